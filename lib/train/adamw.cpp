#include "train/adamw.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"

namespace mae {

namespace {

// The update of one contiguous float32 range, in a single pass. Restrict pointers and
// -fno-math-errno (set for this file in CMake) let the compiler vectorise the loop; on x86-64 an
// AVX2 clone is picked at run time where the processor has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void update_range(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                  int64_t n, float decay_factor, float beta1, float beta2, float step_size, float inv_sqrt_bc2,
                  float eps) {
  const float one_minus_b1 = 1.0f - beta1, one_minus_b2 = 1.0f - beta2;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + one_minus_b1 * gi;
    const float vi = beta2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay_factor - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
  }
}

void fused_update(float* p, const float* g, float* m, float* v, int64_t n, float decay_factor, float beta1, float beta2,
                  float step_size, float inv_sqrt_bc2, float eps) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    update_range(p + begin, g + begin, m + begin, v + begin, end - begin, decay_factor, beta1, beta2, step_size,
                 inv_sqrt_bc2, eps);
  });
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

void AdamW::step() {
  torch::NoGradGuard no_grad;
  ++step_;
  const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(step_));
  const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(step_));
  const double step_size = options_.lr / bc1;
  const double inv_sqrt_bc2 = 1.0 / std::sqrt(bc2);
  size_t k = 0;
  for (auto& group : groups_) {
    const double decay_factor = 1.0 - options_.lr * group.weight_decay;
    for (auto& p : group.params) {
      auto& m = exp_avg_[k];
      auto& v = exp_avg_sq_[k];
      ++k;
      const auto& g = p.grad();
      if (!g.defined()) continue;
      if (p.device().is_cpu() && p.scalar_type() == torch::kFloat && g.scalar_type() == torch::kFloat &&
          p.is_contiguous() && g.is_contiguous()) {
        fused_update(p.data_ptr<float>(), g.data_ptr<float>(), m.data_ptr<float>(), v.data_ptr<float>(), p.numel(),
                     static_cast<float>(decay_factor), static_cast<float>(options_.beta1),
                     static_cast<float>(options_.beta2), static_cast<float>(step_size),
                     static_cast<float>(inv_sqrt_bc2), static_cast<float>(options_.eps));
      } else {
        p.mul_(decay_factor);
        m.mul_(options_.beta1).add_(g, 1.0 - options_.beta1);
        v.mul_(options_.beta2).addcmul_(g, g, 1.0 - options_.beta2);
        p.addcdiv_(m, v.sqrt().mul_(inv_sqrt_bc2).add_(options_.eps), -step_size);
      }
    }
  }
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
