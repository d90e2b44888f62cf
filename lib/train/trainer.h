// The pretraining loop: data -> MAE -> masked loss -> AdamW with warmup + cosine schedule, with a
// live progress line, metrics.jsonl, validation on held-out volumes with fixed masks, atomic
// checkpoints and exact resume.
#pragma once

#include <functional>
#include <string>

#include "train/config.h"

namespace mae {

/// How the caller wants the run started.
struct TrainOptions {
  bool resume = false;           ///< continue from a checkpoint instead of starting fresh
  std::string resume_from;       ///< checkpoint or run folder; "" = output.dir's latest
  bool check_data_only = false;  ///< run the pre-flight data check, print it and stop
  bool dry_run = false;          ///< validate config and data, build the model, then stop
  /// Called after every optimizer step with (step, loss); tests use it to stop a run at a step.
  std::function<void(int64_t, double)> on_step;
};

/// How a run ended.
struct TrainResult {
  int64_t step = 0;           ///< optimizer steps done
  bool interrupted = false;   ///< stopped by request_stop() (a checkpoint was written)
  int signal = 0;             ///< the signal that stopped it, 0 if none
  std::string checkpoint;     ///< the last checkpoint written ("" if none)
  int64_t data_failures = 0;  ///< check_data_only: number of volumes that failed
};

/// Runs (or resumes) pretraining as configured. Throws ConfigError / InputError / CheckpointError
/// / IoError with one-line messages; a non-finite loss with on_nonfinite "error" writes a checkpoint
/// marked diverged and throws Error naming the step.
TrainResult train(const Config& config, const TrainOptions& options);

/// Asks a running train() to stop after the current step and write a checkpoint. Safe to call from
/// a signal handler; `signal` is reported back in TrainResult.
void request_stop(int signal);

/// Clears a pending stop request (before starting another run in the same process).
void clear_stop_request();

/// Installs SIGINT/SIGTERM handlers: the first asks the run to stop after a checkpoint, a second
/// SIGINT ends the process at once with status 130.
void install_stop_signal_handlers();

}  // namespace mae
