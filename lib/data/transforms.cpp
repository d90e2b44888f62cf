// Tensor transforms of the data pipeline; see transforms.h.
#include "data/transforms.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "core/error.h"

namespace mae {

namespace {

void check_cdhw(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4, what, ": expected a (C, D, H, W) tensor, got ", x.sizes());
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

constexpr uint64_t kIntensityAugTag = 0x696E74656E736974ULL;  // "intensit"

// lo + (hi - lo) * u, exactly lo when lo == hi, never outside [lo, hi].
double lerp_range(const std::array<double, 2>& r, double u) {
  if (r[0] == r[1]) return r[0];
  return std::clamp(r[0] + (r[1] - r[0]) * u, r[0], r[1]);
}

}  // namespace

at::Tensor ct_window(const at::Tensor& x, double a_min, double a_max, double b_min, double b_max, bool clip) {
  check_cdhw(x, "ct_window");
  TORCH_CHECK(a_max > a_min, "ct_window: a_max (", a_max, ") must exceed a_min (", a_min, ")");
  const double scale = (b_max - b_min) / (a_max - a_min);
  at::Tensor y = (x.to(at::kFloat) - a_min) * scale + b_min;
  if (clip) y.clamp_(b_min, b_max);
  return y;
}

at::Tensor zscore_nonzero(const at::Tensor& x) {
  check_cdhw(x, "zscore_nonzero");
  at::Tensor y = x.to(at::kFloat).clone();
  for (int64_t c = 0; c < y.size(0); ++c) {
    at::Tensor ch = y[c];
    at::Tensor mask = ch != 0;
    const int64_t n = mask.sum().item<int64_t>();
    if (n == 0) continue;
    at::Tensor vals = ch.masked_select(mask).to(at::kDouble);
    const double mean = vals.mean().item<double>();
    double sd = (vals - mean).pow(2).mean().sqrt().item<double>();
    if (!(sd > 0.0)) sd = 1.0;
    ch.masked_scatter_(mask, ((vals - mean) / sd).to(at::kFloat));
  }
  return y;
}

double percentile(const at::Tensor& values, double q) {
  at::Tensor v = values.to(at::kFloat).contiguous().flatten();
  const int64_t n = v.numel();
  if (n == 0) throw InputError("percentile of an empty tensor");
  std::vector<float> buf(v.data_ptr<float>(), v.data_ptr<float>() + n);
  const double pos = std::clamp(q, 0.0, 100.0) / 100.0 * static_cast<double>(n - 1);
  const auto lo = static_cast<int64_t>(std::floor(pos));
  const double frac = pos - static_cast<double>(lo);
  std::nth_element(buf.begin(), buf.begin() + lo, buf.end());
  const double a = buf[lo];
  if (frac == 0.0 || lo + 1 >= n) return a;
  const double b = *std::min_element(buf.begin() + lo + 1, buf.end());
  return a + frac * (b - a);
}

at::Tensor percentile_scale(const at::Tensor& x, double lower, double upper, double b_min, double b_max, bool clip) {
  check_cdhw(x, "percentile_scale");
  at::Tensor y = x.to(at::kFloat).clone();
  for (int64_t c = 0; c < y.size(0); ++c) {
    at::Tensor ch = y[c];
    const double lo = percentile(ch, lower);
    const double hi = percentile(ch, upper);
    if (!(hi > lo)) {
      ch.fill_(b_min);
      continue;
    }
    ch.sub_(lo).mul_((b_max - b_min) / (hi - lo)).add_(b_min);
    if (clip) ch.clamp_(b_min, b_max);
  }
  return y;
}

at::Tensor apply_intensity(const at::Tensor& x, const IntensityConfig& c) {
  if (c.mode == "ct_window") return ct_window(x, c.a_min, c.a_max, c.b_min, c.b_max, c.clip);
  if (c.mode == "zscore_nonzero") return zscore_nonzero(x);
  if (c.mode == "percentile")
    return percentile_scale(x, c.lower_percentile, c.upper_percentile, c.b_min, c.b_max, c.clip);
  if (c.mode == "none" || c.mode.empty()) return x.to(at::kFloat);
  throw ConfigError("\"data.intensity.mode\" = \"" + c.mode + "\" is not a known mode");
}

std::array<int64_t, 6> foreground_box(const at::Tensor& x, double threshold) {
  check_cdhw(x, "foreground_box");
  const int64_t D = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor fg = (x > threshold).any(0);  // (D, H, W)
  std::array<int64_t, 6> box{0, 0, 0, D, H, W};
  const int64_t sizes[3] = {D, H, W};
  for (int axis = 0; axis < 3; ++axis) {
    std::vector<int64_t> other;
    for (int a = 0; a < 3; ++a)
      if (a != axis) other.push_back(a);
    at::Tensor any = fg.any(other[1]).any(other[0]);  // (size of axis)
    at::Tensor idx = any.nonzero();
    if (idx.numel() == 0) return {0, 0, 0, D, H, W};
    box[axis] = idx.min().item<int64_t>();
    box[axis + 3] = std::min(sizes[axis], idx.max().item<int64_t>() + 1);
  }
  return box;
}

Volume crop_foreground(const Volume& volume, double threshold) {
  const auto b = foreground_box(volume.data, threshold);
  Volume out = volume;
  out.data = volume.data.slice(1, b[0], b[3]).slice(2, b[1], b[4]).slice(3, b[2], b[5]).contiguous();
  // Index (w, h, d) = (b[2], b[1], b[0]) becomes the new origin.
  const double idx[3] = {static_cast<double>(b[2]), static_cast<double>(b[1]), static_cast<double>(b[0])};
  for (int r = 0; r < 3; ++r) {
    double off = 0.0;
    for (int j = 0; j < 3; ++j) off += volume.direction[r * 3 + j] * volume.spacing[j] * idx[j];
    out.origin[r] = volume.origin[r] + off;
  }
  return out;
}

at::Tensor pad_to_size(const at::Tensor& x, const Dhw& min_size, double value) {
  check_cdhw(x, "pad_to_size");
  bool need = false;
  for (int a = 0; a < 3; ++a) need = need || x.size(a + 1) < min_size[a];
  if (!need) return x;
  std::vector<int64_t> sizes = {x.size(0), 0, 0, 0};
  int64_t before[3];
  for (int a = 0; a < 3; ++a) {
    sizes[a + 1] = std::max(x.size(a + 1), min_size[a]);
    before[a] = (sizes[a + 1] - x.size(a + 1)) / 2;
  }
  at::Tensor y = at::full(sizes, value, x.options());
  y.slice(1, before[0], before[0] + x.size(1))
      .slice(2, before[1], before[1] + x.size(2))
      .slice(3, before[2], before[2] + x.size(3))
      .copy_(x);
  return y;
}

double pad_value(const IntensityConfig& c) { return (c.mode == "ct_window" || c.mode == "percentile") ? c.b_min : 0.0; }

uint64_t item_seed(uint64_t seed, int64_t epoch, int64_t item) {
  uint64_t h = splitmix64(seed);
  h = splitmix64(h ^ static_cast<uint64_t>(epoch));
  return splitmix64(h ^ static_cast<uint64_t>(item));
}

CropDraw draw_crop(const Dhw& shape, const Dhw& crop, double flip_prob, uint64_t rng_seed) {
  std::mt19937_64 rng(rng_seed);
  CropDraw d;
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK(shape[a] >= crop[a], "draw_crop: volume size ", shape[a], " < crop ", crop[a], " on axis ", a);
    const uint64_t range = static_cast<uint64_t>(shape[a] - crop[a]) + 1;
    d.start[a] = static_cast<int64_t>(rng() % range);
  }
  for (int a = 0; a < 3; ++a) {
    const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
    d.flip[a] = u < flip_prob;
  }
  return d;
}

