// Dataset list reading (dataset.json, text list, folder, DICOM folder), the refusal of volumes
// listed twice, and the validation split.
#include "data/dataset.h"

#include <nlohmann/json.hpp>

#include <dirent.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <random>

#include "core/error.h"
#include "core/json_reader.h"
#include "io/io.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

// Where a listed volume came from, for messages: "\"training\"[3]", "line 7", "" (folder scan).
struct Listed {
  DatasetSplit split;
  std::vector<std::string> training_where, validation_where;
  bool scanned = false;  // from a folder scan: entries that cannot be opened are for the check to refuse
};

[[noreturn]] void refuse(const std::string& message, const std::string& cause = "") {
  throw InputError(printable(message), cause);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && std::equal(suffix.rbegin(), suffix.rend(), s.rbegin(),
                                                 [](char a, char b) { return std::tolower(a) == std::tolower(b); });
}

std::string resolve(const fs::path& base, const std::string& p) {
  fs::path q(p);
  if (q.is_relative()) q = base / q;
  return q.lexically_normal().string();
}

// The entries of a folder, never throwing: `error` receives why it could not be listed (or was
// listed only in part).
std::vector<fs::path> list_folder(const fs::path& dir, std::string* error) {
  std::vector<fs::path> out;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  for (const fs::directory_iterator end; !ec && it != end; it.increment(ec)) out.push_back(it->path());
  if (ec && error) *error = ec.message();
  return out;
}

DatasetEntry json_entry(const nlohmann::json& e, const fs::path& base, const std::string& where) {
  DatasetEntry out;
  const nlohmann::json* image = &e;
  if (e.is_object()) {
    if (!e.contains("image")) refuse(where + " has no \"image\"");
    image = &e.at("image");
    if (e.contains("series_uid")) {
      if (!e.at("series_uid").is_string()) refuse(where + ": \"series_uid\" must be a string");
      out.series_uid = e.at("series_uid").get<std::string>();
    }
  }
  if (image->is_string()) {
    out.paths.push_back(resolve(base, image->get<std::string>()));
  } else if (image->is_array() && !image->empty()) {
    for (const auto& p : *image) {
      if (!p.is_string()) refuse(where + ": \"image\" list holds " + p.dump() + ", not a path string");
      out.paths.push_back(resolve(base, p.get<std::string>()));
    }
  } else {
    refuse(where + ": \"image\" = " + image->dump() + " must be a path string or a list of path strings");
  }
  return out;
}

void json_section(const nlohmann::json& j, const std::string& key, const fs::path& base, const std::string& file,
                  std::vector<DatasetEntry>* out, std::vector<std::string>* where) {
  const auto& arr = j.at(key);
  if (!arr.is_array()) refuse(file + ": \"" + key + "\" must be an array");
  for (size_t i = 0; i < arr.size(); ++i) {
    where->push_back("\"" + key + "\"[" + std::to_string(i) + "]");
    out->push_back(json_entry(arr[i], base, file + ": " + where->back()));
  }
}

Listed read_json(const std::string& path) {
  const nlohmann::json j = read_json_file<InputError>(path, "dataset list");
  if (!j.is_object()) refuse(path + ": a dataset.json must be a JSON object");
  if (!j.contains("training")) refuse(path + ": has no \"training\" list");
  const fs::path base = fs::path(path).parent_path();
  Listed l;
  json_section(j, "training", base, path, &l.split.training, &l.training_where);
  if (j.contains("validation")) json_section(j, "validation", base, path, &l.split.validation, &l.validation_where);
  return l;
}

Listed read_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) refuse(path + ": cannot open the dataset list");
  const fs::path base = fs::path(path).parent_path();
  Listed l;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    const auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos || line[b] == '#') continue;
    const auto e = line.find_last_not_of(" \t\r");
    l.split.training.push_back({{resolve(base, line.substr(b, e - b + 1))}, ""});
    l.training_where.push_back("line " + std::to_string(number));
  }
  return l;
}

bool can_list_folder(const fs::path& dir) {
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  return !ec;
}

