#include "export/axis_order.h"

#include <ATen/ATen.h>

#include "core/error.h"

namespace mae {

const char* to_string(AxisOrder order) {
  switch (order) {
    case AxisOrder::monai: return "monai";
    case AxisOrder::native: return "native";
  }
  return "?";
}

AxisOrder parse_axis_order(const std::string& name) {
  for (auto order : {AxisOrder::monai, AxisOrder::native}) {
    if (name == to_string(order)) return order;
  }
  throw ConfigError("--axis-order \"" + name + "\" is not known; choose monai (MONAI's (C, i, j, k) arrays) or "
                    "native (mae3d's (C, D, H, W))");
}

std::vector<int64_t> in_axis_order(const std::vector<int64_t>& sizes, AxisOrder order) {
  return order == AxisOrder::monai ? std::vector<int64_t>(sizes.rbegin(), sizes.rend()) : sizes;
}

at::Tensor reverse_spatial_axes(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 3, "reverse_spatial_axes: expected (B, C, spatial...), got ", x.sizes());
  std::vector<int64_t> dims{0, 1};
  for (int64_t d = x.dim() - 1; d >= 2; --d) dims.push_back(d);
  return x.permute(dims).contiguous();
}

at::Tensor reverse_raster(const at::Tensor& t, const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  TORCH_CHECK(t.dim() == 3 && t.size(1) == n, "reverse_raster: expected (R, ", n, ", X), got ", t.sizes());
  const int64_t k = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> shape{t.size(0)};
  shape.insert(shape.end(), sizes.begin(), sizes.end());
  shape.push_back(t.size(2));
  // (R, s0, ..., sk-1, X) -> (R, sk-1, ..., s0, X)
  std::vector<int64_t> dims{0};
  for (int64_t d = k; d >= 1; --d) dims.push_back(d);
  dims.push_back(k + 1);
  return t.reshape(shape).permute(dims).reshape(t.sizes()).contiguous();
}

}  // namespace mae
