// Tests of lib/export: the MONAI key lists (names, shapes, order, counts) of every format for a small
// model and ViT-B 96^3, the cross-attention keys, UNETR refusals, the tensor file round trip, the
// JSON description, encoder features (tokens equal encode() of each window) and the error cases.
// The expected key lists are written out here from MONAI's module structure, not from the export;
// test_export.py checks the export against the state_dict() of MONAI's own classes (1.5 and 1.6), so
// the two together pin these lists to the real ones.
// Axis order: for a non-cubic model (cubic shapes hide axis mistakes), MONAI's ViT and
// MaskedAutoEncoderViT forward passes, written here in plain LibTorch ops from an exported dict, on
// the spatially reversed input reproduce encode() / forward_visible() with tokens and patch voxels
// reordered by hand (--axis-order monai), and on the input itself with --axis-order native.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>
#include <atomic>
#include <filesystem>
#include <fstream>

#include "../common/temp_dir.h"
#include "core/error.h"
#include "export/features.h"
#include "export/monai_export.h"
#include "export/tensor_file.h"
#include "io/io.h"
#include "run/config.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace {

using Shape = std::vector<int64_t>;
using KeyList = std::vector<std::pair<std::string, Shape>>;

// A temporary folder for this suite's tests.
struct TempDir : mae::test::TempDir {
  TempDir() : mae::test::TempDir("mae3d_export_test") {}
};

class Export : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(2);
    torch::manual_seed(0);
  }
};

mae::Config small_config() {
  mae::Config c;
  c.data.dataset = "unused.json";
  c.data.orientation = "";
  c.model.img_size = {32, 32, 32};
  c.model.patch_size = {8, 8, 8};
  c.model.hidden_size = 48;
  c.model.mlp_dim = 96;
  c.model.num_layers = 2;
  c.model.num_heads = 4;
  c.model.decoder_hidden_size = 24;
  c.model.decoder_mlp_dim = 40;
  c.model.decoder_num_layers = 1;
  c.model.decoder_num_heads = 4;
  return c;
}

// Non-cubic image, patch and grid (16, 24, 32) / (4, 8, 16) / (4, 3, 2), none of them the same
// reversed: every axis mistake shows.
mae::Config axis_config(const std::string& proj_type) {
  auto c = small_config();
  c.model.img_size = {16, 24, 32};
  c.model.patch_size = {4, 8, 16};
  c.model.proj_type = proj_type;
  c.model.qkv_bias = true;
  c.model.pos_embed_type = "learnable";
  c.model.decoder_pos_embed_type = "learnable";
  return c;
}

mae::Config vitb_config() {
  mae::Config c;  // the defaults are ViT-B 96^3, patch 16, decoder 384/512/4/12
  c.data.dataset = "unused.json";
  return c;
}

mae::MaskedAutoencoder build(const mae::Config& c) {
  auto m = mae::MaskedAutoencoder(mae::model_options_from(c.model));
  m->eval();
  return m;
}

// One MONAI TransformerBlock as its state_dict lists it; `cross`: the unused cross-attention layers
// of the MONAI release (none: 1.3, full: 1.4 - 1.5, norm: >= 1.6).
void add_block(KeyList& k, const std::string& p, int64_t e, int64_t mlp, bool qkv_bias, mae::CrossAttentionKeys cross) {
  k.push_back({p + "mlp.linear1.weight", {mlp, e}});
  k.push_back({p + "mlp.linear1.bias", {mlp}});
  k.push_back({p + "mlp.linear2.weight", {e, mlp}});
  k.push_back({p + "mlp.linear2.bias", {e}});
  k.push_back({p + "norm1.weight", {e}});
  k.push_back({p + "norm1.bias", {e}});
  k.push_back({p + "attn.out_proj.weight", {e, e}});
  k.push_back({p + "attn.out_proj.bias", {e}});
  k.push_back({p + "attn.qkv.weight", {3 * e, e}});
  if (qkv_bias) k.push_back({p + "attn.qkv.bias", {3 * e}});
  k.push_back({p + "norm2.weight", {e}});
  k.push_back({p + "norm2.bias", {e}});
  if (cross == mae::CrossAttentionKeys::none) return;
  k.push_back({p + "norm_cross_attn.weight", {e}});
  k.push_back({p + "norm_cross_attn.bias", {e}});
  if (cross == mae::CrossAttentionKeys::norm) return;
  k.push_back({p + "cross_attn.out_proj.weight", {e, e}});
  k.push_back({p + "cross_attn.out_proj.bias", {e}});
  for (const char* n : {"to_q", "to_k", "to_v"}) {
    k.push_back({p + "cross_attn." + n + ".weight", {e, e}});
    if (qkv_bias) k.push_back({p + "cross_attn." + n + ".bias", {e}});
  }
}

// MONAI's ViT (prefix "") / UNETR (prefix "vit.") / MaskedAutoEncoderViT state_dict for a 3D model;
// `reversed`: the conv kernel of a --axis-order monai export, (E, C, pW, pH, pD). ViT names its final
// LayerNorm `norm`; MaskedAutoEncoderViT keeps both final LayerNorms as the last entries of its
// nn.Sequential `blocks` and `decoder_blocks`.
KeyList expected_keys(const mae::ModelConfig& m, mae::ExportFormat f, mae::CrossAttentionKeys cross,
                      bool reversed = true) {
  KeyList k;
  const std::string pre = f == mae::ExportFormat::monai_unetr ? "vit." : "";
  const bool full = f == mae::ExportFormat::monai_mae;
  const auto& img = m.img_size;
  const auto& pt = m.patch_size;
  const int64_t n = (img[0] / pt[0]) * (img[1] / pt[1]) * (img[2] / pt[2]);
  const int64_t e = m.hidden_size, ed = m.decoder_hidden_size;
  const int64_t pdim = m.in_channels * pt[0] * pt[1] * pt[2];
  if (full) {
    k.push_back({"cls_token", {1, 1, e}});
    k.push_back({"mask_tokens", {1, 1, ed}});
    k.push_back({"decoder_pos_embedding", {1, n, ed}});
  }
  k.push_back({pre + "patch_embedding.position_embeddings", {1, n, e}});
  if (m.proj_type == "conv") {
    const Shape kernel = reversed ? Shape{pt[2], pt[1], pt[0]} : Shape{pt[0], pt[1], pt[2]};
    k.push_back({pre + "patch_embedding.patch_embeddings.weight", {e, m.in_channels, kernel[0], kernel[1], kernel[2]}});
    k.push_back({pre + "patch_embedding.patch_embeddings.bias", {e}});
  } else {
    k.push_back({pre + "patch_embedding.patch_embeddings.1.weight", {e, pdim}});
    k.push_back({pre + "patch_embedding.patch_embeddings.1.bias", {e}});
  }
  for (int64_t i = 0; i < m.num_layers; ++i) {
    add_block(k, pre + "blocks." + std::to_string(i) + ".", e, m.mlp_dim, m.qkv_bias, cross);
  }
  const std::string norm = full ? "blocks." + std::to_string(m.num_layers) + "." : pre + "norm.";
  k.push_back({norm + "weight", {e}});
  k.push_back({norm + "bias", {e}});
  if (full) {
    k.push_back({"decoder_embed.weight", {ed, e}});
    k.push_back({"decoder_embed.bias", {ed}});
    for (int64_t j = 0; j < m.decoder_num_layers; ++j) {
      add_block(k, "decoder_blocks." + std::to_string(j) + ".", ed, m.decoder_mlp_dim, m.qkv_bias, cross);
    }
    const std::string decoder_norm = "decoder_blocks." + std::to_string(m.decoder_num_layers) + ".";
    k.push_back({decoder_norm + "weight", {ed}});
    k.push_back({decoder_norm + "bias", {ed}});
    k.push_back({"decoder_pred.weight", {pdim, ed}});
    k.push_back({"decoder_pred.bias", {pdim}});
  }
  return k;
}

