#include "model/mae.h"

#include <torch/torch.h>

#include <cmath>
#include <numeric>
#include <ostream>
#include <sstream>

#include "core/error.h"
#include "model/linear.h"
#include "model/ops.h"

namespace mae {

namespace {

void require(bool ok, const std::string& message) {
  if (!ok) throw ConfigError(message);
}

void check_choice(const std::string& name, const std::string& value, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "\"" : ", \"") + std::string(a) + "\"";
  }
  throw ConfigError(name + " = \"" + value + "\" is not allowed; choose one of " + list);
}

// LayerNorm in its weights' precision: under bfloat16 autocast the CPU kernel refuses mixed dtypes
// (CUDA autocast runs layer_norm in float32 too).
torch::Tensor norm_in_weight_dtype(torch::nn::LayerNorm& norm, const torch::Tensor& x) {
  return x.scalar_type() == norm->weight.scalar_type() ? norm(x) : norm(x.to(norm->weight.scalar_type()));
}

// A Linear module's forward through linear() (float32 CPU products on the chosen library).
torch::Tensor apply_linear(torch::nn::Linear& module, const torch::Tensor& x) {
  return linear(x, module->weight, module->bias);
}

// Truncated normal N(0, std) on [-2, 2], as MONAI's trunc_normal_ with a = -2, b = 2.
void trunc_normal_(torch::Tensor t, double std) { t.normal_(0.0, std).clamp_(-2.0, 2.0); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Options

std::vector<int64_t> MaskedAutoencoderOptions::grid() const { return patch_grid(img_size_, patch_size_); }

int64_t MaskedAutoencoderOptions::num_patches() const {
  const auto g = grid();
  return std::accumulate(g.begin(), g.end(), int64_t{1}, std::multiplies<int64_t>());
}

int64_t MaskedAutoencoderOptions::patch_dim() const {
  return in_channels_ * std::accumulate(patch_size_.begin(), patch_size_.end(), int64_t{1}, std::multiplies<int64_t>());
}

void MaskedAutoencoderOptions::validate() const {
  require(in_channels_ >= 1, "in_channels = " + std::to_string(in_channels_) + " must be at least 1");
  require(img_size_.size() == 2 || img_size_.size() == 3,
          "img_size = " + sizes_str(img_size_) + " must have 2 or 3 entries (2D or 3D)");
  require(
      patch_size_.size() == img_size_.size(),
      "patch_size = " + sizes_str(patch_size_) + " must have as many entries as img_size = " + sizes_str(img_size_));
  for (size_t i = 0; i < img_size_.size(); ++i) {
    require(img_size_[i] >= 1, "img_size = " + sizes_str(img_size_) + " must be positive");
    require(patch_size_[i] >= 1, "patch_size = " + sizes_str(patch_size_) + " must be positive");
    require(patch_size_[i] <= img_size_[i],
            "patch_size = " + sizes_str(patch_size_) + " is larger than img_size = " + sizes_str(img_size_));
    require(img_size_[i] % patch_size_[i] == 0,
            "patch_size = " + sizes_str(patch_size_) + " does not divide img_size = " + sizes_str(img_size_));
  }
  auto width_check = [](const std::string& prefix, int64_t width, int64_t heads, int64_t mlp, int64_t layers) {
    require(width >= 1, prefix + "hidden_size = " + std::to_string(width) + " must be at least 1");
    require(heads >= 1, prefix + "num_heads = " + std::to_string(heads) + " must be at least 1");
    require(width % heads == 0, prefix + "hidden_size = " + std::to_string(width) + " is not divisible by " + prefix +
                                    "num_heads = " + std::to_string(heads));
    require(mlp >= 1, prefix + "mlp_dim = " + std::to_string(mlp) + " must be at least 1");
    require(layers >= 1, prefix + "num_layers = " + std::to_string(layers) + " must be at least 1");
  };
  width_check("", hidden_size_, num_heads_, mlp_dim_, num_layers_);
  width_check("decoder_", decoder_hidden_size_, decoder_num_heads_, decoder_mlp_dim_, decoder_num_layers_);
  check_choice("proj_type", proj_type_, {"conv", "perceptron"});
  check_choice("pos_embed_type", pos_embed_type_, {"sincos", "learnable", "none"});
  check_choice("decoder_pos_embed_type", decoder_pos_embed_type_, {"sincos", "learnable", "none"});
  const int64_t parts = img_size_.size() == 3 ? 6 : 4;
  require(pos_embed_type_ != "sincos" || hidden_size_ % parts == 0,
          "hidden_size = " + std::to_string(hidden_size_) + " must be divisible by " + std::to_string(parts) +
              " for sin-cos position embedding in " + std::to_string(img_size_.size()) + "D");
  require(decoder_pos_embed_type_ != "sincos" || decoder_hidden_size_ % parts == 0,
          "decoder_hidden_size = " + std::to_string(decoder_hidden_size_) + " must be divisible by " +
              std::to_string(parts) + " for sin-cos position embedding in " + std::to_string(img_size_.size()) + "D");
  require(dropout_rate_ >= 0.0 && dropout_rate_ <= 1.0,
          "dropout_rate = " + std::to_string(dropout_rate_) + " must be in [0, 1]");
  require(masking_ratio_ > 0.0 && masking_ratio_ < 1.0,
          "masking_ratio = " + std::to_string(masking_ratio_) + " must be in (0, 1)");
  const int64_t n = num_patches();
  const int64_t keep = num_visible(n, masking_ratio_);
  require(keep >= 1 && keep < n, "masking_ratio = " + std::to_string(masking_ratio_) + " leaves " +
                                     std::to_string(keep) + " of " + std::to_string(n) +
                                     " patches visible; at least one must be visible and one masked");
}

// ---------------------------------------------------------------------------------------------
// Transformer block

TransformerBlockImpl::TransformerBlockImpl(int64_t width, int64_t mlp_dim, int64_t heads, double dropout, bool qkv_bias,
                                           bool fused_attention)
    : width_(width), mlp_dim_(mlp_dim), heads_(heads), dropout_(dropout), qkv_bias_(qkv_bias), fused_(fused_attention) {
  reset();
}

void TransformerBlockImpl::reset() {
  norm1 = register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width_}).eps(1e-5)));
  auto attn = register_module("attn", std::make_shared<torch::nn::Module>());
  qkv = attn->register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(width_, 3 * width_).bias(qkv_bias_)));
  out_proj = attn->register_module("out_proj", torch::nn::Linear(width_, width_));
  norm2 = register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({width_}).eps(1e-5)));
  auto mlp = register_module("mlp", std::make_shared<torch::nn::Module>());
  linear1 = mlp->register_module("linear1", torch::nn::Linear(width_, mlp_dim_));
  linear2 = mlp->register_module("linear2", torch::nn::Linear(mlp_dim_, width_));
}

