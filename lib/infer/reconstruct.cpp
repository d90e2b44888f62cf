// Sliding-window reconstruction, its metrics and outputs; see reconstruct.h for the conventions.
#include "infer/reconstruct.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>

#include "core/error.h"
#include "core/pickle.h"
#include "data/cache.h"
#include "infer/windows.h"
#include "io/io.h"
#include "model/ops.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

std::string num_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string dims_str(const std::array<int64_t, 3>& s) {
  return std::to_string(s[0]) + "x" + std::to_string(s[1]) + "x" + std::to_string(s[2]);
}

std::array<int64_t, 3> model_window(const MaskedAutoencoderOptions& o) {
  if (o.img_size().size() != 3) {
    throw CheckpointError("the checkpoint's model is " + std::to_string(o.img_size().size()) +
                          "D; reconstruction needs a 3D model");
  }
  return {o.img_size()[0], o.img_size()[1], o.img_size()[2]};
}

double resolve_ratio(const TrainedModel& model, const ReconstructOptions& options) {
  const double ratio = options.masking_ratio.value_or(model.config.model.masking_ratio);
  const int64_t n = model.model->options().num_patches();
  const int64_t keep = (ratio > 0.0 && ratio < 1.0) ? num_visible(n, ratio) : 0;
  if (!(ratio > 0.0 && ratio < 1.0) || keep < 1 || keep >= n) {
    throw ConfigError("--masking-ratio " + num_str(ratio) +
                      ": must leave at least one visible and one masked patch of the " + std::to_string(n) +
                      " patches of a window");
  }
  return ratio;
}

void check_fits(const Volume& input, const std::array<int64_t, 3>& window, const std::string& what) {
  const auto shape = input.shape_dhw();
  for (int a = 0; a < 3; ++a) {
    if (shape[a] < window[a]) {
      throw InputError(what + ": after preprocessing the volume is " + dims_str(shape) +
                       " voxels (D x H x W), smaller than the model window " + dims_str(window) +
                       "; it is not padded, so use a larger volume (or a model trained with a smaller img_size)");
    }
  }
}

// For each window origin along one axis, the voxels [first, last) it owns: those nearer its centre
// than any other window's centre (ties go to the earlier window).
std::map<int64_t, std::pair<int64_t, int64_t>> owned_ranges(std::vector<int64_t> origins, int64_t window,
                                                            int64_t size) {
  std::sort(origins.begin(), origins.end());
  origins.erase(std::unique(origins.begin(), origins.end()), origins.end());
  std::map<int64_t, std::pair<int64_t, int64_t>> out;
  size_t owner = 0;
  for (int64_t v = 0; v < size; ++v) {
    const double p = static_cast<double>(v) + 0.5;
    auto distance = [&](size_t i) {
      return std::abs(p - (static_cast<double>(origins[i]) + 0.5 * static_cast<double>(window)));
    };
    while (owner + 1 < origins.size() && distance(owner + 1) < distance(owner)) ++owner;
    auto it = out.find(origins[owner]);
    if (it == out.end()) {
      out[origins[owner]] = {v, v + 1};
    } else {
      it->second.second = v + 1;
    }
  }
  return out;
}

Volume like(const Volume& geometry, at::Tensor data) {
  Volume v = geometry;
  v.data = std::move(data).contiguous();
  return v;
}

ErrorStats error_stats(const at::Tensor& sq_err, const at::Tensor& weight, double range) {
  const double n = weight.sum().item<double>();
  ErrorStats s;
  s.mse = n > 0 ? (sq_err * weight).sum().item<double>() / n : 0.0;
  s.psnr = s.mse > 0 ? 10.0 * std::log10(range * range / s.mse) : std::numeric_limits<double>::infinity();
  return s;
}

nlohmann::json stats_json(const ErrorStats& s) {
  nlohmann::json j;
  j["mse"] = s.mse;
  j["psnr_db"] = std::isfinite(s.psnr) ? nlohmann::json(s.psnr) : nlohmann::json();  // null = identical
  return j;
}

}  // namespace