// true: MONAI 1.4 - 1.5's cross-attention keys, false: none (the bool of ExportOptions).
KeyList expected_keys(const mae::ModelConfig& m, mae::ExportFormat f, bool cross, bool reversed = true) {
  return expected_keys(m, f, cross ? mae::CrossAttentionKeys::full : mae::CrossAttentionKeys::none, reversed);
}

KeyList key_list(const mae::NamedTensors& t) {
  KeyList k;
  for (const auto& [name, tensor] : t) k.push_back({name, tensor.sizes().vec()});
  return k;
}

void expect_same_keys(const KeyList& got, const KeyList& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first) << "at " << i;
    EXPECT_EQ(got[i].second, want[i].second) << got[i].first;
  }
}

at::Tensor param(mae::MaskedAutoencoderImpl& m, const std::string& name) {
  for (const auto& p : m.named_parameters()) {
    if (p.key() == name) return p.value();
  }
  ADD_FAILURE() << "no parameter " << name;
  return {};
}

at::Tensor entry(const mae::NamedTensors& t, const std::string& name) {
  for (const auto& [n, v] : t) {
    if (n == name) return v;
  }
  ADD_FAILURE() << "no key " << name;
  return {};
}

std::string write_checkpoint(const std::string& run_dir, const mae::Config& c, mae::MaskedAutoencoder& model,
                             int64_t step = 7) {
  mae::CheckpointInfo info;
  info.step = step;
  info.config = mae::config_to_json(c);
  return mae::save_checkpoint(run_dir, info, *model, nullptr, {});
}

template <typename E>
std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

// --- formats and key lists -------------------------------------------------------------------

TEST_F(Export, FormatNames) {
  for (auto f : {mae::ExportFormat::monai_vit, mae::ExportFormat::monai_unetr, mae::ExportFormat::monai_mae}) {
    EXPECT_EQ(mae::parse_export_format(mae::to_string(f)), f);
  }
  const auto msg = message_of<mae::ConfigError>([] { mae::parse_export_format("monai-swin"); });
  EXPECT_NE(msg.find("--format"), std::string::npos) << msg;
  EXPECT_NE(msg.find("monai-swin"), std::string::npos) << msg;
  for (auto a : {mae::AxisOrder::monai, mae::AxisOrder::native}) EXPECT_EQ(mae::parse_axis_order(mae::to_string(a)), a);
  EXPECT_EQ(mae::ExportOptions{}.axis_order, mae::AxisOrder::monai);
  const auto axis_msg = message_of<mae::ConfigError>([] { mae::parse_axis_order("xyz"); });
  EXPECT_NE(axis_msg.find("--axis-order"), std::string::npos) << axis_msg;
  EXPECT_NE(axis_msg.find("xyz"), std::string::npos) << axis_msg;
  for (auto k : {mae::CrossAttentionKeys::none, mae::CrossAttentionKeys::full, mae::CrossAttentionKeys::norm}) {
    EXPECT_EQ(mae::parse_cross_attention_keys(mae::to_string(k)), k);
    mae::ExportOptions o;
    o.set_cross_attention(k);
    EXPECT_EQ(o.cross_attention(), k);
  }
  EXPECT_EQ(mae::ExportOptions{}.cross_attention(), mae::CrossAttentionKeys::full);
  EXPECT_EQ(std::string(mae::to_string(mae::CrossAttentionKeys::full)), "true");
  const auto cross_msg = message_of<mae::ConfigError>([] { mae::parse_cross_attention_keys("maybe"); });
  EXPECT_NE(cross_msg.find("--cross-attention-keys"), std::string::npos) << cross_msg;
  EXPECT_NE(cross_msg.find("maybe"), std::string::npos) << cross_msg;
}

// The layout of MONAI >= 1.6: norm_cross_attn only, in both the encoder and the decoder.
TEST_F(Export, NormOnlyCrossAttentionKeys) {
  auto c = small_config();
  c.model.qkv_bias = true;
  auto model = build(c);
  mae::ExportOptions o;
  o.set_cross_attention(mae::CrossAttentionKeys::norm);
  for (auto f : {mae::ExportFormat::monai_vit, mae::ExportFormat::monai_mae}) {
    SCOPED_TRACE(mae::to_string(f));
    o.format = f;
    const auto t = mae::monai_state_dict(*model, o);
    expect_same_keys(key_list(t), expected_keys(c.model, f, mae::CrossAttentionKeys::norm));
    for (const auto& [name, v] : t) EXPECT_EQ(name.find(".cross_attn."), std::string::npos) << name;
  }
  o.format = mae::ExportFormat::monai_vit;
  // 3 + 2 blocks x (12 + 2) + 2
  EXPECT_EQ(mae::monai_state_dict(*model, o).size(), 3u + 2 * 14 + 2);
  const auto t = mae::monai_state_dict(*model, o);
  EXPECT_TRUE(entry(t, "blocks.1.norm_cross_attn.weight").equal(at::ones({48})));
  EXPECT_TRUE(entry(t, "blocks.1.norm_cross_attn.bias").equal(at::zeros({48})));
}

TEST_F(Export, SmallKeyListsEveryFormat) {
  const auto c = small_config();
  auto model = build(c);
  for (bool cross : {true, false}) {
    for (auto f : {mae::ExportFormat::monai_vit, mae::ExportFormat::monai_mae}) {
      SCOPED_TRACE(std::string(mae::to_string(f)) + (cross ? " +cross" : " -cross"));
      const auto t = mae::monai_state_dict(*model, {f, cross});
      expect_same_keys(key_list(t), expected_keys(c.model, f, cross));
    }
  }
  // 3 + 2 blocks x (11 | 18) + 2; the MAE adds 3 tokens/tables, decoder_embed, 1 block, norm, pred.
  EXPECT_EQ(mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, false}).size(), 3u + 2 * 11 + 2);
  EXPECT_EQ(mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true}).size(), 3u + 2 * 18 + 2);
  EXPECT_EQ(mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, false}).size(),
            3u + 3 + 2 * 11 + 2 + 2 + 11 + 2 + 2);
  EXPECT_EQ(mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, true}).size(),
            3u + 3 + 2 * 18 + 2 + 2 + 18 + 2 + 2);
}

