#include "train/checkpoint.h"

#include <fcntl.h>
#include <torch/serialize.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "core/error.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

constexpr const char* kFormat = "mae3d-checkpoint";

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

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw CheckpointError(path.string() + ": missing or unreadable");
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception&) {
    throw CheckpointError(path.string() + ": damaged (not valid JSON)");
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

}  // namespace

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string save_checkpoint(const std::string& run_dir, const CheckpointInfo& info, torch::nn::Module& model,
                            const AdamW* optimizer, const std::map<std::string, at::Tensor>& rng) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
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
      save_archive(model_archive, tmp / "model.pt");
      if (optimizer) {
        torch::serialize::OutputArchive opt_archive;
        optimizer->save(opt_archive);
        save_archive(opt_archive, tmp / "optimizer.pt");
      }
      torch::serialize::OutputArchive rng_archive;
      for (const auto& [key, value] : rng) rng_archive.write(key, value, /*is_buffer=*/true);
      save_archive(rng_archive, tmp / "rng.pt");
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw IoError(tmp.string() + ": cannot write checkpoint tensors: " + what_of(e));
    }
    write_text(tmp / "trainer_state.json", info.trainer_state.dump(2));
    write_text(tmp / "config.json", info.config.dump(2));
    nlohmann::json meta = {{"format", kFormat},
                           {"format_version", kCheckpointFormatVersion},
                           {"mae3d_version", MAE3D_VERSION},
                           {"libtorch_version", TORCH_VERSION},
                           {"step", info.step},
                           {"diverged", info.diverged},
                           {"val_loss", info.val_loss ? nlohmann::json(*info.val_loss) : nlohmann::json()}};
    write_text(tmp / "meta.json", meta.dump(2));  // written last: its presence marks a complete folder
    sync_path(tmp, true);
    // Replacing a folder of the same step: move the old one aside under a temporary name first, so
    // a crash at any point leaves either the old or the new folder complete under the final name.
    const fs::path old_dir = root / (".tmp-old-" + name + "-" + std::to_string(::getpid()));
    const bool replacing = fs::exists(final_dir);
    if (replacing) fs::rename(final_dir, old_dir);
    fs::rename(tmp, final_dir);
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
  try {
    if (!meta.is_object() || !meta.contains("format") || meta.at("format") != kFormat) {
      throw CheckpointError(meta_path + ": not an mae3d checkpoint");
    }
    if (!meta.contains("format_version") || meta.at("format_version") != kCheckpointFormatVersion) {
      throw CheckpointError(meta_path + ": checkpoint format version " +
                            (meta.contains("format_version") ? meta.at("format_version").dump() : "(none)") +
                            " is not supported (expected " + std::to_string(kCheckpointFormatVersion) + ")");
    }
    info.step = meta.at("step").get<int64_t>();
    info.diverged = meta.contains("diverged") && meta.at("diverged").is_boolean() && meta.at("diverged").get<bool>();
    if (meta.contains("val_loss") && meta["val_loss"].is_number()) info.val_loss = meta["val_loss"].get<double>();
  } catch (const nlohmann::json::exception&) {
    throw CheckpointError(meta_path + ": damaged (missing or bad step)");
  }
  info.config = read_json(d / "config.json");
  info.trainer_state = read_json(d / "trainer_state.json");
  if (!info.config.is_object()) throw CheckpointError((d / "config.json").string() + ": damaged (not a JSON object)");
  if (!info.trainer_state.is_object() && !info.trainer_state.is_null()) {
    throw CheckpointError((d / "trainer_state.json").string() + ": damaged (not a JSON object)");
  }
  return info;
}

void load_model(const std::string& dir, torch::nn::Module& model) {
  const std::string file = (fs::path(dir) / "model.pt").string();
  if (!fs::exists(file)) throw CheckpointError(file + ": missing");
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(file);
    model.load(archive);
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the model weights (damaged or another architecture): " + what_of(e));
  }
}

void load_optimizer(const std::string& dir, AdamW& optimizer) {
  const std::string file = (fs::path(dir) / "optimizer.pt").string();
  if (!fs::exists(file)) throw CheckpointError(file + ": missing");
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(file);
    optimizer.load(archive);
  } catch (const CheckpointError& e) {
    throw CheckpointError(file + ": " + e.what());
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the optimizer state: " + what_of(e));
  }
}

std::map<std::string, at::Tensor> load_rng(const std::string& dir) {
  const std::string file = (fs::path(dir) / "rng.pt").string();
  std::map<std::string, at::Tensor> out;
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(file);
    for (const auto& key : archive.keys()) {
      at::Tensor t;
      archive.read(key, t, /*is_buffer=*/true);
      out[key] = t;
    }
  } catch (const std::exception& e) {
    throw CheckpointError(file + ": cannot load the random states: " + what_of(e));
  }
  return out;
}

void remove_checkpoints_after(const std::string& run_dir, int64_t step) {
  for (const auto& [s, path] : list_checkpoints(run_dir)) {
    if (s > step) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
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
    std::error_code ec;
    fs::remove_all(all[i].second, ec);
  }
}

}  // namespace mae
