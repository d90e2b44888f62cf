#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <torch/serialize.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <thread>

#include "core/error.h"
#include "core/json_reader.h"
#include "core/printable.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

constexpr const char* kFormat = "mae3d-checkpoint";
constexpr const char* kRunIdKey = "mae3d_run_id";  // extra entries of every .pt archive
constexpr const char* kStepKey = "mae3d_step";

std::string errno_text() { return std::strerror(errno); }

// Flushes a file or folder to disk so a rename after it cannot expose unwritten data.
void sync_path(const fs::path& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) throw IoError(path.string() + ": cannot open to flush: " + errno_text());
  const int rc = ::fsync(fd);
  const std::string why = rc != 0 ? errno_text() : "";
  ::close(fd);
  if (rc != 0) throw IoError(path.string() + ": cannot flush to disk: " + why);
}

// Writes an archive to `path` and flushes it to disk. LibTorch's own save_to(filename) throws from
// a destructor when the disk fills up, which ends the process; here the bytes go through our own
// write calls, a failure is remembered, and the archive writer always sees success.
void save_archive(torch::serialize::OutputArchive& archive, const fs::path& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw IoError(path.string() + ": cannot create: " + errno_text());
  int error = 0;
  archive.save_to([&](const void* data, size_t n) -> size_t {
    const char* p = static_cast<const char*>(data);
    size_t left = error == 0 ? n : 0;
    while (left > 0) {
      const ssize_t written = ::write(fd, p, left);
      if (written < 0) {
        if (errno == EINTR) continue;
        error = errno;
        break;
      }
      p += written;
      left -= static_cast<size_t>(written);
    }
    return n;
  });
  if (error == 0 && ::fsync(fd) != 0) error = errno;
  ::close(fd);
  if (error != 0) throw IoError(path.string() + ": cannot write: " + std::strerror(error));
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) throw IoError(path.string() + ": cannot write: " + errno_text());
  out.close();
  sync_path(path, false);
}

// Strict: a key given twice in a checkpoint file is damage, not something to pick from.
nlohmann::json read_json(const fs::path& path) {
  if (!fs::exists(path)) throw CheckpointError(printable(path.string()) + ": missing");
  return read_json_file<CheckpointError>(path.string(), "checkpoint file");
}

// FNV-1a over the canonical text of a JSON value (keys sorted), to tie config.json to meta.json.
std::string digest_of(const nlohmann::json& j) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (const unsigned char c : j.dump()) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string type_name(const nlohmann::json& v) {
  if (v.is_number_float()) return "the fraction " + v.dump();
  if (v.is_boolean()) return "the boolean " + v.dump();
  if (v.is_string()) return "the string " + v.dump();
  if (v.is_null()) return "null";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return v.dump();
}

// An integer field in [lo, hi]; CheckpointError naming the file and field otherwise.
int64_t int_field(const nlohmann::json& j, const char* key, int64_t lo, int64_t hi, const std::string& file,
                  bool required = true, int64_t fallback = 0) {
  if (!j.contains(key)) {
    if (!required) return fallback;
    throw CheckpointError(file + ": \"" + key + "\" is missing");
  }
  const auto& v = j.at(key);
  auto range = [&] { return " (expected an integer from " + std::to_string(lo) + " to " + std::to_string(hi) + ")"; };
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(hi))
      throw CheckpointError(file + ": \"" + key + "\" = " + v.dump() + " is out of range" + range());
    return static_cast<int64_t>(u);
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < lo || i > hi)
      throw CheckpointError(file + ": \"" + key + "\" = " + v.dump() + " is out of range" + range());
    return i;
  }
  throw CheckpointError(file + ": \"" + key + "\" is " + type_name(v) + range());
}

