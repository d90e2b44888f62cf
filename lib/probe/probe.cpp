#include "probe/probe.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/lbfgs.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "data/cache.h"
#include "data/transforms.h"
#include "io/io.h"
#include "run/config.h"
#include "run/trained_model.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string fixed(double v, int digits) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(digits);
  s << v;
  return s.str();
}

std::string signed_fixed(double v, int digits) {
  std::ostringstream s;
  s.setf(std::ios::fixed | std::ios::showpos);
  s.precision(digits);
  s << v;
  return s.str();
}

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Column j of a row-major 3x3 direction.
std::array<double, 3> column(const std::array<double, 9>& d, int j) { return {d[j], d[3 + j], d[6 + j]}; }

double dot(const std::array<double, 3>& a, const std::array<double, 3>& b) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

// For each axis of `labels`, the axis of `image` its direction is parallel or antiparallel to
// (within 1e-3), or -1.
std::array<int, 3> matching_axes(const Volume& image, const Volume& labels) {
  std::array<int, 3> match{-1, -1, -1};
  for (int j = 0; j < 3; ++j) {
    for (int k = 0; k < 3; ++k) {
      if (std::abs(std::abs(dot(column(labels.direction, j), column(image.direction, k))) - 1.0) < 1e-3) match[j] = k;
    }
  }
  return match;
}

// The physical box covered by the voxels of `v` (voxel centres +- half a voxel), as min/max
// coordinates along the index axes of `frame`.
std::array<std::array<double, 2>, 3> box_in_frame(const Volume& v, const Volume& frame) {
  const auto dhw = v.shape_dhw();
  const std::array<int64_t, 3> size{dhw[2], dhw[1], dhw[0]};  // x, y, z
  std::array<std::array<double, 2>, 3> box{};
  for (auto& b : box) b = {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity()};
  for (int corner = 0; corner < 8; ++corner) {
    std::array<double, 3> p = v.origin;
    for (int j = 0; j < 3; ++j) {
      const double idx = (corner >> j & 1) ? static_cast<double>(size[j]) - 0.5 : -0.5;
      for (int r = 0; r < 3; ++r) p[r] += v.direction[3 * r + j] * v.spacing[j] * idx;
    }
    for (int k = 0; k < 3; ++k) {
      const double c = dot(p, column(frame.direction, k));
      box[k][0] = std::min(box[k][0], c);
      box[k][1] = std::max(box[k][1], c);
    }
  }
  return box;
}

const char* axis_name(int k) { return k == 0 ? "x" : k == 1 ? "y" : "z"; }

// Refuses a label volume that does not lie in the image's physical space.
void check_same_space(const Volume& image, const Volume& labels, const ProbePair& pair) {
  const auto match = matching_axes(image, labels);
  for (int j = 0; j < 3; ++j) {
    if (match[j] < 0) {
      throw InputError(pair.labels + ": its orientation (" + orientation_code(labels) + ", direction of axis " +
                           axis_name(j) + " not along any axis of the image) differs from " + pair.image + " (" +
                           orientation_code(image) + "); labels must be in the image's space",
                       "label geometry");
    }
  }
  const auto a = box_in_frame(image, image);
  const auto b = box_in_frame(labels, image);
  for (int k = 0; k < 3; ++k) {
    int jl = 0;
    for (int j = 0; j < 3; ++j) {
      if (match[j] == k) jl = j;
    }
    const double coarser = std::max(image.spacing[static_cast<size_t>(k)], labels.spacing[static_cast<size_t>(jl)]);
    const double tol = kProbeExtentToleranceVoxels * coarser + 1e-3;
    const double off = std::max(std::abs(a[k][0] - b[k][0]), std::abs(a[k][1] - b[k][1]));
    if (off > tol) {
      throw InputError(pair.labels + ": its physical extent along the image's " + axis_name(k) + " axis (" +
                           fixed(b[k][0], 1) + " .. " + fixed(b[k][1], 1) + " mm) differs from " + pair.image + "'s (" +
                           fixed(a[k][0], 1) + " .. " + fixed(a[k][1], 1) + " mm) by " + fixed(off, 1) +
                           " mm, more than one voxel (" + fixed(tol, 2) + " mm); labels must cover the image's grid",
                       "label geometry");
    }
  }
}

