// Tensor transforms: intensity modes against known values, foreground crop, pad, crop and flip.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include "core/error.h"
#include "data/transforms.h"

namespace mae {
namespace {

at::Tensor as_volume(std::vector<float> v) {
  return at::tensor(v, at::kFloat).reshape({1, 1, 1, static_cast<int64_t>(v.size())});
}

void expect_values(const at::Tensor& t, const std::vector<float>& want, double tol = 1e-5) {
  at::Tensor f = t.flatten().contiguous();
  ASSERT_EQ(f.numel(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(f[i].item<double>(), want[i], tol) << "at " << i;
}

TEST(Intensity, CtWindowKnownValues) {
  at::Tensor x = as_volume({-175.f, 37.5f, 250.f, -1000.f, 1000.f});
  expect_values(ct_window(x, -175, 250, 0, 1, true), {0.f, 0.5f, 1.f, 0.f, 1.f});
  expect_values(ct_window(x, -175, 250, 0, 1, false), {0.f, 0.5f, 1.f, -825.f / 425.f, 1175.f / 425.f});
  expect_values(ct_window(x, -175, 250, -1, 1, true), {-1.f, 0.f, 1.f, -1.f, 1.f});
}

TEST(Intensity, ZscoreNonzeroKnownValues) {
  at::Tensor y = zscore_nonzero(as_volume({0.f, 1.f, 2.f, 3.f}));
  const float s = std::sqrt(2.f / 3.f);  // population std of {1, 2, 3}
  expect_values(y, {0.f, -1.f / s, 0.f, 1.f / s});
}

TEST(Intensity, ZscoreConstantAndEmptyVolumesStayFinite) {
  at::Tensor c = at::full({1, 3, 4, 5}, 7.f);
  at::Tensor y = zscore_nonzero(c);
  EXPECT_TRUE(at::isfinite(y).all().item<bool>());
  EXPECT_EQ(y.abs().max().item<float>(), 0.f);
  at::Tensor z = at::zeros({1, 3, 4, 5});
  EXPECT_TRUE(at::equal(zscore_nonzero(z), z));
}

TEST(Intensity, ZscoreIsPerChannel) {
  at::Tensor x =
      at::stack({at::arange(1, 9, at::kFloat), at::arange(1, 9, at::kFloat) * 100 + 5}).reshape({2, 2, 2, 2});
  at::Tensor y = zscore_nonzero(x);
  EXPECT_TRUE(at::allclose(y[0], y[1], 1e-5, 1e-5));
  EXPECT_NEAR(y[1].mean().item<double>(), 0.0, 1e-5);
}

TEST(Intensity, PercentileMatchesNumpyLinear) {
  at::Tensor v = at::arange(0, 101, at::kFloat);  // percentile q of 0..100 is q
  EXPECT_NEAR(percentile(v, 0.5), 0.5, 1e-9);
  EXPECT_NEAR(percentile(v, 99.5), 99.5, 1e-9);
  EXPECT_NEAR(percentile(v, 0), 0, 1e-9);
  EXPECT_NEAR(percentile(v, 100), 100, 1e-9);
  EXPECT_NEAR(percentile(at::tensor({4.f, 1.f, 3.f, 2.f}), 50), 2.5, 1e-9);
  EXPECT_THROW(percentile(at::empty({0}), 50), InputError);
}

TEST(Intensity, PercentileScale) {
  at::Tensor x = at::arange(0, 101, at::kFloat).reshape({1, 1, 1, 101});
  at::Tensor y = percentile_scale(x, 10, 90, 0, 1, true);
  EXPECT_NEAR(y.flatten()[10].item<double>(), 0.0, 1e-6);
  EXPECT_NEAR(y.flatten()[50].item<double>(), 0.5, 1e-6);
  EXPECT_NEAR(y.flatten()[90].item<double>(), 1.0, 1e-6);
  EXPECT_EQ(y.min().item<float>(), 0.f);
  EXPECT_EQ(y.max().item<float>(), 1.f);
  at::Tensor u = percentile_scale(x, 10, 90, 0, 1, false);
  EXPECT_NEAR(u.flatten()[100].item<double>(), 1.125, 1e-6);
  // Constant volume: both percentiles equal -> b_min, finite.
  at::Tensor c = percentile_scale(at::full({1, 2, 2, 2}, 3.f), 0.5, 99.5, -1, 1, true);
  EXPECT_TRUE(at::equal(c, at::full({1, 2, 2, 2}, -1.f)));
}

TEST(Intensity, ApplyDispatchesOnMode) {
  at::Tensor x = as_volume({-175.f, 250.f});
  IntensityConfig c;
  c.mode = "none";
  EXPECT_TRUE(at::equal(apply_intensity(x, c), x));
  c.mode = "ct_window";
  expect_values(apply_intensity(x, c), {0.f, 1.f});
  c.mode = "bogus";
  EXPECT_THROW(apply_intensity(x, c), ConfigError);
}

TEST(Foreground, BoxAndCropKeepPhysicalPositions) {
  Volume v;
  v.data = at::zeros({2, 10, 12, 14});
  v.data[1][3][4][5] = 1.f;
  v.data[0][6][8][9] = 1.f;
  v.spacing = {0.5, 2.0, 3.0};
  v.origin = {10, 20, 30};
  v.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};
  const auto box = foreground_box(v.data, 0.5);
  EXPECT_EQ(box, (std::array<int64_t, 6>{3, 4, 5, 7, 9, 10}));
  Volume c = crop_foreground(v, 0.5);
  EXPECT_EQ(c.data.sizes(), (std::vector<int64_t>{2, 4, 5, 5}));
  // Voxel (d, h, w) = (3, 4, 5) -> new (0, 0, 0): origin moves by direction * spacing * (w, h, d).
  EXPECT_DOUBLE_EQ(c.origin[0], 10 - 0.5 * 5);
  EXPECT_DOUBLE_EQ(c.origin[1], 20 - 2.0 * 4);
  EXPECT_DOUBLE_EQ(c.origin[2], 30 + 3.0 * 3);
  EXPECT_EQ(c.data[1][0][0][0].item<float>(), 1.f);
  // No foreground: whole volume.
  EXPECT_EQ(foreground_box(v.data, 5.0), (std::array<int64_t, 6>{0, 0, 0, 10, 12, 14}));
}

TEST(Spatial, PadToSizeCentresAndFills) {
  at::Tensor x = at::ones({1, 2, 5, 8});
  at::Tensor y = pad_to_size(x, {5, 4, 8}, -2.0);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{1, 5, 5, 8}));
  EXPECT_EQ(y[0][0][0][0].item<float>(), -2.f);
  EXPECT_EQ(y[0][1][0][0].item<float>(), 1.f);  // (5 - 2) / 2 = 1 before, 2 after
  EXPECT_EQ(y[0][2][0][0].item<float>(), 1.f);
  EXPECT_EQ(y[0][3][0][0].item<float>(), -2.f);
  EXPECT_EQ(y.sum().item<float>(), 2 * 5 * 8 - 2.f * 3 * 5 * 8);
  EXPECT_TRUE(pad_to_size(x, {2, 5, 8}, 0.0).is_same(x));
}

TEST(Spatial, DrawCropIsDeterministicAndInRange) {
  const Dhw shape{20, 30, 40}, crop{8, 8, 8};
  for (int64_t i = 0; i < 50; ++i) {
    const uint64_t s = item_seed(7, 1, i);
    const CropDraw a = draw_crop(shape, crop, 0.5, s), b = draw_crop(shape, crop, 0.5, s);
    EXPECT_EQ(a.start, b.start);
    EXPECT_EQ(a.flip, b.flip);
    for (int k = 0; k < 3; ++k) {
      EXPECT_GE(a.start[k], 0);
      EXPECT_LE(a.start[k] + crop[k], shape[k]);
    }
  }
  EXPECT_NE(item_seed(7, 1, 2), item_seed(7, 2, 1));
  EXPECT_NE(item_seed(7, 0, 0), item_seed(8, 0, 0));
  // flip_prob 0 never flips, 1 always flips.
  EXPECT_EQ(draw_crop(shape, crop, 0.0, 3).flip, (std::array<bool, 3>{false, false, false}));
  EXPECT_EQ(draw_crop(shape, crop, 1.0, 3).flip, (std::array<bool, 3>{true, true, true}));
}

TEST(Spatial, ApplyCropAndFlip) {
  at::Tensor x = at::arange(2 * 4 * 5 * 6, at::kFloat).reshape({2, 4, 5, 6});
  CropDraw d;
  d.start = {1, 2, 3};
  at::Tensor c = apply_crop(x, d, {2, 3, 3});
  EXPECT_EQ(c.sizes(), (std::vector<int64_t>{2, 2, 3, 3}));
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c[1][0][0][0].item<float>(), x[1][1][2][3].item<float>());
  d.flip = {false, false, true};
  at::Tensor f = apply_crop(x, d, {2, 3, 3});
  EXPECT_EQ(f[0][0][0][0].item<float>(), x[0][1][2][5].item<float>());
  EXPECT_TRUE(at::equal(at::flip(f, {3}), c));
  // The crop never aliases its source.
  CropDraw whole;
  at::Tensor all = apply_crop(x, whole, {4, 5, 6});
  EXPECT_NE(all.data_ptr(), x.data_ptr());
}

