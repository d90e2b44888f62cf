// Analytic floating-point operation counts of the masked autoencoder, used by the benchmark to
// express speed as a fraction of the machine's matrix-product rate.
#pragma once

#include "model/mae.h"

namespace mae {

/// Matrix-product FLOPs (2·M·N·K each, attention included) of one forward pass of `batch` samples,
/// as this implementation computes it: the patch projection runs on visible patches only.
double forward_flops(const MaskedAutoencoderOptions& options, int64_t batch);

/// The part of forward_flops in attention's two token-by-token products (q·kᵀ and att·v), which
/// grow with the square of the token count while every other product grows linearly.
double forward_attention_flops(const MaskedAutoencoderOptions& options, int64_t batch);

/// Matrix-product FLOPs of one encoder pass over all patches without masking (encode()).
double encode_flops(const MaskedAutoencoderOptions& options, int64_t batch);

}  // namespace mae
