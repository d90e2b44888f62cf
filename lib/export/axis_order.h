// The spatial axis order of exported weights and features. mae3d holds volumes as (C, D, H, W) with
// D the slowest image index (NIfTI k, ITK z) and W the fastest (NIfTI i, ITK x); MONAI's LoadImage
// (+ EnsureChannelFirst, Orientation) gives (C, i, j, k), the same spatial axes reversed. An export
// in MONAI's order rewrites everything that depends on the axis order so that the MONAI network on
// x.permute(0, 1, 4, 3, 2) computes what mae3d computes on x, with tokens in MONAI's raster:
//   - conv patch kernels: spatial axes reversed;
//   - in-patch voxel vectors in (p1 p2 p3 c) order (perceptron projection columns, decoder_pred
//     rows): the (p1 p2 p3) raster taken over the reversed patch axes;
//   - token-indexed tables and outputs: the raster over the reversed patch grid.
// Attention, MLPs and norms act on tokens independently of their order and stay as they are.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace mae {

/// Spatial axis order of an export.
enum class AxisOrder {
  monai,   ///< MONAI's (C, i, j, k): mae3d's spatial axes reversed (the default)
  native,  ///< mae3d's (C, D, H, W): k slowest, i fastest
};

/// "monai" or "native".
const char* to_string(AxisOrder order);

/// Parses an --axis-order value; ConfigError naming the flag and the choices for anything else.
AxisOrder parse_axis_order(const std::string& name);

/// `sizes` (per spatial axis, mae3d's order) in `order`: reversed for monai, as given for native.
std::vector<int64_t> in_axis_order(const std::vector<int64_t>& sizes, AxisOrder order);

/// x: (B, C, s0, ..., sn) -> (B, C, sn, ..., s0), contiguous. Also turns a conv kernel
/// (E, C, p0, ..., pn) into the kernel for spatially reversed input.
at::Tensor reverse_spatial_axes(const at::Tensor& x);

/// t: (R, prod(sizes), X) whose middle axis is a raster over `sizes` (first slowest) -> the same
/// entries with the middle axis a raster over the reversed sizes, contiguous. Tokens (B, N, E) over
/// the patch grid, or in-patch voxel vectors (R, prod(patch), C) over the patch size.
at::Tensor reverse_raster(const at::Tensor& t, const std::vector<int64_t>& sizes);

}  // namespace mae
