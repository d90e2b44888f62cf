// Dataset list reading (dataset.json, text list, folder) and the validation split.
#include "data/dataset.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "core/error.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && std::equal(suffix.rbegin(), suffix.rend(), s.rbegin(),
                                                 [](char a, char b) { return std::tolower(a) == std::tolower(b); });
}

std::string resolve(const fs::path& base, const std::string& p) {
  fs::path q(p);
  if (q.is_relative()) q = base / q;
  return q.lexically_normal().string();
}

void require_exists(const std::string& path, const std::string& list) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError(path + ": file not found (listed in " + list + ")");
}

DatasetEntry json_entry(const nlohmann::json& e, const fs::path& base, const std::string& where) {
  DatasetEntry out;
  const nlohmann::json* image = &e;
  if (e.is_object()) {
    if (!e.contains("image")) throw InputError(where + " has no \"image\"");
    image = &e.at("image");
    if (e.contains("series_uid")) {
      if (!e.at("series_uid").is_string()) throw InputError(where + ": \"series_uid\" must be a string");
      out.series_uid = e.at("series_uid").get<std::string>();
    }
  }
  if (image->is_string()) {
    out.paths.push_back(resolve(base, image->get<std::string>()));
  } else if (image->is_array() && !image->empty()) {
    for (const auto& p : *image) {
      if (!p.is_string()) throw InputError(where + ": \"image\" list holds " + p.dump() + ", not a path string");
      out.paths.push_back(resolve(base, p.get<std::string>()));
    }
  } else {
    throw InputError(where + ": \"image\" = " + image->dump() + " must be a path string or a list of path strings");
  }
  return out;
}

std::vector<DatasetEntry> json_section(const nlohmann::json& j, const std::string& key, const fs::path& base,
                                       const std::string& file) {
  const auto& arr = j.at(key);
  if (!arr.is_array()) throw InputError(file + ": \"" + key + "\" must be an array");
  std::vector<DatasetEntry> out;
  for (size_t i = 0; i < arr.size(); ++i) {
    out.push_back(json_entry(arr[i], base, file + ": \"" + key + "\"[" + std::to_string(i) + "]"));
  }
  return out;
}

DatasetSplit read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open the dataset list");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw InputError(path + ": a dataset.json must be a JSON object");
  if (!j.contains("training")) throw InputError(path + ": has no \"training\" list");
  const fs::path base = fs::path(path).parent_path();
  DatasetSplit s;
  s.training = json_section(j, "training", base, path);
  if (j.contains("validation")) s.validation = json_section(j, "validation", base, path);
  return s;
}

DatasetSplit read_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw InputError(path + ": cannot open the dataset list");
  const fs::path base = fs::path(path).parent_path();
  DatasetSplit s;
  std::string line;
  while (std::getline(in, line)) {
    const auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos || line[b] == '#') continue;
    const auto e = line.find_last_not_of(" \t\r");
    s.training.push_back({{resolve(base, line.substr(b, e - b + 1))}, ""});
  }
  return s;
}

DatasetSplit read_folder(const std::string& path) {
  std::vector<std::string> names;
  for (const auto& it : fs::directory_iterator(path)) {
    const std::string p = it.path().string();
    if (it.is_directory() ? is_dicom_folder(p) : (it.is_regular_file() && is_volume_file(p))) names.push_back(p);
  }
  std::sort(names.begin(), names.end());
  DatasetSplit s;
  for (auto& n : names) s.training.push_back({{fs::path(n).lexically_normal().string()}, ""});
  return s;
}

}  // namespace

std::string DatasetEntry::name() const {
  std::string out;
  for (const auto& p : paths) out += (out.empty() ? "" : " + ") + p;
  if (!series_uid.empty()) out += " [series " + series_uid + "]";
  return out;
}

bool is_volume_file(const std::string& path) {
  for (const char* ext : {".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr"}) {
    if (ends_with(path, ext)) return true;
  }
  return false;
}

bool is_dicom_folder(const std::string& dir) {
  std::error_code ec;
  int looked = 0;
  for (const auto& it : fs::directory_iterator(dir, ec)) {
    if (!it.is_regular_file(ec)) continue;
    if (ends_with(it.path().string(), ".dcm")) return true;
    if (++looked > 8) break;
    std::ifstream f(it.path(), std::ios::binary);
    char buf[132] = {};
    if (f.read(buf, 132) && std::string(buf + 128, 4) == "DICM") return true;
  }
  return false;
}

DatasetSplit read_dataset(const std::string& path, bool require_files) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError(path + ": dataset list not found (\"data.dataset\")");
  DatasetSplit s;
  if (fs::is_directory(path, ec)) {
    s = read_folder(path);
  } else if (ends_with(path, ".json")) {
    s = read_json(path);
  } else if (is_volume_file(path)) {
    s.training.push_back({{fs::path(path).lexically_normal().string()}, ""});
  } else {
    s = read_text(path);
  }
  if (s.training.empty()) throw InputError(path + ": the dataset lists no training volumes");
  if (require_files) {
    for (const auto* part : {&s.training, &s.validation}) {
      for (const auto& e : *part) {
        for (const auto& p : e.paths) require_exists(p, path);
      }
    }
  }
  return s;
}

DatasetSplit split_validation(DatasetSplit split, double val_fraction, uint64_t seed) {
  const size_t n = split.training.size();
  if (!split.validation.empty() || !(val_fraction > 0.0) || n < 2) return split;
  size_t n_val = static_cast<size_t>(std::llround(val_fraction * static_cast<double>(n)));
  n_val = std::clamp<size_t>(n_val, 1, n - 1);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed ^ 0x76616C5F73706C74ULL);  // "val_splt"
  for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);  // Fisher-Yates
  std::vector<bool> is_val(n, false);
  for (size_t i = 0; i < n_val; ++i) is_val[order[i]] = true;
  DatasetSplit out;
  for (size_t i = 0; i < n; ++i) (is_val[i] ? out.validation : out.training).push_back(std::move(split.training[i]));
  return out;
}

}  // namespace mae
