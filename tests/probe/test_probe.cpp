// The linear probe: label checks, the patch lattice and its windows, the split, the two linear
// models on features whose answer is known, and mae-probe on Colin27 with its AAL and Brodmann atlases.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "../common/expect_error.h"
#include "../common/temp_dir.h"
#include "../core/run_binary.h"
#include "../infer/helpers.h"
#include "core/error.h"
#include "io/io.h"
#include "probe/probe.h"
#include "run/config.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace mae {
namespace {

using test::expect_error;

const std::string kColin = "/usr/share/mricron/templates/ch2.nii.gz";
const std::string kAal = "/usr/share/mricron/templates/aal.nii.gz";
const std::string kBrodmann = "/usr/share/mricron/templates/brodmann.nii.gz";

MaskedAutoencoderOptions tiny_model() {
  MaskedAutoencoderOptions o(1, {16, 16, 16}, {4, 4, 4});
  o.hidden_size(24).mlp_dim(48).num_layers(1).num_heads(2);
  o.decoder_hidden_size(24).decoder_mlp_dim(48).decoder_num_layers(1).decoder_num_heads(2);
  return o;
}

DataConfig plain_data() {
  DataConfig d;
  d.orientation = "RAS";
  d.intensity.mode = "none";
  return d;
}

// A smooth image (1, d, h, w) and labels: two boxes (1, 2) on background 0, both on its grid.
struct Pair {
  Volume image, labels;
};

Pair synthetic_pair(int64_t d, int64_t h, int64_t w) {
  Pair p;
  const auto zd = at::arange(d, at::kFloat).view({d, 1, 1});
  const auto zh = at::arange(h, at::kFloat).view({1, h, 1});
  const auto zw = at::arange(w, at::kFloat).view({1, 1, w});
  p.image.data = (1.0 + at::sin(zd / 3.0) + at::cos(zh / 4.0) * at::sin(zw / 2.5)).unsqueeze(0).contiguous();
  p.image.spacing = {1.0, 1.0, 1.0};
  p.image.origin = {-10.0, 5.0, 3.0};
  p.image.direction = {-1, 0, 0, 0, -1, 0, 0, 0, 1};  // RAS
  auto lab = at::zeros({1, d, h, w});
  lab.narrow(1, 0, d / 2).narrow(2, 0, h / 2).fill_(1.0);
  lab.narrow(1, d / 2, d - d / 2).narrow(3, w / 2, w - w / 2).fill_(2.0);
  p.labels = p.image;
  p.labels.data = lab.contiguous();
  return p;
}

ProbePair write_pair(const test::TempDir& dir, const Pair& p, const std::string& name) {
  ProbePair out{dir / (name + "_image.nii.gz"), dir / (name + "_labels.nii.gz")};
  write_volume(p.image, out.image);
  write_volume(p.labels, out.labels);
  return out;
}

TEST(Probe, ParsesPairsAndTargets) {
  const auto p = parse_probe_pair("a=b.nii.gz=c.nii.gz", "--train");
  EXPECT_EQ(p.image, "a=b.nii.gz");
  EXPECT_EQ(p.labels, "c.nii.gz");
  expect_error<ConfigError>([] { parse_probe_pair("image.nii.gz", "--train"); }, {"--train", "IMAGE=LABELS"});
  expect_error<ConfigError>([] { parse_probe_pair("image.nii.gz=", "--test"); }, {"--test"});
  EXPECT_EQ(parse_probe_target("majority", "--target"), ProbeTarget::majority);
  expect_error<ConfigError>([] { parse_probe_target("dice", "--target"); }, {"--target", "dice"});
}

TEST(Probe, PatchesMapToTheirWindowTokensAndCountTheirLabels) {
  const test::TempDir dir("mae3d_probe");
  // 22 x 37 x 16 voxels: windows of 16 pad nothing on W, cover D with origins 0 and 4 (patch-aligned),
  // H with 0, 16 and 20; whole patches: 5 x 9 x 4.
  const auto pair = write_pair(dir, synthetic_pair(22, 37, 16), "a");
  const auto v = prepare_probe_volume(pair, plain_data(), tiny_model());
  EXPECT_EQ(v.shape, (std::array<int64_t, 3>{22, 37, 16}));
  ASSERT_EQ(v.counts.size(0), 5 * 9 * 4);
  EXPECT_EQ(v.windows.size(0), 2 * 3 * 1);
  EXPECT_EQ(v.label_values, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_TRUE(at::allclose(v.counts.sum(1), at::full({v.counts.size(0)}, 64.0, at::kDouble)));
  // Every patch's token row points at the window voxels of that very patch: compare their mean with
  // the patch's raw mean feature.
  const auto& o = tiny_model();
  const int64_t N = o.grid()[0] * o.grid()[1] * o.grid()[2];
  for (int64_t r = 0; r < v.counts.size(0); ++r) {
    const int64_t idx = v.token_index[r].item<int64_t>();
    const int64_t w = idx / N, t = idx % N;
    const int64_t a = t / 16, b = t / 4 % 4, c = t % 4;
    const auto patch = v.windows[w].narrow(1, a * 4, 4).narrow(2, b * 4, 4).narrow(3, c * 4, 4);
    ASSERT_NEAR(patch.mean().item<double>(), v.raw[r][0].item<double>(), 1e-5) << "patch " << r;
  }
  // Patch (0, 0, 0) lies in label 1's box; patch (4, 0, 3) in label 2's.
  EXPECT_EQ(v.counts[0][1].item<double>(), 64.0);
  const int64_t last = (4 * 9 + 0) * 4 + 3;
  EXPECT_EQ(v.counts[last][2].item<double>(), 64.0);
  // A model of the probe's own features: (P, E).
  auto model = random_init_model(o, 3);
  const auto f = probe_features(*model, v, 4);
  EXPECT_EQ(f.sizes(), (std::vector<int64_t>{v.counts.size(0), 24}));
}

TEST(Probe, AcceptsLabelsStoredInAnotherOrientationOfTheSameSpace) {
  const test::TempDir dir("mae3d_probe");
  auto p = synthetic_pair(20, 20, 20);
  const auto pair = write_pair(dir, p, "a");
  const auto base = prepare_probe_volume(pair, plain_data(), tiny_model());
  // The same labels stored LPS, at 0.5 mm (nearest-neighbour back onto the image grid).
  write_volume(reorient(p.labels, "LPS"), dir / "lps.nii.gz");
  const auto lps = prepare_probe_volume({pair.image, dir / "lps.nii.gz"}, plain_data(), tiny_model());
  EXPECT_TRUE(at::equal(lps.counts, base.counts));
  auto fine = p.labels;
  fine.data = at::upsample_nearest3d(p.labels.data.unsqueeze(0), {40, 40, 40}).squeeze(0).contiguous();
  fine.spacing = {0.5, 0.5, 0.5};
  for (int r = 0; r < 3; ++r) {
    for (int j = 0; j < 3; ++j) fine.origin[r] += fine.direction[3 * r + j] * -0.25;
  }
  write_volume(fine, dir / "fine.nii.gz");
  const auto f = prepare_probe_volume({pair.image, dir / "fine.nii.gz"}, plain_data(), tiny_model());
  EXPECT_TRUE(at::equal(f.counts, base.counts));
  EXPECT_EQ(f.label_values, (std::vector<int64_t>{0, 1, 2}));
}

TEST(Probe, RefusesLabelsThatDoNotFitTheImage) {
  const test::TempDir dir("mae3d_probe");
  auto p = synthetic_pair(20, 20, 20);
  const auto pair = write_pair(dir, p, "a");
  const auto model = tiny_model();
  auto try_labels = [&](const Volume& labels, const std::string& name) {
    const std::string path = dir / name;
    write_volume(labels, path);
    return [&, path] { prepare_probe_volume({pair.image, path}, plain_data(), model); };
  };
  auto shifted = p.labels;
  shifted.origin[2] += 3.0;  // three voxels along z
  expect_error<InputError>(try_labels(shifted, "shifted.nii.gz"), {"shifted.nii.gz", "extent", "z axis"});
  auto within = p.labels;
  within.origin[2] += 0.6;  // under one voxel: accepted
  EXPECT_NO_THROW(try_labels(within, "within.nii.gz")());
  auto rotated = p.labels;
  const double c = std::cos(0.5), s = std::sin(0.5);
  rotated.direction = {-c, s, 0, -s, -c, 0, 0, 0, 1};
  expect_error<InputError>(try_labels(rotated, "rotated.nii.gz"), {"rotated.nii.gz", "orientation"});
  auto fractional = p.labels;
  fractional.data = p.labels.data * 0.3;
  expect_error<InputError>(try_labels(fractional, "prob.nii.gz"), {"prob.nii.gz", "not integer"});
  auto empty = p.labels;
  empty.data = at::zeros_like(p.labels.data);
  expect_error<InputError>(try_labels(empty, "empty.nii.gz"), {"empty.nii.gz", "empty label map"});
  auto two = p.labels;
  two.data = at::cat({p.labels.data, p.labels.data}, 0);
  expect_error<InputError>(try_labels(two, "two.nii.gz"), {"two.nii.gz", "2 components"});
  expect_error<InputError>(
      [&] {
        prepare_probe_volume({pair.image, dir / "none.nii.gz"}, plain_data(), model);
      },
      {"none.nii.gz", "no such file"});
  // One class in the train patches (everything labelled 1).
  auto one = p.labels;
  one.data = at::ones_like(p.labels.data);
  const auto v = prepare_probe_volume({pair.image,
                                       [&] {
                                         write_volume(one, dir / "one.nii.gz");
                                         return dir / "one.nii.gz";
                                       }()},
                                      plain_data(), model);
  ProbeOptions o;
  o.split = ProbeSplit::checkerboard;
  expect_error<InputError>([&] { probe_targets({v}, {}, o); }, {"one.nii.gz", "fewer than 2 classes"});
  o.target = ProbeTarget::majority;
  expect_error<InputError>([&] { probe_targets({v}, {}, o); }, {"one.nii.gz", "fewer than 2 classes"});
}

TEST(Probe, CheckerboardSplitsBlocksAndRefusesAProbeOnItsOwnTrainPatches) {
  const test::TempDir dir("mae3d_probe");
  const auto pair = write_pair(dir, synthetic_pair(32, 32, 32), "a");
  const auto v = prepare_probe_volume(pair, plain_data(), tiny_model());
  ProbeOptions o;
  o.split = ProbeSplit::checkerboard;
  o.include_background = true;
  const auto t = probe_targets({v}, {}, o);
  EXPECT_EQ(t.train_rows.numel() + t.test_rows.numel(), 512);
  EXPECT_EQ(t.train_rows.numel(), 256);
  // Both sides hold whole 2x2x2 blocks of the lattice, never mixed.
  std::set<std::array<int64_t, 3>> train_blocks, test_blocks;
  for (const auto* side : {&t.train_rows, &t.test_rows}) {
    for (int64_t i = 0; i < side->numel(); ++i) {
      const auto r = (*side)[i].item<int64_t>();
      const std::array<int64_t, 3> b{v.lattice[r][0].item<int64_t>() / 2, v.lattice[r][1].item<int64_t>() / 2,
                                     v.lattice[r][2].item<int64_t>() / 2};
      (side == &t.train_rows ? train_blocks : test_blocks).insert(b);
    }
  }
  EXPECT_EQ(train_blocks.size(), 32u);
  EXPECT_EQ(test_blocks.size(), 32u);
  for (const auto& b : train_blocks) EXPECT_EQ(test_blocks.count(b), 0u);
  // The same fold assignment for the same seed; every fold is used.
  EXPECT_TRUE(at::equal(probe_targets({v}, {}, o).train_fold, t.train_fold));
  for (int64_t f = 0; f < o.folds; ++f) EXPECT_GT((t.train_fold == f).sum().item<int64_t>(), 0);
  // Without the background, patches with only label 0 are left out.
  o.include_background = false;
  EXPECT_GT(probe_targets({v}, {}, o).dropped_background, 0);

  const auto other = write_pair(dir, synthetic_pair(24, 24, 24), "b");
  const auto w = prepare_probe_volume(other, plain_data(), tiny_model());
  expect_error<ConfigError>([&] { probe_targets({v}, {w}, o); }, {"--test", "checkerboard"});
  o.split = ProbeSplit::none;
  expect_error<ConfigError>([&] { probe_targets({v}, {v}, o); }, {"--test", "also a --train image", "checkerboard"});
  expect_error<ConfigError>([&] { probe_targets({v}, {}, o); }, {"--test"});
  EXPECT_NO_THROW(probe_targets({v}, {w}, o));
}

// Targets made by hand: rows 0 .. n-1 train, the rest test.
ProbeTargets hand_targets(const at::Tensor& y, int64_t n_train, int64_t folds) {
  ProbeTargets t;
  const int64_t n = y.size(0);
  t.train_rows = at::arange(n_train, at::kLong);
  t.test_rows = at::arange(n_train, n, at::kLong);
  t.train_y = y.narrow(0, 0, n_train).contiguous();
  t.test_y = y.narrow(0, n_train, n - n_train).contiguous();
  t.train_fold = at::arange(n_train, at::kLong) % folds;
  return t;
}

TEST(Probe, RidgeFindsALinearTargetAndNothingInNoise) {
  auto gen = at::detail::createCPUGenerator(5);
  const auto x = at::randn({400, 12}, gen, at::kFloat);
  const auto w = at::randn({12, 3}, gen, at::kDouble);
  const auto y = at::matmul(x.to(at::kDouble), w) + 0.01 * at::randn({400, 3}, gen, at::kDouble);
  ProbeOptions o;
  auto t = hand_targets(y, 300, 3);
  t.classes = {1, 2, 3};
  const auto s = fit_and_score(x, t, o, "linear");
  EXPECT_GT(s.r2, 0.999);
  EXPECT_GT(s.r2_macro, 0.999);
  EXPECT_GT(s.cv_score, 0.999);
  EXPECT_EQ(s.dims, 12);
  const auto noise = at::randn({400, 12}, gen, at::kFloat);
  const auto n = fit_and_score(noise, t, o, "noise");
  EXPECT_LT(n.r2, 0.05);
  EXPECT_GE(n.l2, 1.0);  // the cross-validation shrinks a useless fit
}

TEST(Probe, LogisticSeparatesSeparableClassesAndScoresUnknownTestClassesAsErrors) {
  auto gen = at::detail::createCPUGenerator(6);
  const int64_t n = 300;
  const auto cls = at::arange(n, at::kLong) % 3;
  auto x = at::randn({n, 5}, gen, at::kFloat) * 0.3;
  x.select(1, 0).add_(cls.to(at::kFloat) * 3.0);
  ProbeOptions o;
  o.target = ProbeTarget::majority;
  auto t = hand_targets(cls, 200, 3);
  t.classes = {10, 20, 30};
  const auto s = fit_and_score(x, t, o, "separable");
  EXPECT_DOUBLE_EQ(s.accuracy, 1.0);
  EXPECT_DOUBLE_EQ(s.balanced_accuracy, 1.0);
  EXPECT_DOUBLE_EQ(s.macro_f1, 1.0);
  // A test class no train patch has (id 3) is always wrong.
  auto t2 = t;
  t2.test_only_classes = {40};
  t2.test_y = t.test_y.clone();
  t2.test_y.narrow(0, 0, 50).fill_(3);
  const auto s2 = fit_and_score(x, t2, o, "unknown");
  EXPECT_NEAR(s2.accuracy, 0.5, 1e-12);
  EXPECT_LT(s2.balanced_accuracy, 0.8);
  // Random features: about chance.
  const auto r = fit_and_score(at::randn({n, 5}, gen, at::kFloat), t, o, "noise");
  EXPECT_LT(r.accuracy, 0.55);
}

TEST(Probe, RandomInitLeavesTheGlobalGeneratorAlone) {
  torch::manual_seed(11);
  const auto expected = at::rand({4});
  torch::manual_seed(11);
  auto a = random_init_model(tiny_model(), 5);
  const auto got = at::rand({4});
  EXPECT_TRUE(at::equal(expected, got));
  auto b = random_init_model(tiny_model(), 5);
  auto c = random_init_model(tiny_model(), 6);
  const auto pa = a->parameters(), pb = b->parameters(), pc = c->parameters();
  bool all_equal = true, any_differs = false;
  for (size_t i = 0; i < pa.size(); ++i) {
    all_equal = all_equal && at::equal(pa[i], pb[i]);
    any_differs = any_differs || !at::equal(pa[i], pc[i]);
  }
  EXPECT_TRUE(all_equal);
  EXPECT_TRUE(any_differs);
  // The same weights a training run of that seed starts from (torch::manual_seed, then the model).
  torch::manual_seed(5);
  MaskedAutoencoder run_init(tiny_model());
  const auto pr = run_init->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(at::equal(pa[i], pr[i])) << i;
}

// A tiny checkpoint (the infer tests' tiny model) trained for 2 steps on `image` at 6 mm.
std::string train_tiny_on(const std::string& image, const test::TempDir& dir) {
  auto j = nlohmann::json::parse(test::tiny_config_json(image, dir.path.string()));
  j["data"]["spacing_mm"] = 6.0;
  j["data"]["intensity"] = {{"mode", "zscore_nonzero"}};
  j["train"]["max_steps"] = 2;
  j["train"]["checkpoint_every"] = 2;
  const Config config = config_from_json(j);
  clear_stop_request();
  train(config, TrainOptions{});
  return config.output.dir;
}

#ifdef MAE_PROBE_BIN
TEST(ProbeCli, ProbesColin27AgainstItsAtlasesAndRefusesBadInput) {
  for (const auto& f : {kColin, kAal, kBrodmann}) {
    if (!fs::exists(f)) GTEST_SKIP() << f << " is not installed (Debian package mricron-data)";
  }
  const test::TempDir dir("mae3d_probe_cli");
  const std::string run = train_tiny_on(kColin, dir);
  const std::string report = dir / "report.json";
  auto r = test::run_binary(MAE_PROBE_BIN,
                            {"--checkpoint", run, "--train", kColin + "=" + kAal, "--split", "checkerboard", "--out",
                             report, "--threads", "1"},
                            dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("probe fractions R² on "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("pretrained - random "), std::string::npos) << r.out;
  std::ifstream in(report);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j.at("target"), "fractions");
  // 181 x 217 x 181 at 6 mm: 30 x 36 x 30 voxels, 7 x 9 x 7 patches of 4.
  EXPECT_EQ(j.at("patches").at("total"), 7 * 9 * 7);
  EXPECT_GT(j.at("target_labels").size(), 20u);  // AAL has 116 regions; many survive 6 mm
  for (const auto* name : {"pretrained", "random_init", "raw"}) {
    const double r2 = j.at("scores").at(name).at("r2");
    EXPECT_TRUE(std::isfinite(r2) && r2 <= 1.0) << name << " " << r2;
  }
  EXPECT_EQ(j.at("scores").at("pretrained").at("dims"), 24);
  EXPECT_EQ(j.at("scores").at("raw").at("dims"), 10);

  // Majority labels of Brodmann's areas, tested on the checkerboard's other blocks.
  r = test::run_binary(MAE_PROBE_BIN,
                       {"--checkpoint", run, "--train", kColin + "=" + kBrodmann, "--split", "checkerboard", "--target",
                        "majority", "--threads", "1"},
                       dir.path.string());
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("probe majority accuracy on "), std::string::npos) << r.out;

  // Bad input: one line naming the file, exit 2.
  auto shifted = read_volume(kAal);
  shifted.origin[0] += 20.0;
  write_volume(shifted, dir / "aal_shifted.nii.gz");
  r = test::run_binary(
      MAE_PROBE_BIN,
      {"--checkpoint", run, "--train", kColin + "=" + (dir / "aal_shifted.nii.gz"), "--split", "checkerboard"},
      dir.path.string());
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("aal_shifted.nii.gz"), std::string::npos) << r.err;
  r = test::run_binary(MAE_PROBE_BIN,
                       {"--checkpoint", run, "--train", kColin + "=" + kAal, "--test", kColin + "=" + kAal},
                       dir.path.string());
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("--split checkerboard"), std::string::npos) << r.err;
  r = test::run_binary(MAE_PROBE_BIN, {"--checkpoint", run, "--train", kColin}, dir.path.string());
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("IMAGE=LABELS"), std::string::npos) << r.err;
  r = test::run_binary(MAE_PROBE_BIN,
                       {"--checkpoint", dir / "nothing", "--train", kColin + "=" + kAal, "--split", "checkerboard"},
                       dir.path.string());
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_FALSE(fs::exists(dir / "nothing"));
}
#endif

}  // namespace
}  // namespace mae