// A finite number >= 0 or null (absent = null).
std::optional<double> optional_number(const nlohmann::json& j, const char* key, const std::string& file) {
  if (!j.contains(key) || j.at(key).is_null()) return std::nullopt;
  const auto& v = j.at(key);
  if (!v.is_number() || v.is_boolean()) {
    throw CheckpointError(file + ": \"" + key + "\" is " + type_name(v) + " (expected a number >= 0 or null)");
  }
  const double d = v.get<double>();
  if (!std::isfinite(d) || d < 0.0) {
    throw CheckpointError(file + ": \"" + key + "\" = " + v.dump() +
                          " is out of range (expected a number >= 0 or null)");
  }
  return d;
}

std::string string_field(const nlohmann::json& j, const char* key, const std::string& file, bool required = true) {
  if (!j.contains(key)) {
    if (!required) return "";
    throw CheckpointError(file + ": \"" + key + "\" is missing");
  }
  if (!j.at(key).is_string())
    throw CheckpointError(file + ": \"" + key + "\" is " + type_name(j.at(key)) + " (expected a string)");
  return j.at(key).get<std::string>();
}

bool valid_run_id(const std::string& id) {
  return !id.empty() && id.size() <= 64 &&
         id.find_first_not_of("0123456789abcdefghijklmnopqrstuvwxyz-") == std::string::npos;
}

std::string run_id_field(const nlohmann::json& j, const std::string& file) {
  const std::string id = string_field(j, "run_id", file);
  if (!valid_run_id(id))
    throw CheckpointError(file + ": \"run_id\" = " + nlohmann::json(id).dump() + " is not a run id");
  return id;
}

void check_keys(const nlohmann::json& j, const std::set<std::string>& known, const std::string& file) {
  for (const auto& [key, value] : j.items()) {
    (void)value;
    if (!known.count(key)) throw CheckpointError(file + ": unknown field \"" + key + "\"");
  }
}

int64_t step_of(const std::string& name) {
  if (name.rfind("step_", 0) != 0 || name.size() <= 5) return -1;
  if (name.size() > 5 + 18 || name.find_first_not_of("0123456789", 5) != std::string::npos) return -1;
  return std::stoll(name.substr(5));
}