TEST_F(Export, PerceptronAndQkvBiasKeys) {
  auto c = small_config();
  c.model.proj_type = "perceptron";
  c.model.qkv_bias = true;
  c.model.pos_embed_type = "learnable";
  auto model = build(c);
  for (bool cross : {true, false}) {
    for (auto f : {mae::ExportFormat::monai_vit, mae::ExportFormat::monai_mae}) {
      SCOPED_TRACE(std::string(mae::to_string(f)) + (cross ? " +cross" : " -cross"));
      expect_same_keys(key_list(mae::monai_state_dict(*model, {f, cross})), expected_keys(c.model, f, cross));
    }
  }
  const auto t = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true});
  EXPECT_TRUE(entry(t, "blocks.1.attn.qkv.bias").equal(param(*model, "blocks.1.attn.qkv.bias")));
  EXPECT_EQ(entry(t, "blocks.0.cross_attn.to_v.bias").sizes().vec(), Shape({48}));
}

TEST_F(Export, ValuesAreFreshFloatCopies) {
  const auto c = small_config();
  auto model = build(c);
  const auto t = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, true, mae::AxisOrder::native});
  // The final norms carry the model's values (ViT: renamed norm; MaskedAutoEncoderViT: blocks.2).
  auto w = param(*model, "blocks.2.weight");
  {
    torch::NoGradGuard g;
    w.uniform_(0.5, 1.5);
    param(*model, "decoder_blocks.1.bias").uniform_(-1, 1);
  }
  const auto t2 = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true});
  EXPECT_TRUE(entry(t2, "norm.weight").equal(w));
  const auto t3 = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, true});
  EXPECT_TRUE(entry(t3, "decoder_blocks.1.bias").equal(param(*model, "decoder_blocks.1.bias")));
  EXPECT_TRUE(entry(t3, "blocks.2.weight").equal(w));
  EXPECT_TRUE(
      entry(t, "patch_embedding.position_embeddings").equal(param(*model, "patch_embedding.position_embeddings")));
  EXPECT_TRUE(entry(t, "decoder_pred.weight").equal(param(*model, "decoder_pred.weight")));
  for (const auto& [name, v] : t) {
    EXPECT_EQ(v.scalar_type(), at::kFloat) << name;
    EXPECT_TRUE(v.is_contiguous()) << name;
    EXPECT_FALSE(v.requires_grad()) << name;
    for (const auto& p : model->named_parameters()) {
      EXPECT_NE(v.data_ptr(), p.value().data_ptr()) << name << " shares storage with " << p.key();
    }
  }
  // Cross-attention: a fresh LayerNorm and zero linears, in the decoder at its width.
  EXPECT_TRUE(entry(t, "blocks.0.norm_cross_attn.weight").equal(at::ones({48})));
  EXPECT_TRUE(entry(t, "blocks.0.norm_cross_attn.bias").equal(at::zeros({48})));
  EXPECT_TRUE(entry(t, "blocks.1.cross_attn.to_k.weight").equal(at::zeros({48, 48})));
  EXPECT_TRUE(entry(t, "decoder_blocks.0.cross_attn.out_proj.weight").equal(at::zeros({24, 24})));
  EXPECT_TRUE(entry(t, "decoder_blocks.0.norm_cross_attn.weight").equal(at::ones({24})));
}

TEST_F(Export, VitBaseKeyLists) {
  const auto c = vitb_config();
  auto model = build(c);
  for (bool cross : {true, false}) {
    for (auto f : {mae::ExportFormat::monai_vit, mae::ExportFormat::monai_unetr, mae::ExportFormat::monai_mae}) {
      SCOPED_TRACE(std::string(mae::to_string(f)) + (cross ? " +cross" : " -cross"));
      const auto t = mae::monai_state_dict(*model, {f, cross});
      expect_same_keys(key_list(t), expected_keys(c.model, f, cross));
    }
  }
  const auto vit = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true});
  const auto vit_plain = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, false});
  const auto unetr = mae::monai_state_dict(*model, {mae::ExportFormat::monai_unetr, true});
  const auto full = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, true});
  const auto full_plain = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, false});
  EXPECT_EQ(vit.size(), 221u);
  EXPECT_EQ(vit_plain.size(), 137u);
  EXPECT_EQ(unetr.size(), 221u);
  EXPECT_EQ(full.size(), 302u);
  EXPECT_EQ(full_plain.size(), 190u);
  for (const auto& [name, v] : unetr) EXPECT_EQ(name.rfind("vit.", 0), 0u) << name;
  EXPECT_EQ(entry(vit, "patch_embedding.position_embeddings").sizes().vec(), Shape({1, 216, 768}));
  EXPECT_EQ(entry(vit, "patch_embedding.patch_embeddings.weight").sizes().vec(), Shape({768, 1, 16, 16, 16}));
  EXPECT_EQ(entry(full, "decoder_pred.weight").sizes().vec(), Shape({4096, 384}));
  int64_t values = 0;
  for (const auto& [name, v] : vit_plain) values += v.numel();
  // conv 768*4096+768, positions 216*768, 12 blocks of 7,085,568, final norm 1536.
  EXPECT_EQ(values, 768 * 4096 + 768 + 216 * 768 + 12 * int64_t{7085568} + 1536);
}

// --- axis order -------------------------------------------------------------------------------

// (B, N, X) tokens in mae3d's raster over the grid (gD, gH, gW) -> MONAI's raster over (gW, gH, gD).
at::Tensor monai_tokens(const at::Tensor& t, const Shape& g) {
  return t.reshape({t.size(0), g[0], g[1], g[2], t.size(2)}).permute({0, 3, 2, 1, 4}).reshape(t.sizes());
}

// (..., P·C) patch voxels in (pD pH pW c) order -> (pW pH pD c) order.
at::Tensor monai_voxels(const at::Tensor& t, const Shape& p, int64_t c) {
  return t.reshape({-1, p[0], p[1], p[2], c}).permute({0, 3, 2, 1, 4}).reshape(t.sizes());
}

// MONAI's perceptron Rearrange "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)" on x's own axes.
at::Tensor rearrange_patches(const at::Tensor& x, const Shape& p) {
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t a = x.size(2) / p[0], b = x.size(3) / p[1], c = x.size(4) / p[2];
  return x.reshape({B, C, a, p[0], b, p[1], c, p[2]})
      .permute({0, 2, 4, 6, 3, 5, 7, 1})
      .reshape({B, a * b * c, p[0] * p[1] * p[2] * C});
}