TEST(Spatial, RandomCropPadsSmallVolumes) {
  at::Tensor x = at::rand({1, 5, 20, 20});
  at::Tensor a = random_crop(x, {8, 8, 8}, 0.3, 42, 0.0);
  at::Tensor b = random_crop(x, {8, 8, 8}, 0.3, 42, 0.0);
  EXPECT_EQ(a.sizes(), (std::vector<int64_t>{1, 8, 8, 8}));
  EXPECT_TRUE(at::equal(a, b));
}

IntensityAugDraw aug_draw(double scale, double shift, double gamma) {
  IntensityAugDraw d;
  d.apply = true;
  d.scale = scale;
  d.shift = shift;
  d.gamma = gamma;
  return d;
}

TEST(IntensityAug, DrawIsDeterministicAndInRange) {
  IntensityAugConfig c;
  c.prob = 1.0;
  c.scale = {0.5, 2.0};
  c.shift = {-0.3, 0.2};
  c.gamma = {0.5, 2.0};
  int below_one = 0;
  const int n = 2000;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t s = item_seed(7, 1, i);
    const IntensityAugDraw a = draw_intensity_aug(c, s), b = draw_intensity_aug(c, s);
    ASSERT_TRUE(a.apply);
    EXPECT_EQ(a.scale, b.scale);
    EXPECT_EQ(a.shift, b.shift);
    EXPECT_EQ(a.gamma, b.gamma);
    EXPECT_GE(a.scale, 0.5);
    EXPECT_LE(a.scale, 2.0);
    EXPECT_GE(a.shift, -0.3);
    EXPECT_LE(a.shift, 0.2);
    EXPECT_GE(a.gamma, 0.5);
    EXPECT_LE(a.gamma, 2.0);
    below_one += a.gamma < 1.0;
  }
  // Log-uniform on [1/2, 2]: half the draws below 1 (uniform would give a third).
  EXPECT_NEAR(below_one / static_cast<double>(n), 0.5, 0.04);
  EXPECT_NE(draw_intensity_aug(c, 1).scale, draw_intensity_aug(c, 2).scale);
  // prob 0 never applies (identity values), 0.5 about half the time.
  c.prob = 0.0;
  for (uint64_t s = 0; s < 200; ++s) {
    const IntensityAugDraw d = draw_intensity_aug(c, s);
    EXPECT_FALSE(d.apply);
    EXPECT_EQ(d.scale, 1.0);
    EXPECT_EQ(d.shift, 0.0);
    EXPECT_EQ(d.gamma, 1.0);
  }
  c.prob = 0.5;
  int applied = 0;
  for (uint64_t s = 0; s < 1000; ++s) applied += draw_intensity_aug(c, item_seed(3, 0, s)).apply;
  EXPECT_NEAR(applied / 1000.0, 0.5, 0.06);
  // A range with lo == hi gives exactly lo.
  c.prob = 1.0;
  c.scale = {1.3, 1.3};
  c.shift = {-0.7, -0.7};
  c.gamma = {0.7, 0.7};
  const IntensityAugDraw f = draw_intensity_aug(c, 99);
  EXPECT_EQ(f.scale, 1.3);
  EXPECT_EQ(f.shift, -0.7);
  EXPECT_EQ(f.gamma, 0.7);
}

