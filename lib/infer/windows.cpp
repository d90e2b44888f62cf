#include "infer/windows.h"

#include <cmath>
#include <cstdio>
#include <string>

#include "core/error.h"

namespace mae {

namespace {

std::vector<int64_t> axis_origins(int64_t size, int64_t window, double overlap) {
  const int64_t stride = std::max<int64_t>(1, static_cast<int64_t>(std::floor(window * (1.0 - overlap))));
  std::vector<int64_t> out;
  for (int64_t o = 0;; o += stride) {
    if (o + window >= size) {
      out.push_back(size - window);
      break;
    }
    out.push_back(o);
  }
  return out;
}

}  // namespace

std::vector<std::array<int64_t, 3>> window_origins(const std::array<int64_t, 3>& shape,
                                                   const std::array<int64_t, 3>& window, double overlap) {
  if (!(overlap >= 0.0 && overlap <= kMaxOverlap)) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "window overlap %g must be 0 .. %g", overlap, kMaxOverlap);
    throw ConfigError(buf);
  }
  static const char* kAxis[3] = {"D", "H", "W"};
  for (int a = 0; a < 3; ++a) {
    if (shape[a] < window[a]) {
      throw InputError(std::string("the volume is smaller than the model window on axis ") + kAxis[a] + " (" +
                       std::to_string(shape[a]) + " < " + std::to_string(window[a]) + " voxels after preprocessing)");
    }
  }
  const auto d = axis_origins(shape[0], window[0], overlap);
  const auto h = axis_origins(shape[1], window[1], overlap);
  const auto w = axis_origins(shape[2], window[2], overlap);
  std::vector<std::array<int64_t, 3>> out;
  for (int64_t a : d)
    for (int64_t b : h)
      for (int64_t c : w) out.push_back({a, b, c});
  return out;
}

}  // namespace mae
