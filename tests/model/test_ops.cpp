// Tests of the parameter-free tensor functions: patch order, sin-cos tables, masks, the loss.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "core/error.h"
#include "model/ops.h"

namespace {

class Ops : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    torch::manual_seed(0);
  }
};

TEST_F(Ops, PatchifyRoundTripIsExact3DAnd2D) {
  auto x = torch::randn({2, 3, 8, 12, 4});
  auto p = mae::patchify(x, {4, 4, 2});
  ASSERT_EQ(p.sizes(), (std::vector<int64_t>{2, 2 * 3 * 2, 4 * 4 * 2 * 3}));
  EXPECT_TRUE(torch::equal(mae::unpatchify(p, {8, 12, 4}, {4, 4, 2}, 3), x));
  auto y = torch::randn({2, 2, 6, 9});
  auto q = mae::patchify(y, {3, 3});
  ASSERT_EQ(q.sizes(), (std::vector<int64_t>{2, 6, 18}));
  EXPECT_TRUE(torch::equal(mae::unpatchify(q, {6, 9}, {3, 3}, 2), y));
}

TEST_F(Ops, PatchifyUsesRasterTokensAndP1P2P3COrder) {
  // Grid (2, 3, 2) of patches (2, 2, 2), 2 channels: voxel value encodes its coordinates.
  auto x = torch::zeros({1, 2, 4, 6, 4});
  auto a = x.accessor<float, 5>();
  for (int c = 0; c < 2; ++c)
    for (int d = 0; d < 4; ++d)
      for (int h = 0; h < 6; ++h)
        for (int w = 0; w < 4; ++w) a[0][c][d][h][w] = static_cast<float>(c * 1000 + d * 100 + h * 10 + w);
  auto p = mae::patchify(x, {2, 2, 2});
  // Token t = i*g1*g2 + j*g2 + k; in-patch index = ((p1*2 + p2)*2 + p3)*C + c.
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k)
        for (int p1 = 0; p1 < 2; ++p1)
          for (int p2 = 0; p2 < 2; ++p2)
            for (int p3 = 0; p3 < 2; ++p3)
              for (int c = 0; c < 2; ++c) {
                const int t = i * 3 * 2 + j * 2 + k;
                const int v = ((p1 * 2 + p2) * 2 + p3) * 2 + c;
                const float want = c * 1000 + (2 * i + p1) * 100 + (2 * j + p2) * 10 + (2 * k + p3);
                ASSERT_EQ(p[0][t][v].item<float>(), want) << "t=" << t << " v=" << v;
              }
}

TEST_F(Ops, ConvOrderPatchesTimesWeightEqualConv3d) {
  auto x = torch::randn({2, 3, 8, 8, 12});
  auto w = torch::randn({5, 3, 4, 4, 4});
  auto b = torch::randn({5});
  auto conv = torch::conv3d(x, w, b, /*stride=*/4).flatten(2).transpose(1, 2);  // (B, N, E) raster order
  auto mine = torch::linear(mae::patchify_channels_first(x, {4, 4, 4}), w.view({5, -1}), b);
  EXPECT_TRUE(torch::allclose(conv, mine, 1e-4, 1e-4));
}

TEST_F(Ops, SinCosTableMatchesFormulaAtKnownPositions) {
  // Grid (2, 3, 4), width 12: pos_dim 2, omega = [1, 1/100].
  auto t = mae::sincos_position_table({2, 3, 4}, 12);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{1, 24, 12}));
  const double omega[2] = {1.0, 0.01};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 4; ++k) {
        const int tok = i * 12 + j * 4 + k;
        const double c[3] = {double(i), double(j), double(k)};
        std::vector<double> want;
        for (int axis : {1, 0, 2}) {
          for (double o : omega) want.push_back(std::sin(c[axis] * o));
          for (double o : omega) want.push_back(std::cos(c[axis] * o));
        }
        for (int f = 0; f < 12; ++f) EXPECT_NEAR(t[0][tok][f].item<float>(), want[f], 1e-6) << tok << "," << f;
      }
  // 2D: [sin c1, cos c1, sin c0, cos c0], width/4.
  auto t2 = mae::sincos_position_table({3, 5}, 8);
  EXPECT_NEAR(t2[0][2 * 5 + 4][0].item<float>(), std::sin(4.0), 1e-6);
  EXPECT_NEAR(t2[0][2 * 5 + 4][4].item<float>(), std::sin(2.0), 1e-6);
  EXPECT_NEAR(t2[0][2 * 5 + 4][7].item<float>(), std::cos(2.0 * 0.01), 1e-6);
  EXPECT_THROW(mae::sincos_position_table({2, 2, 2}, 8), mae::ConfigError);
  EXPECT_THROW(mae::sincos_position_table({2, 2}, 6), mae::ConfigError);
}

