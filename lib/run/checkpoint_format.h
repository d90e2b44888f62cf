// Internal to the checkpoint code (run/checkpoint.cpp reads, train/checkpoint.cpp writes): the
// pieces of the folder format both halves need, defined once in run/checkpoint.cpp.
#pragma once

#include <torch/serialize/input-archive.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <exception>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "run/checkpoint.h"

namespace mae::run_detail {

/// meta.json's "format".
constexpr const char* kFormat = "mae3d-checkpoint";
/// Extra entries of every .pt archive: the run id's bytes (uint8) and the step (int64).
constexpr const char* kRunIdKey = "mae3d_run_id";
constexpr const char* kStepKey = "mae3d_step";

/// FNV-1a over the canonical text of a JSON value (keys sorted), to tie config.json to meta.json.
std::string digest_of(const nlohmann::json& j);

/// An exception's message, without LibTorch's backtrace.
std::string what_of(const std::exception& e);

/// "[2, 3, 4]".
std::string shape_text(at::IntArrayRef sizes);

/// Complete checkpoints of a run (folders step_N with a meta.json), oldest first.
std::vector<std::pair<int64_t, std::filesystem::path>> list_checkpoints(const std::string& run_dir);

/// Opens `path` read-only for flock, or -1.
int open_for_lock(const std::filesystem::path& path);

/// Checks the run-id and step entries of a loaded archive against meta.json's (`info`).
/// CheckpointError naming `file` when they are missing, damaged or of another run or step.
void check_stamp(torch::serialize::InputArchive& archive, const std::string& file, const CheckpointInfo& info);

}  // namespace mae::run_detail