// x (C, D, H, W) cut to whole patches and flattened to (P, C, p0, p1, p2), lattice raster order.
at::Tensor patches_of(const at::Tensor& x, const std::array<int64_t, 3>& n, const std::vector<int64_t>& p) {
  const int64_t C = x.size(0);
  auto t = x.narrow(1, 0, n[0] * p[0]).narrow(2, 0, n[1] * p[1]).narrow(3, 0, n[2] * p[2]);
  t = t.reshape({C, n[0], p[0], n[1], p[1], n[2], p[2]}).permute({1, 3, 5, 0, 2, 4, 6});
  return t.reshape({n[0] * n[1] * n[2], C, p[0], p[1], p[2]}).contiguous();
}

// Window origins along one axis of padded size s: k * w, then the last patch-aligned one.
std::vector<int64_t> axis_origins(int64_t s, int64_t w, int64_t p) {
  std::vector<int64_t> o;
  for (int64_t k = 0; k + w <= s; k += w) o.push_back(k);
  const int64_t last = (s - w) / p * p;
  if (o.empty() || o.back() != last) o.push_back(last);
  return o;
}

at::Tensor to_f64(const at::Tensor& t) { return t.to(at::kCPU, at::kDouble).contiguous(); }

// --- ridge regression --------------------------------------------------------------------------

const std::vector<double> kRidgeGrid{1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3};
const std::vector<double> kLogisticGrid{1e-4, 1e-3, 1e-2, 1e-1, 1.0};

// Standardises by the statistics of `fit_rows` of x (columns without variance get scale 1).
std::pair<at::Tensor, at::Tensor> standardise(const at::Tensor& fit, const at::Tensor& other) {
  const auto mean = fit.mean(0, /*keepdim=*/true);
  auto sd = fit.std(0, /*unbiased=*/false, /*keepdim=*/true);
  sd = at::where(sd > 1e-12, sd, at::ones_like(sd));
  return {(fit - mean) / sd, (other - mean) / sd};
}

// Ridge predictions of `xq` for every alpha (relative to the fit rows): fit centred, then eigh.
std::vector<at::Tensor> ridge_predict(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xq,
                                      const std::vector<double>& alphas) {
  const auto xm = x.mean(0, true), ym = y.mean(0, true);
  const auto xc = x - xm, yc = y - ym;
  const auto n = static_cast<double>(x.size(0));
  const auto eig = at::linalg_eigh(at::matmul(xc.t(), xc));
  const auto& lambda = std::get<0>(eig);
  const auto& v = std::get<1>(eig);
  const auto vxy = at::matmul(v.t(), at::matmul(xc.t(), yc));  // (d, K)
  const auto q = at::matmul(xq - xm, v);                       // (m, d)
  std::vector<at::Tensor> out;
  for (double a : alphas) {
    const auto scale = (1.0 / (lambda.clamp_min(0.0) + a * n)).unsqueeze(1);
    out.push_back(at::matmul(q, vxy * scale) + ym);
  }
  return out;
}

// Sums of squared errors and of squares around `mean`, per column.
std::pair<at::Tensor, at::Tensor> sse_sst(const at::Tensor& pred, const at::Tensor& y, const at::Tensor& mean) {
  return {(pred - y).pow(2).sum(0), (y - mean).pow(2).sum(0)};
}

// 1 - sum(sse) / sum(sst) over the columns with variance (a column without any carries no weight).
double weighted_r2(const at::Tensor& sse, const at::Tensor& sst) {
  const auto has = sst > 1e-12;
  const double t = sst.masked_select(has).sum().item<double>();
  return t > 0 ? 1.0 - sse.masked_select(has).sum().item<double>() / t : 0.0;
}

// --- multinomial logistic regression -----------------------------------------------------------

struct Logistic {
  at::Tensor w, b;  // (d, K), (K)
};

Logistic fit_logistic(const at::Tensor& x, const at::Tensor& y, int64_t classes, double alpha) {
  torch::AutoGradMode grad(true);
  auto w = torch::zeros({x.size(1), classes}, torch::dtype(torch::kDouble).requires_grad(true));
  auto b = torch::zeros({classes}, torch::dtype(torch::kDouble).requires_grad(true));
  torch::optim::LBFGS lbfgs({w, b}, torch::optim::LBFGSOptions(1.0)
                                        .max_iter(200)
                                        .tolerance_grad(1e-7)
                                        .tolerance_change(1e-10)
                                        .history_size(20)
                                        .line_search_fn("strong_wolfe"));
  auto closure = [&]() {
    lbfgs.zero_grad();
    auto loss = at::cross_entropy_loss(at::matmul(x, w) + b, y) + 0.5 * alpha * w.pow(2).sum();
    loss.backward();
    return loss;
  };
  lbfgs.step(closure);
  return {w.detach(), b.detach()};
}

