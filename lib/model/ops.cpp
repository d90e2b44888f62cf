#include "model/ops.h"

#include <ATen/ATen.h>

#include <cmath>
#include <numeric>
#include <string>

#include "core/compat.h"
#include "core/error.h"

namespace mae {

namespace {

int64_t product(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{1}, std::multiplies<int64_t>());
}

// (B, C, g0·p0, g1·p1[, g2·p2]) viewed as (B, C, g0, p0, g1, p1[, g2, p2]).
at::Tensor split_patches(const at::Tensor& x, const std::vector<int64_t>& patch_size) {
  const int64_t dims = static_cast<int64_t>(patch_size.size());
  if (x.dim() != dims + 2) {
    throw InputError("patchify: expected a (B, C, " + std::string(dims == 3 ? "D, H, W" : "H, W") + ") tensor, got " +
                     std::to_string(x.dim()) + " dimensions");
  }
  std::vector<int64_t> shape{x.size(0), x.size(1)};
  for (int64_t i = 0; i < dims; ++i) {
    if (x.size(i + 2) % patch_size[i] != 0) {
      throw InputError("patchify: image size " + std::to_string(x.size(i + 2)) + " on axis " + std::to_string(i) +
                       " is not divisible by patch size " + std::to_string(patch_size[i]));
    }
    shape.push_back(x.size(i + 2) / patch_size[i]);
    shape.push_back(patch_size[i]);
  }
  return x.reshape(shape);
}

}  // namespace

