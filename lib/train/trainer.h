// The pretraining loop: data -> MAE -> masked loss -> AdamW with warmup + cosine schedule, with a
// live progress line, metrics.jsonl, validation on held-out volumes with fixed masks, atomic
// checkpoints and exact resume; data-parallel over c10d when launched with WORLD_SIZE > 1
// (train/distributed.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "data/check.h"
#include "io/volume.h"
#include "run/config.h"

namespace mae {

/// How the caller wants the run started.
struct TrainOptions {
  bool resume = false;      ///< continue from a checkpoint instead of starting fresh
  std::string resume_from;  ///< checkpoint or run folder; "" = output.dir's latest
  bool dry_run = false;     ///< validate config and data, build the model, then stop
  /// Called after every optimizer step with (step, loss); tests use it to stop a run at a step.
  std::function<void(int64_t, double)> on_step;
  /// With output.tensorboard and validation volumes: called at every validation with (model, window,
  /// volume name, step), where window is the centre crop of model.img_size of the first validation
  /// volume (preprocessed, rounded and padded as the loader does; origin moved with the crop); the
  /// picture it returns, uint8 (H, W, 3) RGB or (H, W) grey, goes into the event file as the image
  /// "val/reconstruction". The model is in eval mode (the trainer puts it back in train mode after);
  /// the callback must not draw from the global random generators (dropout draws from them), so that
  /// the losses do not depend on output.tensorboard, which may change on a resume. An exception it
  /// throws is logged as a warning and the run goes on. mae-pretrain sets it to the
  /// mae-reconstruct montage of the window (lib/infer, which lib/train cannot depend on).
  std::function<std::optional<at::Tensor>(const MaskedAutoencoder& model, const Volume& window, const std::string& name,
                                          int64_t step)>
      validation_image;
};

/// How a run ended.
struct TrainResult {
  int64_t step = 0;              ///< optimizer steps done
  bool interrupted = false;      ///< stopped by request_stop() (a checkpoint was written unless before_training)
  bool before_training = false;  ///< stopped before the first step of this start: nothing was written
  int signal = 0;                ///< the signal that stopped it, 0 if none
  std::string checkpoint;        ///< the last checkpoint written ("" if none)
  std::string resumed_from;      ///< the checkpoint this start resumed ("" for a fresh run)
  int rank = 0;                  ///< this process's rank (0 when not distributed): only rank 0 writes
  int world_size = 1;            ///< ranks that trained together
};

/// The pre-flight check of --check-data: reads every volume of the config's dataset (training and
/// validation) once through the cache, as a run would, and returns the report; writes nothing but
/// the cache. The caller prints it (CheckReport::text()).
CheckReport check_training_data(const Config& config);

/// One training run, in named steps. The constructor does the set-up (device, process group when
/// distributed, run folder and its lock, resume checks, the pre-flight data check, model, optimizer,
/// loader, restored state); run() loops step() / maybe_validate() / metrics / maybe_checkpoint()
/// until the configured steps are done or a stop is requested.
class Trainer {
 public:
  /// The set-up; throws as train() does. A stop requested during set-up makes run() return at once.
  Trainer(const Config& config, const TrainOptions& options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Trains to the end (or to a requested stop) and says how it ended.
  TrainResult run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Runs (or resumes) pretraining as configured: Trainer(config, options).run(). Throws ConfigError /
/// InputError / CheckpointError / IoError with one-line messages; a non-finite loss with on_nonfinite "error" writes a
/// checkpoint marked diverged and throws Error naming the step. A dry run writes nothing at all (no folder,
/// config.json, train.log or lock). A training run holds the run folder's RunLock, so a second process on the same
/// output.dir gets ConfigError naming the holder. A resume of this run's own checkpoint deletes the checkpoints after
/// it only once its first new checkpoint is written; resuming another run's checkpoint into a folder that holds a run
/// is refused. The memory a step needs is estimated before the model is built and refused (ConfigError) when it exceeds
/// the machine's memory. With output.tensorboard the run also writes a TensorBoard event file per
/// start (train/tensorboard.h): the scalars of every metrics.jsonl record at its step and, with
/// TrainOptions::validation_image, a picture at every validation.
///
/// Distributed (read_distributed_env() finds WORLD_SIZE > 1): every rank runs this with the same
/// config (checked at start, naming the first differing key); rank 0 broadcasts the initial (or
/// resumed) weights, each rank trains on its slice of every global batch of batch_size x
/// world_size crops (masks and dropout as one process would draw them), gradients are averaged by
/// all-reduce, the non-finite check and a requested stop are agreed by all ranks at the same step,
/// and only rank 0 writes the run folder. A failing rank makes every other rank throw
/// DistributedError naming it within distributed.timeout_s.
TrainResult train(const Config& config, const TrainOptions& options);

/// Asks a running train() to stop after the current step and write a checkpoint. Safe to call from
/// a signal handler; `signal` is reported back in TrainResult.
void request_stop(int signal);

/// Clears a pending stop request (before starting another run in the same process).
void clear_stop_request();

/// Installs SIGINT/SIGTERM handlers: the first asks the run to stop after a checkpoint, a second
/// SIGINT ends the process at once with status 130; then unblocks both (a signal a launcher kept
/// blocked and pending across exec is handled now). Needs nothing initialised: async-signal-safe
/// calls only, so it may run from the executable's .preinit_array, before library initialisers.
void install_stop_signal_handlers();

}  // namespace mae
