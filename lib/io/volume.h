// A 3D image in memory: voxels as a LibTorch tensor plus the physical geometry that places them in
// patient space. This header is ITK-free so every area can use it.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>

namespace mae {

/// Voxels and geometry of one volume.
///
/// Axis convention: `data` is (C, D, H, W), W the fastest-varying axis. ITK's index (i, j, k) =
/// (x, y, z) maps to tensor axes (W, H, D). Geometry is kept in ITK's (x, y, z) order, so
/// spacing[0] is the spacing along W. Physical point of tensor voxel (d, h, w) is
/// origin + direction * diag(spacing) * (w, h, d), in ITK's LPS patient coordinates.
struct Volume {
  at::Tensor data;                                     ///< float32 (C, D, H, W), contiguous
  std::array<double, 3> spacing{1.0, 1.0, 1.0};        ///< mm per voxel along x (W), y (H), z (D)
  std::array<double, 3> origin{0.0, 0.0, 0.0};         ///< mm, LPS position of voxel (0, 0, 0)
  std::array<double, 9> direction{1, 0, 0, 0, 1, 0, 0, 0, 1};  ///< row-major 3x3; column j = direction of index axis j

  /// Number of channels C.
  int64_t channels() const { return data.size(0); }
  /// Size along (D, H, W).
  std::array<int64_t, 3> shape_dhw() const { return {data.size(1), data.size(2), data.size(3)}; }
};

}  // namespace mae