// Complete checkpoints of a run (folders step_N with a meta.json), oldest first.
std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  const fs::path dir = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return found;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int64_t step = step_of(e.path().filename().string());
    if (step >= 0 && e.is_directory() && fs::exists(e.path() / "meta.json")) found.emplace_back(step, e.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::string what_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string shape_text(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

// The run-id and step entries every .pt archive carries.
void stamp_archive(torch::serialize::OutputArchive& archive, const std::string& run_id, int64_t step) {
  auto id = torch::empty({static_cast<int64_t>(run_id.size())}, torch::kUInt8);
  std::memcpy(id.data_ptr<uint8_t>(), run_id.data(), run_id.size());
  archive.write(kRunIdKey, id, /*is_buffer=*/true);
  archive.write(kStepKey, torch::tensor(step, torch::kInt64), /*is_buffer=*/true);
}

// Checks the stamp of a loaded archive against meta.json's run id and step.
void check_stamp(torch::serialize::InputArchive& archive, const std::string& file, const CheckpointInfo& info) {
  c10::IValue id_value, step_value;
  if (!archive.try_read(kRunIdKey, id_value) || !id_value.isTensor() || !archive.try_read(kStepKey, step_value) ||
      !step_value.isTensor()) {
    throw CheckpointError(file +
                          ": carries no run id and step (not written by this mae3d checkpoint format, or "
                          "copied in from elsewhere)");
  }
  const auto id_tensor = id_value.toTensor().contiguous();
  const auto step_tensor = step_value.toTensor();
  if (id_tensor.scalar_type() != torch::kUInt8 || id_tensor.dim() != 1 || id_tensor.numel() > 64 ||
      step_tensor.scalar_type() != torch::kInt64 || step_tensor.numel() != 1) {
    throw CheckpointError(file + ": damaged run id or step entry");
  }
  const std::string id(reinterpret_cast<const char*>(id_tensor.data_ptr<uint8_t>()),
                       static_cast<size_t>(id_tensor.numel()));
  const int64_t step = step_tensor.item<int64_t>();
  if (id != info.run_id) {
    throw CheckpointError(file + ": belongs to run " + id + ", but meta.json says run " + info.run_id +
                          " (a part of another run was copied into this checkpoint)");
  }
  if (step != info.step) {
    throw CheckpointError(file + ": was written at step " + std::to_string(step) + ", but meta.json says step " +
                          std::to_string(info.step) + " (a part of another checkpoint was copied in)");
  }
}

// Every tensor of an archive under its dotted name (sub-archives recursively), stamps left out.
void flatten(torch::serialize::InputArchive& archive, const std::string& prefix,
             std::vector<std::pair<std::string, at::Tensor>>& out) {
  for (const auto& key : archive.keys()) {
    if (prefix.empty() && (key == kRunIdKey || key == kStepKey)) continue;
    c10::IValue value;
    if (archive.try_read(key, value) && value.isTensor()) {
      out.emplace_back(prefix + key, value.toTensor());
      continue;
    }
    torch::serialize::InputArchive child;
    if (archive.try_read(key, child)) flatten(child, prefix + key + ".", out);
  }
}

// Opens `path` read-only, or -1.
int open_for_lock(const fs::path& path) { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }

// Tries to take an exclusive flock for up to `wait_s` seconds; true when taken.
bool lock_exclusive(int fd, double wait_s) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_s);
  while (true) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return true;
    if (errno != EWOULDBLOCK && errno != EINTR) return false;
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Deletes a checkpoint folder unless a reader holds it (waiting up to `wait_s` for readers).
// Renamed away under the exclusive lock first, so a reader that opened its meta.json just before
// sees the folder gone once it gets its lock, and resolves again. True when deleted.
bool remove_checkpoint_folder(const fs::path& dir, double wait_s) {
  const int fd = open_for_lock(dir / "meta.json");
  if (fd >= 0 && !lock_exclusive(fd, wait_s)) {
    ::close(fd);
    return false;
  }
  std::error_code ec;
  const fs::path doomed =
      dir.parent_path() / (".tmp-remove-" + dir.filename().string() + "-" + std::to_string(::getpid()));
  fs::rename(dir, doomed, ec);
  if (fd >= 0) ::close(fd);
  fs::remove_all(ec ? dir : doomed, ec);
  return true;
}

}  // namespace

nlohmann::json trainer_state_to_json(const TrainerState& s, const std::string& run_id) {
  return nlohmann::json{{"run_id", run_id},
                        {"step", s.step},
                        {"epoch", s.loader_epoch},
                        {"loader_epoch", s.loader_epoch},
                        {"loader_batch", s.loader_batch},
                        {"nonfinite_skipped", s.nonfinite_skipped},
                        {"smoothed_loss", s.smoothed_loss ? nlohmann::json(*s.smoothed_loss) : nlohmann::json()},
                        {"best_val_loss", s.best_val_loss ? nlohmann::json(*s.best_val_loss) : nlohmann::json()},
                        {"lr_peak", s.lr_peak},
                        {"total_steps", s.total_steps}};
}

