// Learning-rate schedule of MAE pretraining: linear warmup from 0, then cosine decay to lr_min.
#pragma once

#include <cstdint>

namespace mae {

/// Learning rate of optimizer step `step` (0-based) of `total`: peak·(step+1)/warmup while
/// step < warmup (peak at step warmup-1), then cosine from peak at step = warmup to lr_min at total.
double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double lr_min);

/// The MAE paper's scaling rule: base_lr × effective_batch / 256.
double scaled_lr(double base_lr, int64_t effective_batch);

}  // namespace mae