Listed read_folder(const std::string& path) {
  std::string error;
  const std::vector<fs::path> all = list_folder(path, &error);
  if (!error.empty()) refuse(path + ": cannot read the dataset folder: " + error, "permission denied");
  std::vector<std::string> names;
  for (const auto& p : all) {
    const std::string name = p.filename().string();
    std::error_code ec;
    const fs::file_status st = fs::status(p, ec);  // follows symbolic links
    if (ec || !fs::exists(st)) {
      // A link loop, a broken link, ...: what it is cannot be told, so list it when its name may be
      // a volume or a DICOM folder; the check then refuses it by name instead of it vanishing.
      if (is_volume_file(name) || p.extension().empty()) names.push_back(p.string());
    } else if (fs::is_directory(st)) {
      if (name == "lost+found") continue;  // a file system's own folder, never data
      if (!can_list_folder(p) || is_dicom_folder(p.string())) names.push_back(p.string());
    } else if (fs::is_regular_file(st) && is_volume_file(name)) {
      names.push_back(p.string());
    }
  }
  std::sort(names.begin(), names.end());
  Listed l;
  l.scanned = true;
  for (auto& n : names) {
    l.split.training.push_back({{fs::path(n).lexically_normal().string()}, ""});
    l.training_where.emplace_back();
  }
  return l;
}

// A folder holding DICOM files itself: its one series, or a refusal listing them all.
Listed read_dicom_dataset(const std::string& path) {
  const std::vector<DicomSeriesInfo> series = list_dicom_series(path);
  if (series.size() > 1) {
    std::string list;
    for (const auto& s : series) {
      list += (list.empty() ? "" : ", ") + s.uid + (s.description.empty() ? "" : " \"" + s.description + "\"") + " (" +
              std::to_string(s.num_slices) + (s.num_slices == 1 ? " file)" : " files)");
    }
    refuse(path + ": the folder holds " + std::to_string(series.size()) + " DICOM series: " + list +
               "; pick one in a dataset.json: {\"training\": [{\"image\": \"" + path + "\", \"series_uid\": \"" +
               series.front().uid + "\"}]} (one entry per series to use several)",
           input_cause::kAmbiguousSeries);
  }
  Listed l;
  l.split.training.push_back({{fs::path(path).lexically_normal().string()}, ""});
  l.training_where.emplace_back();
  return l;
}

// What makes two listed paths the same volume: the file itself (device and inode, so symbolic
// and hard links count) when it exists, else its absolute, symlink-resolved path.
struct Identity {
  std::string file;
  bool is_folder = false;
};

Identity identity_of(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    return {"inode:" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino), S_ISDIR(st.st_mode)};
  }
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec);
  const fs::path canon = fs::weakly_canonical(abs, ec);
  return {"path:" + (ec ? abs.lexically_normal() : canon).string(), false};
}

void refuse_duplicates(const Listed& l, const std::string& list) {
  struct Seen {
    std::string path, where, series_uid;
    bool is_folder;
    size_t entry;
  };
  std::map<std::string, std::vector<Seen>> seen;
  size_t index = 0;
  for (const auto* part : {&l.split.training, &l.split.validation}) {
    const auto& where = part == &l.split.training ? l.training_where : l.validation_where;
    for (size_t i = 0; i < part->size(); ++i, ++index) {
      const DatasetEntry& e = (*part)[i];
      for (const auto& p : e.paths) {
        const Identity id = identity_of(p);
        auto& same = seen[id.file];
        for (const Seen& s : same) {
          // One DICOM folder may hold several series: it is the same volume only for the same
          // series, or when either names none (then it must hold just one).
          if (id.is_folder && !s.series_uid.empty() && !e.series_uid.empty() && s.series_uid != e.series_uid) {
            continue;
          }
          auto at = [](const std::string& w) { return w.empty() ? std::string() : " (" + w + ")"; };
          const std::string what = id.is_folder ? "the same DICOM series as " : "the same file as ";
          if (s.entry == index) {
            refuse(list + ": " + where[i] + " lists " + p + " twice" +
                       (p == s.path ? std::string() : " (also as " + s.path + ")") + "; list each channel once",
                   "duplicate volume");
          }
          refuse(list + ": " + p + at(where[i]) + " is " + what + s.path + at(s.where) +
                     "; list each volume once (a volume in both training and validation leaks validation data)",
                 "duplicate volume");
        }
        same.push_back({p, i < where.size() ? where[i] : "", e.series_uid, id.is_folder, index});
      }
    }
  }
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
  int looked = 0;
  for (const auto& p : list_folder(dir, nullptr)) {
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) continue;
    if (ends_with(p.string(), ".dcm")) return true;
    if (++looked > 8) break;
    std::ifstream f(p, std::ios::binary);
    char buf[132] = {};
    if (f.read(buf, 132) && std::string(buf + 128, 4) == "DICM") return true;
  }
  return false;
}

