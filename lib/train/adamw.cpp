#include "train/adamw.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "core/error.h"

namespace mae {

namespace {

// The per-step constants of the update, in float as the kernel uses them.
struct StepConstants {
  float decay_factor, beta1, beta2, step_size, inv_sqrt_bc2, eps, scale;
};

// The constants as the element update reads them, copied into the kernel's own frame so that the
// compiler knows no store through the tensors' pointers changes them.
struct Coefficients {
  float beta1, beta2, one_minus_b1, one_minus_b2, decay_factor, step_size, inv_sqrt_bc2, eps, scale;
  explicit Coefficients(const StepConstants& c)
      : beta1(c.beta1),
        beta2(c.beta2),
        one_minus_b1(1.0f - c.beta1),
        one_minus_b2(1.0f - c.beta2),
        decay_factor(c.decay_factor),
        step_size(c.step_size),
        inv_sqrt_bc2(c.inv_sqrt_bc2),
        eps(c.eps),
        scale(c.scale) {}
};

// One element of the update, with its gradient scaled first (x * 1.0f == x exactly: unscaled
// gradients are read as they are). Both kernels below use it, so they compute the same bits.
inline void update_element(float& p, float graw, float& m, float& v, const Coefficients& k) {
  const float gi = graw * k.scale;
  const float mi = k.beta1 * m + k.one_minus_b1 * gi;
  const float vi = k.beta2 * v + k.one_minus_b2 * gi * gi;
  m = mi;
  v = vi;
  p = p * k.decay_factor - k.step_size * mi / (std::sqrt(vi) * k.inv_sqrt_bc2 + k.eps);
}

// The update of one contiguous float32 range, in a single pass.
// Restrict pointers and -fno-math-errno (set for this file in CMake) let the compiler vectorise the
// loop; on x86-64 an AVX2 clone is picked at run time where the processor has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void update_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                  int64_t n, const StepConstants& c) {
  const Coefficients k(c);
  for (int64_t i = 0; i < n; ++i) update_element(p[i], g[i], m[i], v[i], k);
}

// Sum of squares of one block, in double, over 16 independent lanes combined in a fixed order: the
// lanes let the compiler vectorise without reassociating, and the result depends on the block alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
double
sum_squares(const float* __restrict g, int64_t n) {
  constexpr int kLanes = 16;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<double>(g[i + j]) * static_cast<double>(g[i + j]);
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += static_cast<double>(g[i]) * static_cast<double>(g[i]);
  double s = 0.0;
  for (double l : lane) s += l;
  return s + tail;
}

// update_range and sum_squares in one loop: each gradient is read once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
double
update_range_sq(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v, int64_t n,
                const StepConstants& c) {
  const Coefficients k(c);
  constexpr int kLanes = 16;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      lane[j] += static_cast<double>(g[i + j]) * static_cast<double>(g[i + j]);
      update_element(p[i + j], g[i + j], m[i + j], v[i + j], k);
    }
  }
  double tail = sum_squares(g + i, n - i);
  update_range(p + i, g + i, m + i, v + i, n - i, c);
  double s = 0.0;
  for (double l : lane) s += l;
  return s + tail;
}

// Each parameter is cut into blocks of kBlock elements; the threads take whole blocks, each block's
// sum of squares is kept apart, and the blocks are summed in order afterwards, so the norm is the
// same for any thread count.
constexpr int64_t kBlock = 1 << 15;

// One parameter's update (when `update`) and its gradient's sum of squares (when `sq`), with the
// gradient scaled by `scale` first.
double fused_pass(float* p, const float* g, float* m, float* v, int64_t n, const StepConstants& c, bool update, bool sq,
                  std::vector<double>& partial) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  partial.assign(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock, len = std::min(kBlock, n - begin);
      if (sq && update) {
        partial[b] = update_range_sq(p + begin, g + begin, m + begin, v + begin, len, c);
      } else if (sq) {
        partial[b] = sum_squares(g + begin, len);
      } else {
        update_range(p + begin, g + begin, m + begin, v + begin, len, c);
      }
    }
  });
  double s = 0.0;
  for (double x : partial) s += x;
  return s;
}

bool fusable(const torch::Tensor& p, const torch::Tensor& g) {
  return p.device().is_cpu() && p.scalar_type() == torch::kFloat && g.scalar_type() == torch::kFloat &&
         p.is_contiguous() && g.is_contiguous();
}

}  // namespace

