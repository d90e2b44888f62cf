// Reading checkpoint folders: the format checked first, every part tied to its run and step. The
// writing half (save_checkpoint, the optimizer state, the run lock, pruning) is train/checkpoint.h.
// Layout of <run>/checkpoints/step_00000123/:
//   model.pt            model parameters (LibTorch archive)
//   optimizer.pt        AdamW moments and step count (absent in model-only checkpoints; read by
//                       load_optimizer in train/checkpoint.h, as only training needs AdamW)
//   rng.pt              random generator states
//   trainer_state.json  step, loader position, counters, ranks and per-rank batch size
//   config.json         the resolved run config
//   meta.json           format, versions, run id, step, diverged flag, validation loss
//
// Every part records the run it belongs to (a random run id drawn at the run's first start and
// kept across resumes) and the step: the JSON files as "run_id" / "step", the .pt archives as the
// extra entries mae3d_run_id (the id's bytes) and mae3d_step; meta.json also holds a digest of
// config.json. Loading refuses a part of another run or step, naming the part and both values, and
// a model whose tensors differ from what the checkpoint's config builds (name, shape, dtype). Every
// number read from the JSON files is type- and range-checked.
//
// Concurrency: readers (mae-export, mae-reconstruct, resume) hold a shared lock on the checkpoint
// they read (CheckpointReadLock); pruning skips a checkpoint held so and deletes it at a later prune.
#pragma once

#include <torch/nn/module.h>
#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <string>

namespace mae {

/// Checkpoint format version written into meta.json; loading refuses other versions. Version 2
/// added run ids and per-part stamps; mae3d is pre-1.0, so version 1 checkpoints are refused.
constexpr int kCheckpointFormatVersion = 2;

/// Largest step, epoch, batch or counter a checkpoint may record (far beyond any real run).
constexpr int64_t kMaxCheckpointCount = 1000000000000LL;

/// The trainer's position and counters, as trainer_state.json records them.
struct TrainerState {
  int64_t step = 0;                     ///< optimizer steps done
  int64_t loader_epoch = 0;             ///< loader position: epoch of the next batch
  int64_t loader_batch = 0;             ///< loader position: batch within that epoch
  int64_t nonfinite_skipped = 0;        ///< batches skipped for a non-finite loss
  std::optional<double> smoothed_loss;  ///< running loss average, when any step was done
  std::optional<double> best_val_loss;  ///< lowest validation loss so far
  double lr_peak = 0.0;                 ///< peak learning rate of the schedule
  int64_t total_steps = 0;              ///< steps the run was configured for
  int64_t world_size = 1;               ///< ranks that trained up to this checkpoint
  int64_t batch_size = 0;               ///< per-rank train.batch_size when written; 0 = not recorded
  /// Where the run last changed its number of ranks (a resume on another world size): the step,
  /// the skipped-batch count and the loader's batches read (epoch x batches per epoch + batch, in
  /// batches of the new size) at that point; all 0 when it never did. The loader position is checked
  /// against the steps since then.
  int64_t base_step = 0, base_skipped = 0, base_read = 0;
};

/// trainer_state.json's content for `state` of run `run_id`.
nlohmann::json trainer_state_to_json(const TrainerState& state, const std::string& run_id);

/// Reads trainer_state.json's content strictly: every key known, integers where integers belong,
/// each within [0, kMaxCheckpointCount] (world_size within [1, 1000000]). "world_size",
/// "batch_size" and the "base_*" fields are optional (absent: 1 and 0, as in checkpoints written
/// before they were recorded); a base beyond the step or skipped count is refused.
/// CheckpointError naming `file` and the field.
TrainerState trainer_state_from_json(const nlohmann::json& j, const std::string& file);

/// What a checkpoint records besides tensors.
struct CheckpointInfo {
  int64_t step = 0;                   ///< optimizer steps done
  std::string run_id;                 ///< run the checkpoint belongs to ("" when saving: a new id is drawn)
  nlohmann::json config;              ///< resolved run config
  TrainerState trainer_state;         ///< position and counters (its step is set to `step` when saving)
  bool diverged = false;              ///< written because the loss became non-finite
  std::string diverged_reason;        ///< why, in words, when diverged
  std::optional<double> val_loss;     ///< validation loss at this step, when measured
  std::optional<double> probe_score;  ///< linear-probe score (R² or accuracy) at this step, when probed
};

/// A new random run id (16 hexadecimal digits).
std::string new_run_id();

/// Folder name of the checkpoint of `step` ("step_00000123").
std::string checkpoint_name(int64_t step);

/// The checkpoint folder meant by `path`: a checkpoint folder itself, or a run folder (its
/// `latest`, else its newest complete checkpoint). CheckpointError naming the path when none.
std::string resolve_checkpoint(const std::string& path);

/// The newest complete checkpoint of a run folder, or "" when it has none.
std::string latest_checkpoint(const std::string& run_dir);

/// Reads meta.json, config.json and trainer_state.json of a checkpoint folder, checking the format
/// and version first, every field's type and range, and that all three belong to the same run and
/// step. CheckpointError naming the file for a damaged, foreign or mixed checkpoint.
CheckpointInfo read_checkpoint_info(const std::string& dir);

/// Loads model.pt into `model`: every tensor's name, shape and dtype must be what `model` has (no
/// missing or unexpected tensors), and the file must carry `info`'s run id and step.
/// CheckpointError naming the file, the tensor and both shapes.
void load_model(const std::string& dir, torch::nn::Module& model, const CheckpointInfo& info);

/// Loads rng.pt (generator states by name), checking `info`'s run id and step. CheckpointError
/// naming the file.
std::map<std::string, at::Tensor> load_rng(const std::string& dir, const CheckpointInfo& info);

/// Run id of the checkpoints a run folder holds (of its latest), or "" when it holds none or the
/// latest is unreadable.
std::string run_id_of(const std::string& run_dir);

/// A shared lock on one checkpoint folder (flock on its meta.json) while it is being read;
/// released on destruction. Pruning and the removal of abandoned checkpoints wait for or skip it.
class CheckpointReadLock {
 public:
  CheckpointReadLock() = default;
  ~CheckpointReadLock();
  CheckpointReadLock(CheckpointReadLock&& other) noexcept;
  CheckpointReadLock& operator=(CheckpointReadLock&& other) noexcept;
  CheckpointReadLock(const CheckpointReadLock&) = delete;
  CheckpointReadLock& operator=(const CheckpointReadLock&) = delete;
  /// The checkpoint folder held.
  const std::string& dir() const { return dir_; }
  /// Releases the lock early.
  void release();

 private:
  friend CheckpointReadLock lock_checkpoint(const std::string& path);
  int fd_ = -1;
  std::string dir_;
};

/// Resolves `path` as resolve_checkpoint does and takes a shared lock on that checkpoint. When a
/// training process removed the folder between resolving and locking, resolves again (a run
/// folder's `latest` then names a newer one). CheckpointError naming the path when none is left.
CheckpointReadLock lock_checkpoint(const std::string& path);

}  // namespace mae