Reconstruction reconstruct_volume(const TrainedModel& trained, const Volume& input, const ReconstructOptions& options) {
  MaskedAutoencoder model = trained.model;
  const auto& mo = model->options();
  const auto window = model_window(mo);
  if (input.channels() != mo.in_channels()) {
    throw InputError("the input has " + std::to_string(input.channels()) + " channel(s); the model expects " +
                     std::to_string(mo.in_channels()));
  }
  check_fits(input, window, "input");
  if (options.batch_size < 1) throw ConfigError("reconstruction batch size must be >= 1");
  const double ratio = resolve_ratio(trained, options);
  const auto origins = window_origins(input.shape_dhw(), window, options.overlap);
  const int64_t n = mo.num_patches();
  const int64_t channels = mo.in_channels();
  const bool norm_pix = trained.config.model.norm_pix_loss;
  int64_t patch_voxels = 1;
  for (int64_t p : mo.patch_size()) patch_voxels *= p;

  const at::Tensor x = input.data.to(at::kFloat).contiguous();  // (C, D, H, W)
  const auto shape = input.shape_dhw();
  std::array<std::map<int64_t, std::pair<int64_t, int64_t>>, 3> owned;
  for (int a = 0; a < 3; ++a) {
    std::vector<int64_t> axis;
    for (const auto& o : origins) axis.push_back(o[a]);
    owned[a] = owned_ranges(axis, window[a], shape[a]);
  }
  at::Tensor rec = x.clone();
  at::Tensor baseline = x.clone();
  at::Tensor mask_map = at::zeros({1, shape[0], shape[1], shape[2]}, at::kFloat);

  Reconstruction out;
  out.window = window;
  out.masking_ratio = ratio;
  out.num_windows = static_cast<int64_t>(origins.size());

  c10::NoGradGuard no_grad;
  model->eval();
  at::Generator gen = at::detail::createCPUGenerator(options.seed);
  double loss_sum = 0.0;
  for (size_t start = 0; start < origins.size(); start += static_cast<size_t>(options.batch_size)) {
    const size_t stop = std::min(origins.size(), start + static_cast<size_t>(options.batch_size));
    std::vector<at::Tensor> crops, visibles;
    for (size_t i = start; i < stop; ++i) {
      const auto& o = origins[i];
      crops.push_back(
          x.slice(1, o[0], o[0] + window[0]).slice(2, o[1], o[1] + window[1]).slice(3, o[2], o[2] + window[2]));
      visibles.push_back(draw_visible(1, n, ratio, gen));  // one draw per window, raster order
    }
    const at::Tensor xb = at::stack(crops).contiguous();  // (B, C, d, h, w)
    const int64_t b = xb.size(0);
    const auto result = model->forward_visible(xb, at::cat(visibles));
    const at::Tensor pred = result.pred.to(at::kFloat);  // (B, N, P)
    const at::Tensor mask = result.mask.to(at::kFloat);  // (B, N)
    const at::Tensor target = patchify(xb, mo.patch_size());
    loss_sum += masked_mse_loss(pred, target, mask, norm_pix).item<double>() * static_cast<double>(b);
    if (start == 0) {
      out.first_window = {xb.narrow(0, 0, 1).clone(), mask.narrow(0, 0, 1).clone(), result.pred.narrow(0, 0, 1).clone(),
                          origins[0]};
    }

    at::Tensor values = pred;
    if (norm_pix) {
      const auto vis = (1.0 - mask).unsqueeze(-1);  // (B, N, 1)
      const auto num_vis = vis.sum(1, /*keepdim=*/true);
      const auto mean = (target * vis).sum({1, 2}, /*keepdim=*/true) / (num_vis * static_cast<double>(target.size(2)));
      const auto var = target.var(-1, /*unbiased=*/true, /*keepdim=*/true) + 1e-6;
      const auto std = ((var * vis).sum(1, /*keepdim=*/true) / num_vis).sqrt();
      values = pred * std + mean;
    }
    const at::Tensor pred_vox = unpatchify(values, mo.img_size(), mo.patch_size(), channels);  // (B, C, d, h, w)
    const at::Tensor mask_vox =
        unpatchify(mask.unsqueeze(-1).expand({b, n, patch_voxels}).contiguous(), mo.img_size(), mo.patch_size(), 1);
    const at::Tensor vis_vox = 1.0 - mask_vox;  // (B, 1, d, h, w)
    const at::Tensor base = (xb * vis_vox).sum({2, 3, 4}, /*keepdim=*/true) / vis_vox.sum({2, 3, 4}, /*keepdim=*/true);

    for (int64_t k = 0; k < b; ++k) {
      const auto& o = origins[start + static_cast<size_t>(k)];
      std::array<std::pair<int64_t, int64_t>, 3> r;  // owned voxels [first, last) per axis
      bool owns = true;
      for (int a = 0; a < 3; ++a) {
        const auto it = owned[a].find(o[a]);
        owns = owns && it != owned[a].end();
        if (owns) r[a] = it->second;
      }
      if (!owns) continue;  // cannot happen for distinct origins; kept so a voxel is never written twice
      auto in_volume = [&](const at::Tensor& t) {
        return t.slice(1, r[0].first, r[0].second).slice(2, r[1].first, r[1].second).slice(3, r[2].first, r[2].second);
      };
      auto in_window = [&](const at::Tensor& t) {
        return t.slice(1, r[0].first - o[0], r[0].second - o[0])
            .slice(2, r[1].first - o[1], r[1].second - o[1])
            .slice(3, r[2].first - o[2], r[2].second - o[2]);
      };
      const at::Tensor hidden = in_window(mask_vox[k]) > 0.5;  // (1, d', h', w')
      const at::Tensor own_x = in_window(xb[k]);
      in_volume(rec).copy_(at::where(hidden, in_window(pred_vox[k]), own_x));  // visible: the input, exactly
      in_volume(baseline).copy_(at::where(hidden, base[k].expand_as(own_x), own_x));
      in_volume(mask_map).copy_(hidden.to(at::kFloat));
    }
    if (options.progress) options.progress(static_cast<int64_t>(stop), static_cast<int64_t>(origins.size()));
  }

  const at::Tensor masked = mask_map > 0.5;  // (1, D, H, W)
  out.baseline = baseline;
  const at::Tensor minimum = x.amin({1, 2, 3}, /*keepdim=*/true);
  out.input = like(input, x);
  out.reconstruction = like(input, rec);
  out.error = like(input, rec - x);
  out.masked = like(input, at::where(masked, minimum.expand_as(x), x));
  out.mask = like(input, masked.to(at::kFloat));

  auto& m = out.metrics;
  const at::Tensor xd = x.to(at::kDouble);
  m.data_range = (xd.max() - xd.min()).item<double>();
  const double range = m.data_range > 0 ? m.data_range : 1.0;
  const at::Tensor w_masked = masked.expand_as(x).to(at::kDouble);
  const at::Tensor w_all = at::ones_like(xd);
  m.voxels = x.numel();
  m.masked_voxels = static_cast<int64_t>(w_masked.sum().item<double>());
  const at::Tensor model_sq = (rec.to(at::kDouble) - xd).pow(2);
  const at::Tensor base_sq = (out.baseline.to(at::kDouble) - xd).pow(2);
  m.model_masked = error_stats(model_sq, w_masked, range);
  m.model_all = error_stats(model_sq, w_all, range);
  m.baseline_masked = error_stats(base_sq, w_masked, range);
  m.baseline_all = error_stats(base_sq, w_all, range);
  m.loss = loss_sum / static_cast<double>(origins.size());
  return out;
}