std::string sizes_str(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::vector<int64_t> patch_grid(const std::vector<int64_t>& img_size, const std::vector<int64_t>& patch_size) {
  std::vector<int64_t> grid;
  for (size_t i = 0; i < img_size.size(); ++i) grid.push_back(img_size[i] / patch_size[i]);
  return grid;
}

at::Tensor patchify(const at::Tensor& x, const std::vector<int64_t>& patch_size) {
  const auto v = split_patches(x, patch_size);
  const int64_t B = x.size(0), C = x.size(1);
  // (B, C, g0, p0, g1, p1, g2, p2) -> (B, g0, g1, g2, p0, p1, p2, C)
  const auto t = patch_size.size() == 3 ? v.permute({0, 2, 4, 6, 3, 5, 7, 1}) : v.permute({0, 2, 4, 3, 5, 1});
  const int64_t n = x.numel() / (B * C * product(patch_size));
  return t.reshape({B, n, product(patch_size) * C});
}

at::Tensor patchify_channels_first(const at::Tensor& x, const std::vector<int64_t>& patch_size) {
  const auto v = split_patches(x, patch_size);
  const int64_t B = x.size(0), C = x.size(1);
  // (B, C, g0, p0, g1, p1, g2, p2) -> (B, g0, g1, g2, C, p0, p1, p2)
  const auto t = patch_size.size() == 3 ? v.permute({0, 2, 4, 6, 1, 3, 5, 7}) : v.permute({0, 2, 4, 1, 3, 5});
  const int64_t n = x.numel() / (B * C * product(patch_size));
  return t.reshape({B, n, C * product(patch_size)});
}

at::Tensor unpatchify(const at::Tensor& patches, const std::vector<int64_t>& img_size,
                      const std::vector<int64_t>& patch_size, int64_t channels) {
  const auto grid = patch_grid(img_size, patch_size);
  const int64_t B = patches.size(0);
  if (patches.dim() != 3 || patches.size(1) != product(grid) || patches.size(2) != product(patch_size) * channels) {
    throw InputError("unpatchify: expected (B, " + std::to_string(product(grid)) + ", " +
                     std::to_string(product(patch_size) * channels) + ") patches, got " +
                     sizes_str(patches.sizes().vec()));
  }
  std::vector<int64_t> shape{B};
  shape.insert(shape.end(), grid.begin(), grid.end());
  shape.insert(shape.end(), patch_size.begin(), patch_size.end());
  shape.push_back(channels);
  const auto v = patches.reshape(shape);
  // (B, g0, g1, g2, p0, p1, p2, C) -> (B, C, g0, p0, g1, p1, g2, p2)
  const auto t = patch_size.size() == 3 ? v.permute({0, 7, 1, 4, 2, 5, 3, 6}) : v.permute({0, 5, 1, 3, 2, 4});
  std::vector<int64_t> out{B, channels};
  out.insert(out.end(), img_size.begin(), img_size.end());
  return t.reshape(out);
}

at::Tensor sincos_position_table(const std::vector<int64_t>& grid, int64_t width) {
  const int64_t dims = static_cast<int64_t>(grid.size());
  const int64_t parts = dims == 3 ? 6 : 4;
  if (width % parts != 0) {
    throw ConfigError("sin-cos position embedding: width " + std::to_string(width) + " is not divisible by " +
                      std::to_string(parts) + " (needed for " + std::to_string(dims) + "D)");
  }
  const int64_t pos_dim = width / parts;
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto omega = 1.0 / at::pow(10000.0, at::arange(pos_dim, f32) / static_cast<double>(pos_dim));
  std::vector<at::Tensor> axes;
  for (int64_t g : grid) axes.push_back(at::arange(g, f32));
  const auto coords = at::meshgrid(axes, "ij");
  auto outer = [&](const at::Tensor& c) { return at::outer(c.flatten(), omega); };
  std::vector<at::Tensor> feats;
  const auto o1 = outer(coords[1]), o0 = outer(coords[0]);
  feats = {at::sin(o1), at::cos(o1), at::sin(o0), at::cos(o0)};
  if (dims == 3) {
    const auto o2 = outer(coords[2]);
    feats.push_back(at::sin(o2));
    feats.push_back(at::cos(o2));
  }
  return at::cat(feats, 1).unsqueeze(0);
}

int64_t num_visible(int64_t n, double masking_ratio) {
  // (1 - 0.9) * 10 is 0.99999999999999978 in doubles; a tolerance well below 1/n keeps floor exact.
  return static_cast<int64_t>(std::floor((1.0 - masking_ratio) * static_cast<double>(n) + 1e-6));
}

at::Tensor draw_visible(int64_t batch, int64_t n, double masking_ratio, std::optional<at::Generator> generator) {
  if (!(masking_ratio > 0.0 && masking_ratio < 1.0)) {
    throw ConfigError("masking_ratio = " + std::to_string(masking_ratio) + " must be in (0, 1)");
  }
  const int64_t keep = num_visible(n, masking_ratio);
  if (keep < 1 || keep >= n) {
    throw ConfigError("masking_ratio = " + std::to_string(masking_ratio) + " leaves " + std::to_string(keep) + " of " +
                      std::to_string(n) + " patches visible; at least one must be visible and one masked");
  }
  const auto weights = at::ones({batch, n}, at::TensorOptions().dtype(at::kFloat));
  return at::multinomial(weights, keep, /*replacement=*/false,
                         generator ? c10::optional<at::Generator>(*generator) : c10::nullopt);
}

at::Tensor mask_from_visible(const at::Tensor& visible, int64_t n) {
  auto mask = at::ones({visible.size(0), n}, visible.options().dtype(at::kFloat));
  return mask.scatter_(1, visible, 0.0);
}

at::Tensor dropout(const at::Tensor& x, double p, const BatchSlice& slice) {
  if (p <= 0.0) return x;
  if (p >= 1.0) return x * 0.0;
  const int64_t rows = x.size(0);
  const int64_t global = slice.global > 0 ? slice.global : rows;
  TORCH_CHECK(slice.offset >= 0 && slice.offset + rows <= global, "dropout: rows ", slice.offset, "..",
              slice.offset + rows - 1, " are outside a batch of ", global);
  auto shape = x.sizes().vec();
  shape[0] = global;
  // Drawn in float32 whatever x's dtype (autocast may hand bfloat16), so the noise never depends on it.
  auto keep = at::empty(shape, x.options().dtype(at::kFloat)).bernoulli_(1.0 - p);
  // clone: autograd saves the mask, and a view would keep the whole global batch's mask alive.
  if (global != rows) keep = keep.narrow(0, slice.offset, rows).clone();
  return x * keep.div_(1.0 - p).to(x.scalar_type());
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p, bool fused,
                     const BatchSlice& slice) {
  if (fused && compat::kHasFusedAttention && dropout_p <= 0.0) return compat::fused_attention(q, k, v, 0.0);
  auto att = at::matmul(q, k.transpose(-2, -1)).mul_(1.0 / std::sqrt(static_cast<double>(q.size(-1))));
  att = at::softmax(att, -1);
  if (dropout_p > 0.0) att = dropout(att, dropout_p, slice);
  return at::matmul(att, v);
}

at::Tensor masked_mse_loss(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& mask, bool norm_pix) {
  if (pred.sizes() != target.sizes() || pred.dim() != 3 || mask.dim() != 2 || mask.size(0) != pred.size(0) ||
      mask.size(1) != pred.size(1)) {
    throw InputError("masked_mse_loss: pred " + sizes_str(pred.sizes().vec()) + ", target " +
                     sizes_str(target.sizes().vec()) + " and mask " + sizes_str(mask.sizes().vec()) + " do not match");
  }
  auto t = target;
  if (norm_pix) {
    const auto mean = t.mean(-1, /*keepdim=*/true);
    const auto var = t.var(-1, /*unbiased=*/true, /*keepdim=*/true);
    t = (t - mean) / at::sqrt(var + 1e-6);
  }
  const auto per_patch = (pred - t).pow(2).mean(-1);
  const auto m = mask.to(per_patch.scalar_type());
  return (per_patch * m).sum() / m.sum();
}

}  // namespace mae