torch::Tensor TransformerBlockImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), T = x.size(1), hd = width_ / heads_;
  const bool drop = dropout_ > 0.0 && is_training();
  // Attention: (B, T, E) -> (3, B, heads, T, hd).
  auto qkv_t = apply_linear(qkv, norm_in_weight_dtype(norm1, x)).view({B, T, 3, heads_, hd}).permute({2, 0, 3, 1, 4});
  auto parts = qkv_t.unbind(0);
  auto a = attention(parts[0], parts[1], parts[2], drop ? dropout_ : 0.0, fused_, slice_);
  auto o = apply_linear(out_proj, a.transpose(1, 2).reshape({B, T, width_}));
  if (drop) o = dropout(o, dropout_, slice_);
  auto h = x + o;
  auto m = torch::gelu(apply_linear(linear1, norm_in_weight_dtype(norm2, h)));
  if (drop) m = dropout(m, dropout_, slice_);
  m = apply_linear(linear2, m);
  if (drop) m = dropout(m, dropout_, slice_);
  return h + m;
}

// ---------------------------------------------------------------------------------------------
// Masked autoencoder

MaskedAutoencoderImpl::MaskedAutoencoderImpl(MaskedAutoencoderOptions options) : options_(std::move(options)) {
  options_.validate();
  reset();
}