nlohmann::json metrics_to_json(const ReconstructMetrics& m) {
  nlohmann::json j;
  j["data_range"] = m.data_range;
  j["voxels"] = m.voxels;
  j["masked_voxels"] = m.masked_voxels;
  j["model"] = {{"masked", stats_json(m.model_masked)}, {"all", stats_json(m.model_all)}};
  j["baseline_window_mean"] = {{"masked", stats_json(m.baseline_masked)}, {"all", stats_json(m.baseline_all)}};
  j["gain_db_masked"] = std::isfinite(m.model_masked.psnr) && std::isfinite(m.baseline_masked.psnr)
                            ? nlohmann::json(m.model_masked.psnr - m.baseline_masked.psnr)
                            : nlohmann::json();
  j["training_loss"] = m.loss;
  return j;
}

void save_window_tensors(const WindowTensors& w, const std::string& path) {
  c10::Dict<std::string, at::Tensor> dict;
  dict.insert("input", w.input.contiguous());
  dict.insert("mask", w.mask.contiguous());
  dict.insert("pred", w.pred.to(at::kFloat).contiguous());
  const std::vector<char> bytes = pickle_untagged(c10::IValue(dict));
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  f.close();
  if (!f) throw IoError(path + ": cannot write the tensors (--save-tensors)");
}

