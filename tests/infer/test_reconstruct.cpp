// Whole-volume reconstruction end to end on a tiny checkpoint trained in the test: outputs,
// geometry, exact visible voxels, metrics recomputed from the written files, the PNG, the saved
// tensors, determinism, norm_pix de-normalisation, and the errors a user can cause.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/cache.h"
#include "helpers.h"
#include "infer/reconstruct.h"
#include "infer/windows.h"
#include "io/io.h"
#include "model/ops.h"
#include "run/config.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace mae {
namespace {

class Reconstruct : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = std::make_unique<test::TempDir>();
    volume_path_ = *dir_ / "volume.nii.gz";
    write_volume(test::synthetic_volume(18, 24, 20), volume_path_);
    run_dir_ = test::train_tiny(volume_path_, dir_->path.string());
  }
  static void TearDownTestSuite() { dir_.reset(); }

  ReconstructRequest request(const std::string& out) const {
    ReconstructRequest r;
    r.checkpoint = run_dir_;
    r.inputs = {volume_path_};
    r.out_dir = out;
    r.options.seed = 3;
    return r;
  }

  static std::unique_ptr<test::TempDir> dir_;
  static std::string volume_path_, run_dir_;
};

std::unique_ptr<test::TempDir> Reconstruct::dir_;
std::string Reconstruct::volume_path_, Reconstruct::run_dir_;

void expect_same_geometry(const Volume& a, const Volume& b) {
  EXPECT_EQ(a.shape_dhw(), b.shape_dhw());
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(a.spacing[i], b.spacing[i], 1e-6);
    EXPECT_NEAR(a.origin[i], b.origin[i], 1e-4);
  }
  for (int i = 0; i < 9; ++i) EXPECT_NEAR(a.direction[i], b.direction[i], 1e-6);
}

uint32_t be32(const std::string& s, size_t at) {
  return (uint32_t(uint8_t(s[at])) << 24) | (uint32_t(uint8_t(s[at + 1])) << 16) | (uint32_t(uint8_t(s[at + 2])) << 8) |
         uint32_t(uint8_t(s[at + 3]));
}