at::Tensor predict_logistic(const Logistic& m, const at::Tensor& x) { return (at::matmul(x, m.w) + m.b).argmax(1); }

}  // namespace

const char* to_string(ProbeTarget target) { return target == ProbeTarget::fractions ? "fractions" : "majority"; }

const char* to_string(ProbeSplit split) { return split == ProbeSplit::none ? "none" : "checkerboard"; }

ProbeTarget parse_probe_target(const std::string& text, const std::string& key) {
  if (text == "fractions") return ProbeTarget::fractions;
  if (text == "majority") return ProbeTarget::majority;
  throw ConfigError(key + " = \"" + text + "\": expected \"fractions\" or \"majority\"");
}

ProbePair parse_probe_pair(const std::string& text, const std::string& flag) {
  const auto eq = text.rfind('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == text.size()) {
    throw ConfigError(flag + " \"" + text + "\": expected IMAGE=LABELS (an image and its label volume)");
  }
  return {text.substr(0, eq), text.substr(eq + 1)};
}

ProbeVolume prepare_probe_volume(const ProbePair& pair, const DataConfig& data, const MaskedAutoencoderOptions& model) {
  if (model.spatial_dims() != 3) {
    throw ConfigError("the probe needs a 3D model; this one is " + std::to_string(model.spatial_dims()) + "D");
  }
  std::error_code ec;
  for (const auto* path : {&pair.image, &pair.labels}) {
    if (!fs::exists(*path, ec)) throw InputError(*path + ": no such file or folder", input_cause::kMissingFile);
  }
  // The image exactly as the training loader sees it (preprocessing plus the cache's rounding).
  DataConfig d = data;
  d.cache_dir.clear();
  const PreprocessedVolume pv = VolumeCache(d).load(DatasetEntry{{pair.image}, ""});
  if (pv.volume.channels() != model.in_channels()) {
    throw InputError(pair.image + ": has " + std::to_string(pv.volume.channels()) +
                     " channel(s) but the model was trained on " + std::to_string(model.in_channels()));
  }
  ReadOptions read;
  read.slice_spacing_tolerance = data.dicom_slice_tolerance;
  const Volume image = read_volume(pair.image, read);  // geometry as read, before preprocessing
  Volume labels = read_volume(pair.labels, read);
  if (labels.channels() != 1) {
    throw InputError(pair.labels + ": has " + std::to_string(labels.channels()) +
                         " channels; a label volume has one (an integer label per voxel)",
                     "label values");
  }
  const auto rounded = labels.data.round();
  const double off = (labels.data - rounded).abs().max().item<double>();
  if (off > 1e-3) {
    const auto where = (labels.data - rounded).abs().flatten().argmax().item<int64_t>();
    throw InputError(pair.labels + ": voxel values are not integer labels (e.g. " +
                         fixed(labels.data.flatten()[where].item<double>(), 4) +
                         "); threshold or argmax a probability map into labels first",
                     "label values");
  }
  if (rounded.abs().max().item<double>() > 1e7) {
    throw InputError(pair.labels + ": label values beyond +-1e7 are not labels", "label values");
  }
  labels.data = rounded;
  if (!(rounded != 0).any().item<bool>()) {
    throw InputError(pair.labels + ": empty label map (every voxel is 0, background)", "label values");
  }
  check_same_space(image, labels, pair);
  const Volume on_grid = resample_labels_like(labels, pv.volume);

  ProbeVolume v;
  v.pair = pair;
  v.shape = pv.volume.shape_dhw();
  const auto& win = model.img_size();
  const auto& p = model.patch_size();
  const auto& g = model.grid();
  std::array<int64_t, 3> n{};
  for (size_t a = 0; a < 3; ++a) n[a] = v.shape[a] / p[a];
  if (n[0] * n[1] * n[2] == 0) {
    throw InputError(pair.image + ": the preprocessed volume (" + std::to_string(v.shape[0]) + "x" +
                     std::to_string(v.shape[1]) + "x" + std::to_string(v.shape[2]) +
                     ") is smaller than one patch of the model");
  }
  // Windows on the patch lattice, padded at the end to at least one window.
  std::array<int64_t, 3> padded{};
  for (size_t a = 0; a < 3; ++a) padded[a] = std::max(v.shape[a], win[a]);
  const at::Tensor x = at::constant_pad_nd(
      pv.volume.data.to(at::kFloat), {0, padded[2] - v.shape[2], 0, padded[1] - v.shape[1], 0, padded[0] - v.shape[0]},
      pad_value(data.intensity));
  std::array<std::vector<int64_t>, 3> origins;
  for (size_t a = 0; a < 3; ++a) origins[a] = axis_origins(padded[a], win[a], p[a]);
  std::vector<at::Tensor> windows;
  for (int64_t o0 : origins[0]) {
    for (int64_t o1 : origins[1]) {
      for (int64_t o2 : origins[2]) {
        windows.push_back(x.narrow(1, o0, win[0]).narrow(2, o1, win[1]).narrow(3, o2, win[2]));
      }
    }
  }
  v.windows = at::stack(windows).contiguous();
  const int64_t N = g[0] * g[1] * g[2];
  const int64_t P = n[0] * n[1] * n[2];
  v.token_index = at::empty({P}, at::kLong);
  v.lattice = at::empty({P, 3}, at::kLong);
  auto ti = v.token_index.accessor<int64_t, 1>();
  auto la = v.lattice.accessor<int64_t, 2>();
  // Per axis: the first window holding lattice position i, and i's patch position inside it.
  std::array<std::vector<std::pair<int64_t, int64_t>>, 3> where;
  for (size_t a = 0; a < 3; ++a) {
    for (int64_t i = 0; i < n[a]; ++i) {
      int64_t k = 0;
      while (!(origins[a][static_cast<size_t>(k)] <= i * p[a] &&
               (i + 1) * p[a] <= origins[a][static_cast<size_t>(k)] + win[a])) {
        ++k;
      }
      where[a].push_back({k, (i * p[a] - origins[a][static_cast<size_t>(k)]) / p[a]});
    }
  }
  const auto w1 = static_cast<int64_t>(origins[1].size()), w2 = static_cast<int64_t>(origins[2].size());
  int64_t row = 0;
  for (int64_t i = 0; i < n[0]; ++i) {
    for (int64_t j = 0; j < n[1]; ++j) {
      for (int64_t k = 0; k < n[2]; ++k, ++row) {
        const auto [wa, ta] = where[0][static_cast<size_t>(i)];
        const auto [wb, tb] = where[1][static_cast<size_t>(j)];
        const auto [wc, tc] = where[2][static_cast<size_t>(k)];
        ti[row] = ((wa * w1 + wb) * w2 + wc) * N + (ta * g[1] + tb) * g[2] + tc;
        la[row][0] = i, la[row][1] = j, la[row][2] = k;
      }
    }
  }
  // Label counts per patch.
  const auto lab = patches_of(on_grid.data, n, p).reshape({P, -1}).to(at::kLong);
  const auto uniq = at::_unique(lab, /*sorted=*/true, /*return_inverse=*/true);
  const auto values = std::get<0>(uniq).contiguous();
  const auto inverse = std::get<1>(uniq).reshape({P, -1});
  v.label_values.assign(values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + values.numel());
  const auto L = static_cast<int64_t>(v.label_values.size());
  v.counts = at::zeros({P, L}, at::kDouble).scatter_add_(1, inverse, at::ones(inverse.sizes(), at::kDouble));
  // Raw intensity features: mean, std and a 2x2x2 average pool of each channel.
  const auto img = patches_of(pv.volume.data.to(at::kFloat), n, p);  // (P, C, p0, p1, p2)
  const int64_t C = img.size(1);
  const auto flat = img.reshape({P, C, -1});
  const auto mean = flat.mean(2, true);
  const auto sd = flat.std(2, /*unbiased=*/false, /*keepdim=*/true);
  const auto pooled = at::adaptive_avg_pool3d(img, {2, 2, 2}).reshape({P, C, 8});
  v.raw = at::cat({mean, sd, pooled}, 2).reshape({P, C * 10}).contiguous();
  return v;
}