// One MONAI TransformerBlock (pre-norm, fused qkv split as (3, heads, head_dim), exact GELU).
at::Tensor reference_block(const mae::NamedTensors& sd, const std::string& p, const at::Tensor& x, int64_t heads,
                           bool qkv_bias) {
  const int64_t B = x.size(0), T = x.size(1), E = x.size(2), hd = E / heads;
  auto y = at::layer_norm(x, {E}, entry(sd, p + "norm1.weight"), entry(sd, p + "norm1.bias"), 1e-5);
  auto qkv = at::linear(y, entry(sd, p + "attn.qkv.weight"), qkv_bias ? entry(sd, p + "attn.qkv.bias") : at::Tensor())
                 .view({B, T, 3, heads, hd})
                 .permute({2, 0, 3, 1, 4});
  auto att = at::softmax(at::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(static_cast<double>(hd)), -1);
  auto o = at::matmul(att, qkv[2]).transpose(1, 2).reshape({B, T, E});
  auto h = x + at::linear(o, entry(sd, p + "attn.out_proj.weight"), entry(sd, p + "attn.out_proj.bias"));
  y = at::layer_norm(h, {E}, entry(sd, p + "norm2.weight"), entry(sd, p + "norm2.bias"), 1e-5);
  y = at::gelu(at::linear(y, entry(sd, p + "mlp.linear1.weight"), entry(sd, p + "mlp.linear1.bias")));
  return h + at::linear(y, entry(sd, p + "mlp.linear2.weight"), entry(sd, p + "mlp.linear2.bias"));
}

// MONAI's PatchEmbeddingBlock on x (B, C, s0, s1, s2) with patch `p` in x's axis order: (B, N, E).
at::Tensor reference_embed(const mae::NamedTensors& sd, const at::Tensor& x, const Shape& p, bool conv) {
  at::Tensor h;
  if (conv) {
    const auto w = entry(sd, "patch_embedding.patch_embeddings.weight");
    EXPECT_EQ(w.sizes().slice(2).vec(), p);
    h = at::conv3d(x, w, entry(sd, "patch_embedding.patch_embeddings.bias"), p).flatten(2).transpose(1, 2);
  } else {
    h = at::linear(rearrange_patches(x, p), entry(sd, "patch_embedding.patch_embeddings.1.weight"),
                   entry(sd, "patch_embedding.patch_embeddings.1.bias"));
  }
  return h + entry(sd, "patch_embedding.position_embeddings");
}

// MONAI's ViT (classification=False) from a monai-vit dict: x (B, C, s0, s1, s2) -> (B, N, E).
at::Tensor reference_vit(const mae::NamedTensors& sd, const at::Tensor& x, const Shape& p, const mae::ModelConfig& m) {
  auto h = reference_embed(sd, x, p, m.proj_type == "conv");
  for (int64_t i = 0; i < m.num_layers; ++i) {
    h = reference_block(sd, "blocks." + std::to_string(i) + ".", h, m.num_heads, m.qkv_bias);
  }
  return at::layer_norm(h, {m.hidden_size}, entry(sd, "norm.weight"), entry(sd, "norm.bias"), 1e-5);
}

// MaskedAutoEncoderViT's prediction from a monai-mae dict with the tokens `visible` (B, K) kept:
// (B, N, P·C), as mae3d's forward_visible computes it.
at::Tensor reference_mae(const mae::NamedTensors& sd, const at::Tensor& x, const Shape& p, const mae::ModelConfig& m,
                         const at::Tensor& visible) {
  const int64_t B = x.size(0), E = m.hidden_size, Ed = m.decoder_hidden_size;
  auto tokens = reference_embed(sd, x, p, m.proj_type == "conv");
  const int64_t N = tokens.size(1), K = visible.size(1);
  const auto kept = tokens.gather(1, visible.unsqueeze(-1).expand({B, K, E}));
  auto h = at::cat({entry(sd, "cls_token").expand({B, 1, E}), kept}, 1);
  for (int64_t i = 0; i < m.num_layers; ++i) {
    h = reference_block(sd, "blocks." + std::to_string(i) + ".", h, m.num_heads, m.qkv_bias);
  }
  const std::string norm = "blocks." + std::to_string(m.num_layers) + ".";
  h = at::layer_norm(h, {E}, entry(sd, norm + "weight"), entry(sd, norm + "bias"), 1e-5);
  h = at::linear(h, entry(sd, "decoder_embed.weight"), entry(sd, "decoder_embed.bias"));
  auto full =
      entry(sd, "mask_tokens").expand({B, N, Ed}).scatter(1, visible.unsqueeze(-1).expand({B, K, Ed}), h.slice(1, 1));
  h = at::cat({h.slice(1, 0, 1), full + entry(sd, "decoder_pos_embedding")}, 1);
  for (int64_t j = 0; j < m.decoder_num_layers; ++j) {
    h = reference_block(sd, "decoder_blocks." + std::to_string(j) + ".", h, m.decoder_num_heads, m.qkv_bias);
  }
  const std::string decoder_norm = "decoder_blocks." + std::to_string(m.decoder_num_layers) + ".";
  h = at::layer_norm(h, {Ed}, entry(sd, decoder_norm + "weight"), entry(sd, decoder_norm + "bias"), 1e-5);
  return at::linear(h, entry(sd, "decoder_pred.weight"), entry(sd, "decoder_pred.bias")).slice(1, 1);
}

at::Tensor reverse_axes(const at::Tensor& x) { return x.permute({0, 1, 4, 3, 2}).contiguous(); }

bool close(const at::Tensor& a, const at::Tensor& b) {
  const bool ok = a.sizes() == b.sizes() && at::allclose(a, b, /*rtol=*/1e-5, /*atol=*/1e-5);
  if (!ok && a.sizes() == b.sizes()) ADD_FAILURE() << "max |diff| " << (a - b).abs().max().item<double>();
  return ok;
}

TEST_F(Export, MonaiAxisOrderVitMatchesEncode) {
  for (const std::string proj : {"conv", "perceptron"}) {
    SCOPED_TRACE(proj);
    const auto c = axis_config(proj);
    const Shape grid{4, 3, 2}, patch{4, 8, 16}, patch_monai{16, 8, 4};
    auto model = build(c);
    torch::NoGradGuard g;
    const auto x = at::randn({2, 1, 16, 24, 32});
    const auto ours = model->encode(x);
    ASSERT_EQ(ours.sizes().vec(), Shape({2, 24, 48}));

    const auto monai = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true});
    expect_same_keys(key_list(monai), expected_keys(c.model, mae::ExportFormat::monai_vit, true));
    EXPECT_TRUE(close(reference_vit(monai, reverse_axes(x), patch_monai, c.model), monai_tokens(ours, grid)));

    const auto native = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, true, mae::AxisOrder::native});
    expect_same_keys(key_list(native), expected_keys(c.model, mae::ExportFormat::monai_vit, true, false));
    EXPECT_TRUE(close(reference_vit(native, x, patch, c.model), ours));
    // The order-free weights are the same in both.
    EXPECT_TRUE(entry(monai, "blocks.1.attn.qkv.weight").equal(entry(native, "blocks.1.attn.qkv.weight")));
    EXPECT_TRUE(entry(monai, "norm.bias").equal(entry(native, "norm.bias")));
    EXPECT_FALSE(entry(monai, "patch_embedding.position_embeddings")
                     .equal(entry(native, "patch_embedding.position_embeddings")));
  }
}