TrainerState trainer_state_from_json(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object()) throw CheckpointError(file + ": damaged (not a JSON object)");
  check_keys(j,
             {"run_id", "step", "epoch", "loader_epoch", "loader_batch", "nonfinite_skipped", "smoothed_loss",
              "best_val_loss", "lr_peak", "total_steps"},
             file);
  TrainerState s;
  constexpr int64_t kMax = kMaxCheckpointCount;
  s.step = int_field(j, "step", 0, kMax, file);
  s.loader_epoch = int_field(j, "loader_epoch", 0, kMax, file, false);
  s.loader_batch = int_field(j, "loader_batch", 0, kMax, file, false);
  const int64_t epoch = int_field(j, "epoch", 0, kMax, file, false, s.loader_epoch);
  if (epoch != s.loader_epoch) {
    throw CheckpointError(file + ": \"epoch\" = " + std::to_string(epoch) +
                          " differs from \"loader_epoch\" = " + std::to_string(s.loader_epoch));
  }
  s.nonfinite_skipped = int_field(j, "nonfinite_skipped", 0, kMax, file, false);
  s.total_steps = int_field(j, "total_steps", 0, kMax, file, false);
  s.smoothed_loss = optional_number(j, "smoothed_loss", file);
  s.best_val_loss = optional_number(j, "best_val_loss", file);
  if (const auto lr = optional_number(j, "lr_peak", file)) s.lr_peak = *lr;
  return s;
}

std::string new_run_id() {
  std::random_device device;
  std::mt19937_64 mix((static_cast<uint64_t>(device()) << 32) ^ device() ^
                      static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) ^
                      (static_cast<uint64_t>(::getpid()) << 16));
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(mix()));
  return buf;
}

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointInfo& info, torch::nn::Module& model,
                            const AdamW* optimizer, const std::map<std::string, at::Tensor>& rng) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  const std::string run_id = info.run_id.empty() ? new_run_id() : info.run_id;
  // A diverged checkpoint never replaces a good one and is not what `latest` points to.
  const std::string name = (info.diverged ? "diverged_" : "") + checkpoint_name(info.step);
  const fs::path tmp = root / (".tmp-" + name + "-" + std::to_string(::getpid()));
  const fs::path final_dir = root / name;
  try {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec) throw IoError(root.string() + ": cannot create the checkpoint folder: " + ec.message());
    fs::remove_all(tmp, ec);
    if (!fs::create_directory(tmp, ec) || ec) {
      throw IoError(tmp.string() + ": cannot create: " + (ec ? ec.message() : std::string("exists")));
    }
    try {
      torch::serialize::OutputArchive model_archive;
      model.save(model_archive);
      stamp_archive(model_archive, run_id, info.step);
      save_archive(model_archive, tmp / "model.pt");
      if (optimizer) {
        torch::serialize::OutputArchive opt_archive;
        optimizer->save(opt_archive);
        stamp_archive(opt_archive, run_id, info.step);
        save_archive(opt_archive, tmp / "optimizer.pt");
      }
      torch::serialize::OutputArchive rng_archive;
      for (const auto& [key, value] : rng) rng_archive.write(key, value, /*is_buffer=*/true);
      stamp_archive(rng_archive, run_id, info.step);
      save_archive(rng_archive, tmp / "rng.pt");
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw IoError(tmp.string() + ": cannot write checkpoint tensors: " + what_of(e));
    }
    TrainerState state = info.trainer_state;
    state.step = info.step;
    write_text(tmp / "trainer_state.json", trainer_state_to_json(state, run_id).dump(2));
    write_text(tmp / "config.json", info.config.dump(2));
    nlohmann::json meta = {{"format", kFormat},
                           {"format_version", kCheckpointFormatVersion},
                           {"mae3d_version", MAE3D_VERSION},
                           {"libtorch_version", TORCH_VERSION},
                           {"run_id", run_id},
                           {"step", info.step},
                           {"config_digest", digest_of(info.config)},
                           {"diverged", info.diverged},
                           {"val_loss", info.val_loss ? nlohmann::json(*info.val_loss) : nlohmann::json()}};
    if (info.diverged) meta["diverged_reason"] = info.diverged_reason;
    write_text(tmp / "meta.json", meta.dump(2));  // written last: its presence marks a complete folder
    sync_path(tmp, true);
    // Replacing a folder of the same step: move the old one aside under a temporary name first, so
    // a crash at any point leaves either the old or the new folder complete under the final name.
    // A reader of the old folder is waited for (its lock is held only while it loads).
    const fs::path old_dir = root / (".tmp-old-" + name + "-" + std::to_string(::getpid()));
    const bool replacing = fs::exists(final_dir);
    int old_fd = -1;
    if (replacing) {
      old_fd = open_for_lock(final_dir / "meta.json");
      if (old_fd >= 0) lock_exclusive(old_fd, 60.0);
      fs::rename(final_dir, old_dir);
    }
    fs::rename(tmp, final_dir);
    if (old_fd >= 0) ::close(old_fd);
    sync_path(root, true);
    if (replacing) fs::remove_all(old_dir, ec);
    if (!info.diverged) {
      const fs::path latest_tmp = root / ("latest.tmp-" + std::to_string(::getpid()));
      write_text(latest_tmp, name + "\n");
      fs::rename(latest_tmp, root / "latest");
      sync_path(root, true);
    }
  } catch (const Error&) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  } catch (const fs::filesystem_error& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw IoError(final_dir.string() + ": cannot write checkpoint: " + e.code().message());
  }
  return final_dir.string();
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::ifstream in(root / "latest");
  std::string name;
  if (in && std::getline(in, name) && step_of(name) >= 0 && fs::exists(root / name / "meta.json")) {
    return (root / name).string();
  }
  const auto all = list_checkpoints(run_dir);
  return all.empty() ? std::string() : all.back().second.string();
}

