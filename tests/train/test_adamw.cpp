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

}  // namespace