TEST_F(Export, MonaiAxisOrderMaeMatchesForward) {
  for (const std::string proj : {"conv", "perceptron"}) {
    SCOPED_TRACE(proj);
    const auto c = axis_config(proj);
    const Shape grid{4, 3, 2}, patch{4, 8, 16}, patch_monai{16, 8, 4};
    auto model = build(c);
    torch::NoGradGuard g;
    const auto x = at::randn({2, 1, 16, 24, 32});
    const auto visible =
        at::stack({at::randperm(24, at::kLong).slice(0, 0, 6), at::randperm(24, at::kLong).slice(0, 0, 6)});
    const auto ours = model->forward_visible(x, visible).pred;
    ASSERT_EQ(ours.sizes().vec(), Shape({2, 24, 512}));

    // Our token t sits at MONAI raster position where_monai[t].
    const auto where_monai = at::argsort(monai_tokens(at::arange(24, at::kLong).view({1, 24, 1}), grid).flatten());
    const auto visible_monai = where_monai.index_select(0, visible.flatten()).view(visible.sizes());
    const auto monai = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, false});
    expect_same_keys(key_list(monai), expected_keys(c.model, mae::ExportFormat::monai_mae, false));
    const auto want = monai_voxels(monai_tokens(ours, grid), patch, 1);
    EXPECT_TRUE(close(reference_mae(monai, reverse_axes(x), patch_monai, c.model, visible_monai), want));
    // That prediction is patch-for-patch MONAI's (p1 p2 p3 c) patchify of the reversed input.
    EXPECT_TRUE(monai_voxels(monai_tokens(model->target(x), grid), patch, 1)
                    .equal(rearrange_patches(reverse_axes(x), patch_monai)));

    const auto native = mae::monai_state_dict(*model, {mae::ExportFormat::monai_mae, false, mae::AxisOrder::native});
    EXPECT_TRUE(close(reference_mae(native, x, patch, c.model, visible), ours));
    EXPECT_TRUE(entry(native, "decoder_pred.weight").equal(param(*model, "decoder_pred.weight")));
  }
}

TEST_F(Export, MonaiAxisOrderDescription) {
  TempDir dir;
  auto c = axis_config("conv");
  c.data.orientation = "RAS";
  auto model = build(c);
  write_checkpoint(dir / "run", c, model);
  mae::export_checkpoint(dir / "run", dir / "m.pt", {mae::ExportFormat::monai_vit, true});
  mae::export_checkpoint(dir / "run", dir / "n.pt", {mae::ExportFormat::monai_vit, true, mae::AxisOrder::native});
  std::ifstream in_m(dir / "m.json"), in_n(dir / "n.json");
  const auto m = nlohmann::json::parse(in_m), n = nlohmann::json::parse(in_n);
  EXPECT_EQ(m["axis_order"]["order"], "monai");
  EXPECT_EQ(n["axis_order"]["order"], "native");
  EXPECT_EQ(m["architecture"]["img_size"], Shape({32, 24, 16}));
  EXPECT_EQ(m["architecture"]["patch_size"], Shape({16, 8, 4}));
  EXPECT_EQ(m["architecture"]["grid"], Shape({2, 3, 4}));
  EXPECT_EQ(m["preprocessing"]["input_size"], Shape({32, 24, 16}));
  EXPECT_EQ(n["architecture"]["img_size"], Shape({16, 24, 32}));
  EXPECT_EQ(n["architecture"]["patch_size"], Shape({4, 8, 16}));
  const auto ctor = m["monai"]["constructor"].get<std::string>();
  EXPECT_NE(ctor.find("img_size=(32, 24, 16), patch_size=(16, 8, 4)"), std::string::npos) << ctor;
  const auto ctor_n = n["monai"]["constructor"].get<std::string>();
  EXPECT_NE(ctor_n.find("img_size=(16, 24, 32), patch_size=(4, 8, 16)"), std::string::npos) << ctor_n;
  // monai: MONAI's arrays after Orientationd, no transpose; native: keeps the note to reverse the axes.
  const auto input = m["axis_order"]["input"].get<std::string>();
  EXPECT_NE(input.find("(B, C, i, j, k)"), std::string::npos) << input;
  EXPECT_NE(input.find("Orientationd(axcodes=\"RAS\")"), std::string::npos) << input;
  EXPECT_NE(n["axis_order"]["input"].get<std::string>().find("reverse the spatial axes"), std::string::npos);
  EXPECT_EQ(m["preprocessing"]["monai_transforms_approximate"].dump().find("Transposed"), std::string::npos);
  EXPECT_NE(n["preprocessing"]["monai_transforms_approximate"].dump().find("Transposed"), std::string::npos);
  EXPECT_NE(m["monai"]["load"].get<std::string>().find(", i, j, k)"), std::string::npos);
  const auto t = mae::load_tensor_dict(dir / "m.pt");
  EXPECT_EQ(entry(t, "patch_embedding.patch_embeddings.weight").sizes().vec(), Shape({48, 1, 16, 8, 4}));
}

// --- UNETR ------------------------------------------------------------------------------------

TEST_F(Export, UnetrRefusesWhatItCannotHold) {
  auto six = vitb_config();
  six.model.num_layers = 6;
  auto msg = message_of<mae::ConfigError>([&] { mae::check_unetr_compatible(mae::model_options_from(six.model)); });
  EXPECT_NE(msg.find("monai-unetr"), std::string::npos) << msg;
  EXPECT_NE(msg.find("num_layers = 6"), std::string::npos) << msg;

  auto p8 = vitb_config();
  p8.model.patch_size = {8, 8, 8};
  msg = message_of<mae::ConfigError>([&] { mae::check_unetr_compatible(mae::model_options_from(p8.model)); });
  EXPECT_NE(msg.find("patch_size = (8, 8, 8)"), std::string::npos) << msg;

  auto two_d = small_config();
  two_d.model.img_size = {64, 64};
  two_d.model.patch_size = {16, 16};
  two_d.model.num_layers = 12;
  msg = message_of<mae::ConfigError>([&] { mae::check_unetr_compatible(mae::model_options_from(two_d.model)); });
  EXPECT_NE(msg.find("2D"), std::string::npos) << msg;

  auto small = build(small_config());
  EXPECT_THROW(mae::monai_state_dict(*small, {mae::ExportFormat::monai_unetr, true}), mae::ConfigError);
  EXPECT_NO_THROW(mae::check_unetr_compatible(mae::model_options_from(vitb_config().model)));
}

TEST_F(Export, UnetrRefusalWritesNothing) {
  TempDir dir;
  auto c = small_config();
  auto model = build(c);
  write_checkpoint(dir / "run", c, model);
  EXPECT_THROW(mae::export_checkpoint(dir / "run", dir / "u.pt", {mae::ExportFormat::monai_unetr, true}),
               mae::ConfigError);
  EXPECT_FALSE(fs::exists(dir / "u.pt"));
  EXPECT_FALSE(fs::exists(dir / "u.json"));
}