std::string resolve_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw CheckpointError(path + ": no such checkpoint or run folder");
  if (fs::exists(fs::path(path) / "meta.json")) return path;
  const std::string latest = latest_checkpoint(path);
  if (latest.empty()) throw CheckpointError(path + ": not a checkpoint folder and holds no checkpoints");
  return latest;
}

CheckpointInfo read_checkpoint_info(const std::string& dir) {
  const fs::path d(dir);
  const auto meta = read_json(d / "meta.json");
  const std::string meta_path = (d / "meta.json").string();
  CheckpointInfo info;
  if (!meta.is_object() || !meta.contains("format") || meta.at("format") != kFormat) {
    throw CheckpointError(meta_path + ": not an mae3d checkpoint");
  }
  if (!meta.contains("format_version") || meta.at("format_version") != kCheckpointFormatVersion) {
    const std::string found = meta.contains("format_version") ? meta.at("format_version").dump() : "(none)";
    std::string hint;
    if (meta.contains("format_version") && meta.at("format_version").is_number_integer() &&
        meta.at("format_version").get<int64_t>() < kCheckpointFormatVersion) {
      hint =
          "; it was written by an older mae3d (before run ids; mae3d is pre-1.0 and does not convert old "
          "checkpoints): export or reconstruct it with that mae3d, or start a new run";
    }
    throw CheckpointError(meta_path + ": checkpoint format version " + found + " is not supported (expected " +
                          std::to_string(kCheckpointFormatVersion) + ")" + hint);
  }
  check_keys(meta,
             {"format", "format_version", "mae3d_version", "libtorch_version", "run_id", "step", "config_digest",
              "diverged", "diverged_reason", "val_loss"},
             meta_path);
  string_field(meta, "mae3d_version", meta_path, false);
  string_field(meta, "libtorch_version", meta_path, false);
  info.run_id = run_id_field(meta, meta_path);
  info.step = int_field(meta, "step", 0, kMaxCheckpointCount, meta_path);
  if (meta.contains("diverged")) {
    if (!meta.at("diverged").is_boolean()) {
      throw CheckpointError(meta_path + ": \"diverged\" is " + type_name(meta.at("diverged")) +
                            " (expected true or false)");
    }
    info.diverged = meta.at("diverged").get<bool>();
  }
  info.diverged_reason = string_field(meta, "diverged_reason", meta_path, false);
  if (info.diverged && info.diverged_reason.empty()) info.diverged_reason = "the loss became non-finite";
  info.val_loss = optional_number(meta, "val_loss", meta_path);

  const std::string config_path = (d / "config.json").string();
  info.config = read_json(config_path);
  if (!info.config.is_object()) throw CheckpointError(config_path + ": damaged (not a JSON object)");
  const std::string digest = string_field(meta, "config_digest", meta_path);
  if (digest_of(info.config) != digest) {
    throw CheckpointError(config_path + ": is not the config this checkpoint was written with (its digest " +
                          digest_of(info.config) + " differs from meta.json's " + digest +
                          "; copied from another run or edited)");
  }

  const std::string state_path = (d / "trainer_state.json").string();
  const auto state = read_json(state_path);
  info.trainer_state = trainer_state_from_json(state, state_path);
  const std::string state_run = run_id_field(state, state_path);
  if (state_run != info.run_id) {
    throw CheckpointError(state_path + ": belongs to run " + state_run + ", but meta.json says run " + info.run_id +
                          " (a part of another run was copied into this checkpoint)");
  }
  if (info.trainer_state.step != info.step) {
    throw CheckpointError(state_path + ": \"step\" = " + std::to_string(info.trainer_state.step) +
                          ", but meta.json says step " + std::to_string(info.step) +
                          " (parts of different checkpoints mixed)");
  }
  return info;
}

