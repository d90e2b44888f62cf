#include "model/linear.h"

#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <unordered_map>

#include "core/compat.h"
#include "core/error.h"

#ifdef MAE3D_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace mae {

namespace {

std::atomic<Fp32Matmul> g_engine{onednn_built() ? Fp32Matmul::onednn : Fp32Matmul::blas};
std::atomic<int64_t> g_products{0};

#ifdef MAE3D_HAVE_ONEDNN
dnnl::memory::desc float_desc(const at::Tensor& t) {
  return dnnl::memory::desc({t.size(0), t.size(1)}, dnnl::memory::data_type::f32, {t.stride(0), t.stride(1)});
}

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}
#endif

bool onednn_applies(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  auto is_float_cpu = [](const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; };
  return g_engine.load() == Fp32Matmul::onednn && onednn_built() && x.dim() >= 1 && weight.dim() == 2 &&
         x.size(-1) == weight.size(1) && x.numel() > 0 && weight.numel() > 0 && is_float_cpu(x) &&
         is_float_cpu(weight) && (!bias.defined() || (is_float_cpu(bias) && bias.dim() == 1)) &&
         !compat::cpu_autocast_enabled();
}

// x W^T + b on oneDNN, in x's shape with the last axis n.
at::Tensor onednn_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                          c10::IntArrayRef x_sizes) {
  auto shape = x_sizes.vec();
  shape.back() = weight.size(0);
  auto y = at::empty(shape, x2.options());
  onednn_mm(x2, weight.t(), y.view({-1, weight.size(0)}), bias.numel() > 0 ? &bias : nullptr);
  return y;
}

// linear() on oneDNN: the forward's x W^T + b, the backward's dy W and dy^T x, and dy summed
// over rows for the bias. The output is a fresh tensor (not a view), so in-place ops on it work as on
// torch::linear's.
struct OnednnLinear : public torch::autograd::Function<OnednnLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    const auto x2 = x.reshape({-1, weight.size(1)});
    ctx->save_for_backward({x2, weight});
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["bias"] = bias.numel() > 0;
    return onednn_forward(x2, weight, bias, x.sizes());
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x2 = saved[0];
    const auto& weight = saved[1];
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const int64_t n = weight.size(0), k = weight.size(1);
    const auto dy = grads[0].reshape({-1, n});
    // With create_graph the gradients must be differentiable themselves: LibTorch's products.
    const bool differentiable = torch::GradMode::is_enabled();
    at::Tensor dx, dw, db;
    if (ctx->needs_input_grad(0)) {
      if (differentiable) {
        dx = dy.mm(weight);
      } else {
        dx = at::empty({dy.size(0), k}, dy.options());
        onednn_mm(dy, weight, dx);
      }
      dx = dx.view(x_sizes);
    }
    if (ctx->needs_input_grad(1)) {
      if (differentiable) {
        dw = dy.t().mm(x2);
      } else {
        dw = at::empty({n, k}, dy.options());
        onednn_mm(dy.t(), x2, dw);
      }
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) db = dy.sum(0);
    return {dx, dw, db};
  }
};

#ifdef MAE3D_HAVE_ONEDNN
// An operand that oneDNN's fast kernels take: unit stride along one axis and a full stride along the
// other (a zero or odd stride sends a product to its reference kernel, orders of magnitude slower).
at::Tensor plain(const at::Tensor& t) {
  const bool rows = t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1));
  const bool cols = t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0));
  return rows || cols ? t : t.contiguous();
}
#endif

}  // namespace

bool onednn_built() {
#ifdef MAE3D_HAVE_ONEDNN
  return true;
#else
  return false;
#endif
}