// --- files ------------------------------------------------------------------------------------

TEST_F(Export, TensorFileRoundTrip) {
  TempDir dir;
  const mae::NamedTensors in{{"b", at::randn({2, 3})},
                             {"a", at::arange(6, at::kLong).view({3, 2})},
                             {"c", at::randn({4}, at::kDouble)},
                             {"t", at::randn({3, 4}).t()}};
  mae::save_tensor_dict(in, dir / "x.pt");
  // No TorchScript type tag: torch.load's weights_only mode (PyTorch >= 2.6's default) refuses
  // torch.jit._pickle.restore_type_tag. The archive stores data.pkl uncompressed.
  {
    std::ifstream file(dir / "x.pt", std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    EXPECT_NE(bytes.find("_rebuild_tensor_v2"), std::string::npos);
    EXPECT_EQ(bytes.find("restore_type_tag"), std::string::npos);
    EXPECT_EQ(bytes.find("torch.jit"), std::string::npos);
  }
  const auto out = mae::load_tensor_dict(dir / "x.pt");
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[0].first, "b");
  EXPECT_EQ(out[1].first, "a");
  EXPECT_TRUE(out[0].second.equal(in[0].second));
  EXPECT_EQ(out[1].second.scalar_type(), at::kLong);
  EXPECT_TRUE(out[1].second.equal(in[1].second));
  EXPECT_EQ(out[2].second.scalar_type(), at::kFloat);
  EXPECT_TRUE(out[3].second.equal(in[3].second));
  EXPECT_TRUE(out[3].second.is_contiguous());
  EXPECT_THROW(mae::save_tensor_dict({{"a", at::ones({1})}, {"a", at::ones({1})}}, dir / "y.pt"), mae::Error);
  // A view is written with its own storage, and two entries never come back sharing one.
  const auto big = at::randn({100, 10});
  mae::save_tensor_dict({{"view", big.narrow(0, 10, 2)}, {"same1", big}, {"same2", big}}, dir / "v.pt");
  const auto back = mae::load_tensor_dict(dir / "v.pt");
  EXPECT_TRUE(back[0].second.equal(big.narrow(0, 10, 2)));
  EXPECT_EQ(back[0].second.storage().nbytes(), 2u * 10 * sizeof(float));
  EXPECT_TRUE(back[1].second.equal(big) && back[2].second.equal(big));
  EXPECT_NE(back[1].second.data_ptr(), back[2].second.data_ptr());
  fs::remove(dir / "v.pt");
  // No temporary files stay behind.
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir.path)) files += e.is_regular_file();
  EXPECT_EQ(files, 1);
  EXPECT_EQ(mae::description_path("/a/b/model.pt"), "/a/b/model.json");
  EXPECT_EQ(mae::description_path("/a/b/model.bin"), "/a/b/model.bin.json");
}

TEST_F(Export, ExportCheckpointWritesFileAndDescription) {
  TempDir dir;
  auto c = small_config();
  c.data.spacing_mm = std::array<double, 3>{1.5, 1.5, 2.0};
  c.data.intensity.mode = "ct_window";
  c.data.foreground_threshold = 0.0;
  auto model = build(c);
  write_checkpoint(dir / "run", c, model, 42);
  const auto r = mae::export_checkpoint(dir / "run", dir / "enc.pt", {mae::ExportFormat::monai_vit, true});
  EXPECT_EQ(r.json_path, dir / "enc.json");
  const auto t = mae::load_tensor_dict(dir / "enc.pt");
  expect_same_keys(key_list(t), expected_keys(c.model, mae::ExportFormat::monai_vit, true));
  EXPECT_TRUE(entry(t, "blocks.1.mlp.linear2.weight").equal(param(*model, "blocks.1.mlp.linear2.weight")));
  EXPECT_EQ(r.num_tensors, static_cast<int64_t>(t.size()));

  std::ifstream in(r.json_path);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "monai-vit");
  EXPECT_EQ(j["checkpoint"]["step"], 42);
  EXPECT_EQ(j["num_tensors"], t.size());
  EXPECT_EQ(j["tensors"].size(), t.size());
  EXPECT_EQ(j["architecture"]["num_layers"], 2);
  EXPECT_EQ(j["architecture"]["patch_size"], Shape({8, 8, 8}));
  EXPECT_EQ(j["preprocessing"]["intensity"]["mode"], "ct_window");
  EXPECT_EQ(j["preprocessing"]["spacing_mm"], std::vector<double>({1.5, 1.5, 2.0}));
  EXPECT_EQ(j["preprocessing"]["foreground_threshold"], 0.0);
  EXPECT_TRUE(j["cross_attention_keys"]["included"].get<bool>());
  const auto transforms = j["preprocessing"]["monai_transforms_approximate"].dump();
  EXPECT_NE(transforms.find("a_min=-175.0, a_max=250.0"), std::string::npos) << transforms;
  EXPECT_NE(transforms.find("pixdim=(1.5, 1.5, 2.0)"), std::string::npos) << transforms;
  EXPECT_EQ(j["monai"]["constructor"],
            "ViT(in_channels=1, img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, "
            "num_layers=2, num_heads=4, proj_type=\"conv\", pos_embed_type=\"sincos\", classification=False, "
            "dropout_rate=0.0, spatial_dims=3, qkv_bias=False)");
  EXPECT_NE(j["monai"]["load"].get<std::string>().find("strict=True"), std::string::npos);

  // The MAE description carries the decoder and the MaskedAutoEncoderViT call.
  mae::export_checkpoint(dir / "run", dir / "full.pt", {mae::ExportFormat::monai_mae, false});
  std::ifstream in2(dir / "full.json");
  const auto j2 = nlohmann::json::parse(in2);
  EXPECT_EQ(j2["architecture"]["decoder_hidden_size"], 24);
  EXPECT_EQ(j2["monai"]["constructor"].get<std::string>().rfind("MaskedAutoEncoderViT(in_channels=1, ", 0), 0u);
  EXPECT_FALSE(j2["monai"]["strict"].get<bool>());
  EXPECT_EQ(j2["monai"]["min_version"], "1.3");
  EXPECT_EQ(j2["cross_attention_keys"]["value"], "false");
  EXPECT_NE(j2["notes"].dump().find("blocks.2 and decoder_blocks.1"), std::string::npos) << j2["notes"].dump();

  // The cross-attention layout is recorded with the MONAI releases it matches key for key.
  EXPECT_EQ(j["monai"]["min_version"], "1.4");
  EXPECT_EQ(j["monai"]["exact_versions"], "1.4 - 1.5");
  EXPECT_EQ(j["cross_attention_keys"]["value"], "true");
  EXPECT_TRUE(j["cross_attention_keys"]["linears"].get<bool>());
  mae::ExportOptions norm_only{mae::ExportFormat::monai_vit};
  norm_only.set_cross_attention(mae::CrossAttentionKeys::norm);
  mae::export_checkpoint(dir / "run", dir / "norm.pt", norm_only);
  const auto j3 = nlohmann::json::parse(std::ifstream(dir / "norm.json"));
  EXPECT_EQ(j3["monai"]["min_version"], "1.6");
  EXPECT_EQ(j3["monai"]["exact_versions"], ">= 1.6");
  EXPECT_TRUE(j3["monai"]["strict"].get<bool>());
  EXPECT_EQ(j3["cross_attention_keys"]["value"], "norm");
  EXPECT_TRUE(j3["cross_attention_keys"]["included"].get<bool>());
  EXPECT_FALSE(j3["cross_attention_keys"]["linears"].get<bool>());
  EXPECT_EQ(j3["num_tensors"], 3 + 2 * 13 + 2);  // no qkv bias: 11 + 2 per block
}