TEST(IntensityAug, ScaleAndShiftKnownValues) {
  at::Tensor x = as_volume({0.f, 1.f, 2.f, -3.f});
  expect_values(apply_intensity_aug(x, aug_draw(2.0, 0.5, 1.0)), {0.5f, 2.5f, 4.5f, -5.5f});
  expect_values(apply_intensity_aug(x, aug_draw(0.5, -1.0, 1.0)), {-1.f, -0.5f, 0.f, -2.5f});
  // The input is left alone.
  expect_values(x, {0.f, 1.f, 2.f, -3.f}, 0.0);
}

TEST(IntensityAug, GammaOnTheCropsOwnRangeThenScaleAndShift) {
  // min -1, max 3: t = (x + 1) / 4 = {0, 1/4, 1/2, 1}; t^2 = {0, 1/16, 1/4, 1}; back: -1 + 4 t^2.
  at::Tensor x = as_volume({-1.f, 0.f, 1.f, 3.f});
  expect_values(apply_intensity_aug(x, aug_draw(1.0, 0.0, 2.0)), {-1.f, -0.75f, 0.f, 3.f});
  // Gamma first, then x * 2 + 1.
  expect_values(apply_intensity_aug(x, aug_draw(2.0, 1.0, 2.0)), {-1.f, -0.5f, 1.f, 7.f});
  // gamma 0.5 on [0, 1] data is the square root.
  expect_values(apply_intensity_aug(as_volume({0.f, 0.25f, 1.f}), aug_draw(1.0, 0.0, 0.5)), {0.f, 0.5f, 1.f});
}

