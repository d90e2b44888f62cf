#include "train/checkpoint.h"

#include <fcntl.h>
#include <sys/file.h>
#include <torch/serialize.h>
#include <torch/version.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

#include "core/atomic_file.h"
#include "core/error.h"
#include "run/checkpoint_format.h"

namespace fs = std::filesystem;

namespace mae {

using namespace run_detail;

namespace {

std::string errno_text() { return std::strerror(errno); }

// Writes an archive to `path` and flushes it to disk. LibTorch's own save_to(filename) throws from
// a destructor when the disk fills up, which ends the process; here the bytes go through
// write_file_synced's sink, which remembers a failure, so the archive writer always sees success.
void save_archive(torch::serialize::OutputArchive& archive, const fs::path& path) {
  write_file_synced(path.string(), [&](const ByteSink& sink) {
    archive.save_to([&](const void* data, size_t n) -> size_t {
      sink(data, n);
      return n;
    });
  });
}

// The run-id and step entries every .pt archive carries.
void stamp_archive(torch::serialize::OutputArchive& archive, const std::string& run_id, int64_t step) {
  auto id = torch::empty({static_cast<int64_t>(run_id.size())}, torch::kUInt8);
  std::memcpy(id.data_ptr<uint8_t>(), run_id.data(), run_id.size());
  archive.write(kRunIdKey, id, /*is_buffer=*/true);
  archive.write(kStepKey, torch::tensor(step, torch::kInt64), /*is_buffer=*/true);
}

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
    write_file_synced((tmp / "trainer_state.json").string(), trainer_state_to_json(state, run_id).dump(2));
    write_file_synced((tmp / "config.json").string(), info.config.dump(2));
    nlohmann::json meta = {{"format", kFormat},
                           {"format_version", kCheckpointFormatVersion},
                           {"mae3d_version", MAE3D_VERSION},
                           {"libtorch_version", TORCH_VERSION},
                           {"run_id", run_id},
                           {"step", info.step},
                           {"config_digest", digest_of(info.config)},
                           {"diverged", info.diverged},
                           {"val_loss", info.val_loss ? nlohmann::json(*info.val_loss) : nlohmann::json()}};
    if (info.probe_score) meta["probe_score"] = *info.probe_score;
    if (info.diverged) meta["diverged_reason"] = info.diverged_reason;
    // Written last: its presence marks a complete folder.
    write_file_synced((tmp / "meta.json").string(), meta.dump(2));
    sync_folder(tmp.string());
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
    sync_folder(root.string());
    if (replacing) fs::remove_all(old_dir, ec);
    if (!info.diverged) write_file_atomically((root / "latest").string(), name + "\n");
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
    // latest.tmp.* is write_file_atomically's temporary; latest.tmp-* that of older mae3d.
    if (name.rfind(".tmp-", 0) == 0 || name.rfind("latest.tmp", 0) == 0) fs::remove_all(e.path(), ec);
  }
}

void prune_checkpoints(const std::string& run_dir, int64_t keep_last, bool best_by_probe) {
  const auto all = list_checkpoints(run_dir);
  if (static_cast<int64_t>(all.size()) <= keep_last) return;
  const std::string latest = latest_checkpoint(run_dir);
  std::string best;
  double best_loss = std::numeric_limits<double>::infinity();  // lower is better (a probe score negated)
  for (const auto& [step, path] : all) {
    try {
      const auto info = read_checkpoint_info(path.string());
      const std::optional<double> key =
          best_by_probe ? (info.probe_score ? std::optional<double>(-*info.probe_score) : std::nullopt) : info.val_loss;
      if (key && !info.diverged && *key < best_loss) {
        best_loss = *key;
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