TEST_F(Reconstruct, WritesConsistentOutputs) {
  const test::TempDir out;
  ReconstructRequest req = request(out.path.string());
  req.original_space = true;
  req.save_tensors = out / "window.pt";
  const ReconstructReport report = run_reconstruction(req);
  EXPECT_EQ(report.step, 3);
  for (const char* name : {"input", "masked", "reconstruction", "error", "mask"}) {
    EXPECT_TRUE(fs::exists(out / (std::string(name) + ".nii.gz"))) << name;
    EXPECT_TRUE(fs::exists(out / (std::string(name) + "_original.nii.gz"))) << name;
  }
  ASSERT_TRUE(fs::exists(out / "montage.png"));
  ASSERT_TRUE(fs::exists(out / "metrics.json"));

  // Geometry and voxels of input.nii.gz are the training preprocessing's.
  const Config config = load_config(report.checkpoint + "/config.json");
  PreprocessedVolume pre = preprocess_volume(DatasetEntry{{volume_path_}, ""}, config.data);
  pre.volume.data = round_for_cache(pre.volume.data);
  const Volume input = read_volume(out / "input.nii.gz");
  const Volume rec = read_volume(out / "reconstruction.nii.gz");
  const Volume masked = read_volume(out / "masked.nii.gz");
  const Volume error = read_volume(out / "error.nii.gz");
  const Volume mask = read_volume(out / "mask.nii.gz");
  EXPECT_EQ(pre.volume.shape_dhw(), (std::array<int64_t, 3>{18, 20, 24}));  // reoriented PRS -> RAS
  for (const Volume* v : {&input, &rec, &masked, &error, &mask}) expect_same_geometry(*v, pre.volume);
  EXPECT_TRUE(at::equal(input.data, pre.volume.data));

  // Visible voxels equal the input exactly; masked ones are predictions; the maps agree.
  const auto vis = (mask.data == 0).expand_as(input.data);
  const auto hid = (mask.data == 1).expand_as(input.data);
  EXPECT_TRUE(at::logical_or(vis, hid).all().item<bool>()) << "mask is not 0/1";
  EXPECT_GT(hid.sum().item<int64_t>(), 0);
  EXPECT_GT(vis.sum().item<int64_t>(), 0);
  EXPECT_TRUE(at::equal(rec.data.masked_select(vis), input.data.masked_select(vis)));
  EXPECT_FALSE(at::equal(rec.data.masked_select(hid), input.data.masked_select(hid)));
  EXPECT_TRUE(at::allclose(error.data, rec.data - input.data, 1e-5, 1e-5));
  EXPECT_TRUE((error.data.masked_select(vis) == 0).all().item<bool>());
  EXPECT_TRUE(at::equal(masked.data.masked_select(vis), input.data.masked_select(vis)));
  EXPECT_TRUE((masked.data.masked_select(hid) == input.data.min()).all().item<bool>());

  // metrics.json matches a recomputation from the written files.
  std::ifstream mf(out / "metrics.json");
  const auto m = nlohmann::json::parse(mf);
  const auto x = input.data.to(at::kDouble), r = rec.data.to(at::kDouble);
  const double range = (x.max() - x.min()).item<double>();
  const double mse_all = (r - x).pow(2).mean().item<double>();
  const double mse_masked = (r - x).pow(2).masked_select(hid).mean().item<double>();
  EXPECT_NEAR(m["data_range"].get<double>(), range, 1e-9 * range);
  EXPECT_NEAR(m["model"]["all"]["mse"].get<double>(), mse_all, 1e-6 * mse_all);
  EXPECT_NEAR(m["model"]["masked"]["mse"].get<double>(), mse_masked, 1e-6 * mse_masked);
  EXPECT_NEAR(m["model"]["masked"]["psnr_db"].get<double>(), 10 * std::log10(range * range / mse_masked), 1e-6);
  EXPECT_NEAR(m["model"]["all"]["psnr_db"].get<double>(), 10 * std::log10(range * range / mse_all), 1e-6);
  EXPECT_EQ(m["masked_voxels"].get<int64_t>(), hid.sum().item<int64_t>());
  EXPECT_GT(m["baseline_window_mean"]["masked"]["mse"].get<double>(), 0.0);
  EXPECT_EQ(m["num_windows"].get<int64_t>(), 8);  // D 18 -> 2, H 20 -> 2, W 24 -> 2 windows of 16
  EXPECT_EQ(m["step"].get<int64_t>(), 3);
  EXPECT_EQ(m["seed"].get<uint64_t>(), 3u);
  EXPECT_DOUBLE_EQ(m["masking_ratio"].get<double>(), 0.75);

  // Original space: the input file's grid.
  const Volume raw = read_volume(volume_path_);
  for (const char* name : {"input", "reconstruction", "mask"}) {
    expect_same_geometry(read_volume(out / (std::string(name) + "_original.nii.gz")), raw);
  }

  // The PNG: a valid header, 4 columns of panels with square pixels in mm, 3 rows.
  std::ifstream pf(out / "montage.png", std::ios::binary);
  const std::string png((std::istreambuf_iterator<char>(pf)), std::istreambuf_iterator<char>());
  ASSERT_GT(png.size(), 24u);
  EXPECT_EQ(png.substr(1, 3), "PNG");
  EXPECT_EQ(png.substr(12, 4), "IHDR");
  const uint32_t width = be32(png, 16), height = be32(png, 20);
  // RAS volume 18 (z, 2 mm) x 20 (y, 1.5 mm) x 24 (x, 1 mm): extents 36, 30, 24 mm; 240 px for 36 mm.
  const double px = 240.0 / 36.0;
  const int64_t axial_rows = std::llround(30 * px), coronal_rows = std::llround(36 * px), sag_rows = coronal_rows;
  const int64_t widest = std::llround(30 * px);  // sagittal: y across
  EXPECT_GE(height, axial_rows + coronal_rows + sag_rows);
  EXPECT_LT(height, axial_rows + coronal_rows + sag_rows + 400);
  EXPECT_GE(width, 4 * widest);
  EXPECT_LT(width, 4 * widest + 1400);

  // --save-tensors: what Python's torch.load reads.
  std::ifstream tf(out / "window.pt", std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(tf)), std::istreambuf_iterator<char>());
  const auto dict = torch::jit::pickle_load(bytes).toGenericDict();
  EXPECT_EQ(dict.at("input").toTensor().sizes(), (std::vector<int64_t>{1, 1, 16, 16, 16}));
  EXPECT_EQ(dict.at("mask").toTensor().sizes(), (std::vector<int64_t>{1, 64}));
  EXPECT_EQ(dict.at("pred").toTensor().sizes(), (std::vector<int64_t>{1, 64, 64}));
  EXPECT_EQ(dict.at("mask").toTensor().sum().item<double>(), 48.0);
  EXPECT_TRUE(at::equal(dict.at("input").toTensor()[0], input.data.narrow(1, 0, 16).narrow(2, 0, 16).narrow(3, 0, 16)));
}