void load_model(const std::string& dir, torch::nn::Module& model, const CheckpointInfo& info) {
  const std::string file = (fs::path(dir) / "model.pt").string();
  if (!fs::exists(file)) throw CheckpointError(file + ": missing");
  std::vector<std::pair<std::string, at::Tensor>> stored;
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(file);
    flatten(archive, "", stored);
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the model weights (damaged): " + what_of(e));
  }
  // In the model's own order, so the first difference reported is the first the model has.
  std::vector<std::pair<std::string, at::Tensor>> expected;
  for (const auto& p : model.named_parameters(/*recurse=*/true)) expected.emplace_back(p.key(), p.value());
  for (const auto& b : model.named_buffers(/*recurse=*/true)) expected.emplace_back(b.key(), b.value());
  std::map<std::string, at::Tensor> by_name(stored.begin(), stored.end());
  std::set<std::string> known;
  std::vector<std::string> problems;
  for (const auto& [name, t] : expected) {
    known.insert(name);
    const auto it = by_name.find(name);
    if (it == by_name.end()) {
      problems.push_back("tensor \"" + name + "\" " + shape_text(t.sizes()) +
                         " of the model its config.json builds is missing");
    } else if (!it->second.sizes().equals(t.sizes())) {
      problems.push_back("tensor \"" + name + "\" has shape " + shape_text(it->second.sizes()) +
                         ", but the model its config.json builds has " + shape_text(t.sizes()));
    } else if (it->second.scalar_type() != t.scalar_type()) {
      problems.push_back("tensor \"" + name + "\" has dtype " + std::string(c10::toString(it->second.scalar_type())) +
                         ", but the model its config.json builds has " + c10::toString(t.scalar_type()));
    }
  }
  for (const auto& [name, t] : stored) {
    if (!known.count(name)) {
      problems.push_back("unexpected tensor \"" + name + "\" " + shape_text(t.sizes()) +
                         " (not in the model its config.json builds)");
    }
  }
  if (!problems.empty()) {
    throw CheckpointError(file + ": " + problems.front() +
                          (problems.size() > 1 ? " (and " + std::to_string(problems.size() - 1) + " more)" : "") +
                          "; the weights are of another architecture than the checkpoint's config");
  }
  check_stamp(archive, file, info);  // after the shapes: another architecture is the clearer message
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : expected) t.copy_(by_name.at(name));
}

