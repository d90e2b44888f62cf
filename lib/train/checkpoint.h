// Checkpoint folders: written atomically (temporary folder, files flushed to disk, rename, then the
// `latest` pointer), read back with the format checked first, and pruned to the last K plus the
// best by validation loss. Layout of <run>/checkpoints/step_00000123/:
//   model.pt            model parameters (LibTorch archive)
//   optimizer.pt        AdamW moments and step count (absent in model-only checkpoints)
//   rng.pt              random generator states
//   trainer_state.json  step, loader position and counters
//   config.json         the resolved run config
//   meta.json           format, versions, step, diverged flag, validation loss
#pragma once

#include <torch/nn/module.h>
#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "train/adamw.h"

namespace mae {

/// Checkpoint format version written into meta.json; loading refuses other versions.
constexpr int kCheckpointFormatVersion = 1;

/// What a checkpoint records besides tensors.
struct CheckpointInfo {
  int64_t step = 0;                ///< optimizer steps done
  nlohmann::json config;           ///< resolved run config
  nlohmann::json trainer_state;    ///< step, loader position, counters
  bool diverged = false;           ///< written because the loss became non-finite
  std::optional<double> val_loss;  ///< validation loss at this step, when measured
};

/// Folder name of the checkpoint of `step` ("step_00000123").
std::string checkpoint_name(int64_t step);

/// Writes <run_dir>/checkpoints/step_N atomically and updates `latest`; returns the folder. A
/// diverged checkpoint goes to diverged_step_N and leaves `latest` alone.
/// IoError naming the path when anything cannot be written (the previous checkpoints stay intact).
std::string save_checkpoint(const std::string& run_dir, const CheckpointInfo& info, torch::nn::Module& model,
                            const AdamW* optimizer, const std::map<std::string, at::Tensor>& rng);

/// The checkpoint folder meant by `path`: a checkpoint folder itself, or a run folder (its
/// `latest`, else its newest complete checkpoint). CheckpointError naming the path when none.
std::string resolve_checkpoint(const std::string& path);

/// The newest complete checkpoint of a run folder, or "" when it has none.
std::string latest_checkpoint(const std::string& run_dir);

/// Reads meta.json, config.json and trainer_state.json of a checkpoint folder, checking the format
/// and version first. CheckpointError naming the file for a damaged or foreign checkpoint.
CheckpointInfo read_checkpoint_info(const std::string& dir);

/// Loads model.pt into `model` (names and shapes must match). CheckpointError naming the file.
void load_model(const std::string& dir, torch::nn::Module& model);

/// Loads optimizer.pt into `optimizer`. CheckpointError naming the file.
void load_optimizer(const std::string& dir, AdamW& optimizer);

/// Loads rng.pt. CheckpointError naming the file.
std::map<std::string, at::Tensor> load_rng(const std::string& dir);

/// Deletes checkpoints of `run_dir` beyond the newest `keep_last`, keeping the one with the lowest
/// validation loss and the one `latest` names; also removes temporary folders of crashed writes.
void prune_checkpoints(const std::string& run_dir, int64_t keep_last);

/// Deletes the checkpoints of `run_dir` after `step` (a resume from `step` abandons them).
void remove_checkpoints_after(const std::string& run_dir, int64_t step);

/// Removes temporary folders left by interrupted checkpoint writes.
void remove_partial_checkpoints(const std::string& run_dir);

}  // namespace mae