void MaskedAutoencoderImpl::reset() {
  const auto& o = options_;
  const int64_t E = o.hidden_size(), Ed = o.decoder_hidden_size(), N = o.num_patches();
  cls_token_ = register_parameter("cls_token", torch::zeros({1, 1, E}));

  auto pe = register_module("patch_embedding", std::make_shared<torch::nn::Module>());
  patch_module_ = pe.get();
  if (o.proj_type() == "conv") {
    if (o.spatial_dims() == 3) {
      auto conv = pe->register_module(
          "patch_embeddings",
          torch::nn::Conv3d(torch::nn::Conv3dOptions(o.in_channels(), E, o.patch_size()).stride(o.patch_size())));
      proj_weight_ = conv->weight;
      proj_bias_ = conv->bias;
    } else {
      auto conv = pe->register_module(
          "patch_embeddings",
          torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels(), E, o.patch_size()).stride(o.patch_size())));
      proj_weight_ = conv->weight;
      proj_bias_ = conv->bias;
    }
  } else {
    auto linear = torch::nn::Linear(o.patch_dim(), E);
    pe->register_module("patch_embeddings", torch::nn::Sequential(torch::nn::Identity(), linear));
    proj_weight_ = linear->weight;
    proj_bias_ = linear->bias;
  }
  position_embeddings_ = pe->register_parameter("position_embeddings", torch::zeros({1, N, E}),
                                                /*requires_grad=*/o.pos_embed_type() == "learnable");

  auto blocks = register_module("blocks", torch::nn::ModuleList());
  blocks_.clear();
  for (int64_t i = 0; i < o.num_layers(); ++i) {
    blocks_.emplace_back(E, o.mlp_dim(), o.num_heads(), o.dropout_rate(), o.qkv_bias(), o.fused_attention());
    blocks->push_back(blocks_.back());
  }
  norm_ = torch::nn::LayerNorm(torch::nn::LayerNormOptions({E}).eps(1e-5));
  blocks->push_back(norm_);

  decoder_embed_ = register_module("decoder_embed", torch::nn::Linear(E, Ed));
  mask_tokens_ = register_parameter("mask_tokens", torch::zeros({1, 1, Ed}));
  decoder_pos_embedding_ = register_parameter("decoder_pos_embedding", torch::zeros({1, N, Ed}),
                                              /*requires_grad=*/o.decoder_pos_embed_type() == "learnable");
  auto dblocks = register_module("decoder_blocks", torch::nn::ModuleList());
  decoder_blocks_.clear();
  for (int64_t i = 0; i < o.decoder_num_layers(); ++i) {
    decoder_blocks_.emplace_back(Ed, o.decoder_mlp_dim(), o.decoder_num_heads(), o.dropout_rate(), o.qkv_bias(),
                                 o.fused_attention());
    dblocks->push_back(decoder_blocks_.back());
  }
  decoder_norm_ = torch::nn::LayerNorm(torch::nn::LayerNormOptions({Ed}).eps(1e-5));
  dblocks->push_back(decoder_norm_);
  decoder_pred_ = register_module("decoder_pred", torch::nn::Linear(Ed, o.patch_dim()));
  reset_parameters();
}

void MaskedAutoencoderImpl::reset_parameters() {
  torch::NoGradGuard no_grad;
  const auto& o = options_;
  for (auto& module : modules(/*include_self=*/false)) {
    if (auto* linear = module->as<torch::nn::Linear>()) {
      torch::nn::init::xavier_uniform_(linear->weight);
      if (linear->bias.defined()) linear->bias.zero_();
    } else if (auto* norm = module->as<torch::nn::LayerNorm>()) {
      norm->weight.fill_(1.0);
      norm->bias.zero_();
    }
  }
  // The patch projection is initialised like a Linear over its flattened weight.
  torch::nn::init::xavier_uniform_(proj_weight_.view({proj_weight_.size(0), -1}));
  proj_bias_.zero_();
  cls_token_.normal_(0.0, 0.02);
  mask_tokens_.normal_(0.0, 0.02);
  auto init_positions = [&](torch::Tensor& table, const std::string& type, int64_t width) {
    if (type == "sincos") {
      table.copy_(sincos_position_table(o.grid(), width));
    } else if (type == "learnable") {
      trunc_normal_(table, 0.02);
    } else {
      table.zero_();
    }
  };
  init_positions(position_embeddings_, o.pos_embed_type(), o.hidden_size());
  init_positions(decoder_pos_embedding_, o.decoder_pos_embed_type(), o.decoder_hidden_size());
}

void MaskedAutoencoderImpl::check_input(const torch::Tensor& x) const {
  const auto& o = options_;
  std::vector<int64_t> expected{-1, o.in_channels()};
  expected.insert(expected.end(), o.img_size().begin(), o.img_size().end());
  bool ok = x.dim() == static_cast<int64_t>(expected.size()) && x.size(0) >= 1;
  for (size_t i = 1; ok && i < expected.size(); ++i) ok = x.size(static_cast<int64_t>(i)) == expected[i];
  if (!ok) {
    std::string want = "(B, " + std::to_string(o.in_channels());
    for (int64_t s : o.img_size()) want += ", " + std::to_string(s);
    throw InputError("MaskedAutoencoder: input of shape " + sizes_str(x.sizes().vec()) +
                     " does not match the model's " + want + ") (in_channels and img_size)");
  }
}

torch::Tensor MaskedAutoencoderImpl::embed(const torch::Tensor& x, const torch::Tensor* visible) {
  const auto& o = options_;
  const int64_t B = x.size(0), E = o.hidden_size();
  // conv == a matrix product over patches in (c p1 p2 p3) order; only visible patches are projected.
  auto patches = o.proj_type() == "conv" ? patchify_channels_first(x, o.patch_size()) : patchify(x, o.patch_size());
  if (visible) {
    patches = patches.gather(1, visible->unsqueeze(-1).expand({B, visible->size(1), patches.size(2)}));
  }
  auto tokens = linear(patches, proj_weight_.view({E, -1}), proj_bias_);
  if (o.pos_embed_type() != "none") {
    tokens = tokens + (visible ? position_embeddings_.squeeze(0).index_select(0, visible->flatten()).view({B, -1, E})
                               : position_embeddings_);
  }
  if (o.dropout_rate() > 0.0 && is_training()) tokens = dropout(tokens, o.dropout_rate(), slice_);
  return tokens;
}

