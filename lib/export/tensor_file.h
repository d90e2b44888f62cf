// Files that Python reads without mae3d: a `dict[str, Tensor]` in torch.save's format (what
// `torch.load(path)` returns as a plain dict, keys in the order given) and JSON descriptions beside
// it. Both are written to a temporary name in the target folder, flushed and renamed, so a reader
// never sees half a file and a failed write leaves any previous file intact.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

namespace mae {

/// Named tensors in a fixed order (the order of the keys in the written dict).
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

/// Writes `tensors` as a pickled dict[str, Tensor] that Python's torch.load reads (also with
/// weights_only=True, the default since PyTorch 2.6: no TorchScript type tags): CPU, contiguous,
/// floating types as float32, integer types kept (origins are int64). Views and entries sharing a
/// storage are copied first, so each entry is written with its own storage of exactly its size.
/// IoError naming `path` when it cannot be written; Error on a duplicate key.
void save_tensor_dict(const NamedTensors& tensors, const std::string& path);

/// Reads a file written by save_tensor_dict (or torch.save of a dict[str, Tensor]), keys in file
/// order. InputError naming `path` when it is missing or not such a dict.
NamedTensors load_tensor_dict(const std::string& path);

/// Writes `value` as indented JSON atomically. IoError naming `path` on failure.
void write_json_file(const nlohmann::json& value, const std::string& path);

/// The JSON description beside an exported file: "x/model.pt" -> "x/model.json" (".json" appended
/// when the name has no ".pt" extension).
std::string description_path(const std::string& pt_path);

/// Throws IoError naming `flag` and `path` when the folder of `path` does not exist or is not a
/// folder, so that long work is not done for a file that cannot be written.
void check_output_folder(const std::string& path, const std::string& flag);

}  // namespace mae
