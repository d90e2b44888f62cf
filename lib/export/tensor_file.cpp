#include "export/tensor_file.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/pickle.h"

namespace fs = std::filesystem;

namespace mae {

void save_tensor_dict(const NamedTensors& tensors, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  std::set<std::string> seen;
  std::set<const void*> storages;
  for (const auto& [name, tensor] : tensors) {
    if (!seen.insert(name).second) throw Error("save_tensor_dict: duplicate key \"" + name + "\" for " + path);
    TORCH_CHECK(tensor.defined(), "save_tensor_dict: tensor \"", name, "\" is undefined");
    auto t = tensor.detach().to(at::kCPU);
    if (at::isFloatingType(t.scalar_type())) t = t.to(at::kFloat);
    // torch.save writes whole storages: a view would drag its base along and two entries on one
    // storage would come back shared. Copy unless the tensor owns exactly its own storage.
    const bool owns_storage = t.is_contiguous() && t.storage_offset() == 0 &&
                              t.storage().nbytes() == static_cast<size_t>(t.numel()) * t.element_size() &&
                              storages.insert(t.storage().data()).second;
    if (!owns_storage) {
      t = t.clone(at::MemoryFormat::Contiguous);
      storages.insert(t.storage().data());
    }
    dict.insert(name, t);
  }
  std::vector<char> bytes;
  try {
    bytes = pickle_untagged(c10::IValue(dict));
  } catch (const c10::Error& e) {
    throw Error(path + ": cannot serialise the tensors: " + e.what_without_backtrace());
  }
  write_file_atomically(path, [&](const ByteSink& sink) { sink(bytes.data(), bytes.size()); });
}

NamedTensors load_tensor_dict(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": missing or unreadable");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const c10::Error& e) {
    throw InputError(path + ": not a torch.save file: " + e.what_without_backtrace());
  }
  if (!value.isGenericDict()) throw InputError(path + ": does not hold a dict");
  NamedTensors out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw InputError(path + ": holds a dict that is not dict[str, Tensor]");
    }
    out.emplace_back(item.key().toStringRef(), item.value().toTensor());
  }
  return out;
}

void write_json_file(const nlohmann::json& value, const std::string& path) {
  write_file_atomically(path, value.dump(2) + "\n");
}

std::string description_path(const std::string& pt_path) {
  fs::path p(pt_path);
  if (p.extension() == ".pt") return p.replace_extension(".json").string();
  return pt_path + ".json";
}

void check_output_folder(const std::string& path, const std::string& flag) {
  if (path.empty()) throw ConfigError(flag + " is empty; give the file to write");
  const fs::path parent = fs::path(path).parent_path();
  const fs::path folder = parent.empty() ? fs::path(".") : parent;
  std::error_code ec;
  if (!fs::is_directory(folder, ec)) {
    throw IoError(flag + " " + path + ": cannot write: the folder " + folder.string() + " does not exist");
  }
  if (fs::is_directory(path, ec)) throw IoError(flag + " " + path + ": cannot write: it is a folder");
  if (::access(folder.c_str(), W_OK) != 0) {
    throw IoError(flag + " " + path + ": cannot write into " + folder.string() + ": " + std::strerror(errno));
  }
}

}  // namespace mae
