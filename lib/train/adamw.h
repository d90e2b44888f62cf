// AdamW with decoupled weight decay (Loshchilov & Hutter), the update of torch.optim.AdamW, fused
// into one pass over each parameter on the CPU. LibTorch's own AdamW runs about ten separate
// element-wise passes per parameter, which for a ViT-B is a quarter of a training step on a
// two-core machine; here it is one memory pass. The global gradient norm that logging and clipping
// need is taken in that pass too, or (for clipping, which needs it first) in one read pass with the
// clip factor folded into the update, instead of clip_grad_norm_'s separate norm and scale passes.
// Other devices and dtypes use tensor ops.
#pragma once

#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <vector>

namespace mae {

/// Hyper-parameters shared by every group except the weight decay.
struct AdamWOptions {
  double lr = 1.5e-4;   ///< learning rate (the schedule sets it every step)
  double beta1 = 0.9;   ///< first-moment decay
  double beta2 = 0.95;  ///< second-moment decay (0.95 as in the MAE paper)
  double eps = 1e-8;    ///< added to the denominator
};

/// A set of parameters with its own weight decay.
struct AdamWGroup {
  std::vector<torch::Tensor> params;  ///< parameters updated together
  double weight_decay = 0.0;          ///< decoupled decay per step: p -= lr * weight_decay * p
};

/// Fused AdamW over parameter groups.
class AdamW {
 public:
  /// Takes the groups and allocates zeroed moment buffers.
  AdamW(std::vector<AdamWGroup> groups, AdamWOptions options);

  /// What step() does besides the update.
  struct StepOptions {
    double grad_scale = 1.0;         ///< gradients are multiplied by this first (clipping); they stay as they are
    double* grad_sq_norm = nullptr;  ///< when set, receives the sum of squares of the unscaled gradients,
                                     ///< taken in the same pass as the update
  };

  /// One update from the parameters' current gradients; parameters without a gradient are skipped.
  void step(const StepOptions& options);
  /// One update, gradients as they are.
  void step() { step(StepOptions{}); }
  /// Sum of squares of all gradients, in one read pass (a global gradient norm is its square root).
  /// Summed in double over fixed blocks in a fixed order: the same for any thread count, and the same
  /// value step() reports through StepOptions::grad_sq_norm.
  double grad_sq_norm() const;
  /// Sets every parameter's gradient to undefined (frees it), as zero_grad(set_to_none=True).
  void zero_grad();
  /// Learning rate of the next step.
  void set_lr(double lr) { options_.lr = lr; }
  /// Current learning rate.
  double lr() const { return options_.lr; }
  /// The options in use.
  const AdamWOptions& options() const { return options_; }
  /// Number of updates made so far.
  int64_t steps() const { return step_; }

  /// Writes moments and step count into an archive.
  void save(torch::serialize::OutputArchive& archive) const;
  /// Restores what save() wrote; throws CheckpointError if shapes or counts do not match.
  void load(torch::serialize::InputArchive& archive);

 private:
  std::vector<AdamWGroup> groups_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_;  // flattened over all groups, in order
  AdamWOptions options_;
  int64_t step_ = 0;
};

}  // namespace mae
