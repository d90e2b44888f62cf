#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace mae {

double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double lr_min) {
  if (warmup > 0 && step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t decay_steps = std::max<int64_t>(1, total - warmup);
  const double t = std::clamp(static_cast<double>(step - warmup) / static_cast<double>(decay_steps), 0.0, 1.0);
  return lr_min + (peak - lr_min) * 0.5 * (1.0 + std::cos(M_PI * t));
}

double scaled_lr(double base_lr, int64_t effective_batch) {
  return base_lr * static_cast<double>(effective_batch) / 256.0;
}

}  // namespace mae
