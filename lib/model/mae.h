// The masked autoencoder (He et al. 2021; Zhou et al. 2022) with the contract and parameter names
// of MONAI's MaskedAutoEncoderViT, for 2D and 3D images. The encoder sees only the visible
// patches plus a cls token; the decoder puts mask tokens back in grid order and predicts every
// patch's voxels in (p1 p2 p3 c) order.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "model/ops.h"

namespace mae {

/// Options of MaskedAutoencoder. Defaults: ViT-B encoder (768 / 3072 / 12 layers / 12 heads) and
/// MONAI's light decoder (384 / 512 / 4 layers / 12 heads), masking 0.75, sin-cos positions.
struct MaskedAutoencoderOptions {
  /// Required: channels, image size and patch size per spatial axis (2 or 3 entries, D H W order).
  MaskedAutoencoderOptions(int64_t in_channels, std::vector<int64_t> img_size, std::vector<int64_t> patch_size)
      : in_channels_(in_channels), img_size_(std::move(img_size)), patch_size_(std::move(patch_size)) {}

  /// Number of spatial axes (2 or 3).
  int64_t spatial_dims() const { return static_cast<int64_t>(img_size_.size()); }
  /// Patch grid (img_size / patch_size per axis).
  std::vector<int64_t> grid() const;
  /// Number of patches N.
  int64_t num_patches() const;
  /// Voxels per patch times channels: the width of one prediction, prod(patch)·C.
  int64_t patch_dim() const;
  /// Throws ConfigError naming the option and value for any invalid combination.
  void validate() const;

  TORCH_ARG(int64_t, in_channels);                            ///< image channels C
  TORCH_ARG(std::vector<int64_t>, img_size);                  ///< image size per axis, each divisible by the patch
  TORCH_ARG(std::vector<int64_t>, patch_size);                ///< patch size per axis
  TORCH_ARG(int64_t, hidden_size) = 768;                      ///< encoder width E
  TORCH_ARG(int64_t, mlp_dim) = 3072;                         ///< encoder MLP width
  TORCH_ARG(int64_t, num_layers) = 12;                        ///< encoder transformer blocks
  TORCH_ARG(int64_t, num_heads) = 12;                         ///< encoder attention heads (divide E)
  TORCH_ARG(double, masking_ratio) = 0.75;                    ///< share of patches masked, in (0, 1)
  TORCH_ARG(int64_t, decoder_hidden_size) = 384;              ///< decoder width Ed
  TORCH_ARG(int64_t, decoder_mlp_dim) = 512;                  ///< decoder MLP width
  TORCH_ARG(int64_t, decoder_num_layers) = 4;                 ///< decoder transformer blocks
  TORCH_ARG(int64_t, decoder_num_heads) = 12;                 ///< decoder attention heads (divide Ed)
  TORCH_ARG(std::string, proj_type) = "conv";                 ///< patch projection: "conv" | "perceptron"
  TORCH_ARG(std::string, pos_embed_type) = "sincos";          ///< encoder positions: "sincos" | "learnable" | "none"
  TORCH_ARG(std::string, decoder_pos_embed_type) = "sincos";  ///< decoder positions: same choices
  TORCH_ARG(double, dropout_rate) = 0.0;                      ///< dropout in [0, 1]
  TORCH_ARG(bool, qkv_bias) = false;                          ///< bias on the fused qkv projection
  /// Attention through at::scaled_dot_product_attention where LibTorch has it (2.x); false, or
  /// LibTorch 1.13: explicit softmax(q k^T / sqrt(d)) v. Same function; not a saved option.
  TORCH_ARG(bool, fused_attention) = true;
};

/// Pre-norm transformer block, names as MONAI's TransformerBlock: norm1, attn.qkv, attn.out_proj,
/// norm2, mlp.linear1, mlp.linear2.
class TransformerBlockImpl : public torch::nn::Module {
 public:
  /// width: token width; mlp_dim: hidden MLP width; heads divides width; fused_attention: see
  /// MaskedAutoencoderOptions::fused_attention.
  TransformerBlockImpl(int64_t width, int64_t mlp_dim, int64_t heads, double dropout, bool qkv_bias,
                       bool fused_attention = true);
  /// Registers the submodules.
  void reset();
  /// x: (B, T, width) -> (B, T, width).
  torch::Tensor forward(const torch::Tensor& x);
  /// Which rows of a global batch x holds (for dropout; see mae::dropout).
  void set_batch_slice(const BatchSlice& slice) { slice_ = slice; }

