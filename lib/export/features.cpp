#include "export/features.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/version.h>

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "data/cache.h"
#include "export/monai_export.h"
#include "export/tensor_file.h"
#include "infer/windows.h"
#include "run/trained_model.h"

namespace fs = std::filesystem;

namespace mae {

EncoderFeatures encode_volume(MaskedAutoencoderImpl& model, const at::Tensor& volume, double overlap, int64_t batch) {
  const auto& o = model.options();
  if (o.spatial_dims() != 3) {
    throw ConfigError("--features needs a 3D model; this checkpoint's model is " + std::to_string(o.spatial_dims()) +
                      "D");
  }
  if (volume.dim() != 4) {
    throw InputError("--features: the preprocessed volume has " + std::to_string(volume.dim()) +
                     " axes; expected (C, D, H, W)");
  }
  if (volume.size(0) != o.in_channels()) {
    throw InputError("--features: the volume has " + std::to_string(volume.size(0)) +
                     " channel(s) but the model was trained on " + std::to_string(o.in_channels()));
  }
  const auto& win = o.img_size();
  const auto origins =
      window_origins({volume.size(1), volume.size(2), volume.size(3)}, {win[0], win[1], win[2]}, overlap);
  const int64_t W = static_cast<int64_t>(origins.size());
  const auto x = volume.to(at::kFloat).contiguous();

  EncoderFeatures f;
  std::vector<at::Tensor> windows;
  windows.reserve(origins.size());
  for (const auto& org : origins) {
    windows.push_back(x.narrow(1, org[0], win[0]).narrow(2, org[1], win[1]).narrow(3, org[2], win[2]));
  }
  f.windows = at::stack(windows).contiguous();
  f.origins = at::empty({W, 3}, at::kLong);
  auto acc = f.origins.accessor<int64_t, 2>();
  for (int64_t i = 0; i < W; ++i) {
    for (int a = 0; a < 3; ++a) acc[i][a] = origins[static_cast<size_t>(i)][static_cast<size_t>(a)];
  }

  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  std::vector<at::Tensor> tokens;
  for (int64_t start = 0; start < W; start += std::max<int64_t>(1, batch)) {
    const int64_t n = std::min<int64_t>(std::max<int64_t>(1, batch), W - start);
    tokens.push_back(model.encode(f.windows.narrow(0, start, n)));
  }
  if (was_training) model.train();
  f.tokens = at::cat(tokens, 0).contiguous();
  f.pooled = f.tokens.mean(std::vector<int64_t>{0, 1});
  return f;
}

EncoderFeatures to_axis_order(const EncoderFeatures& features, const std::vector<int64_t>& grid, AxisOrder axis_order) {
  if (axis_order == AxisOrder::native) return features;
  EncoderFeatures f;
  f.windows = reverse_spatial_axes(features.windows);
  f.origins = features.origins.flip({1}).contiguous();
  f.tokens = reverse_raster(features.tokens, grid);
  f.pooled = features.pooled;
  return f;
}

FeaturesResult export_features(const std::string& checkpoint, const std::string& volume_path,
                               const std::string& out_path, double overlap, AxisOrder axis_order, bool allow_diverged) {
  std::error_code ec;
  if (volume_path.empty() || !fs::exists(volume_path, ec)) {
    throw InputError("--features " + volume_path + ": no such file or folder");
  }
  if (!(overlap >= 0.0 && overlap <= kMaxOverlap)) {
    throw ConfigError("--overlap " + std::to_string(overlap) + " must be in [0, " + std::to_string(kMaxOverlap) + "]");
  }
  TrainedModel trained = load_trained_model(checkpoint);
  refuse_diverged(trained, allow_diverged);
  check_output_folder(out_path, "--out");

  // The training loader's values: preprocess_volume plus the cache's float16 rounding.
  DataConfig data = trained.config.data;
  data.cache_dir.clear();
  const PreprocessedVolume pv = VolumeCache(data).load(DatasetEntry{{volume_path}, ""});
  const auto& grid = trained.model->options().grid();
  const EncoderFeatures f = to_axis_order(encode_volume(*trained.model, pv.volume.data, overlap), grid, axis_order);
  const bool monai = axis_order == AxisOrder::monai;

  FeaturesResult result;
  result.pt_path = out_path;
  result.json_path = description_path(out_path);
  result.num_windows = f.windows.size(0);

  nlohmann::json j;
  j["kind"] = "mae3d encoder features";
  j["file"] = fs::absolute(out_path).lexically_normal().string();
  j["created_by"] = std::string("mae-export (mae3d ") + MAE3D_VERSION + ", LibTorch " + TORCH_VERSION + ")";
  j["volume"] = fs::absolute(volume_path).lexically_normal().string();
  j["checkpoint"] = checkpoint_description(trained);
  j["overlap"] = overlap;
  j["source"] = {{"channels", pv.source.channels},
                 {"shape_dhw", pv.source.shape_dhw},
                 {"spacing_mm_xyz", pv.source.spacing},
                 {"orientation", pv.source.orientation}};
  j["preprocessed"] = {{"shape_cdhw", pv.volume.data.sizes().vec()}, {"spacing_mm_xyz", pv.volume.spacing}};
  if (monai) {
    auto shape = pv.volume.data.sizes().vec();
    std::reverse(shape.begin() + 1, shape.end());
    j["preprocessed"]["shape_cijk"] = shape;
  }
  j["axis_order"] = {{"order", to_string(axis_order)},
                     {"input", axis_order_description(axis_order, trained.config.data.orientation)}};
  j["preprocessing"] = preprocessing_description(trained.config, axis_order);
  j["shapes"] = {{"windows", f.windows.sizes().vec()},
                 {"origins", f.origins.sizes().vec()},
                 {"tokens", f.tokens.sizes().vec()},
                 {"pooled", f.pooled.sizes().vec()}};
  const std::string axes = monai ? "(i, j, k)" : "(d, h, w)";
  j["meaning"] = {
      {"windows", "(W, C, " + std::string(monai ? "i, j, k" : "d, h, w") +
                      ") float32: the exact encoder inputs (model-sized windows of the preprocessed volume)" +
                      (monai ? ", as MONAI arrays: mae3d's (C, d, h, w) windows with the spatial axes reversed" : "")},
      {"origins", "(W, 3) int64: voxel offset " + axes + " of each window in the preprocessed volume"},
      {"tokens",
       "(W, N, E) float32: encoder output on all patches, no cls token, after the final LayerNorm; "
       "patch t = a*g1*g2 + b*g2 + c at position (a, b, c) of the " +
           axes +
           " patch grid \"grid\" (as a "
           "ViT exported with --axis-order " +
           to_string(axis_order) + " computes them from the windows)"},
      {"pooled", "(E) float32: mean of tokens over all windows and patches"}};
  j["grid"] = in_axis_order(grid, axis_order);

  save_tensor_dict({{"windows", f.windows}, {"origins", f.origins}, {"tokens", f.tokens}, {"pooled", f.pooled}},
                   result.pt_path);
  write_json_file(j, result.json_path);
  return result;
}

}  // namespace mae