// The owner of voxel v along one axis, computed here independently of the library: the window whose
// centre (origin + window / 2) is nearest to v's centre (v + 0.5), ties to the earlier window.
std::vector<int64_t> nearest_window(const std::vector<int64_t>& origins, int64_t window, int64_t size) {
  std::vector<int64_t> owner(static_cast<size_t>(size));
  for (int64_t v = 0; v < size; ++v) {
    // Twice the distances, so that everything stays in integers and ties are exact.
    int64_t best = 0, best_dist = std::abs(2 * v + 1 - (2 * origins[0] + window));
    for (size_t i = 1; i < origins.size(); ++i) {
      const int64_t dist = std::abs(2 * v + 1 - (2 * origins[i] + window));
      if (dist < best_dist) best = static_cast<int64_t>(i), best_dist = dist;
    }
    owner[static_cast<size_t>(v)] = best;
  }
  return owner;
}

TEST_F(Reconstruct, EachVoxelShowsTheWindowWhoseCentreIsNearest) {
  const TrainedModel model = load_trained_model(run_dir_);
  // Windows of 16, stride 12, overlapping unevenly on every axis, with exact ties between centres:
  //   D 31: origins {0, 12, 15}, centres 8, 20, 23 (voxel 21 ties between windows 1 and 2);
  //   H 27: origins {0, 11},     centres 8, 19     (voxel 13 ties);
  //   W 37: origins {0, 12, 21}, centres 8, 20, 29 (voxel 24 ties between windows 1 and 2).
  const int64_t D = 31, H = 27, W = 37, win = 16;
  const std::vector<std::vector<int64_t>> axis_origins = {{0, 12, 15}, {0, 11}, {0, 12, 21}};
  Volume volume = test::synthetic_volume(D, H, W, 13);
  volume.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  ReconstructOptions o;
  o.seed = 4;
  const auto r = reconstruct_volume(model, volume, o);
  const auto origins = window_origins({D, H, W}, {win, win, win}, o.overlap);
  ASSERT_EQ(origins.size(), 18u);
  ASSERT_EQ(r.num_windows, 18);
  for (size_t i = 0; i < origins.size(); ++i) {
    const std::array<int64_t, 3> want = {axis_origins[0][i / 6], axis_origins[1][(i / 3) % 2], axis_origins[2][i % 3]};
    ASSERT_EQ(origins[i], want) << "window " << i;
  }

  // Every window as the library runs it: one CPU generator seeded with the seed, one draw per
  // window in raster order, the window alone through the model; masked voxels show the prediction,
  // visible ones the input.
  c10::NoGradGuard no_grad;
  MaskedAutoencoder net = model.model;  // shares the module
  net->eval();
  const int64_t n = net->options().num_patches();
  at::Generator gen = at::detail::createCPUGenerator(o.seed);
  std::vector<at::Tensor> window_mask, window_rec;  // (1, 16, 16, 16), (C, 16, 16, 16)
  at::Tensor first_mask;                            // (1, N) of window 0
  for (const auto& og : origins) {
    const auto crop = volume.data.to(at::kFloat)
                          .slice(1, og[0], og[0] + win)
                          .slice(2, og[1], og[1] + win)
                          .slice(3, og[2], og[2] + win)
                          .unsqueeze(0)
                          .contiguous();
    const auto out = net->forward_visible(crop, draw_visible(1, n, r.masking_ratio, gen));
    const auto pred = unpatchify(out.pred.to(at::kFloat), {win, win, win}, {4, 4, 4}, 1)[0];
    const auto hidden = unpatchify(out.mask.to(at::kFloat).unsqueeze(-1).expand({1, n, 64}).contiguous(),
                                   {win, win, win}, {4, 4, 4}, 1)[0];
    if (!first_mask.defined()) first_mask = out.mask.to(at::kFloat);
    window_mask.push_back(hidden.contiguous());
    window_rec.push_back(at::where(hidden > 0.5, pred, crop[0]).contiguous());
  }
  EXPECT_TRUE(at::equal(r.first_window.mask, first_mask)) << "the masks are not drawn as the library draws them";

  // Every voxel against its owner window's own mask and reconstruction.
  const auto own_d = nearest_window(axis_origins[0], win, D);
  const auto own_h = nearest_window(axis_origins[1], win, H);
  const auto own_w = nearest_window(axis_origins[2], win, W);
  const auto got_mask = r.mask.data.to(at::kFloat).contiguous();
  const auto got_rec = r.reconstruction.data.to(at::kFloat).contiguous();
  const auto gm = got_mask.accessor<float, 4>();
  const auto gr = got_rec.accessor<float, 4>();
  int64_t bad_mask = 0, bad_rec = 0;
  std::string first_bad;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t w = 0; w < W; ++w) {
        const size_t k = static_cast<size_t>((own_d[d] * 2 + own_h[h]) * 3 + own_w[w]);
        const auto& og = origins[k];
        const auto wm = window_mask[k].accessor<float, 4>();
        const auto wr = window_rec[k].accessor<float, 4>();
        const int64_t ld = d - og[0], lh = h - og[1], lw = w - og[2];
        const bool mask_ok = gm[0][d][h][w] == wm[0][ld][lh][lw];
        const bool rec_ok = std::abs(gr[0][d][h][w] - wr[0][ld][lh][lw]) <= 1e-5f + 1e-5f * std::abs(wr[0][ld][lh][lw]);
        bad_mask += mask_ok ? 0 : 1;
        bad_rec += rec_ok ? 0 : 1;
        if ((!mask_ok || !rec_ok) && first_bad.empty()) {
          first_bad = "voxel (" + std::to_string(d) + ", " + std::to_string(h) + ", " + std::to_string(w) +
                      ") owned by window " + std::to_string(k);
        }
      }
    }
  }
  EXPECT_EQ(bad_mask, 0) << "voxels whose mask is not their owner window's; first: " << first_bad;
  EXPECT_EQ(bad_rec, 0) << "voxels whose reconstruction is not their owner window's; first: " << first_bad;
  const double share = static_cast<double>(r.metrics.masked_voxels) / static_cast<double>(r.metrics.voxels);
  EXPECT_NEAR(share, 0.75, 0.1) << "each voxel takes its mask from one window";
}

