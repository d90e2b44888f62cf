// Encoder features of a whole volume: the volume preprocessed exactly as training saw it, covered by
// model-sized windows, each window encoded on all its patches (no masking, no cls token, after the
// encoder's final norm, as MONAI's ViT computes it). Saved as a dict[str, Tensor] for Python with a
// JSON description beside it.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "model/mae.h"

namespace mae {

/// Encoder outputs over the windows of one volume.
struct EncoderFeatures {
  at::Tensor windows;  ///< (W, C, d, h, w) float32: the exact encoder inputs
  at::Tensor origins;  ///< (W, 3) int64: voxel offsets (d, h, w) of each window in the volume
  at::Tensor tokens;   ///< (W, N, E) float32: encoder output after its final norm
  at::Tensor pooled;   ///< (E) float32: mean token over all windows and patches
};

/// Covers `volume` (C, D, H, W) with windows of the model's img_size overlapping by at least
/// `overlap` (window_origins) and encodes each under NoGradGuard, `batch` windows at a time.
/// InputError when the volume is smaller than the window or its channels differ from the model's;
/// ConfigError for a 2D model or a bad overlap.
EncoderFeatures encode_volume(MaskedAutoencoderImpl& model, const at::Tensor& volume, double overlap,
                              int64_t batch = 2);

/// Where a features export went.
struct FeaturesResult {
  std::string pt_path;    ///< the tensor file
  std::string json_path;  ///< the description beside it
  int64_t num_windows = 0; ///< W
};

/// Loads the checkpoint with its own config, preprocesses `volume_path` as training did (read,
/// reorient, resample, intensity, foreground crop, float16 rounding), encodes it (encode_volume) and
/// writes {"windows", "origins", "tokens", "pooled"} to `out_path` plus a JSON description (shapes,
/// checkpoint, preprocessing) beside it. CheckpointError / InputError naming the file for bad
/// input, IoError naming `out_path` when it cannot be written.
FeaturesResult export_features(const std::string& checkpoint, const std::string& volume_path,
                               const std::string& out_path, double overlap);

}  // namespace mae