at::Tensor apply_crop(const at::Tensor& x, const CropDraw& d, const Dhw& crop) {
  check_cdhw(x, "apply_crop");
  at::Tensor y = x.slice(1, d.start[0], d.start[0] + crop[0])
                     .slice(2, d.start[1], d.start[1] + crop[1])
                     .slice(3, d.start[2], d.start[2] + crop[2]);
  std::vector<int64_t> dims;
  for (int a = 0; a < 3; ++a)
    if (d.flip[a]) dims.push_back(a + 1);
  return dims.empty() ? y.clone(at::MemoryFormat::Contiguous) : at::flip(y, dims).contiguous();
}

at::Tensor random_crop(const at::Tensor& x, const Dhw& crop, double flip_prob, uint64_t rng_seed, double pad) {
  at::Tensor p = pad_to_size(x, crop, pad);
  const CropDraw d = draw_crop({p.size(1), p.size(2), p.size(3)}, crop, flip_prob, rng_seed);
  return apply_crop(p, d, crop);
}

IntensityAugDraw draw_intensity_aug(const IntensityAugConfig& c, uint64_t rng_seed) {
  std::mt19937_64 rng(splitmix64(rng_seed ^ kIntensityAugTag));
  auto uniform = [&rng] { return static_cast<double>(rng() >> 11) * 0x1.0p-53; };
  IntensityAugDraw d;
  if (!(uniform() < c.prob)) return d;
  d.apply = true;
  const double us = uniform(), ub = uniform(), ug = uniform();
  d.scale = lerp_range(c.scale, us);
  d.shift = lerp_range(c.shift, ub);
  const std::array<double, 2> log_gamma{std::log(c.gamma[0]), std::log(c.gamma[1])};
  d.gamma =
      c.gamma[0] == c.gamma[1] ? c.gamma[0] : std::clamp(std::exp(lerp_range(log_gamma, ug)), c.gamma[0], c.gamma[1]);
  return d;
}

at::Tensor apply_intensity_aug(const at::Tensor& x, const IntensityAugDraw& d) {
  check_cdhw(x, "apply_intensity_aug");
  if (!d.apply) return x;
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  y.copy_(x);
  const int64_t n = y.numel() / std::max<int64_t>(y.size(0), 1);
  float* data = y.data_ptr<float>();
  for (int64_t c = 0; c < y.size(0); ++c) {
    float* p = data + c * n;
    if (d.gamma != 1.0 && n > 0) {
      const auto [lo_it, hi_it] = std::minmax_element(p, p + n);
      const double lo = *lo_it, hi = *hi_it, range = hi - lo;
      if (range > 0.0) {
        for (int64_t i = 0; i < n; ++i) {
          const double v = lo + range * std::pow((p[i] - lo) / range, d.gamma);
          p[i] = static_cast<float>(std::clamp(v, lo, hi));
        }
      }
    }
    if (d.scale != 1.0 || d.shift != 0.0) {
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(static_cast<double>(p[i]) * d.scale + d.shift);
    }
  }
  return y;
}

}  // namespace mae