void MaskedAutoencoderImpl::set_batch_slice(const BatchSlice& slice) {
  slice_ = slice;
  for (auto& block : blocks_) block->set_batch_slice(slice);
  for (auto& block : decoder_blocks_) block->set_batch_slice(slice);
}

MaeOutput MaskedAutoencoderImpl::forward(const torch::Tensor& x, std::optional<double> masking_ratio,
                                         std::optional<at::Generator> generator) {
  check_input(x);
  const double ratio = masking_ratio.value_or(options_.masking_ratio());
  auto visible = draw_visible(x.size(0), options_.num_patches(), ratio, std::move(generator));
  return forward_visible(x, visible.to(x.device()));
}

MaeOutput MaskedAutoencoderImpl::forward_visible(const torch::Tensor& x, const torch::Tensor& visible) {
  check_input(x);
  const int64_t B = x.size(0), N = options_.num_patches(), Ed = options_.decoder_hidden_size();
  TORCH_CHECK(visible.dim() == 2 && visible.size(0) == B && visible.size(1) >= 1 && visible.size(1) < N,
              "visible indices must be (B, keep) with 1 <= keep < N");
  auto h = torch::cat({cls_token_.expand({B, 1, cls_token_.size(2)}), embed(x, &visible)}, 1);
  for (auto& block : blocks_) h = block(h);
  h = apply_linear(decoder_embed_, norm_in_weight_dtype(norm_, h));
  // Mask tokens everywhere, visible tokens scattered back to their grid positions.
  // Under autocast the activations may be bfloat16 while tokens and tables stay float32.
  auto full = mask_tokens_.to(h.scalar_type())
                  .expand({B, N, Ed})
                  .scatter(1, visible.unsqueeze(-1).expand({B, visible.size(1), Ed}), h.slice(1, 1));
  if (options_.decoder_pos_embed_type() != "none") full = full + decoder_pos_embedding_.to(h.scalar_type());
  h = torch::cat({h.slice(1, 0, 1), full}, 1);
  for (auto& block : decoder_blocks_) h = block(h);
  auto pred = apply_linear(decoder_pred_, norm_in_weight_dtype(decoder_norm_, h).slice(1, 1));
  return {pred, mask_from_visible(visible, N), visible};
}

torch::Tensor MaskedAutoencoderImpl::encode(const torch::Tensor& x) {
  check_input(x);
  auto h = embed(x, nullptr);
  for (auto& block : blocks_) h = block(h);
  return norm_in_weight_dtype(norm_, h);
}

torch::Tensor MaskedAutoencoderImpl::target(const torch::Tensor& x) const { return patchify(x, options_.patch_size()); }

void MaskedAutoencoderImpl::pretty_print(std::ostream& stream) const {
  const auto& o = options_;
  stream << "mae::MaskedAutoencoder(in_channels=" << o.in_channels() << ", img_size=" << sizes_str(o.img_size())
         << ", patch_size=" << sizes_str(o.patch_size()) << ", hidden_size=" << o.hidden_size()
         << ", mlp_dim=" << o.mlp_dim() << ", num_layers=" << o.num_layers() << ", num_heads=" << o.num_heads()
         << ", masking_ratio=" << o.masking_ratio() << ", decoder_hidden_size=" << o.decoder_hidden_size()
         << ", decoder_mlp_dim=" << o.decoder_mlp_dim() << ", decoder_num_layers=" << o.decoder_num_layers()
         << ", decoder_num_heads=" << o.decoder_num_heads() << ", proj_type=" << o.proj_type()
         << ", pos_embed_type=" << o.pos_embed_type() << ", decoder_pos_embed_type=" << o.decoder_pos_embed_type()
         << ", dropout_rate=" << o.dropout_rate() << ", qkv_bias=" << (o.qkv_bias() ? "true" : "false") << ")";
}

std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> decay_groups(const torch::nn::Module& model) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) {
    const auto& name = item.key();
    const auto& p = item.value();
    if (!p.requires_grad()) continue;
    const bool is_token = name == "cls_token" || name == "mask_tokens";
    const bool is_position =
        name.find("position_embeddings") != std::string::npos || name.find("pos_embedding") != std::string::npos;
    (p.dim() <= 1 || is_token || is_position ? no_decay : decay).push_back(p);
  }
  return {decay, no_decay};
}

}  // namespace mae