at::Tensor probe_features(MaskedAutoencoderImpl& encoder, const ProbeVolume& volume, int64_t batch) {
  torch::NoGradGuard no_grad;
  const bool was_training = encoder.is_training();
  encoder.eval();
  at::Device device = at::kCPU;
  for (const auto& p : encoder.parameters()) {
    device = p.device();
    break;
  }
  const int64_t W = volume.windows.size(0);
  std::vector<at::Tensor> tokens;
  for (int64_t start = 0; start < W; start += std::max<int64_t>(1, batch)) {
    const int64_t m = std::min<int64_t>(std::max<int64_t>(1, batch), W - start);
    tokens.push_back(encoder.encode(volume.windows.narrow(0, start, m).to(device)).to(at::kCPU, at::kFloat));
  }
  if (was_training) encoder.train();
  const auto all = at::cat(tokens, 0);
  return all.reshape({-1, all.size(2)}).index_select(0, volume.token_index).contiguous();
}

MaskedAutoencoder random_init_model(const MaskedAutoencoderOptions& options, uint64_t seed) {
  auto gen = at::detail::getDefaultCPUGenerator();
  at::Tensor state;
  {
    // Only the CPU generator (the model is built on the CPU): torch::manual_seed would also re-seed
    // every CUDA generator, whose dropout masks a training run on a GPU is drawing.
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
    gen.set_current_seed(seed);
  }
  MaskedAutoencoder model(options);
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  model->eval();
  return model;
}

