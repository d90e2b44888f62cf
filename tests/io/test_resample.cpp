// Resampling against known answers: the size and extent rule, constants stay constant, linear
// ramps stay linear (up and down, and on another grid), channels handled one by one.
#include <ATen/ATen.h>

#include "core/error.h"
#include "io/io.h"
#include "test_util.h"

namespace mae::test {
namespace {

// (1, D, H, W) volume with value = a*x + b*y + c*z + e in index units.
Volume ramp(int64_t d, int64_t h, int64_t w, std::array<double, 3> spacing, double a, double b,
            double c, double e) {
  Volume v;
  const auto z = at::arange(d, at::kFloat).view({d, 1, 1});
  const auto y = at::arange(h, at::kFloat).view({1, h, 1});
  const auto x = at::arange(w, at::kFloat).view({1, 1, w});
  v.data = (x * a + y * b + z * c + e).expand({d, h, w}).contiguous().unsqueeze(0);
  v.spacing = spacing;
  v.origin = {-3, 4, 7};
  v.direction = oblique_direction();
  return v;
}

TEST(Resample, SizeFollowsExtentOverSpacingWithSameOriginAndDirection) {
  const Volume in = ramp(6, 8, 10, {1, 1, 2}, 0, 0, 0, 1);
  const Volume out = resample(in, {2, 0.5, 3});
  EXPECT_EQ(out.data.sizes(), (std::vector<int64_t>{1, 4, 16, 5}));  // 12/3, 8/0.5, 10/2
  EXPECT_EQ(out.spacing, (std::array<double, 3>{2, 0.5, 3}));
  EXPECT_EQ(out.origin, in.origin);
  EXPECT_EQ(out.direction, in.direction);
  EXPECT_EQ(resample(in, {3, 3, 3}).data.sizes(), (std::vector<int64_t>{1, 4, 3, 3}));
  EXPECT_EQ(resample(in, {100, 100, 100}).data.sizes(), (std::vector<int64_t>{1, 1, 1, 1}));
}

TEST(Resample, ConstantStaysConstantUpAndDown) {
  const Volume in = ramp(6, 8, 10, {1, 1, 2}, 0, 0, 0, 3.5);
  for (auto spacing : {std::array<double, 3>{0.6, 0.7, 0.9}, std::array<double, 3>{2.5, 1.5, 4}}) {
    const Volume out = resample(in, spacing);
    EXPECT_NEAR(out.data.min().item<float>(), 3.5f, 1e-4);
    EXPECT_NEAR(out.data.max().item<float>(), 3.5f, 1e-4);
  }
}

TEST(Resample, LinearRampStaysLinearWhenUpsampling) {
  const Volume in = ramp(4, 5, 10, {1, 1, 1}, 2, 1, 3, 1);
  const Volume out = resample(in, {0.5, 1, 1});
  ASSERT_EQ(out.data.sizes(), (std::vector<int64_t>{1, 4, 5, 20}));
  auto a = out.data.accessor<float, 4>();
  for (int64_t d = 0; d < 4; ++d)
    for (int64_t h = 0; h < 5; ++h)
      for (int64_t w = 0; w < 20; ++w) {
        const double x = std::min(0.5 * w, 9.0);  // past the last centre: nearest voxel
        EXPECT_NEAR(a[0][d][h][w], 2 * x + h + 3 * d + 1, 1e-4) << d << " " << h << " " << w;
      }
}

TEST(Resample, LinearRampStaysLinearInsideWhenDownsampling) {
  const Volume in = ramp(3, 3, 64, {1, 1, 1}, 0.5, 0, 0, 2);
  const Volume out = resample(in, {2, 1, 1});
  ASSERT_EQ(out.data.sizes(), (std::vector<int64_t>{1, 3, 3, 32}));
  auto a = out.data.accessor<float, 4>();
  // Away from the borders (> 4 sigma) the symmetric Gaussian leaves a ramp unchanged.
  for (int64_t w = 4; w < 28; ++w) EXPECT_NEAR(a[0][1][1][w], 0.5 * (2.0 * w) + 2, 1e-3) << w;
}

TEST(Resample, ResampleLikeFollowsReferenceGrid) {
  Volume in = ramp(8, 8, 8, {1, 1, 1}, 1, 2, 3, 0);
  in.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  in.origin = {0, 0, 0};
  Volume ref;
  ref.data = at::zeros({1, 4, 5, 6});
  ref.spacing = {1, 1, 1};
  ref.origin = {0.5, 1.25, 2};
  ref.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  const Volume out = resample_like(in, ref);
  ASSERT_EQ(out.data.sizes(), ref.data.sizes());
  EXPECT_EQ(out.origin, ref.origin);
  auto a = out.data.accessor<float, 4>();
  for (int64_t d = 0; d < 4; ++d)
    for (int64_t h = 0; h < 5; ++h)
      for (int64_t w = 0; w < 6; ++w) {
        const double x = 0.5 + w, y = 1.25 + h, z = 2.0 + d;
        EXPECT_NEAR(a[0][d][h][w], x + 2 * y + 3 * z, 1e-4);
      }
}

TEST(Resample, ChannelsAreResampledSeparately) {
  Volume in = ramp(6, 6, 6, {1, 1, 1}, 0, 0, 0, 1);
  in.data = at::cat({in.data, in.data * 7}, 0);
  const Volume out = resample(in, {2, 2, 2});
  ASSERT_EQ(out.data.sizes(), (std::vector<int64_t>{2, 3, 3, 3}));
  EXPECT_NEAR(out.data[0].max().item<float>(), 1.0f, 1e-4);
  EXPECT_NEAR(out.data[1].min().item<float>(), 7.0f, 1e-4);
}

TEST(Resample, BadSpacingIsConfigError) {
  const Volume in = ramp(2, 2, 2, {1, 1, 1}, 0, 0, 0, 1);
  expect_error<ConfigError>([&] { resample(in, {1, 0, 1}); }, {"spacing"});
}

}  // namespace
}  // namespace mae::test
