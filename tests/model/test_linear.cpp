// Tests of linear() (lib/model/linear.h): oneDNN's float32 products against torch::linear, in the
// forward and in all three gradients, and the choice of library.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

#include "core/compat.h"
#include "core/error.h"
#include "model/linear.h"
#include "model/mae.h"
#include "model/ops.h"

namespace {

// Restores the process-wide engine after each test.
class Linear : public ::testing::Test {
 protected:
  void SetUp() override {
    saved_ = mae::fp32_matmul();
    at::set_num_threads(2);
    torch::manual_seed(0);
  }
  void TearDown() override { mae::set_fp32_matmul(saved_); }
  mae::Fp32Matmul saved_ = mae::Fp32Matmul::blas;
};

// Largest difference relative to the reference's largest magnitude.
double relative_error(const torch::Tensor& got, const torch::Tensor& want) {
  return (got - want).abs().max().item<double>() / want.abs().max().item<double>();
}

struct Grads {
  torch::Tensor y, dx, dw, db;
};

Grads run(const torch::Tensor& x0, const torch::Tensor& w0, const torch::Tensor& b0, const torch::Tensor& dy,
          bool slice_input) {
  auto x = x0.clone().requires_grad_(true);
  auto w = w0.clone().requires_grad_(true);
  auto b = b0.defined() ? b0.clone().requires_grad_(true) : torch::Tensor();
  // A sliced input is not contiguous: linear() must read its strides (or copy) right.
  auto in = slice_input ? x.slice(1, 1) : x;
  auto y = mae::linear(in, w, b);
  (y * dy).sum().backward();
  return {y.detach(), x.grad(), w.grad(), b.defined() ? b.grad() : torch::Tensor()};
}

TEST_F(Linear, OnednnMatchesTorchLinearInTheForwardAndAllGradients) {
  if (!mae::onednn_built()) GTEST_SKIP() << "built without oneDNN";
  struct Case {
    std::vector<int64_t> x;
    int64_t out;
    bool bias, slice;
  };
  for (const auto& c :
       {Case{{7, 33}, 20, true, false}, Case{{2, 55, 96}, 288, true, false}, Case{{2, 17, 48}, 64, false, false},
        Case{{2, 18, 40}, 24, true, true}, Case{{3, 1, 5}, 3, true, false}}) {
    auto x = torch::randn(c.x), w = torch::randn({c.out, c.x.back()}) * 0.1;
    auto b = c.bias ? torch::randn({c.out}) : torch::Tensor();
    auto out_shape = c.x;
    out_shape.back() = c.out;
    if (c.slice) out_shape[1] -= 1;
    auto dy = torch::randn(out_shape);
    mae::set_fp32_matmul(mae::Fp32Matmul::blas);
    const int64_t before_blas = mae::onednn_products();
    const auto want = run(x, w, b, dy, c.slice);
    EXPECT_EQ(mae::onednn_products(), before_blas) << "blas ran a product on oneDNN";
    mae::set_fp32_matmul(mae::Fp32Matmul::onednn);
    const int64_t before = mae::onednn_products();
    const auto got = run(x, w, b, dy, c.slice);
    // The forward's product and the backward's two (dx, dw) ran on oneDNN.
    EXPECT_EQ(mae::onednn_products() - before, 3);
    const std::string what = "input " + mae::sizes_str(c.x) + " -> " + std::to_string(c.out);
    ASSERT_EQ(got.y.sizes(), want.y.sizes()) << what;
    EXPECT_LT(relative_error(got.y, want.y), 1e-5) << what;
    EXPECT_LT(relative_error(got.dx, want.dx), 1e-5) << what;
    EXPECT_LT(relative_error(got.dw, want.dw), 1e-5) << what;
    if (c.bias) {
      EXPECT_LT(relative_error(got.db, want.db), 1e-5) << what;
    }
  }
}

// Operands as LibTorch hands them: a transposed input, a bias with stride 2, a gradient expanded
// from a scalar (stride 0), no gradient wanted, in-place ops on the output, and create_graph.
TEST_F(Linear, OnednnTakesStridedOperandsAndBehavesAsTorchLinear) {
  if (!mae::onednn_built()) GTEST_SKIP() << "built without oneDNN";
  mae::set_fp32_matmul(mae::Fp32Matmul::onednn);
  const auto x = torch::randn({40, 9}).t();  // (9, 40), strides (1, 9)
  const auto w = torch::randn({24, 40}), b_wide = torch::randn({48});
  const auto b = b_wide.slice(0, 0, 48, 2);  // stride 2
  auto xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true);
  const int64_t before = mae::onednn_products();
  auto y = mae::linear(x, w, b);
  EXPECT_EQ(mae::onednn_products() - before, 1);
  EXPECT_LT(relative_error(y, torch::linear(x, w, b)), 1e-5);
  // sum() hands the backward a gradient expanded from one number.
  auto xo = x.clone().requires_grad_(true), wo = w.clone().requires_grad_(true);
  mae::linear(xo, wo, b).sum().backward();
  torch::linear(xr, wr, b).sum().backward();
  EXPECT_LT(relative_error(xo.grad(), xr.grad()), 1e-5);
  EXPECT_LT(relative_error(wo.grad(), wr.grad()), 1e-5);
  // No gradient wanted: the product, without a graph.
  {
    torch::NoGradGuard no_grad;
    const auto z = mae::linear(xo, wo, b);
    EXPECT_FALSE(z.requires_grad());
    EXPECT_LT(relative_error(z, torch::linear(x, w, b)), 1e-5);
  }
  // In-place ops on the output, as on torch::linear's.
  auto yi = mae::linear(xo, wo, b);
  EXPECT_NO_THROW(yi.mul_(2.0).sum().backward());
  // create_graph: the gradient can be differentiated again.
  auto xg = x.clone().requires_grad_(true), wg = w.clone().requires_grad_(true);
  auto xt = x.clone().requires_grad_(true), wt = w.clone().requires_grad_(true);
  auto g = torch::autograd::grad({mae::linear(xg, wg, b).pow(2).sum()}, {xg}, {}, true, true)[0];
  auto gt = torch::autograd::grad({torch::linear(xt, wt, b).pow(2).sum()}, {xt}, {}, true, true)[0];
  g.sum().backward();
  gt.sum().backward();
  EXPECT_LT(relative_error(wg.grad(), wt.grad()), 1e-5);
}

