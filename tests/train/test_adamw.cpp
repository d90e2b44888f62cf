// The fused AdamW must produce the update of torch::optim::AdamW (decoupled weight decay).
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/error.h"
#include "train/adamw.h"

namespace {

TEST(AdamW, MatchesLibTorchAdamWOverSeveralSteps) {
  at::set_num_threads(1);
  torch::manual_seed(0);
  auto a1 = torch::randn({300, 70}, torch::requires_grad());
  auto b1 = torch::randn({70}, torch::requires_grad());
  auto a2 = a1.detach().clone().requires_grad_(true);
  auto b2 = b1.detach().clone().requires_grad_(true);

  mae::AdamW mine({{{a1}, 0.05}, {{b1}, 0.0}}, mae::AdamWOptions{1e-2, 0.9, 0.95, 1e-8});
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{a2},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).weight_decay(0.05)));
  groups.emplace_back(std::vector<torch::Tensor>{b2},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).weight_decay(0.0)));
  torch::optim::AdamW ref(groups, torch::optim::AdamWOptions(1e-2));

  auto x = torch::randn({16, 300});
  for (int step = 0; step < 5; ++step) {
    mine.zero_grad();
    ref.zero_grad();
    (x.matmul(a1) + b1).pow(2).mean().backward();
    (x.matmul(a2) + b2).pow(2).mean().backward();
    mine.step();
    ref.step();
  }
  EXPECT_TRUE(torch::allclose(a1, a2, 1e-5, 1e-6)) << (a1 - a2).abs().max();
  EXPECT_TRUE(torch::allclose(b1, b2, 1e-5, 1e-6)) << (b1 - b2).abs().max();
  EXPECT_EQ(mine.steps(), 5);
}

TEST(AdamW, StateRoundTripsThroughAnArchiveAndRejectsAMismatch) {
  at::set_num_threads(1);
  auto p = torch::randn({10}, torch::requires_grad());
  mae::AdamW opt({{{p}, 0.0}}, {});
  p.sum().backward();
  opt.step();
  torch::serialize::OutputArchive out;
  opt.save(out);
  std::ostringstream os;
  out.save_to(os);

  auto q = p.detach().clone().requires_grad_(true);
  mae::AdamW restored({{{q}, 0.0}}, {});
  torch::serialize::InputArchive in;
  std::istringstream is(os.str());
  in.load_from(is);
  restored.load(in);
  EXPECT_EQ(restored.steps(), 1);
  // Same next update from the same state.
  opt.zero_grad();
  restored.zero_grad();
  p.sum().backward();
  q.sum().backward();
  opt.step();
  restored.step();
  EXPECT_TRUE(torch::equal(p, q));

  auto r = torch::randn({10}, torch::requires_grad());
  auto s = torch::randn({3}, torch::requires_grad());
  mae::AdamW other({{{r, s}, 0.0}}, {});
  torch::serialize::InputArchive in2;
  std::istringstream is2(os.str());
  in2.load_from(is2);
  EXPECT_THROW(other.load(in2), mae::CheckpointError);
}

// The global gradient norm the trainer logs and clips by: torch's value, taken in the update pass,
// and bit-identical for any thread count (parameters span several of the kernel's blocks).
TEST(AdamW, GradientNormMatchesTorchInTheUpdatePassForAnyThreadCount) {
  torch::manual_seed(1);
  std::vector<torch::Tensor> init{torch::randn({300, 1000}), torch::randn({70000}), torch::randn({5}),
                                  torch::randn({4, 3}, torch::kDouble)};  // double: the tensor-op path
  auto run = [&](int threads, bool in_update) {
    at::set_num_threads(threads);
    std::vector<torch::Tensor> ps;
    for (const auto& t : init) ps.push_back(t.clone().requires_grad_(true));
    mae::AdamW opt({{{ps[0], ps[1]}, 0.05}, {{ps[2], ps[3]}, 0.0}}, {});
    torch::Tensor loss = torch::zeros({}, torch::kDouble);
    for (const auto& p : ps) loss = loss + (p * p * p).sum().to(torch::kDouble);
    loss.backward();
    double sq = 0.0;
    if (in_update) {
      mae::AdamW::StepOptions o;
      o.grad_sq_norm = &sq;
      opt.step(o);
    } else {
      sq = opt.grad_sq_norm();
    }
    double ref = 0.0;
    for (const auto& p : ps) ref += p.grad().to(torch::kDouble).pow(2).sum().item<double>();
    EXPECT_NEAR(sq, ref, 1e-12 * ref);
    return sq;
  };
  const double one = run(1, false), two = run(2, false), in_pass = run(2, true), in_pass_one = run(1, true);
  EXPECT_EQ(one, two);
  EXPECT_EQ(one, in_pass);
  EXPECT_EQ(one, in_pass_one);
}

// Clipping as the trainer does it (norm first, factor folded into the update) equals torch's
// clip_grad_norm_ followed by torch's AdamW, and leaves the gradients themselves unchanged.
TEST(AdamW, ScaledStepMatchesClipGradNormThenLibTorchAdamW) {
  at::set_num_threads(2);
  torch::manual_seed(2);
  auto a1 = torch::randn({400, 300}, torch::requires_grad());
  auto a2 = a1.detach().clone().requires_grad_(true);
  mae::AdamW mine({{{a1}, 0.05}}, mae::AdamWOptions{1e-2, 0.9, 0.95, 1e-8});
  torch::optim::AdamW ref({a2}, torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).weight_decay(0.05));
  const double max_norm = 0.5;
  auto x = torch::randn({16, 400});
  for (int step = 0; step < 4; ++step) {
    mine.zero_grad();
    ref.zero_grad();
    x.matmul(a1).pow(2).mean().backward();
    x.matmul(a2).pow(2).mean().backward();
    const double norm = std::sqrt(mine.grad_sq_norm());
    const auto before = a1.grad().clone();
    mae::AdamW::StepOptions o;
    o.grad_scale = std::min(1.0, max_norm / (norm + 1e-6));
    ASSERT_LT(o.grad_scale, 1.0) << "the test must clip";
    mine.step(o);
    EXPECT_TRUE(torch::equal(a1.grad(), before));
    const double ref_norm = torch::nn::utils::clip_grad_norm_(std::vector<torch::Tensor>{a2}, max_norm);
    EXPECT_NEAR(norm, ref_norm, 1e-5 * ref_norm);
    ref.step();
  }
  EXPECT_TRUE(torch::allclose(a1, a2, 1e-5, 1e-6)) << (a1 - a2).abs().max();
}

}  // namespace