ProbeTargets probe_targets(const std::vector<ProbeVolume>& train, const std::vector<ProbeVolume>& test,
                           const ProbeOptions& options) {
  if (train.empty()) throw ConfigError("--train: give at least one IMAGE=LABELS pair");
  if (!(options.folds >= 2 && options.folds <= 10)) {
    throw ConfigError("--folds " + std::to_string(options.folds) + " must be in [2, 10]");
  }
  const bool board = options.split == ProbeSplit::checkerboard;
  if (board) {
    for (const auto& t : test) {
      bool same = false;
      for (const auto& r : train) {
        std::error_code ec;
        same = same || t.pair.image == r.pair.image || fs::equivalent(t.pair.image, r.pair.image, ec);
      }
      if (!same) {
        throw ConfigError("--test " + t.pair.image +
                          ": with --split checkerboard the test patches come from the --train volumes; leave --test "
                          "out or give the same pairs");
      }
    }
  } else {
    if (test.empty()) {
      throw ConfigError(
          "--test: give at least one IMAGE=LABELS pair, or --split checkerboard to probe the --train "
          "volumes on alternating blocks");
    }
    for (const auto& t : test) {
      for (const auto& r : train) {
        std::error_code ec;
        if (t.pair.image == r.pair.image || fs::equivalent(t.pair.image, r.pair.image, ec)) {
          throw ConfigError("--test " + t.pair.image +
                            " is also a --train image; a probe scored on its own train patches says nothing: use "
                            "--split checkerboard to split one volume into alternating blocks");
        }
      }
    }
  }
  // Every volume (train, then test unless the split is a checkerboard) with its label counts on
  // one global list of label values.
  std::vector<const ProbeVolume*> volumes;
  for (const auto& v : train) volumes.push_back(&v);
  if (!board) {
    for (const auto& v : test) volumes.push_back(&v);
  }
  std::set<int64_t> all_values;
  for (const auto* v : volumes) all_values.insert(v->label_values.begin(), v->label_values.end());
  const std::vector<int64_t> values(all_values.begin(), all_values.end());
  const auto L = static_cast<int64_t>(values.size());
  std::vector<at::Tensor> counts;
  std::vector<int64_t> side, fold;  // per row: 0 train / 1 test; CV fold of train rows
  ProbeTargets t;
  for (size_t vi = 0; vi < volumes.size(); ++vi) {
    const auto* v = volumes[vi];
    std::vector<int64_t> col;
    for (int64_t lv : v->label_values) {
      col.push_back(std::lower_bound(values.begin(), values.end(), lv) - values.begin());
    }
    const int64_t P = v->counts.size(0);
    auto c = at::zeros({P, L}, at::kDouble);
    c.index_copy_(1, at::tensor(col, at::kLong), v->counts);
    counts.push_back(c);
    auto la = v->lattice.accessor<int64_t, 2>();
    const bool is_test_volume = vi >= train.size();
    for (int64_t r = 0; r < P; ++r) {
      const int64_t b0 = la[r][0] / 2, b1 = la[r][1] / 2, b2 = la[r][2] / 2;
      const bool test_row = board ? ((b0 + b1 + b2) % 2 == 1) : is_test_volume;
      side.push_back(test_row ? 1 : 0);
      const uint64_t h =
          splitmix(splitmix(splitmix(splitmix(options.seed ^ 0x70726f6265ULL) + vi) + static_cast<uint64_t>(b0)) +
                   static_cast<uint64_t>((b1 << 20) + b2));
      fold.push_back(static_cast<int64_t>(h % static_cast<uint64_t>(options.folds)));
    }
    t.total_patches += P;
  }
  const auto all = at::cat(counts, 0);
  const int64_t bg = std::find(values.begin(), values.end(), 0) - values.begin();
  const bool has_bg = bg < L;
  // Rows whose voxels are all background are left out unless asked for.
  const auto total = all.sum(1);
  const auto all_background = has_bg ? (all.select(1, bg) == total) : at::zeros({all.size(0)}, at::kBool);
  auto keep = at::ones({all.size(0)}, at::kBool);
  if (!options.include_background) keep = all_background.logical_not();
  t.dropped_background = all.size(0) - keep.sum().item<int64_t>();
  const auto side_t = at::tensor(side, at::kLong);
  const auto fold_t = at::tensor(fold, at::kLong);
  t.train_rows = at::nonzero(keep.logical_and(side_t == 0)).flatten();
  t.test_rows = at::nonzero(keep.logical_and(side_t == 1)).flatten();
  const std::string where = board ? "the train blocks of the --train volumes" : "the --train volumes";
  if (t.train_rows.numel() == 0 || t.test_rows.numel() == 0) {
    throw InputError(std::string(t.train_rows.numel() == 0 ? "the train" : "the test") +
                         " side has no patch with a label" + (board ? " (checkerboard split)" : "") +
                         "; the label volumes must label some patches of " +
                         (t.train_rows.numel() == 0 ? train.front().pair.labels
                                                    : (board ? train.front().pair.labels : test.front().pair.labels)),
                     "label values");
  }
  t.train_fold = fold_t.index_select(0, t.train_rows);
  const auto fractions = all / total.unsqueeze(1);
  const auto train_counts = all.index_select(0, t.train_rows);
  const std::string files =
      train.size() == 1 ? train.front().pair.labels : std::to_string(train.size()) + " label files";
  if (options.target == ProbeTarget::fractions) {
    const auto present = (train_counts.sum(0) > 0).contiguous();
    std::vector<int64_t> cols;
    int64_t classes_present = 0;
    for (int64_t l = 0; l < L; ++l) {
      if (!present[l].item<bool>()) continue;
      ++classes_present;
      if (values[static_cast<size_t>(l)] != 0) {
        cols.push_back(l);
        t.classes.push_back(values[static_cast<size_t>(l)]);
      }
    }
    if (classes_present < 2 || cols.empty()) {
      throw InputError(
          files + ": fewer than 2 classes among the train patches of " + where + "; a probe needs labels that vary",
          "label values");
    }
    const auto c = at::tensor(cols, at::kLong);
    t.train_y = fractions.index_select(0, t.train_rows).index_select(1, c).contiguous();
    t.test_y = fractions.index_select(0, t.test_rows).index_select(1, c).contiguous();
  } else {
    // Majority label; ties go to the smaller label value (argmax takes the first maximum).
    const auto major = all.argmax(1);
    const auto train_major = major.index_select(0, t.train_rows);
    std::set<int64_t> cls;
    for (int64_t i = 0; i < train_major.numel(); ++i) cls.insert(train_major[i].item<int64_t>());
    if (cls.size() < 2) {
      throw InputError(
          files + ": fewer than 2 classes among the train patches of " + where + " (every patch's majority label is " +
              std::to_string(values[static_cast<size_t>(*cls.begin())]) + "); a probe needs labels that vary",
          "label values");
    }
    std::map<int64_t, int64_t> id;  // label column -> class id
    for (int64_t c : cls) {
      id[c] = static_cast<int64_t>(t.classes.size());
      t.classes.push_back(values[static_cast<size_t>(c)]);
    }
    auto to_ids = [&](const at::Tensor& rows, bool test_side) {
      auto y = at::empty({rows.numel()}, at::kLong);
      for (int64_t i = 0; i < rows.numel(); ++i) {
        const int64_t m = major[rows[i].item<int64_t>()].item<int64_t>();
        auto it = id.find(m);
        if (it == id.end() && test_side) {
          t.test_only_classes.push_back(values[static_cast<size_t>(m)]);
          it = id.emplace(m, static_cast<int64_t>(t.classes.size() + t.test_only_classes.size() - 1)).first;
        }
        y[i] = it->second;
      }
      return y;
    };
    t.train_y = to_ids(t.train_rows, false);
    t.test_y = to_ids(t.test_rows, true);
  }
  for (int64_t f = 0; f < options.folds; ++f) {
    if ((t.train_fold == f).sum().item<int64_t>() == 0) {
      throw InputError(files + ": too few labelled train patches (" + std::to_string(t.train_rows.numel()) + ") for " +
                           std::to_string(options.folds) + " cross-validation folds",
                       "label values");
    }
  }
  return t;
}

