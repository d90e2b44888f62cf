#include "model/flops.h"

#include "model/ops.h"

namespace mae {

namespace {

// One transformer block over `tokens` tokens of width w: qkv, scores, scores·v, out_proj, MLP.
double block_flops(double tokens, double w, double mlp) {
  return 2.0 * tokens * w * 3.0 * w       // qkv
         + 2.0 * tokens * tokens * w      // q·kᵀ over all heads
         + 2.0 * tokens * tokens * w      // att·v
         + 2.0 * tokens * w * w           // out_proj
         + 2.0 * 2.0 * tokens * w * mlp;  // linear1 + linear2
}

}  // namespace

double forward_flops(const MaskedAutoencoderOptions& o, int64_t batch) {
  const double n = static_cast<double>(o.num_patches());
  const double keep = static_cast<double>(num_visible(o.num_patches(), o.masking_ratio()));
  const double e = static_cast<double>(o.hidden_size()), ed = static_cast<double>(o.decoder_hidden_size());
  const double p = static_cast<double>(o.patch_dim());
  double f = 2.0 * keep * p * e;  // patch projection of the visible patches
  f += static_cast<double>(o.num_layers()) * block_flops(keep + 1.0, e, static_cast<double>(o.mlp_dim()));
  f += 2.0 * (keep + 1.0) * e * ed;  // decoder_embed
  f += static_cast<double>(o.decoder_num_layers()) * block_flops(n + 1.0, ed, static_cast<double>(o.decoder_mlp_dim()));
  f += 2.0 * n * ed * p;  // decoder_pred
  return f * static_cast<double>(batch);
}

double forward_attention_flops(const MaskedAutoencoderOptions& o, int64_t batch) {
  const double n = static_cast<double>(o.num_patches());
  const double keep = static_cast<double>(num_visible(o.num_patches(), o.masking_ratio()));
  const double e = static_cast<double>(o.hidden_size()), ed = static_cast<double>(o.decoder_hidden_size());
  const double f = static_cast<double>(o.num_layers()) * 4.0 * (keep + 1.0) * (keep + 1.0) * e +
                   static_cast<double>(o.decoder_num_layers()) * 4.0 * (n + 1.0) * (n + 1.0) * ed;
  return f * static_cast<double>(batch);
}

double encode_flops(const MaskedAutoencoderOptions& o, int64_t batch) {
  const double n = static_cast<double>(o.num_patches());
  const double e = static_cast<double>(o.hidden_size());
  double f = 2.0 * n * static_cast<double>(o.patch_dim()) * e;
  f += static_cast<double>(o.num_layers()) * block_flops(n, e, static_cast<double>(o.mlp_dim()));
  return f * static_cast<double>(batch);
}

}  // namespace mae