AdamW::AdamW(std::vector<AdamWGroup> groups, AdamWOptions options) : groups_(std::move(groups)), options_(options) {
  for (const auto& group : groups_) {
    for (const auto& p : group.params) {
      exp_avg_.push_back(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
      exp_avg_sq_.push_back(torch::zeros_like(p, torch::MemoryFormat::Contiguous));
    }
  }
}

double AdamW::grad_sq_norm() const {
  torch::NoGradGuard no_grad;
  std::vector<double> partial;
  double sq = 0.0;
  std::optional<torch::Tensor> other;  // the parameters off the fused path, summed on their device
  for (const auto& group : groups_) {
    for (const auto& p : group.params) {
      const auto& g = p.grad();
      if (!g.defined()) continue;
      if (fusable(p, g)) {
        sq += fused_pass(nullptr, g.data_ptr<float>(), nullptr, nullptr, g.numel(), StepConstants{}, false, true,
                         partial);
      } else {
        auto s = g.to(torch::kDouble).pow(2).sum();
        other = other ? *other + s : s;
      }
    }
  }
  return other ? sq + other->item<double>() : sq;
}

void AdamW::step(const StepOptions& options) {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  const double step_size = options_.lr / bc1;
  const double inv_sqrt_bc2 = 1.0 / std::sqrt(bc2);
  const bool want_sq = options.grad_sq_norm != nullptr;
  std::vector<double> partial;
  double sq = 0.0;
  std::optional<torch::Tensor> other;
  size_t k = 0;
  for (auto& group : groups_) {
    const double decay_factor = 1.0 - options_.lr * group.weight_decay;
    for (auto& p : group.params) {
      auto& m = exp_avg_[k];
      auto& v = exp_avg_sq_[k];
      ++k;
      const auto& grad = p.grad();
      if (!grad.defined()) continue;
      if (fusable(p, grad)) {
        const StepConstants c{static_cast<float>(decay_factor),      static_cast<float>(options_.beta1),
                              static_cast<float>(options_.beta2),    static_cast<float>(step_size),
                              static_cast<float>(inv_sqrt_bc2),      static_cast<float>(options_.eps),
                              static_cast<float>(options.grad_scale)};
        sq += fused_pass(p.data_ptr<float>(), grad.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(),
                         p.numel(), c, true, want_sq, partial);
      } else {
        if (want_sq) {
          auto s = grad.to(torch::kDouble).pow(2).sum();
          other = other ? *other + s : s;
        }
        const auto g = options.grad_scale != 1.0 ? grad * static_cast<float>(options.grad_scale) : grad;
        p.mul_(decay_factor);
        m.mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
        v.mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
        p.addcdiv_(m, v.sqrt().mul_(inv_sqrt_bc2).add_(options_.eps), -step_size);
      }
    }
  }
  if (want_sq) *options.grad_sq_norm = other ? sq + other->item<double>() : sq;
}

void AdamW::zero_grad() {
  for (auto& group : groups_) {
    for (auto& p : group.params) p.mutable_grad() = torch::Tensor();
  }
}

void AdamW::save(torch::serialize::OutputArchive& archive) const {
  archive.write("step", torch::tensor(step_, torch::kInt64));
  archive.write("count", torch::tensor(static_cast<int64_t>(exp_avg_.size()), torch::kInt64));
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    archive.write("exp_avg." + std::to_string(i), exp_avg_[i], /*is_buffer=*/true);
    archive.write("exp_avg_sq." + std::to_string(i), exp_avg_sq_[i], /*is_buffer=*/true);
  }
}

void AdamW::load(torch::serialize::InputArchive& archive) {
  torch::Tensor step, count;
  archive.read("step", step);
  archive.read("count", count);
  if (count.item<int64_t>() != static_cast<int64_t>(exp_avg_.size())) {
    throw CheckpointError("optimizer state holds " + std::to_string(count.item<int64_t>()) +
                          " parameters, the model has " + std::to_string(exp_avg_.size()));
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < exp_avg_.size(); ++i) {
    torch::Tensor m, v;
    archive.read("exp_avg." + std::to_string(i), m, /*is_buffer=*/true);
    archive.read("exp_avg_sq." + std::to_string(i), v, /*is_buffer=*/true);
    if (!m.sizes().equals(exp_avg_[i].sizes()) || !v.sizes().equals(exp_avg_sq_[i].sizes())) {
      throw CheckpointError("optimizer state of parameter " + std::to_string(i) + " has the wrong shape");
    }
    exp_avg_[i].copy_(m);
    exp_avg_sq_[i].copy_(v);
  }
  step_ = step.item<int64_t>();
}

}  // namespace mae
