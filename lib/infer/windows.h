// Sliding windows over a whole volume: where model-sized windows go so that they cover every voxel.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace mae {

/// Largest window overlap accepted. The window count grows as (1 / (1 - overlap))³ over a tiling
/// without overlap (8x at 0.5, 64x at 0.75, 1000x at 0.9, and one window per voxel shift near 1),
/// while a voxel's nearest window already sees 3/8 of a window of context on each side at 0.75.
inline constexpr double kMaxOverlap = 0.75;

/// Origins (d, h, w) of windows of size `window` that cover a volume of size `shape` (both D, H, W),
/// neighbours overlapping by at least `overlap` (0 <= overlap <= kMaxOverlap) of the window, the
/// last window on each axis flush with the volume's end; raster order, d slowest. ConfigError for
/// an overlap outside that range; InputError when the volume is smaller than the window on an axis
/// (the message gives both sizes).
std::vector<std::array<int64_t, 3>> window_origins(const std::array<int64_t, 3>& shape,
                                                   const std::array<int64_t, 3>& window, double overlap);

}  // namespace mae
