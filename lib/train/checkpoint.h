// Writing checkpoint folders: atomically (temporary folder, files flushed to disk, rename, then the
// `latest` pointer), pruned to the last K plus the best by validation loss. The folder layout, the
// format and everything that reads a checkpoint is run/checkpoint.h; here are what only training
// needs: save_checkpoint, the optimizer state, the run lock and the removal of old checkpoints.
//
// Concurrency: a training process holds an exclusive lock on its run folder (RunLock). Readers
// hold a shared lock on the checkpoint they read (CheckpointReadLock, run/checkpoint.h); pruning
// skips a checkpoint held so and deletes it at a later prune.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "run/checkpoint.h"
#include "train/adamw.h"

namespace mae {

/// Writes <run_dir>/checkpoints/step_N atomically and updates `latest`; returns the folder. A
/// diverged checkpoint goes to diverged_step_N and leaves `latest` alone. An empty info.run_id
/// gets a new id (model-only checkpoints of tests and tools).
/// IoError naming the path when anything cannot be written (the previous checkpoints stay intact).
std::string save_checkpoint(const std::string& run_dir, const CheckpointInfo& info, torch::nn::Module& model,
                            const AdamW* optimizer, const std::map<std::string, at::Tensor>& rng);

/// Loads optimizer.pt into `optimizer`, whose parameters are `params` (name, tensor) in the order
/// the optimizer holds them: the state's count, shapes and dtypes must match them, its step count
/// must be `info.step`, and the file must carry `info`'s run id. CheckpointError naming the file.
void load_optimizer(const std::string& dir, AdamW& optimizer,
                    const std::vector<std::pair<std::string, at::Tensor>>& params, const CheckpointInfo& info);

/// The exclusive lock of a run folder, held by the training process while it writes the run:
/// flock on <run_dir>/run.lock, which records the holder's PID and host.
class RunLock {
 public:
  /// Takes the lock. ConfigError naming the folder and the holder's PID and host when another
  /// process (or another RunLock in this one) holds it; IoError when the lock file cannot be made.
  explicit RunLock(const std::string& run_dir);
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

 private:
  int fd_ = -1;
};

/// Deletes checkpoints of `run_dir` beyond the newest `keep_last`, keeping the best (the lowest
/// validation loss, or with `best_by_probe` the highest probe score; diverged ones never) and the
/// one `latest` names; skips a checkpoint a reader holds (deleted by a later prune); also removes
/// temporary folders of crashed writes.
void prune_checkpoints(const std::string& run_dir, int64_t keep_last, bool best_by_probe = false);

/// Deletes the checkpoints of `run_dir` after `step` except `keep` (a resume from `step` abandons
/// them once its own first checkpoint, `keep`, is written), waiting briefly for readers.
void remove_checkpoints_after(const std::string& run_dir, int64_t step, const std::string& keep = "");

/// Removes temporary folders left by interrupted checkpoint writes.
void remove_partial_checkpoints(const std::string& run_dir);

}  // namespace mae