Fp32Matmul resolve_fp32_matmul(const std::string& choice, const std::string& key) {
  if (choice == "auto") return onednn_built() ? Fp32Matmul::onednn : Fp32Matmul::blas;
  if (choice == "blas") return Fp32Matmul::blas;
  if (choice == "onednn") {
    if (!onednn_built()) {
      throw ConfigError(key + " = \"onednn\": this mae3d was built without oneDNN (install libdnnl-dev and " +
                        "rebuild); use \"blas\" or \"auto\"");
    }
    return Fp32Matmul::onednn;
  }
  throw ConfigError(key + " = \"" + choice + "\" is not allowed; choose one of \"auto\", \"blas\", \"onednn\"");
}

const char* fp32_matmul_name(Fp32Matmul engine) { return engine == Fp32Matmul::onednn ? "onednn" : "blas"; }

Fp32Matmul fp32_matmul() { return g_engine.load(); }

int64_t onednn_products() { return g_products.load(std::memory_order_relaxed); }

void set_fp32_matmul(Fp32Matmul engine) {
  if (engine == Fp32Matmul::onednn && !onednn_built()) {
    throw ConfigError("fp32 matmul \"onednn\": this mae3d was built without oneDNN");
  }
  g_engine.store(engine);
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!onednn_applies(x, weight, bias)) return torch::linear(x, weight, bias);
  // A custom function's inputs must all be defined: no bias is passed as an empty tensor. oneDNN
  // reads a bias with unit stride only.
  const auto b = bias.defined() ? bias.contiguous() : at::empty({0}, weight.options());
  const bool needs_graph = torch::GradMode::is_enabled() &&
                           (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()));
  if (!needs_graph) return onednn_forward(x.reshape({-1, weight.size(1)}), weight, b, x.sizes());
  return OnednnLinear::apply(x, weight, b);
}

void onednn_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor* bias) {
#ifdef MAE3D_HAVE_ONEDNN
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.size(1) == b.size(0) && c.size(0) == a.size(0) &&
                  c.size(1) == b.size(1),
              "onednn_mm: shapes ", a.sizes(), " x ", b.sizes(), " -> ", c.sizes(), " do not match");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "onednn_mm: float32 only");
  TORCH_CHECK(c.stride(1) == 1, "onednn_mm: the output needs unit column stride");
  TORCH_CHECK(c.stride(0) >= std::max<int64_t>(1, c.size(1)), "onednn_mm: the output's rows overlap");
  const auto& engine = cpu_engine();
  const auto a_plain = plain(a), b_plain = plain(b);
  const auto a_md = float_desc(a_plain), b_md = float_desc(b_plain), c_md = float_desc(c);
  std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, dnnl::memory(a_md, engine, a_plain.data_ptr())},
                                             {DNNL_ARG_WEIGHTS, dnnl::memory(b_md, engine, b_plain.data_ptr())},
                                             {DNNL_ARG_DST, dnnl::memory(c_md, engine, c.data_ptr())}};
  // Primitive descriptors of the same shapes and strides come from oneDNN's own primitive cache.
  std::optional<dnnl::matmul::primitive_desc> pd;
  at::Tensor bias_plain;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == c.size(1) && bias->scalar_type() == at::kFloat,
                "onednn_mm: the bias must be float32 of length ", c.size(1));
    bias_plain = bias->contiguous();
    const dnnl::memory::desc bias_md({1, c.size(1)}, dnnl::memory::data_type::f32, {c.size(1), 1});
    pd.emplace(dnnl::matmul::desc(a_md, b_md, bias_md, c_md), engine);
    args.emplace(DNNL_ARG_BIAS, dnnl::memory(bias_md, engine, bias_plain.data_ptr()));
  } else {
    pd.emplace(dnnl::matmul::desc(a_md, b_md, c_md), engine);
  }
  dnnl::stream stream(engine);
  dnnl::matmul(*pd).execute(stream, args);
  stream.wait();
  g_products.fetch_add(1, std::memory_order_relaxed);
#else
  (void)a, (void)b, (void)c, (void)bias;
  throw Error("onednn_mm: this mae3d was built without oneDNN");
#endif
}

}  // namespace mae