TEST_F(Reconstruct, DeterministicAndIndependentOfBatching) {
  const TrainedModel model = load_trained_model(run_dir_);
  PreprocessedVolume pre = preprocess_volume(DatasetEntry{{volume_path_}, ""}, model.config.data);
  ReconstructOptions a;
  a.seed = 11;
  a.batch_size = 1;
  ReconstructOptions b = a;
  b.batch_size = 5;
  const auto ra = reconstruct_volume(model, pre.volume, a);
  const auto rb = reconstruct_volume(model, pre.volume, b);
  EXPECT_TRUE(at::equal(ra.mask.data, rb.mask.data));
  EXPECT_TRUE(at::allclose(ra.reconstruction.data, rb.reconstruction.data, 1e-5, 1e-5));
  ReconstructOptions c = a;
  c.seed = 12;
  EXPECT_FALSE(at::equal(ra.mask.data, reconstruct_volume(model, pre.volume, c).mask.data));
  // A lower ratio masks fewer voxels; overlap 0 needs fewer windows.
  ReconstructOptions d = a;
  d.masking_ratio = 0.25;
  d.overlap = 0.0;
  const auto rd = reconstruct_volume(model, pre.volume, d);
  EXPECT_LT(rd.metrics.masked_voxels, ra.metrics.masked_voxels);
  EXPECT_EQ(rd.num_windows, 8);
}

TEST_F(Reconstruct, NormPixPredictionsAreDenormalisedWithVisibleStatistics) {
  const test::TempDir dir;
  Config config =
      config_from_json(nlohmann::json::parse(test::tiny_config_json(volume_path_, dir.path.string(), true)));
  MaskedAutoencoder model(model_options_from(config.model));
  CheckpointInfo info;
  info.step = 0;
  info.config = config_to_json(config);
  save_checkpoint(config.output.dir, info, *model, nullptr, {});
  const TrainedModel trained = load_trained_model(config.output.dir);
  ASSERT_TRUE(trained.config.model.norm_pix_loss);

  // One window exactly: the stitched masked voxels are pred·std + mean of the visible patches.
  Volume v = test::synthetic_volume(16, 16, 16);
  v.direction = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  ReconstructOptions o;
  o.seed = 5;
  const auto r = reconstruct_volume(trained, v, o);
  ASSERT_EQ(r.num_windows, 1);
  const auto& w = r.first_window;
  const auto target = patchify(w.input, {4, 4, 4});  // (1, N, P)
  const auto vis = (1 - w.mask).unsqueeze(-1);
  const auto mean = (target * vis).sum() / (vis.sum() * target.size(2));
  const auto var = target.var(-1, true, true) + 1e-6;
  const auto std = ((var * vis).sum() / vis.sum()).sqrt();
  const auto expected = unpatchify(w.pred * std + mean, {16, 16, 16}, {4, 4, 4}, 1)[0];
  const auto hid = r.mask.data > 0;
  EXPECT_TRUE(at::allclose(r.reconstruction.data.masked_select(hid), expected.masked_select(hid), 1e-4, 1e-4));
  EXPECT_TRUE(at::equal(r.reconstruction.data.masked_select(~hid), v.data.masked_select(~hid)));
  EXPECT_TRUE(std::isfinite(r.metrics.model_masked.psnr));
}