std::string path_problem(const std::string& path, std::string* cause) {
  auto label = [&](const char* c) {
    if (cause) *cause = c;
  };
  label("");
  struct stat st;
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      DIR* d = ::opendir(path.c_str());
      if (!d) {
        const int err = errno;
        label(err == EACCES ? "permission denied" : input_cause::kUnreadable);
        return "cannot read the folder: " + std::string(std::strerror(err));
      }
      ::closedir(d);
    } else if (::access(path.c_str(), R_OK) != 0) {
      label("permission denied");
      return "cannot read the file: " + std::string(std::strerror(errno));
    }
    return "";
  }
  const int err = errno;
  std::error_code ec;
  const fs::path target = fs::read_symlink(path, ec);
  const std::string link = ec ? std::string() : " (a symbolic link to " + target.string();
  if (err == ELOOP) {
    label("symlink loop");
    return "symbolic link loop" + (link.empty() ? std::string() : link + ", which leads back to itself)");
  }
  if (err == ENOENT && !link.empty()) {
    label(input_cause::kMissingFile);
    return "broken symbolic link" + link + ", which does not exist)";
  }
  if (err == ENOENT || err == ENOTDIR) {
    label(input_cause::kMissingFile);
    return "file not found";
  }
  if (err == EACCES) {
    label("permission denied");
    return "permission denied (a folder on the path cannot be searched)";
  }
  label(input_cause::kUnreadable);
  return std::strerror(err);
}

DatasetSplit read_dataset(const std::string& path, bool require_files) {
  std::string cause;
  const std::string problem = path_problem(path, &cause);
  if (!problem.empty()) refuse(path + ": cannot read the dataset list (\"data.dataset\"): " + problem, cause);
  std::error_code ec;
  Listed l;
  if (fs::is_directory(path, ec)) {
    l = read_folder(path);
    if (is_dicom_folder(path)) {
      if (l.split.training.empty()) {
        l = read_dicom_dataset(path);
      } else {
        spdlog::warn(
            "{}: the folder also holds DICOM files itself; they are not listed (name the folder in a "
            "dataset.json entry to use them)",
            printable(path));
      }
    }
  } else if (ends_with(path, ".json")) {
    l = read_json(path);
  } else if (is_volume_file(path)) {
    l.split.training.push_back({{fs::path(path).lexically_normal().string()}, ""});
    l.training_where.emplace_back();
  } else {
    l = read_text(path);
  }
  if (l.split.training.empty()) refuse(path + ": the dataset lists no training volumes");
  if (require_files && !l.scanned) {
    for (const auto* part : {&l.split.training, &l.split.validation}) {
      for (const auto& e : *part) {
        for (const auto& p : e.paths) {
          const std::string why = path_problem(p, &cause);
          if (!why.empty()) refuse(p + ": " + why + " (listed in " + path + ")", cause);
        }
      }
    }
  }
  refuse_duplicates(l, path);
  return std::move(l.split);
}

DatasetSplit split_validation(DatasetSplit split, double val_fraction, uint64_t seed) {
  const size_t n = split.training.size();
  if (!split.validation.empty() || !(val_fraction > 0.0) || n < 2) return split;
  size_t n_val = static_cast<size_t>(std::llround(val_fraction * static_cast<double>(n)));
  n_val = std::clamp<size_t>(n_val, 1, n - 1);
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed ^ 0x76616C5F73706C74ULL);                               // "val_splt"
  for (size_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);  // Fisher-Yates
  std::vector<bool> is_val(n, false);
  for (size_t i = 0; i < n_val; ++i) is_val[order[i]] = true;
  DatasetSplit out;
  for (size_t i = 0; i < n; ++i) (is_val[i] ? out.validation : out.training).push_back(std::move(split.training[i]));
  return out;
}

}  // namespace mae