void load_optimizer(const std::string& dir, AdamW& optimizer,
                    const std::vector<std::pair<std::string, at::Tensor>>& params, const CheckpointInfo& info) {
  const std::string file = (fs::path(dir) / "optimizer.pt").string();
  if (!fs::exists(file)) throw CheckpointError(file + ": missing");
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(file);
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the optimizer state (damaged): " + what_of(e));
  }
  check_stamp(archive, file, info);
  auto read = [&](const std::string& key) {
    c10::IValue v;
    if (!archive.try_read(key, v) || !v.isTensor()) throw CheckpointError(file + ": entry \"" + key + "\" is missing");
    return v.toTensor();
  };
  auto scalar = [&](const std::string& key) {
    const auto t = read(key);
    if (t.numel() != 1 || t.scalar_type() != torch::kInt64) {
      throw CheckpointError(file + ": entry \"" + key + "\" is not one integer");
    }
    return t.item<int64_t>();
  };
  const int64_t count = scalar("count"), steps = scalar("step");
  if (count != static_cast<int64_t>(params.size())) {
    throw CheckpointError(file + ": holds the state of " + std::to_string(count) + " parameters, the model has " +
                          std::to_string(params.size()));
  }
  if (steps != info.step) {
    throw CheckpointError(file + ": made " + std::to_string(steps) + " optimizer steps, but meta.json says step " +
                          std::to_string(info.step) + " (a part of another checkpoint was copied in)");
  }
  for (size_t i = 0; i < params.size(); ++i) {
    for (const char* kind : {"exp_avg.", "exp_avg_sq."}) {
      const std::string key = kind + std::to_string(i);
      const auto t = read(key);
      const auto& [name, p] = params[i];
      if (!t.sizes().equals(p.sizes())) {
        throw CheckpointError(file + ": \"" + key + "\" (of parameter \"" + name + "\") has shape " +
                              shape_text(t.sizes()) + ", the parameter has " + shape_text(p.sizes()));
      }
      if (t.scalar_type() != p.scalar_type()) {
        throw CheckpointError(file + ": \"" + key + "\" (of parameter \"" + name + "\") has dtype " +
                              c10::toString(t.scalar_type()) + ", the parameter has " + c10::toString(p.scalar_type()));
      }
    }
  }
  try {
    optimizer.load(archive);
  } catch (const CheckpointError& e) {
    throw CheckpointError(file + ": " + e.what());
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the optimizer state: " + what_of(e));
  }
}

std::map<std::string, at::Tensor> load_rng(const std::string& dir, const CheckpointInfo& info) {
  const std::string file = (fs::path(dir) / "rng.pt").string();
  if (!fs::exists(file)) throw CheckpointError(file + ": missing");
  std::map<std::string, at::Tensor> out;
  torch::serialize::InputArchive archive;
  try {
    archive.load_from(file);
    for (const auto& key : archive.keys()) {
      if (key == kRunIdKey || key == kStepKey) continue;
      c10::IValue v;
      if (archive.try_read(key, v) && v.isTensor()) out[key] = v.toTensor();
    }
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the random states: " + what_of(e));
  }
  check_stamp(archive, file, info);
  return out;
}

std::string run_id_of(const std::string& run_dir) {
  const std::string latest = latest_checkpoint(run_dir);
  if (latest.empty()) return "";
  try {
    const auto meta = read_json(fs::path(latest) / "meta.json");
    if (meta.is_object() && meta.contains("run_id") && meta.at("run_id").is_string()) {
      return meta.at("run_id").get<std::string>();
    }
  } catch (const CheckpointError&) {
  }
  return "";
}

CheckpointReadLock::~CheckpointReadLock() { release(); }

CheckpointReadLock::CheckpointReadLock(CheckpointReadLock&& other) noexcept
    : fd_(other.fd_), dir_(std::move(other.dir_)) {
  other.fd_ = -1;
}

CheckpointReadLock& CheckpointReadLock::operator=(CheckpointReadLock&& other) noexcept {
  if (this != &other) {
    release();
    fd_ = other.fd_;
    dir_ = std::move(other.dir_);
    other.fd_ = -1;
  }
  return *this;
}