ReconstructReport run_reconstruction(const ReconstructRequest& req) {
  const auto t0 = std::chrono::steady_clock::now();
  if (req.inputs.empty()) throw ConfigError("no input volume (--input)");
  if (req.out_dir.empty()) throw ConfigError("no output folder (--out)");
  if (!(req.options.overlap >= 0.0 && req.options.overlap <= kMaxOverlap)) {
    throw ConfigError("--overlap " + num_str(req.options.overlap) + ": must be 0 .. " + num_str(kMaxOverlap) +
                      " (the window count grows as (1 / (1 - overlap))^3: 64x a plain tiling at 0.75)");
  }
  const TrainedModel trained = load_trained_model(req.checkpoint);
  const double ratio = resolve_ratio(trained, req.options);
  const auto window = model_window(trained.model->options());

  DatasetEntry entry;
  entry.paths = req.inputs;
  PreprocessedVolume pre = preprocess_volume(entry, trained.config.data);
  pre.volume.data = round_for_cache(pre.volume.data);  // what training saw (the loader stores voxels rounded)
  if (pre.volume.channels() != trained.model->options().in_channels()) {
    throw InputError(entry.name() + ": " + std::to_string(pre.volume.channels()) + " channel(s), but the model of " +
                     trained.dir + " expects " + std::to_string(trained.model->options().in_channels()) +
                     " (one --input per channel)");
  }
  check_fits(pre.volume, window, entry.name());
  const auto slices = resolve_slices(pre.volume, req.slices);  // fail before the slow part

  ReconstructOptions options = req.options;
  options.masking_ratio = ratio;
  const Reconstruction rec = reconstruct_volume(trained, pre.volume, options);

  std::error_code ec;
  fs::create_directories(req.out_dir, ec);
  if (!fs::is_directory(req.out_dir))
    throw IoError(req.out_dir + ": cannot create the output folder (--out): " + ec.message());
  ReconstructReport report;
  report.checkpoint = trained.dir;
  report.step = trained.step;
  report.warning = diverged_warning(trained);
  const fs::path out(req.out_dir);
  const std::vector<std::pair<std::string, const Volume*>> volumes = {{"input", &rec.input},
                                                                      {"masked", &rec.masked},
                                                                      {"reconstruction", &rec.reconstruction},
                                                                      {"error", &rec.error},
                                                                      {"mask", &rec.mask}};
  for (const auto& [name, v] : volumes) {
    const std::string path = (out / (name + ".nii.gz")).string();
    write_volume(*v, path);
    report.files.push_back(path);
  }
  if (req.original_space) {
    ReadOptions ro;
    ro.time_point = trained.config.data.time_point;
    ro.fourth_axis_as_channels = trained.config.data.fourth_axis_as_channels;
    const Volume original = read_volume(req.inputs[0], ro);
    for (const auto& [name, v] : volumes) {
      Volume r = resample_like(*v, original);
      if (name == "mask") r.data = (r.data >= 0.5).to(at::kFloat);
      const std::string path = (out / (name + "_original.nii.gz")).string();
      write_volume(r, path);
      report.files.push_back(path);
    }
  }

  const auto& m = rec.metrics;
  auto db = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f", v);
    return std::string(buf);
  };
  MontageInputs mi;
  mi.input = &rec.input;
  mi.reconstruction = rec.reconstruction.data;
  mi.mask = rec.mask.data;
  mi.slices = slices;
  mi.title = {"mae reconstruction: " + fs::path(req.inputs[0]).filename().string() + ", checkpoint step " +
              std::to_string(trained.step) + ", " + std::to_string(static_cast<int>(std::lround(ratio * 100))) +
              "% of patches masked, seed " + std::to_string(req.options.seed)};
  mi.footer = {"psnr over masked voxels: model " + db(m.model_masked.psnr) + " db, window-mean baseline " +
               db(m.baseline_masked.psnr) + " db (" + std::to_string(rec.num_windows) + " windows)"};
  const std::string png = (out / "montage.png").string();
  write_png(render_montage(mi), png);
  report.files.push_back(png);

  if (!req.save_tensors.empty()) {
    save_window_tensors(rec.first_window, req.save_tensors);
    report.files.push_back(req.save_tensors);
  }

  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json j = metrics_to_json(m);
  j["checkpoint"] = trained.dir;
  j["step"] = trained.step;
  j["input"] = req.inputs;
  j["masking_ratio"] = ratio;
  j["seed"] = req.options.seed;
  j["overlap"] = req.options.overlap;
  j["num_windows"] = rec.num_windows;
  j["window"] = rec.window;
  j["patch_size"] = trained.model->options().patch_size();
  j["norm_pix_loss"] = trained.config.model.norm_pix_loss;
  j["preprocessed_shape"] = rec.input.data.sizes().vec();
  j["spacing_mm"] = rec.input.spacing;
  j["seconds"] = report.seconds;
  j["checkpoint_diverged"] = !report.warning.empty();
  report.metrics = j;
  const std::string metrics_path = (out / "metrics.json").string();
  {
    std::ofstream f(metrics_path, std::ios::trunc);
    f << j.dump(2) << "\n";
    f.close();
    if (!f) throw IoError(metrics_path + ": cannot write");
  }
  report.files.push_back(metrics_path);
  return report;
}

}  // namespace mae
