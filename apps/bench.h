// What mae-bench's two halves share: the timed model-only training step (apps/bench.cpp) and the
// end-to-end run of a config through the trainer (apps/bench_e2e.cpp, built with the train area).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>
#include <vector>

#include "model/mae.h"

namespace mae::bench {

/// Medians of the timed steps of one model-only run.
struct StepTiming {
  double fwd_s = 0.0, bwd_s = 0.0, optim_s = 0.0, step_s = 0.0;
  double step_gflop = 0.0;       ///< 3 x the forward's floating-point work, in GFLOP
  double attention_share = 0.0;  ///< share of step_gflop in the attention products (q k^T, att v)
  int64_t params = 0;            ///< all parameters
  int64_t trainable = 0;         ///< parameters with gradients (what AdamW keeps moments for)
  double anon_mb = -1.0;         ///< the largest current_anon_mb() after a timed step's backward or update
};

/// Times `warmup` + `iters` training steps (forward, masked loss, backward, fused AdamW) of a model
/// built with `options` on a fixed random batch, bf16 autocast when `bf16`, masks from a seeded
/// generator. Returns the medians of the timed steps.
StepTiming time_training_step(const MaskedAutoencoderOptions& options, int64_t batch, c10::Device device, bool bf16,
                              int warmup, int iters);

/// Median GFLOP/s of an n³ matrix product in bf16 (`bf16`) or fp32 on `device`: n = size, or on a CPU
/// the largest power of two from 256 up to size whose product takes about a second or less.
double matmul_gflops(int64_t size, int reps, c10::Device device, bool bf16);

/// The median of `v` (the mean of the middle two for an even count).
double median(std::vector<double> v);

/// Peak resident memory of this process so far, in MiB.
double peak_rss_mb();

/// Resident memory of this process now, in MiB (VmRSS; -1 where /proc is missing).
double current_rss_mb();

/// Its private anonymous part now, in MiB (RssAnon: the heap and other written pages, without the
/// libraries' clean file-backed pages; -1 where /proc is missing).
double current_anon_mb();

/// `cuda` -> `cuda:0`; other devices as given.
c10::Device parse_device(const std::string& name);

/// The end-to-end benchmark (--end-to-end CONFIG): trains `config_path` (with `overrides`, as
/// mae-pretrain --set) for warmup + iters steps in a temporary run folder after warming the volume
/// cache, then times the same model, batch, device and precision model-only; prints one JSON line
/// with both medians and their ratio. Defined only when the train area is built.
void end_to_end(const std::string& config_path, const std::vector<std::string>& overrides, int warmup, int iters);

/// True when this mae-bench was built with the train area (end_to_end is available).
bool has_end_to_end();

}  // namespace mae::bench