ProbeScores fit_and_score(const at::Tensor& features, const ProbeTargets& targets, const ProbeOptions& options,
                          const std::string& name) {
  ProbeScores s;
  s.features = name;
  s.dims = features.size(1);
  auto [x_train, x_test] = standardise(to_f64(features.index_select(0, targets.train_rows)),
                                       to_f64(features.index_select(0, targets.test_rows)));
  const auto& fold = targets.train_fold;
  if (options.target == ProbeTarget::fractions) {
    const auto& y = targets.train_y;
    std::vector<double> sse(kRidgeGrid.size(), 0.0);
    double sst = 0.0;
    const auto ymean = y.mean(0, true);
    for (int64_t f = 0; f < options.folds; ++f) {
      const auto in = at::nonzero(fold != f).flatten(), out = at::nonzero(fold == f).flatten();
      const auto preds =
          ridge_predict(x_train.index_select(0, in), y.index_select(0, in), x_train.index_select(0, out), kRidgeGrid);
      const auto yo = y.index_select(0, out);
      for (size_t a = 0; a < kRidgeGrid.size(); ++a) sse[a] += (preds[a] - yo).pow(2).sum().item<double>();
      sst += (yo - ymean).pow(2).sum().item<double>();
    }
    const size_t best = static_cast<size_t>(std::min_element(sse.begin(), sse.end()) - sse.begin());
    s.l2 = kRidgeGrid[best];
    s.cv_score = sst > 0 ? 1.0 - sse[best] / sst : 0.0;
    const auto pred = ridge_predict(x_train, y, x_test, {s.l2}).front();
    const auto& yt = targets.test_y;
    const auto [e, t] = sse_sst(pred, yt, yt.mean(0, true));
    s.r2 = weighted_r2(e, t);
    const auto has = t > 1e-12;
    const auto per = 1.0 - e / t.clamp_min(1e-12);
    s.r2_macro = has.any().item<bool>() ? per.masked_select(has).mean().item<double>() : 0.0;
    return s;
  }
  const auto K = static_cast<int64_t>(targets.classes.size());
  const auto& y = targets.train_y;
  std::vector<int64_t> correct(kLogisticGrid.size(), 0);
  for (int64_t f = 0; f < options.folds; ++f) {
    const auto in = at::nonzero(fold != f).flatten(), out = at::nonzero(fold == f).flatten();
    const auto xi = x_train.index_select(0, in), yi = y.index_select(0, in);
    const auto xo = x_train.index_select(0, out), yo = y.index_select(0, out);
    for (size_t a = 0; a < kLogisticGrid.size(); ++a) {
      const auto m = fit_logistic(xi, yi, K, kLogisticGrid[a]);
      correct[a] += (predict_logistic(m, xo) == yo).sum().item<int64_t>();
    }
  }
  const size_t best = static_cast<size_t>(std::max_element(correct.begin(), correct.end()) - correct.begin());
  s.l2 = kLogisticGrid[best];
  s.cv_score = static_cast<double>(correct[best]) / static_cast<double>(y.numel());
  const auto m = fit_logistic(x_train, y, K, s.l2);
  const auto pred = predict_logistic(m, x_test);
  const auto& yt = targets.test_y;
  s.accuracy = (pred == yt).to(at::kDouble).mean().item<double>();
  const int64_t total_classes = K + static_cast<int64_t>(targets.test_only_classes.size());
  double recall_sum = 0.0, f1_sum = 0.0;
  int64_t recall_n = 0, f1_n = 0;
  for (int64_t c = 0; c < total_classes; ++c) {
    const auto truth = yt == c, guess = pred == c;
    const double tp = truth.logical_and(guess).sum().item<double>();
    const double nt = truth.sum().item<double>(), ng = guess.sum().item<double>();
    if (nt > 0) recall_sum += tp / nt, ++recall_n;
    if (nt > 0 || ng > 0) f1_sum += 2.0 * tp / (nt + ng), ++f1_n;
  }
  s.balanced_accuracy = recall_n > 0 ? recall_sum / static_cast<double>(recall_n) : 0.0;
  s.macro_f1 = f1_n > 0 ? f1_sum / static_cast<double>(f1_n) : 0.0;
  return s;
}