TEST_F(Export, UnetrDescription) {
  auto o = mae::model_options_from(vitb_config().model);
  EXPECT_EQ(mae::monai_constructor(o, mae::ExportFormat::monai_unetr),
            "UNETR(in_channels=1, out_channels=num_classes, img_size=(96, 96, 96), feature_size=16, "
            "hidden_size=768, mlp_dim=3072, num_heads=12, proj_type=\"conv\", norm_name=\"instance\", "
            "conv_block=True, res_block=True, dropout_rate=0.0, spatial_dims=3, qkv_bias=False)");
}

// --- errors -----------------------------------------------------------------------------------

TEST_F(Export, Errors) {
  TempDir dir;
  auto msg = message_of<mae::CheckpointError>([&] { mae::export_checkpoint(dir / "nope", dir / "x.pt", {}); });
  EXPECT_NE(msg.find(dir / "nope"), std::string::npos) << msg;

  fs::create_directories(dir / "empty_run");
  EXPECT_THROW(mae::export_checkpoint(dir / "empty_run", dir / "x.pt", {}), mae::CheckpointError);

  auto c = small_config();
  auto model = build(c);
  const auto ckpt = write_checkpoint(dir / "run", c, model);
  msg = message_of<mae::IoError>([&] { mae::export_checkpoint(ckpt, dir / "no/such/folder/x.pt", {}); });
  EXPECT_NE(msg.find("no/such/folder/x.pt"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--out"), std::string::npos) << msg;

  // A damaged model.pt is a CheckpointError naming the file.
  std::ofstream(fs::path(ckpt) / "model.pt", std::ios::trunc) << "not a model";
  msg = message_of<mae::CheckpointError>([&] { mae::export_checkpoint(ckpt, dir / "x.pt", {}); });
  EXPECT_NE(msg.find("model.pt"), std::string::npos) << msg;

  msg = message_of<mae::InputError>(
      [&] { mae::export_features(dir / "run", dir / "missing.nii.gz", dir / "f.pt", 0.25); });
  EXPECT_NE(msg.find("missing.nii.gz"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "x.pt"));
}

// --- features ---------------------------------------------------------------------------------

TEST_F(Export, EncodeVolumeMatchesEncodePerWindow) {
  auto model = build(small_config());
  const auto volume = at::randn({1, 40, 36, 33});
  const auto f = mae::encode_volume(*model, volume, 0.25);
  // Windows of 32 with stride 24: D 40 -> {0, 8}, H 36 -> {0, 4}, W 33 -> {0, 1}.
  ASSERT_EQ(f.windows.sizes().vec(), Shape({8, 1, 32, 32, 32}));
  ASSERT_EQ(f.origins.sizes().vec(), Shape({8, 3}));
  EXPECT_EQ(f.origins.scalar_type(), at::kLong);
  ASSERT_EQ(f.tokens.sizes().vec(), Shape({8, 64, 48}));
  ASSERT_EQ(f.pooled.sizes().vec(), Shape({48}));
  EXPECT_EQ(f.origins[7][0].item<int64_t>(), 8);
  EXPECT_EQ(f.origins[7][1].item<int64_t>(), 4);
  EXPECT_EQ(f.origins[7][2].item<int64_t>(), 1);
  torch::NoGradGuard g;
  for (int64_t i = 0; i < 8; ++i) {
    const auto o = f.origins[i];
    const auto crop = volume.narrow(1, o[0].item<int64_t>(), 32)
                          .narrow(2, o[1].item<int64_t>(), 32)
                          .narrow(3, o[2].item<int64_t>(), 32);
    EXPECT_TRUE(f.windows[i].equal(crop)) << i;
    // Batched and single-window matrix products may round differently (the BLAS picks its kernel by
    // shape): about 1e-5 after the final LayerNorm on AVX2 OpenBLAS.
    const auto single = model->encode(crop.unsqueeze(0))[0];
    EXPECT_TRUE(at::allclose(f.tokens[i], single, 1e-4, 1e-5))
        << i << ": max difference " << (f.tokens[i] - single).abs().max().item<double>();
  }
  EXPECT_TRUE(at::allclose(f.pooled, f.tokens.mean(std::vector<int64_t>{0, 1})));
  EXPECT_FALSE(f.tokens.requires_grad());

  const auto small_msg = message_of<mae::InputError>([&] {
    mae::encode_volume(*model, at::randn({1, 40, 20, 40}), 0.25);
  });
  EXPECT_NE(small_msg.find("20 < 32"), std::string::npos) << small_msg;
  EXPECT_THROW(mae::encode_volume(*model, at::randn({2, 40, 40, 40}), 0.25), mae::InputError);
  EXPECT_THROW(mae::encode_volume(*model, volume, 1.0), mae::ConfigError);
}

TEST_F(Export, FeaturesInBothAxisOrders) {
  TempDir dir;
  auto c = axis_config("conv");
  c.data.intensity.mode = "zscore_nonzero";
  auto model = build(c);
  write_checkpoint(dir / "run", c, model);
  mae::Volume v;
  v.data = (at::rand({1, 34, 40, 40}) * 100).contiguous();
  v.spacing = {1.0, 1.0, 1.0};
  mae::write_volume(v, dir / "vol.nii.gz");
  mae::export_features(dir / "run", dir / "vol.nii.gz", dir / "m.pt", 0.5);
  mae::export_features(dir / "run", dir / "vol.nii.gz", dir / "n.pt", 0.5, mae::AxisOrder::native);
  const auto m = mae::load_tensor_dict(dir / "m.pt"), n = mae::load_tensor_dict(dir / "n.pt");
  const auto wm = entry(m, "windows"), wn = entry(n, "windows");
  const int64_t W = wn.size(0);
  EXPECT_GT(W, 1);
  EXPECT_EQ(wn.sizes().vec(), Shape({W, 1, 16, 24, 32}));
  EXPECT_EQ(wm.sizes().vec(), Shape({W, 1, 32, 24, 16}));
  EXPECT_TRUE(wm.equal(reverse_axes(wn)));
  EXPECT_TRUE(entry(m, "origins").equal(entry(n, "origins").flip({1})));
  EXPECT_TRUE(entry(m, "tokens").equal(monai_tokens(entry(n, "tokens"), {4, 3, 2})));
  EXPECT_TRUE(entry(m, "pooled").equal(entry(n, "pooled")));
  // A ViT exported in the same order reproduces each file's tokens from its windows.
  torch::NoGradGuard g;
  const auto vit_m = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, false});
  const auto vit_n = mae::monai_state_dict(*model, {mae::ExportFormat::monai_vit, false, mae::AxisOrder::native});
  EXPECT_TRUE(close(reference_vit(vit_m, wm, {16, 8, 4}, c.model), entry(m, "tokens")));
  EXPECT_TRUE(close(reference_vit(vit_n, wn, {4, 8, 16}, c.model), entry(n, "tokens")));
  std::ifstream in_m(dir / "m.json"), in_n(dir / "n.json");
  const auto jm = nlohmann::json::parse(in_m), jn = nlohmann::json::parse(in_n);
  EXPECT_EQ(jm["axis_order"]["order"], "monai");
  EXPECT_EQ(jn["axis_order"]["order"], "native");
  EXPECT_EQ(jm["grid"], Shape({2, 3, 4}));
  EXPECT_EQ(jn["grid"], Shape({4, 3, 2}));
  EXPECT_EQ(jm["shapes"]["windows"], Shape({W, 1, 32, 24, 16}));
  EXPECT_EQ(jm["preprocessed"]["shape_cijk"], Shape({1, 40, 40, 34}));
}

