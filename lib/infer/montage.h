// The picture mae-reconstruct draws: one row per slice (original | masked | reconstruction | error)
// with square pixels in mm, a shared grey window, the radiological view (patient right on image
// left, anterior or superior up) with the anatomical direction marked on each edge, and text labels
// drawn with a small built-in 5x7 bitmap font (no font library needed; lower case is drawn as upper).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/volume.h"

namespace mae {

/// A slice asked for on the command line: a plane and, optionally, a voxel index along its normal.
struct SliceSpec {
  std::string plane;             ///< "axial" | "coronal" | "sagittal"
  std::optional<int64_t> index;  ///< voxel index in the preprocessed volume; nullopt = the middle slice
};

/// Parses "axial", "coronal:40", "sagittal:12" (the text of one --slice). ConfigError naming --slice
/// and the text for an unknown plane or an index that is not a non-negative integer.
SliceSpec parse_slice_spec(const std::string& text);

/// A slice located in a volume.
struct ResolvedSlice {
  std::string plane;  ///< "axial" | "coronal" | "sagittal"
  int axis = 0;       ///< tensor axis the slice is taken along: 0 = D (z), 1 = H (y), 2 = W (x)
  int64_t index = 0;  ///< voxel index along `axis`
  std::string label;  ///< row name, e.g. "axial z=45"
};

/// Locates each spec in `volume` from its orientation code (the plane's normal is the index axis
/// pointing S/I, A/P or L/R). Empty `specs` = the middle axial, coronal and sagittal slices.
/// ConfigError naming --slice, the index and the valid range when an index is out of range.
std::vector<ResolvedSlice> resolve_slices(const Volume& volume, const std::vector<SliceSpec>& specs);

/// What the montage shows; all tensors share the input's (C, D, H, W) grid; channel 0 is shown.
struct MontageInputs {
  const Volume* input = nullptr;      ///< the preprocessed input (its geometry gives mm and directions)
  at::Tensor reconstruction;          ///< (C, D, H, W)
  at::Tensor mask;                    ///< (1, D, H, W), 1 = masked (hidden from the model)
  std::vector<ResolvedSlice> slices;  ///< one row each
  std::vector<std::string> title;     ///< lines above the grid
  std::vector<std::string> footer;    ///< extra lines below the legend (e.g. metrics)
  double target_panel_px = 240;       ///< the largest physical extent of the volume maps to this many pixels
};

/// Renders the montage: uint8 (height, width, 3) RGB. Grey window = 1st..99th percentile of the
/// input's channel 0 (shared by original, masked and reconstruction); masked voxels blue in the
/// masked column; error = reconstruction - input, orange > 0, blue < 0, saturating at half the
/// window's width.
at::Tensor render_montage(const MontageInputs& inputs);

/// Width in pixels of `text` drawn at `scale` (6·scale per character, less the last gap).
int64_t text_width(const std::string& text, int scale);

/// Draws `text` into image: uint8 (H, W, 3) with its top-left corner at (x, y), each font pixel a
/// scale×scale square of `rgb`; what falls outside the image is clipped.
void draw_text(at::Tensor& image, int64_t x, int64_t y, const std::string& text, int scale,
               const std::array<uint8_t, 3>& rgb);

}  // namespace mae
