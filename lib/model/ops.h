// Tensor functions of the masked autoencoder that hold no parameters: patchify/unpatchify,
// fixed sin-cos position tables, mask drawing and the masked reconstruction loss.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mae {

/// "[a, b, c]": sizes as they appear in messages.
std::string sizes_str(const std::vector<int64_t>& sizes);

/// Patch grid of an image: img_size[i] / patch_size[i] per axis. Both lists have 2 or 3 entries.
std::vector<int64_t> patch_grid(const std::vector<int64_t>& img_size, const std::vector<int64_t>& patch_size);

/// x: (B, C, *img) -> (B, N, prod(patch)·C), tokens in raster order of the patch grid
/// (t = i·g1·g2 + j·g2 + k), voxels inside a patch in (p1 p2 p3 c) order, c fastest.
at::Tensor patchify(const at::Tensor& x, const std::vector<int64_t>& patch_size);

/// Exact inverse of patchify: (B, N, prod(patch)·C) -> (B, C, *img).
at::Tensor unpatchify(const at::Tensor& patches, const std::vector<int64_t>& img_size,
                      const std::vector<int64_t>& patch_size, int64_t channels);

/// x: (B, C, *img) -> (B, N, C·prod(patch)) with voxels in (c p1 p2 p3) order, the order of a
/// Conv weight (E, C, p1, p2, p3) flattened: the conv patch embedding becomes one matrix product.
at::Tensor patchify_channels_first(const at::Tensor& x, const std::vector<int64_t>& patch_size);

/// Fixed sin-cos position table (1, prod(grid), width), laid out as MONAI's
/// build_sincos_position_embedding: 3D [sin c1ω, cos c1ω, sin c0ω, cos c0ω, sin c2ω, cos c2ω] with
/// pos_dim = width/6, ω_k = 1/10000^(k/pos_dim); 2D [sin c1ω, cos c1ω, sin c0ω, cos c0ω], width/4.
/// Throws ConfigError when width is not divisible by 6 (3D) or 4 (2D).
at::Tensor sincos_position_table(const std::vector<int64_t>& grid, int64_t width);

/// Number of patches kept visible: floor((1 - ratio)·n), exact for ratios such as 0.9 of 10 (keeps 1).
int64_t num_visible(int64_t n, double masking_ratio);

/// Draws the visible patches of each sample uniformly without replacement with torch::multinomial
/// on the CPU (so a seed gives the same mask on every device). Returns int64 (B, keep) indices in
/// draw order. Throws ConfigError when the ratio leaves no visible or no masked patch.
at::Tensor draw_visible(int64_t batch, int64_t n, double masking_ratio, std::optional<at::Generator> generator);

/// Mask (B, N) with 1 = masked, 0 = visible, from the visible indices (B, keep).
at::Tensor mask_from_visible(const at::Tensor& visible, int64_t n);

/// The rows of a global batch that a forward pass computes: with data-parallel training rank r holds
/// rows offset .. offset + B - 1 of a batch of `global` rows. global = 0: the batch is whole.
struct BatchSlice {
  int64_t global = 0;  ///< rows of the whole batch, 0 = the tensor's own batch
  int64_t offset = 0;  ///< first row of this slice
};

/// Inverted dropout x * bernoulli(1 - p) / (1 - p), the noise drawn from the global generator (of
/// x's device) for the WHOLE batch of `slice` (shape (global, x.sizes()[1:])) and then cut to this
/// slice's rows: N ranks holding slices of one batch draw exactly the noise one process draws for
/// it, and all ranks keep their generators in step. p in [0, 1]; p = 1 gives zeros.
at::Tensor dropout(const at::Tensor& x, double p, const BatchSlice& slice = {});

/// Multi-head softmax attention softmax(q k^T / sqrt(d)) v for q, k, v (B, heads, T, d), with dropout
/// dropout_p on the attention weights (0 in evaluation). fused: LibTorch's
/// at::scaled_dot_product_attention where this LibTorch has it (2.x) and dropout_p is 0, else the
/// explicit matmul-softmax path (always used on 1.13, and for dropout, which goes through
/// mae::dropout with `slice`). Both compute the same function within float rounding.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p, bool fused,
                     const BatchSlice& slice = {});

/// Mean squared error per patch, averaged over masked patches only.
/// pred, target: (B, N, P); mask: (B, N), 1 = masked. With norm_pix, each target patch is first
/// normalised by its own mean and (unbiased) variance + 1e-6, as in the MAE paper.
at::Tensor masked_mse_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask,
                           bool norm_pix = false);

}  // namespace mae