TEST(IntensityAug, GammaKeepsEachChannelsMinAndMax) {
  at::Generator gen = at::detail::createCPUGenerator(5);
  at::Tensor x = at::rand({2, 6, 7, 8}, gen, at::kFloat);
  x[0].mul_(3.5).sub_(1.25);  // z-scored-like range with negative values
  x[1].mul_(250).add_(-175);  // HU-like range
  for (double g : {0.7, 1.5, 3.0}) {
    at::Tensor y = apply_intensity_aug(x, aug_draw(1.0, 0.0, g));
    for (int64_t c = 0; c < 2; ++c) {
      EXPECT_EQ(y[c].min().item<float>(), x[c].min().item<float>()) << "gamma " << g << " channel " << c;
      EXPECT_EQ(y[c].max().item<float>(), x[c].max().item<float>()) << "gamma " << g << " channel " << c;
      EXPECT_FALSE(at::equal(y[c], x[c]));
      // Monotone: in the order of x, y never decreases.
      at::Tensor ys = y[c].flatten().index_select(0, x[c].flatten().argsort());
      EXPECT_TRUE((ys.slice(0, 1) >= ys.slice(0, 0, -1)).all().item<bool>());
    }
  }
}

TEST(IntensityAug, ConstantChannelsAndNoDrawAreLeftAlone) {
  at::Tensor x = at::full({1, 2, 2, 2}, 0.25f);
  EXPECT_TRUE(at::equal(apply_intensity_aug(x, aug_draw(1.0, 0.0, 2.0)), x));
  EXPECT_TRUE(at::equal(apply_intensity_aug(x, aug_draw(2.0, 0.5, 2.0)), at::full({1, 2, 2, 2}, 1.0f)));
  at::Tensor r = at::rand({1, 3, 4, 5});
  EXPECT_TRUE(apply_intensity_aug(r, IntensityAugDraw{}).is_same(r));
  // An identity draw changes no bit.
  EXPECT_TRUE(at::equal(apply_intensity_aug(r, aug_draw(1.0, 0.0, 1.0)), r));
  // Non-contiguous input: the same values as its contiguous copy.
  at::Tensor t = at::rand({1, 4, 5, 6}).transpose(1, 3);
  EXPECT_TRUE(at::equal(apply_intensity_aug(t, aug_draw(1.1, 0.2, 0.8)),
                        apply_intensity_aug(t.contiguous(), aug_draw(1.1, 0.2, 0.8))));
}

}  // namespace
}  // namespace mae
