// Encoder features of a whole volume: the volume preprocessed exactly as training saw it, covered by
// model-sized windows, each window encoded on all its patches (no masking, no cls token, after the
// encoder's final norm, as MONAI's ViT computes it). Saved as a dict[str, Tensor] for Python with a
// JSON description beside it, by default in MONAI's axis order (export/axis_order.h): windows as
// (C, i, j, k) arrays, origins as (i, j, k) and tokens in the raster of the (i, j, k) patch grid, so
// that they match a ViT exported with the same --axis-order.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "export/axis_order.h"
#include "model/mae.h"

namespace mae {

/// Encoder outputs over the windows of one volume, in mae3d's axis order (encode_volume) or in
/// MONAI's (to_axis_order).
struct EncoderFeatures {
  at::Tensor windows;  ///< (W, C, d, h, w) float32: the exact encoder inputs ((W, C, i, j, k) in MONAI's order)
  at::Tensor origins;  ///< (W, 3) int64: voxel offsets (d, h, w) of each window in the volume ((i, j, k))
  at::Tensor tokens;   ///< (W, N, E) float32: encoder output after its final norm, in the raster of the grid
  at::Tensor pooled;   ///< (E) float32: mean token over all windows and patches
};

/// Covers `volume` (C, D, H, W) with windows of the model's img_size overlapping by at least
/// `overlap` (window_origins) and encodes each under NoGradGuard, `batch` windows at a time.
/// InputError when the volume is smaller than the window or its channels differ from the model's;
/// ConfigError for a 2D model or a bad overlap.
EncoderFeatures encode_volume(MaskedAutoencoderImpl& model, const at::Tensor& volume, double overlap,
                              int64_t batch = 2);

/// Features from encode_volume (mae3d's order) in `axis_order`: for monai, windows with their spatial
/// axes reversed, origins as (i, j, k) and tokens in the raster of the reversed `grid`; pooled as it is.
EncoderFeatures to_axis_order(const EncoderFeatures& features, const std::vector<int64_t>& grid, AxisOrder axis_order);

/// Where a features export went.
struct FeaturesResult {
  std::string pt_path;      ///< the tensor file
  std::string json_path;    ///< the description beside it
  int64_t num_windows = 0;  ///< W
};

/// Loads the checkpoint with its own config, preprocesses `volume_path` as training did (read,
/// reorient, resample, intensity, foreground crop, float16 rounding), encodes it (encode_volume) and
/// writes {"windows", "origins", "tokens", "pooled"} in `axis_order` to `out_path` plus a JSON
/// description (axis order, shapes, checkpoint, preprocessing) beside it. CheckpointError /
/// InputError naming the file for bad input, IoError naming `out_path` when it cannot be written.
/// A checkpoint marked diverged is refused (CheckpointError) unless `allow_diverged`.
FeaturesResult export_features(const std::string& checkpoint, const std::string& volume_path,
                               const std::string& out_path, double overlap, AxisOrder axis_order = AxisOrder::monai,
                               bool allow_diverged = false);

}  // namespace mae
