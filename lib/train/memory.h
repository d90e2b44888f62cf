// Memory pre-flight of a training run: an analytic estimate of the memory one training step needs
// (weights, gradients, AdamW moments, the activations autograd keeps, attention matrices, the
// decoder on all tokens), computed from the config alone, before the model is allocated, so an
// impossible model.img_size or train.batch_size is refused in seconds with a one-line error instead
// of growing until the machine swaps or the kernel kills the process.
#pragma once

#include <cstdint>
#include <string>

#include "run/config.h"

namespace mae {

/// The parts of the estimate, in bytes.
struct MemoryEstimate {
  double parameters = 0;   ///< number of model parameters (a count, not bytes)
  double weights = 0;      ///< weights, gradients and the two AdamW moments (+ bf16 weight copies)
  double activations = 0;  ///< what autograd keeps for backward, encoder and decoder, plus the peak of one block
  double io = 0;           ///< input batch, targets, predictions and loss terms
  double runtime = 0;      ///< LibTorch, loader and the process itself
  double total = 0;        ///< sum of the above
};

/// Estimated peak memory of one training step (forward + backward + AdamW) of `config` on a CPU.
/// Measured against the peak RSS of mae-pretrain: see memory.cpp.
MemoryEstimate estimate_training_memory(const Config& config);

/// Physical memory of this machine in bytes (sysconf), or the cgroup limit when that is lower.
double physical_memory_bytes();

/// "12.3 GiB" style text.
std::string format_bytes(double bytes);

/// ConfigError naming model.img_size, train.batch_size, the estimate and `available_bytes` when the
/// estimate exceeds them.
void check_training_memory(const Config& config, double available_bytes);

}  // namespace mae