TEST_F(Ops, NumVisibleIsExactFloor) {
  EXPECT_EQ(mae::num_visible(10, 0.9), 1);
  EXPECT_EQ(mae::num_visible(10, 0.7), 3);
  EXPECT_EQ(mae::num_visible(216, 0.75), 54);
  EXPECT_EQ(mae::num_visible(8, 0.5), 4);
  EXPECT_EQ(mae::num_visible(7, 0.5), 3);
  EXPECT_EQ(mae::num_visible(100, 0.99), 1);
  EXPECT_EQ(mae::num_visible(3, 0.3), 2);
}

TEST_F(Ops, MaskHasExactCountPerSample) {
  for (int64_t n : {8, 10, 27, 216}) {
    for (double r : {0.1, 0.5, 0.75, 0.9}) {
      const int64_t keep = mae::num_visible(n, r);
      if (keep < 1 || keep >= n) continue;
      auto gen = at::detail::createCPUGenerator(7);
      auto vis = mae::draw_visible(4, n, r, gen);
      ASSERT_EQ(vis.sizes(), (std::vector<int64_t>{4, keep}));
      auto mask = mae::mask_from_visible(vis, n);
      for (int b = 0; b < 4; ++b) {
        EXPECT_EQ(mask[b].sum().item<float>(), static_cast<float>(n - keep)) << "n=" << n << " r=" << r;
        EXPECT_EQ(std::get<0>(at::_unique(vis[b])).numel(), keep);  // without replacement
      }
    }
  }
}

TEST_F(Ops, SameSeedSameMaskOtherSeedOtherMask) {
  auto g1 = at::detail::createCPUGenerator(42), g2 = at::detail::createCPUGenerator(42),
       g3 = at::detail::createCPUGenerator(43);
  auto a = mae::draw_visible(2, 216, 0.75, g1);
  auto b = mae::draw_visible(2, 216, 0.75, g2);
  auto c = mae::draw_visible(2, 216, 0.75, g3);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, c));
  EXPECT_FALSE(torch::equal(a[0], a[1]));  // per-sample masks
}

TEST_F(Ops, RatiosLeavingNoVisibleOrNoMaskedPatchAreErrors) {
  EXPECT_THROW(mae::draw_visible(1, 10, 0.95, std::nullopt), mae::ConfigError);  // keeps 0
  EXPECT_THROW(mae::draw_visible(1, 4, 1e-7, std::nullopt), mae::ConfigError);   // masks none
  EXPECT_THROW(mae::draw_visible(1, 10, 0.0, std::nullopt), mae::ConfigError);
  EXPECT_THROW(mae::draw_visible(1, 10, 1.0, std::nullopt), mae::ConfigError);
}

TEST_F(Ops, LossIsMeanOverMaskedPatchesAndHasNoGradientOnVisible) {
  auto pred = torch::randn({2, 6, 5}, torch::requires_grad());
  auto target = torch::randn({2, 6, 5});
  auto mask = torch::tensor({{1, 0, 1, 0, 0, 1}, {0, 1, 1, 0, 0, 0}}, torch::kFloat);
  auto loss = mae::masked_mse_loss(pred, target, mask);
  auto per_patch = (pred - target).pow(2).mean(-1).detach();
  const float want = ((per_patch * mask).sum() / 5.0).item<float>();
  EXPECT_NEAR(loss.item<float>(), want, 1e-6);
  loss.backward();
  auto g = pred.grad();
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 6; ++t) {
      const float norm = g[b][t].abs().sum().item<float>();
      if (mask[b][t].item<float>() == 0.0f) {
        EXPECT_EQ(norm, 0.0f);
      } else {
        EXPECT_GT(norm, 0.0f);
      }
    }
}

TEST_F(Ops, NormPixLossNormalisesEachTargetPatch) {
  auto target = torch::randn({1, 3, 8}) * 5 + 3;
  auto mean = target.mean(-1, true);
  auto var = target.var(-1, true, true);
  auto normed = (target - mean) / torch::sqrt(var + 1e-6);
  auto mask = torch::ones({1, 3});
  EXPECT_NEAR(mae::masked_mse_loss(normed, target, mask, /*norm_pix=*/true).item<float>(), 0.0f, 1e-6);
  EXPECT_GT(mae::masked_mse_loss(normed, target, mask, /*norm_pix=*/false).item<float>(), 1.0f);
}

TEST_F(Ops, BadShapesAreErrors) {
  EXPECT_THROW(mae::patchify(torch::zeros({1, 1, 8, 8, 7}), {4, 4, 4}), mae::InputError);
  EXPECT_THROW(mae::patchify(torch::zeros({1, 8, 8, 8}), {4, 4, 4}), mae::InputError);
  EXPECT_THROW(mae::unpatchify(torch::zeros({1, 7, 64}), {8, 8, 8}, {4, 4, 4}, 1), mae::InputError);
  EXPECT_THROW(mae::masked_mse_loss(torch::zeros({1, 2, 3}), torch::zeros({1, 2, 4}), torch::ones({1, 2})),
               mae::InputError);
}

}  // namespace
