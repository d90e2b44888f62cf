// window_origins: every voxel covered, windows inside the volume, overlap respected, errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "infer/windows.h"

namespace mae {
namespace {

struct WindowCase {
  std::array<int64_t, 3> shape, window;
  double overlap;
};

TEST(WindowOrigins, CoverEveryVoxelInsideTheVolume) {
  const std::vector<WindowCase> cases = {
      {{16, 16, 16}, {16, 16, 16}, 0.0}, {{17, 16, 33}, {16, 16, 16}, 0.25},  {{40, 23, 64}, {16, 8, 16}, 0.5},
      {{30, 30, 30}, {7, 9, 11}, 0.0},   {{91, 109, 91}, {64, 64, 64}, 0.25}, {{20, 20, 20}, {4, 4, 4}, 0.75},
      {{5, 100, 6}, {5, 3, 2}, 0.6},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::to_string(c.shape[0]) + "x" + std::to_string(c.shape[1]) + "x" + std::to_string(c.shape[2]) +
                 " overlap " + std::to_string(c.overlap));
    const auto origins = window_origins(c.shape, c.window, c.overlap);
    std::vector<int> covered(static_cast<size_t>(c.shape[0] * c.shape[1] * c.shape[2]), 0);
    for (size_t i = 0; i < origins.size(); ++i) {
      const auto& o = origins[i];
      for (int a = 0; a < 3; ++a) {
        ASSERT_GE(o[a], 0);
        ASSERT_LE(o[a] + c.window[a], c.shape[a]);
      }
      if (i > 0) {
        EXPECT_LT(origins[i - 1], o) << "not in raster order";
      }
      for (int64_t d = o[0]; d < o[0] + c.window[0]; ++d) {
        for (int64_t h = o[1]; h < o[1] + c.window[1]; ++h) {
          for (int64_t w = o[2]; w < o[2] + c.window[2]; ++w) {
            covered[static_cast<size_t>((d * c.shape[1] + h) * c.shape[2] + w)]++;
          }
        }
      }
    }
    for (int v : covered) ASSERT_GT(v, 0);
    // Neighbours along each axis overlap by at least overlap·window.
    for (int a = 0; a < 3; ++a) {
      std::vector<int64_t> axis;
      for (const auto& o : origins) {
        if (axis.empty() || o[a] > axis.back()) axis.push_back(o[a]);
      }
      for (size_t i = 1; i < axis.size(); ++i) {
        EXPECT_GE(axis[i - 1] + c.window[a] - axis[i], static_cast<int64_t>(c.overlap * c.window[a]));
      }
      EXPECT_EQ(axis.front(), 0);
      EXPECT_EQ(axis.back() + c.window[a], c.shape[a]);
    }
  }
}

TEST(WindowOrigins, RefusesASmallVolumeAndABadOverlap) {
  try {
    window_origins({10, 20, 20}, {16, 16, 16}, 0.25);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("10"), std::string::npos) << what;
    EXPECT_NE(what.find("16"), std::string::npos) << what;
  }
  EXPECT_THROW(window_origins({20, 20, 20}, {16, 16, 16}, 1.0), ConfigError);
  EXPECT_THROW(window_origins({20, 20, 20}, {16, 16, 16}, -0.1), ConfigError);
  EXPECT_THROW(window_origins({20, 20, 20}, {16, 16, 16}, std::nan("")), ConfigError);
  // Near 1 the stride is one voxel: (size - window + 1)³ windows. The overlap is bounded instead.
  for (double overlap : {0.76, 0.9, 0.999}) {
    try {
      window_origins({64, 64, 64}, {16, 16, 16}, overlap);
      ADD_FAILURE() << overlap;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("must be 0 .. 0.75"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(window_origins({64, 64, 64}, {16, 16, 16}, kMaxOverlap).size(), 13u * 13u * 13u);
}

}  // namespace
}  // namespace mae