  torch::nn::LayerNorm norm1{nullptr}, norm2{nullptr};   ///< pre-norms of attention and MLP
  torch::nn::Linear qkv{nullptr}, out_proj{nullptr};     ///< fused q,k,v projection and output projection
  torch::nn::Linear linear1{nullptr}, linear2{nullptr};  ///< MLP layers (exact GELU between)

 private:
  int64_t width_, mlp_dim_, heads_;
  double dropout_;
  bool qkv_bias_, fused_;
  BatchSlice slice_;
};
TORCH_MODULE(TransformerBlock);

/// Result of MaskedAutoencoder::forward.
struct MaeOutput {
  torch::Tensor pred;     ///< (B, N, prod(patch)·C) predicted voxels of every patch
  torch::Tensor mask;     ///< (B, N) float, 1 = masked, 0 = visible
  torch::Tensor visible;  ///< (B, keep) int64 indices of the visible patches, in draw order
};

/// MONAI-compatible masked autoencoder ViT.
class MaskedAutoencoderImpl : public torch::nn::Module {
 public:
  /// Validates the options (ConfigError) and builds the model with MAE initialisation.
  explicit MaskedAutoencoderImpl(MaskedAutoencoderOptions options);
  /// Registers all parameters and submodules and initialises them.
  void reset();
  /// Re-draws the initial weights: xavier-uniform Linear (and patch projection), zero biases,
  /// LayerNorm 1/0, cls and mask tokens N(0, 0.02), learnable positions truncated N(0, 0.02).
  void reset_parameters();

  /// x: (B, C, *img_size) -> {pred, mask, visible}. The masking ratio defaults to the options';
  /// masks are drawn on the CPU with `generator` when given (else the global generator).
  MaeOutput forward(const torch::Tensor& x, std::optional<double> masking_ratio = std::nullopt,
                    std::optional<at::Generator> generator = std::nullopt);

  /// Same as forward but with given visible indices (B, keep), e.g. for reproducible evaluation.
  MaeOutput forward_visible(const torch::Tensor& x, const torch::Tensor& visible);

  /// Encoder on all patches without masking and without the cls token, as MONAI's ViT computes it:
  /// x: (B, C, *img_size) -> tokens (B, N, E) after the final LayerNorm.
  torch::Tensor encode(const torch::Tensor& x);

  /// Prediction target for x: patchify(x) (B, N, prod(patch)·C).
  torch::Tensor target(const torch::Tensor& x) const;

  /// The options the model was built with.
  const MaskedAutoencoderOptions& options() const { return options_; }

  /// Declares that the following forward passes compute rows slice.offset .. of a batch of
  /// slice.global rows (data-parallel training: this rank's share of the global batch), so that
  /// every dropout draws its noise for the whole batch and keeps this slice's rows (mae::dropout):
  /// N ranks then compute exactly what one process computes on the whole batch. {} = whole batches.
  void set_batch_slice(const BatchSlice& slice);

  /// Prints the options.
  void pretty_print(std::ostream& stream) const override;

 private:
  torch::Tensor embed(const torch::Tensor& x, const torch::Tensor* visible);  // (B, K or N, E) + positions
  void check_input(const torch::Tensor& x) const;

  MaskedAutoencoderOptions options_;
  BatchSlice slice_;
  torch::Tensor cls_token_, mask_tokens_, position_embeddings_, decoder_pos_embedding_;
  torch::nn::Module* patch_module_ = nullptr;  // owned through registered submodules
  torch::Tensor proj_weight_, proj_bias_;      // conv weight (E, C, p...) or Linear (E, P)
  std::vector<TransformerBlock> blocks_, decoder_blocks_;
  torch::nn::LayerNorm norm_{nullptr}, decoder_norm_{nullptr};
  torch::nn::Linear decoder_embed_{nullptr}, decoder_pred_{nullptr};
};
TORCH_MODULE(MaskedAutoencoder);

/// Trainable parameters split for AdamW: {with weight decay, without}. Biases, norms, the cls and
/// mask tokens and learnable position tables get no decay; frozen tables are left out.
std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> decay_groups(const torch::nn::Module& model);

}  // namespace mae
