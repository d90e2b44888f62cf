// orientation_code and reorient: orientation codes in the nibabel/MONAI convention (each letter is
// where the voxel index increases towards) computed from the direction matrix, and reorientation
// as an exact permute/flip of the tensor with the matching direction and origin. No ITK: ITK 5.2's
// SpatialOrientation names use the opposite ("from") convention, which is easy to get backwards.
#include <ATen/ATen.h>

#include <array>
#include <cctype>
#include <cmath>

#include "core/error.h"
#include "io/io.h"

namespace mae {
namespace {

// For each physical LPS axis: the letter for the positive and the negative direction.
constexpr char kPositive[3] = {'L', 'P', 'S'};
constexpr char kNegative[3] = {'R', 'A', 'I'};

// All assignments of three index axes to three physical axes.
constexpr int kPermutations[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2},
                                     {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};

// physical[j]: the LPS axis that index axis j follows most closely. Chosen jointly over the six
// assignments (largest product of |cosines|) so that an oblique direction never gives two index
// axes the same physical axis.
std::array<int, 3> dominant_axes(const std::array<double, 9>& d) {
  int best = 0;
  double best_score = -1.0;
  for (int p = 0; p < 6; ++p) {
    double score = 1.0;
    for (int j = 0; j < 3; ++j) score *= std::abs(d[kPermutations[p][j] * 3 + j]);
    if (score > best_score + 1e-12) {
      best_score = score;
      best = p;
    }
  }
  return {kPermutations[best][0], kPermutations[best][1], kPermutations[best][2]};
}

// Physical axis (0 x, 1 y, 2 z) named by an orientation letter, or -1.
int axis_of(char letter) {
  for (int a = 0; a < 3; ++a) {
    if (letter == kPositive[a] || letter == kNegative[a]) return a;
  }
  return -1;
}

std::string checked_code(const std::string& code) {
  std::string upper = code;
  for (auto& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  bool ok = upper.size() == 3;
  std::array<bool, 3> seen{false, false, false};
  for (size_t i = 0; ok && i < 3; ++i) {
    const int a = axis_of(upper[i]);
    ok = a >= 0 && !seen[a];
    if (ok) seen[a] = true;
  }
  if (!ok) {
    throw ConfigError("orientation code '" + code +
                      "' is invalid: use three letters, one from each of R/L, A/P, S/I (e.g. RAS)");
  }
  return upper;
}

}  // namespace

std::string orientation_code(const Volume& volume) {
  const auto physical = dominant_axes(volume.direction);
  std::string code(3, '?');
  for (int j = 0; j < 3; ++j) {
    const int a = physical[j];
    code[j] = volume.direction[a * 3 + j] >= 0 ? kPositive[a] : kNegative[a];
  }
  return code;
}

Volume reorient(const Volume& volume, const std::string& code) {
  const std::string target = checked_code(code);
  const std::string current = orientation_code(volume);
  if (current == target) return volume;

  // New index axis j takes old index axis source[j], reversed when the letters disagree.
  std::array<int, 3> source{};
  std::array<bool, 3> flip{};
  for (int j = 0; j < 3; ++j) {
    for (int i = 0; i < 3; ++i) {
      if (axis_of(current[i]) == axis_of(target[j])) {
        source[j] = i;
        flip[j] = current[i] != target[j];
      }
    }
  }
  const int64_t old_sizes_xyz[3] = {volume.data.size(3), volume.data.size(2), volume.data.size(1)};

  Volume out;
  std::array<double, 3> first_voxel{};  // old index (x, y, z) of the new voxel 0
  for (int j = 0; j < 3; ++j) {
    const int i = source[j];
    out.spacing[j] = volume.spacing[i];
    for (int r = 0; r < 3; ++r) {
      out.direction[r * 3 + j] = volume.direction[r * 3 + i] * (flip[j] ? -1.0 : 1.0);
    }
    first_voxel[i] = flip[j] ? static_cast<double>(old_sizes_xyz[i] - 1) : 0.0;
  }
  for (int r = 0; r < 3; ++r) {
    double p = volume.origin[r];
    for (int i = 0; i < 3; ++i) {
      p += volume.direction[r * 3 + i] * volume.spacing[i] * first_voxel[i];
    }
    out.origin[r] = p;
  }

  // Tensor dim of ITK axis a is 3 - a (dim 0 is the channel).
  std::vector<int64_t> perm{0, 3 - source[2], 3 - source[1], 3 - source[0]};
  std::vector<int64_t> flip_dims;
  for (int j = 0; j < 3; ++j) {
    if (flip[j]) flip_dims.push_back(3 - j);
  }
  at::Tensor data = volume.data.permute(perm);
  if (!flip_dims.empty()) data = data.flip(flip_dims);
  out.data = data.contiguous();
  return out;
}

}  // namespace mae
