#include "run/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <torch/serialize.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "core/error.h"
#include "core/json_reader.h"
#include "core/printable.h"
#include "run/checkpoint_format.h"

namespace fs = std::filesystem;

namespace mae {

using namespace run_detail;

namespace {

constexpr int64_t kMaxWorldSize = 1000000;  // ranks a trainer_state.json may record

// Strict: a key given twice in a checkpoint file is damage, not something to pick from.
nlohmann::json read_json(const fs::path& path) {
  if (!fs::exists(path)) throw CheckpointError(printable(path.string()) + ": missing");
  return read_json_file<CheckpointError>(path.string(), "checkpoint file");
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

}  // namespace

namespace run_detail {

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

std::string what_of(const std::exception& e) {
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) return c->what_without_backtrace();
  return e.what();
}

std::string shape_text(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

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

int open_for_lock(const fs::path& path) { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }

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

}  // namespace run_detail

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
                        {"total_steps", s.total_steps},
                        {"world_size", s.world_size},
                        {"batch_size", s.batch_size},
                        {"base_step", s.base_step},
                        {"base_skipped", s.base_skipped},
                        {"base_read", s.base_read}};
}

TrainerState trainer_state_from_json(const nlohmann::json& j, const std::string& file) {
  if (!j.is_object()) throw CheckpointError(file + ": damaged (not a JSON object)");
  check_keys(
      j,
      {"run_id", "step", "epoch", "loader_epoch", "loader_batch", "nonfinite_skipped", "smoothed_loss", "best_val_loss",
       "lr_peak", "total_steps", "world_size", "batch_size", "base_step", "base_skipped", "base_read"},
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
  // Recorded since distributed training; absent in older checkpoints (one rank, batch not recorded).
  s.world_size = int_field(j, "world_size", 1, kMaxWorldSize, file, false, 1);
  s.batch_size = int_field(j, "batch_size", 0, kMax, file, false, 0);
  s.base_step = int_field(j, "base_step", 0, s.step, file, false, 0);
  s.base_skipped = int_field(j, "base_skipped", 0, s.nonfinite_skipped, file, false, 0);
  s.base_read = int_field(j, "base_read", 0, kMax, file, false, 0);
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
              "diverged", "diverged_reason", "val_loss", "probe_score"},
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
  info.probe_score = optional_number(meta, "probe_score", meta_path);

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
    // A run that checkpoints every few milliseconds can replace the latest folder between our
    // reading of `latest` and the open; each try reads `latest` anew. 400 tries of 5 ms (2 s):
    // enough for a reader that the scheduler keeps waiting on a loaded machine.
    if (attempt >= 400) throw CheckpointError(dir + ": removed while it was being opened (the run is pruning it)");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace mae