TEST_F(Export, FeaturesFileFromVolume) {
  TempDir dir;
  auto c = small_config();
  c.data.intensity.mode = "zscore_nonzero";
  auto model = build(c);
  write_checkpoint(dir / "run", c, model);
  mae::Volume v;
  v.data = (at::rand({1, 34, 40, 32}) * 100).contiguous();
  v.spacing = {1.0, 1.0, 1.0};
  mae::write_volume(v, dir / "vol.nii.gz");

  const auto r = mae::export_features(dir / "run", dir / "vol.nii.gz", dir / "feat.pt", 0.5);
  EXPECT_EQ(r.json_path, dir / "feat.json");
  const auto t = mae::load_tensor_dict(dir / "feat.pt");
  ASSERT_EQ(t.size(), 4u);
  EXPECT_EQ(t[0].first, "windows");
  EXPECT_EQ(t[1].first, "origins");
  EXPECT_EQ(t[2].first, "tokens");
  EXPECT_EQ(t[3].first, "pooled");
  const auto windows = t[0].second, tokens = t[2].second;
  // Stride 16: D 34 -> {0, 2}, H 40 -> {0, 8}, W 32 -> {0}.
  EXPECT_EQ(windows.sizes().vec(), Shape({4, 1, 32, 32, 32}));
  EXPECT_EQ(t[1].second.scalar_type(), at::kLong);
  EXPECT_EQ(tokens.sizes().vec(), Shape({4, 64, 48}));
  EXPECT_EQ(t[3].second.sizes().vec(), Shape({48}));
  // Preprocessed as training did: z-scored over nonzero voxels, so the windows are not the raw values.
  EXPECT_LT(windows.abs().max().item<float>(), 10.0f);
  torch::NoGradGuard g;
  // MONAI's axis order by default: windows (W, C, i, j, k), tokens in the (i, j, k) raster.
  EXPECT_TRUE(at::allclose(tokens, monai_tokens(model->encode(reverse_axes(windows)), {4, 4, 4}), 1e-5, 1e-6));
  std::ifstream in(r.json_path);
  const auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["shapes"]["tokens"], Shape({4, 64, 48}));
  EXPECT_EQ(j["checkpoint"]["step"], 7);
  EXPECT_EQ(j["preprocessing"]["intensity"]["mode"], "zscore_nonzero");
  EXPECT_EQ(j["axis_order"]["order"], "monai");

  // A volume smaller than the window is an InputError giving both sizes.
  v.data = at::rand({1, 20, 40, 40});
  mae::write_volume(v, dir / "small.nii.gz");
  EXPECT_THROW(mae::export_features(dir / "run", dir / "small.nii.gz", dir / "f2.pt", 0.25), mae::InputError);
  EXPECT_FALSE(fs::exists(dir / "f2.pt"));
}

}  // namespace

namespace {

// --- checkpoints that must not be exported silently --------------------------------------------

TEST_F(Export, DivergedCheckpointIsRefusedUnlessAllowed) {
  TempDir dir;
  auto c = axis_config("conv");
  c.data.intensity.mode = "zscore_nonzero";
  auto model = build(c);
  mae::CheckpointInfo info;
  info.step = 3;
  info.config = mae::config_to_json(c);
  info.diverged = true;
  info.diverged_reason = "the loss was not finite (nan) at step 4";
  const auto ckpt = mae::save_checkpoint(dir / "run", info, *model, nullptr, {});
  auto msg = message_of<mae::CheckpointError>([&] { mae::export_checkpoint(ckpt, dir / "x.pt", {}); });
  for (const char* part : {"diverged_step_00000003", "marked diverged", "not finite", "--allow-diverged"}) {
    EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
  EXPECT_FALSE(fs::exists(dir / "x.pt"));
  mae::Volume v;
  v.data = (at::rand({1, 34, 40, 40}) * 100).contiguous();
  mae::write_volume(v, dir / "vol.nii.gz");
  msg = message_of<mae::CheckpointError>([&] { mae::export_features(ckpt, dir / "vol.nii.gz", dir / "f.pt", 0.5); });
  EXPECT_NE(msg.find("--allow-diverged"), std::string::npos) << msg;

  mae::ExportOptions allow;
  allow.allow_diverged = true;
  mae::export_checkpoint(ckpt, dir / "x.pt", allow);
  const auto j = nlohmann::json::parse(std::ifstream(dir / "x.json"));
  EXPECT_EQ(j["checkpoint"]["diverged"], true);
  EXPECT_EQ(j["checkpoint"]["diverged_reason"], info.diverged_reason);
  EXPECT_NO_THROW(mae::export_features(ckpt, dir / "vol.nii.gz", dir / "f.pt", 0.5, mae::AxisOrder::monai,
                                       /*allow_diverged=*/true));
}

TEST_F(Export, WeightsOfAnotherArchitectureThanTheConfigAreRefused) {
  TempDir dir;
  auto c = small_config();
  auto wide_config = c;
  wide_config.model.hidden_size = 96;
  auto wide = build(wide_config);
  const auto ckpt = write_checkpoint(dir / "run", c, wide);  // config.json says 48, model.pt holds 96
  const auto msg = message_of<mae::CheckpointError>([&] { mae::export_checkpoint(ckpt, dir / "x.pt", {}); });
  for (const char* part : {"model.pt", "[1, 1, 96]", "[1, 1, 48]"}) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(dir / "x.pt"));
}

}  // namespace