TEST_F(Reconstruct, BadCheckpointsAreCheckpointErrorsNamingThePath) {
  const test::TempDir out;
  ReconstructRequest req = request(out.path.string());
  req.checkpoint = out / "no_such_run";
  test::expect_error<CheckpointError>([&] { run_reconstruction(req); }, {req.checkpoint});
  const test::TempDir fake;
  fs::create_directories(fake.path / "ckpt");
  std::ofstream(fake / "ckpt/meta.json") << "{not json";
  req.checkpoint = fake / "ckpt";
  test::expect_error<CheckpointError>([&] { run_reconstruction(req); }, {"meta.json"});
}

TEST_F(Reconstruct, BadInputsAreInputErrorsNamingTheFile) {
  const test::TempDir out;
  ReconstructRequest req = request(out.path.string());
  req.inputs = {out / "missing.nii.gz"};
  test::expect_error<InputError>([&] { run_reconstruction(req); }, {"missing.nii.gz"});
  std::ofstream(out / "corrupt.nii.gz") << "this is not a volume";
  req.inputs = {out / "corrupt.nii.gz"};
  test::expect_error<InputError>([&] { run_reconstruction(req); }, {"corrupt.nii.gz"});
  // Smaller than the window after preprocessing: both sizes in the message, nothing padded.
  Volume small = test::synthetic_volume(10, 20, 20);
  small.direction = {1, 0, 0, 0, -1, 0, 0, 0, 1};
  write_volume(small, out / "small.nii.gz");
  req.inputs = {out / "small.nii.gz"};
  test::expect_error<InputError>([&] { run_reconstruction(req); }, {"small.nii.gz", "10x20x20", "16x16x16"});
  EXPECT_FALSE(fs::exists(out / "montage.png"));
}

TEST_F(Reconstruct, BadFlagsAreConfigErrorsNamingTheFlag) {
  const test::TempDir out;
  ReconstructRequest req = request(out.path.string());
  req.slices = {{"axial", 18}};
  test::expect_error<ConfigError>([&] { run_reconstruction(req); }, {"--slice", "axial:18", "0..17"});
  req.slices = {};
  for (double ratio : {0.0, 1.0, 0.999, -0.5}) {
    req.options.masking_ratio = ratio;
    test::expect_error<ConfigError>([&] { run_reconstruction(req); }, {"--masking-ratio"});
  }
  req.options.masking_ratio.reset();
  req.options.overlap = 1.0;
  test::expect_error<ConfigError>([&] { run_reconstruction(req); }, {"--overlap"});
  req.options.overlap = 0.999;  // one window per voxel shift: minutes instead of a second
  test::expect_error<ConfigError>([&] { run_reconstruction(req); }, {"--overlap 0.999", "0 .. 0.75"});
}

TEST_F(Reconstruct, ReportsProgressAfterEveryBatchOfWindows) {
  const TrainedModel model = load_trained_model(run_dir_);
  Volume volume = test::synthetic_volume(24, 24, 24, 5);
  ReconstructOptions o;
  o.overlap = 0.5;  // stride 8 on 24: 2 origins per axis -> 8 windows, 2 batches of 4
  std::vector<std::pair<int64_t, int64_t>> calls;
  o.progress = [&](int64_t done, int64_t total) { calls.emplace_back(done, total); };
  const auto r = reconstruct_volume(model, volume, o);
  ASSERT_EQ(r.num_windows, 8);
  EXPECT_EQ(calls, (std::vector<std::pair<int64_t, int64_t>>{{4, 8}, {8, 8}}));
}

}  // namespace
}  // namespace mae