TEST_F(Linear, BlasIsTorchLinearBitForBit) {
  mae::set_fp32_matmul(mae::Fp32Matmul::blas);
  auto x = torch::randn({2, 9, 40}), w = torch::randn({24, 40}), b = torch::randn({24});
  EXPECT_TRUE(torch::equal(mae::linear(x, w, b), torch::linear(x, w, b)));
}

TEST_F(Linear, AutocastAndOtherDtypesStayOnLibTorch) {
  if (!mae::onednn_built()) GTEST_SKIP() << "built without oneDNN";
  mae::set_fp32_matmul(mae::Fp32Matmul::onednn);
  auto x = torch::randn({4, 32}), w = torch::randn({16, 32}), b = torch::randn({16});
  const int64_t before = mae::onednn_products();
  {
    mae::compat::AutocastScope autocast(true, at::kCPU);
    const auto y = mae::linear(x, w, b);
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(torch::equal(y, torch::linear(x, w, b)));
  }
  const auto xd = x.to(at::kDouble), wd = w.to(at::kDouble), bd = b.to(at::kDouble);
  EXPECT_TRUE(torch::equal(mae::linear(xd, wd, bd), torch::linear(xd, wd, bd)));
  EXPECT_EQ(mae::onednn_products(), before);
}

TEST_F(Linear, ModelTrainsTheSameOnEitherLibrary) {
  if (!mae::onednn_built()) GTEST_SKIP() << "built without oneDNN";
  auto options = mae::MaskedAutoencoderOptions(1, {16, 16, 16}, {8, 8, 8})
                     .hidden_size(48)
                     .mlp_dim(96)
                     .num_layers(2)
                     .num_heads(4)
                     .decoder_hidden_size(24)
                     .decoder_mlp_dim(48)
                     .decoder_num_layers(1)
                     .decoder_num_heads(4)
                     .masking_ratio(0.5);
  auto x = torch::randn({2, 1, 16, 16, 16});
  auto visible = mae::draw_visible(2, options.num_patches(), 0.5, std::nullopt);
  auto step = [&](mae::Fp32Matmul engine) {
    mae::set_fp32_matmul(engine);
    torch::manual_seed(3);
    mae::MaskedAutoencoder model(options);
    auto out = model->forward_visible(x, visible);
    auto loss = mae::masked_mse_loss(out.pred, model->target(x), out.mask);
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (const auto& p : model->parameters()) {
      if (p.grad().defined()) grads.push_back(p.grad().flatten());
    }
    return std::make_pair(loss.item<double>(), torch::cat(grads));
  };
  const auto blas = step(mae::Fp32Matmul::blas);
  const int64_t before = mae::onednn_products();
  const auto onednn = step(mae::Fp32Matmul::onednn);
  // 2 encoder + 1 decoder blocks of 4 Linear layers, the patch projection, decoder embedding and
  // prediction: 15 forward products, and 2 backward ones each but the patch projection's (its
  // input needs no gradient).
  EXPECT_EQ(mae::onednn_products() - before, 15 + 2 * 15 - 1);
  EXPECT_NEAR(onednn.first, blas.first, 1e-5 * blas.first);
  EXPECT_LT(relative_error(onednn.second, blas.second), 1e-4);
}

TEST_F(Linear, ChoiceNamesTheSettingWhenRefused) {
  EXPECT_EQ(mae::resolve_fp32_matmul("blas", "k"), mae::Fp32Matmul::blas);
  EXPECT_EQ(mae::resolve_fp32_matmul("auto", "k"),
            mae::onednn_built() ? mae::Fp32Matmul::onednn : mae::Fp32Matmul::blas);
  try {
    mae::resolve_fp32_matmul("mkl", "\"train.fp32_matmul\"");
    FAIL() << "\"mkl\" was accepted";
  } catch (const mae::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("\"train.fp32_matmul\" = \"mkl\" is not allowed"), std::string::npos)
        << e.what();
  }
  if (mae::onednn_built()) {
    EXPECT_EQ(mae::resolve_fp32_matmul("onednn", "k"), mae::Fp32Matmul::onednn);
  } else {
    EXPECT_THROW(mae::resolve_fp32_matmul("onednn", "k"), mae::ConfigError);
    EXPECT_THROW(mae::set_fp32_matmul(mae::Fp32Matmul::onednn), mae::ConfigError);
  }
}

}  // namespace
