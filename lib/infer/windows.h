// Sliding windows over a whole volume: where model-sized windows go so that they cover every voxel.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

namespace mae {

/// Origins (d, h, w) of windows of size `window` that cover a volume of size `shape` (both D, H, W),
/// neighbours overlapping by at least `overlap` (0 <= overlap < 1) of the window, the last window on
/// each axis flush with the volume's end; raster order, d slowest. InputError when the volume is
/// smaller than the window on an axis (the message gives both sizes).
std::vector<std::array<int64_t, 3>> window_origins(const std::array<int64_t, 3>& shape,
                                                   const std::array<int64_t, 3>& window, double overlap);

}  // namespace mae