at::Tensor stack_raw(const std::vector<ProbeVolume>& volumes) {
  std::vector<at::Tensor> raw;
  for (const auto& v : volumes) raw.push_back(v.raw);
  return at::cat(raw, 0);
}

double ProbeReport::headline() const {
  return scores.size() >= 2 ? scores[0].score(options.target) - scores[1].score(options.target) : 0.0;
}

ProbeReport run_probe(MaskedAutoencoderImpl& encoder, MaskedAutoencoderImpl& random_encoder,
                      const std::vector<ProbeVolume>& train, const std::vector<ProbeVolume>& test,
                      const ProbeOptions& options) {
  ProbeReport report;
  report.options = options;
  report.targets = probe_targets(train, test, options);
  std::vector<ProbeVolume> volumes(train);
  if (options.split != ProbeSplit::checkerboard) volumes.insert(volumes.end(), test.begin(), test.end());
  auto t0 = Clock::now();
  std::vector<at::Tensor> pre, rnd;
  for (const auto& v : volumes) {
    pre.push_back(probe_features(encoder, v, options.batch));
    rnd.push_back(probe_features(random_encoder, v, options.batch));
  }
  report.seconds_features = seconds_since(t0);
  t0 = Clock::now();
  report.scores.push_back(fit_and_score(at::cat(pre, 0), report.targets, options, "pretrained"));
  report.scores.push_back(fit_and_score(at::cat(rnd, 0), report.targets, options, "random_init"));
  report.scores.push_back(fit_and_score(stack_raw(volumes), report.targets, options, "raw"));
  report.seconds_fit = seconds_since(t0);
  return report;
}

