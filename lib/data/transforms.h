// Preprocessing on tensors. Deterministic transforms (intensity normalisation, foreground crop) run
// once per volume and are cached; random ones (pad, crop, flip, intensity augmentation) run for every
// item of every epoch with a random state derived only from (seed, epoch, item), so results do not
// depend on threads.
// All volumes are float32 (C, D, H, W); sizes and positions are given in (D, H, W) order.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>

#include "data/config.h"
#include "io/volume.h"

namespace mae {

/// (D, H, W) sizes or positions.
using Dhw = std::array<int64_t, 3>;

/// CT window: x: (C, D, H, W) -> same shape, (x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min,
/// clipped to [b_min, b_max] when `clip`.
at::Tensor ct_window(const at::Tensor& x, double a_min, double a_max, double b_min, double b_max, bool clip);

/// Per-channel z-score over nonzero voxels: x: (C, D, H, W) -> same shape. Nonzero voxels become
/// (x - mean) / std (population std over the nonzero voxels, 1 when it is 0); zero voxels stay 0; a
/// channel without nonzero voxels is returned unchanged.
at::Tensor zscore_nonzero(const at::Tensor& x);

/// The q-th percentile (0 .. 100) of `values` with linear interpolation between order statistics
/// (numpy's default). values: any shape, float32; InputError when empty.
double percentile(const at::Tensor& values, double q);

/// Per-channel percentile scaling: x: (C, D, H, W) -> same shape; the `lower` percentile maps to
/// b_min and the `upper` to b_max (clipped when `clip`). A channel whose two percentiles are equal
/// becomes b_min.
at::Tensor percentile_scale(const at::Tensor& x, double lower, double upper, double b_min, double b_max, bool clip);

/// Applies `config.mode`: x: (C, D, H, W) -> same shape, float32.
at::Tensor apply_intensity(const at::Tensor& x, const IntensityConfig& config);

/// Bounding box of voxels > threshold in any channel: x: (C, D, H, W) -> {d0, h0, w0, d1, h1, w1}
/// (half-open); the whole volume when no voxel exceeds the threshold.
std::array<int64_t, 6> foreground_box(const at::Tensor& x, double threshold);

/// Crops a volume to foreground_box(volume.data, threshold), moving the origin so every kept voxel
/// keeps its physical position.
Volume crop_foreground(const Volume& volume, double threshold);

/// Pads x: (C, D, H, W) -> (C, max(D, d), max(H, h), max(W, w)) with `value`, centred (the odd
/// voxel goes after). Returns x itself when no axis is too small.
at::Tensor pad_to_size(const at::Tensor& x, const Dhw& min_size, double value);

/// Value used to pad volumes after `config`'s intensity mode (b_min for ct_window and percentile,
/// 0 otherwise).
double pad_value(const IntensityConfig& config);

/// The random choices for one item: where its crop starts and which axes it flips.
struct CropDraw {
  Dhw start{0, 0, 0};                             ///< crop start (D, H, W)
  std::array<bool, 3> flip{false, false, false};  ///< flip along D, H, W
};

/// A 64-bit seed mixing (seed, epoch, item) with splitmix64; the only source of an item's randomness.
uint64_t item_seed(uint64_t seed, int64_t epoch, int64_t item);

/// Draws a crop of `crop` inside a volume of `shape` (each shape >= crop) and the flips, each axis
/// flipped with probability flip_prob, from std::mt19937_64(rng_seed).
CropDraw draw_crop(const Dhw& shape, const Dhw& crop, double flip_prob, uint64_t rng_seed);

/// Applies a draw: x: (C, D, H, W) -> (C, crop_d, crop_h, crop_w), a contiguous copy.
at::Tensor apply_crop(const at::Tensor& x, const CropDraw& draw, const Dhw& crop);

/// pad_to_size + draw_crop + apply_crop: x: (C, D, H, W) -> (C, crop_d, crop_h, crop_w).
at::Tensor random_crop(const at::Tensor& x, const Dhw& crop, double flip_prob, uint64_t rng_seed, double pad);

/// The random choices of one crop's intensity augmentation; the defaults change nothing.
struct IntensityAugDraw {
  bool apply = false;  ///< false: the crop is left as it is
  double scale = 1.0;  ///< multiplier s
  double shift = 0.0;  ///< offset b, added after scaling
  double gamma = 1.0;  ///< exponent g, applied before scale and shift
};

/// Draws an item's intensity augmentation from std::mt19937_64 seeded with a mix of `rng_seed` (the
/// item's seed, the one draw_crop takes) and a tag of its own, so the crop's stream is untouched:
/// applied with probability config.prob; then s ~ U(scale), b ~ U(shift), g ~ log-uniform(gamma)
/// (each exactly lo when lo == hi). Not applied: the defaults.
IntensityAugDraw draw_intensity_aug(const IntensityAugConfig& config, uint64_t rng_seed);

/// Applies a draw: x: (C, D, H, W) -> same shape, float32. Per channel, with its min m and max M:
/// x -> m + (M - m) * ((x - m) / (M - m))^g (left alone when M == m or g == 1, so m and M stay), then
/// x * s + b; every voxel, computed in double one voxel at a time (the same bits for any number of
/// threads). Returns x itself when `draw.apply` is false, otherwise a new contiguous tensor.
at::Tensor apply_intensity_aug(const at::Tensor& x, const IntensityAugDraw& draw);

}  // namespace mae