void CheckpointReadLock::release() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

CheckpointReadLock lock_checkpoint(const std::string& path) {
  for (int attempt = 0;; ++attempt) {
    const std::string dir = resolve_checkpoint(path);
    const fs::path meta = fs::path(dir) / "meta.json";
    const int fd = open_for_lock(meta);
    if (fd >= 0) {
      int rc;
      do {
        rc = ::flock(fd, LOCK_SH);
      } while (rc != 0 && errno == EINTR);
      struct stat held {
      }, now{};
      // Still the folder's meta.json: not renamed away by a prune while we waited for the lock.
      if (rc == 0 && ::fstat(fd, &held) == 0 && ::stat(meta.c_str(), &now) == 0 && held.st_ino == now.st_ino &&
          held.st_dev == now.st_dev) {
        CheckpointReadLock lock;
        lock.fd_ = fd;
        lock.dir_ = dir;
        return lock;
      }
      ::close(fd);
    }
    if (attempt >= 20) throw CheckpointError(dir + ": removed while it was being opened (the run is pruning it)");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

RunLock::RunLock(const std::string& run_dir) {
  const fs::path file = fs::path(run_dir) / "run.lock";
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw IoError(file.string() + ": cannot create the run's lock file: " + errno_text());
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    std::string holder;
    {
      std::ifstream in(file);
      std::getline(in, holder);
    }
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK) throw IoError(file.string() + ": cannot lock: " + std::strerror(err));
    std::string pid = "?", host = "?";
    const auto space = holder.find(' ');
    if (!holder.empty()) {
      pid = holder.substr(0, space);
      if (space != std::string::npos) host = holder.substr(space + 1);
    }
    throw ConfigError("\"output.dir\" = \"" + run_dir + "\" is in use by another training process (PID " + pid +
                      " on " + host + ", lock file " + file.string() +
                      "); wait for it to finish or stop it, or choose another output.dir");
  }
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::strcpy(host, "unknown-host");
  const std::string text = std::to_string(::getpid()) + " " + host + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    const std::string why = errno_text();
    ::close(fd_);
    fd_ = -1;
    throw IoError(file.string() + ": cannot write the run's lock file: " + why);
  }
}

RunLock::~RunLock() {
  if (fd_ >= 0) ::close(fd_);
}

void remove_checkpoints_after(const std::string& run_dir, int64_t step, const std::string& keep) {
  const fs::path kept = keep.empty() ? fs::path() : fs::path(keep).lexically_normal();
  for (const auto& [s, path] : list_checkpoints(run_dir)) {
    if (s > step && path.lexically_normal() != kept) remove_checkpoint_folder(path, 30.0);
  }
}

void remove_partial_checkpoints(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(".tmp-", 0) == 0 || name.rfind("latest.tmp-", 0) == 0) fs::remove_all(e.path(), ec);
  }
}

void prune_checkpoints(const std::string& run_dir, int64_t keep_last) {
  const auto all = list_checkpoints(run_dir);
  if (static_cast<int64_t>(all.size()) <= keep_last) return;
  const std::string latest = latest_checkpoint(run_dir);
  std::string best;
  double best_loss = std::numeric_limits<double>::infinity();
  for (const auto& [step, path] : all) {
    try {
      const auto info = read_checkpoint_info(path.string());
      if (info.val_loss && !info.diverged && *info.val_loss < best_loss) {
        best_loss = *info.val_loss;
        best = path.string();
      }
    } catch (const CheckpointError&) {
    }
  }
  const size_t first_kept = all.size() - static_cast<size_t>(keep_last);
  for (size_t i = 0; i < first_kept; ++i) {
    const std::string p = all[i].second.string();
    if (p == best || p == latest) continue;
    remove_checkpoint_folder(all[i].second, 0.0);  // a reader holds it: a later prune deletes it
  }
}

}  // namespace mae