nlohmann::json probe_report_json(const ProbeReport& r) {
  nlohmann::json j;
  const bool frac = r.options.target == ProbeTarget::fractions;
  j["target"] = to_string(r.options.target);
  j["split"] = to_string(r.options.split);
  j["include_background"] = r.options.include_background;
  j["folds"] = r.options.folds;
  j["seed"] = r.options.seed;
  j["metric"] = frac ? "r2" : "accuracy";
  j["patches"] = {{"total", r.targets.total_patches},
                  {"train", r.targets.train_rows.numel()},
                  {"test", r.targets.test_rows.numel()},
                  {"dropped_background", r.targets.dropped_background}};
  j[frac ? "target_labels" : "classes"] = r.targets.classes;
  if (!frac) j["test_only_classes"] = r.targets.test_only_classes;
  j["scores"] = nlohmann::json::object();
  for (const auto& s : r.scores) {
    nlohmann::json e{{"dims", s.dims}, {"l2", s.l2}, {"cv_score", s.cv_score}};
    if (frac) {
      e["r2"] = s.r2;
      e["r2_macro"] = s.r2_macro;
    } else {
      e["accuracy"] = s.accuracy;
      e["balanced_accuracy"] = s.balanced_accuracy;
      e["macro_f1"] = s.macro_f1;
    }
    j["scores"][s.features] = e;
  }
  j["pretrained_minus_random"] = r.headline();
  j["seconds"] = {{"features", r.seconds_features}, {"fit", r.seconds_fit}};
  return j;
}

std::string probe_summary(const ProbeReport& r) {
  const bool frac = r.options.target == ProbeTarget::fractions;
  std::ostringstream s;
  s << "probe " << to_string(r.options.target) << (frac ? " R²" : " accuracy") << " on " << r.targets.test_rows.numel()
    << " test patches: ";
  for (size_t i = 0; i < r.scores.size(); ++i) {
    const auto& sc = r.scores[i];
    s << (i ? ", " : "") << (sc.features == "random_init" ? "random-init" : sc.features) << " "
      << fixed(sc.score(r.options.target), 3);
  }
  s << "; pretrained - random " << signed_fixed(r.headline(), 3);
  return s.str();
}

ProbeReport probe_checkpoint(const std::string& checkpoint, const std::vector<ProbePair>& train,
                             const std::vector<ProbePair>& test, const ProbeOptions& options) {
  TrainedModel trained = load_trained_model(checkpoint);
  const auto model_options = model_options_from(trained.config.model);
  auto random = random_init_model(model_options, trained.config.seed);
  std::vector<ProbeVolume> tr, te;
  for (const auto& p : train) tr.push_back(prepare_probe_volume(p, trained.config.data, model_options));
  for (const auto& p : test) te.push_back(prepare_probe_volume(p, trained.config.data, model_options));
  return run_probe(*trained.model, *random, tr, te, options);
}

}  // namespace mae
