// Tests of MaskedAutoencoder: shapes over a table of configurations, argument checks, MONAI
// parameter names, initialisation, agreement with a plain re-implementation of MONAI's forward
// pass, and that a small model can overfit one volume.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <map>
#include <string>

#include "core/compat.h"
#include "core/error.h"
#include "model/flops.h"
#include "model/mae.h"
#include "model/ops.h"

namespace {

class Model : public ::testing::Test {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    torch::manual_seed(0);
  }
};

mae::MaskedAutoencoderOptions small3d() {
  return mae::MaskedAutoencoderOptions(1, {16, 16, 16}, {4, 4, 4})
      .hidden_size(48)
      .mlp_dim(96)
      .num_layers(2)
      .num_heads(4)
      .decoder_hidden_size(24)
      .decoder_mlp_dim(48)
      .decoder_num_layers(1)
      .decoder_num_heads(4);
}

// --- shape table (issue: 2D/3D × sincos/learnable × conv/perceptron × 96/128) ---------------------

struct ShapeCase {
  int dims;
  std::string pos;
  std::string proj;
  int64_t img;
};

// Readable parameter in test listings (ctest shows it).
void PrintTo(const ShapeCase& c, std::ostream* os) { *os << c.dims << "D " << c.pos << " " << c.proj << " " << c.img; }

class ShapeTable : public ::testing::TestWithParam<ShapeCase> {
 protected:
  void SetUp() override {
    at::set_num_threads(1);
    torch::manual_seed(0);
  }
};

TEST_P(ShapeTable, PredAndMaskHaveTheContractShapes) {
  const auto c = GetParam();
  std::vector<int64_t> img(c.dims, c.img), patch(c.dims, 16);
  auto opts = mae::MaskedAutoencoderOptions(4, img, patch)
                  .hidden_size(768)
                  .mlp_dim(3072)
                  .num_layers(4)
                  .num_heads(12)
                  .decoder_hidden_size(384)
                  .decoder_mlp_dim(512)
                  .decoder_num_layers(4)
                  .decoder_num_heads(16)
                  .masking_ratio(0.5)
                  .pos_embed_type(c.pos)
                  .decoder_pos_embed_type(c.pos)
                  .proj_type(c.proj);
  mae::MaskedAutoencoder model(opts);
  std::vector<int64_t> shape{2, 4};
  shape.insert(shape.end(), img.begin(), img.end());
  torch::NoGradGuard no_grad;
  auto out = model->forward(torch::randn(shape));
  int64_t n = 1, pdim = 4;
  for (int i = 0; i < c.dims; ++i) {
    n *= c.img / 16;
    pdim *= 16;
  }
  EXPECT_EQ(out.pred.sizes(), (std::vector<int64_t>{2, n, pdim}));
  EXPECT_EQ(out.mask.sizes(), (std::vector<int64_t>{2, n}));
  EXPECT_EQ(out.mask.sum().item<float>(), static_cast<float>(2 * (n - n / 2)));
  EXPECT_TRUE(torch::isfinite(out.pred).all().item<bool>());
}

std::vector<ShapeCase> shape_cases() {
  std::vector<ShapeCase> cases;
  for (int dims : {2, 3})
    for (const char* pos : {"sincos", "learnable"})
      for (const char* proj : {"conv", "perceptron"})
        for (int64_t img : {96, 128}) cases.push_back({dims, pos, proj, img});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Contract, ShapeTable, ::testing::ValuesIn(shape_cases()),
                         [](const ::testing::TestParamInfo<ShapeCase>& info) {
                           const auto& c = info.param;
                           return std::to_string(c.dims) + "d_" + c.pos + "_" + c.proj + "_" + std::to_string(c.img);
                         });

// --- bad arguments -----------------------------------------------------------------------------------

struct BadCase {
  std::string name;
  std::function<void(mae::MaskedAutoencoderOptions&)> edit;
  std::string needle;  // the message must name the option
};

TEST_F(Model, BadArgumentsThrowNamingTheOption) {
  const std::vector<BadCase> cases = {
      {"dropout high", [](auto& o) { o.dropout_rate(1.5); }, "dropout_rate"},
      {"dropout negative", [](auto& o) { o.dropout_rate(-0.1); }, "dropout_rate"},
      {"pos type", [](auto& o) { o.pos_embed_type("fourier"); }, "pos_embed_type"},
      {"decoder pos type", [](auto& o) { o.decoder_pos_embed_type("x"); }, "decoder_pos_embed_type"},
      {"proj type", [](auto& o) { o.proj_type("mlp"); }, "proj_type"},
      {"patch larger",
       [](auto& o) {
         o.patch_size({32, 4, 4});
       },
       "patch_size"},
      {"patch not dividing",
       [](auto& o) {
         o.patch_size({5, 4, 4});
       },
       "patch_size"},
      {"heads", [](auto& o) { o.num_heads(5); }, "num_heads"},
      {"decoder heads", [](auto& o) { o.decoder_num_heads(5); }, "decoder_num_heads"},
      {"sincos width", [](auto& o) { o.hidden_size(44).num_heads(4); }, "hidden_size"},
      {"decoder sincos width", [](auto& o) { o.decoder_hidden_size(28).decoder_num_heads(4); }, "decoder_hidden_size"},
      {"ratio zero", [](auto& o) { o.masking_ratio(0.0); }, "masking_ratio"},
      {"ratio one", [](auto& o) { o.masking_ratio(1.0); }, "masking_ratio"},
      {"ratio leaves none visible", [](auto& o) { o.masking_ratio(0.999); }, "masking_ratio"},
      {"dims mismatch",
       [](auto& o) {
         o.patch_size({4, 4});
       },
       "patch_size"},
      {"1D", [](auto& o) { o.img_size({16}).patch_size({4}); }, "img_size"},
      {"channels", [](auto& o) { o.in_channels(0); }, "in_channels"},
  };
  for (const auto& c : cases) {
    auto o = small3d();
    c.edit(o);
    try {
      mae::MaskedAutoencoder model(o);
      ADD_FAILURE() << c.name << ": no error";
    } catch (const mae::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos) << c.name << ": " << e.what();
    }
  }
  // Learnable positions have no width constraint.
  EXPECT_NO_THROW(mae::MaskedAutoencoder(small3d().hidden_size(44).num_heads(4).pos_embed_type("learnable")));
}

TEST_F(Model, WrongInputShapeOrChannelsIsAnError) {
  mae::MaskedAutoencoder model(small3d());
  EXPECT_THROW(model->forward(torch::randn({1, 2, 16, 16, 16})), mae::InputError);
  EXPECT_THROW(model->forward(torch::randn({1, 1, 16, 16, 12})), mae::InputError);
  EXPECT_THROW(model->forward(torch::randn({1, 16, 16, 16})), mae::InputError);
  EXPECT_THROW(model->forward(torch::randn({1, 1, 16, 16, 16}), 0.99), mae::ConfigError);
}

// --- parameter names ---------------------------------------------------------------------------------

TEST_F(Model, ParameterNamesAndShapesFollowMonai) {
  auto opts = mae::MaskedAutoencoderOptions(1, {96, 96, 96}, {16, 16, 16})
                  .hidden_size(768)
                  .mlp_dim(3072)
                  .num_layers(2)
                  .num_heads(12)
                  .decoder_hidden_size(384)
                  .decoder_mlp_dim(512)
                  .decoder_num_layers(1)
                  .decoder_num_heads(12);
  mae::MaskedAutoencoder model(opts);
  std::map<std::string, std::vector<int64_t>> want = {
      {"cls_token", {1, 1, 768}},
      {"mask_tokens", {1, 1, 384}},
      {"patch_embedding.patch_embeddings.weight", {768, 1, 16, 16, 16}},
      {"patch_embedding.patch_embeddings.bias", {768}},
      {"patch_embedding.position_embeddings", {1, 216, 768}},
      {"blocks.2.weight", {768}},
      {"blocks.2.bias", {768}},
      {"decoder_embed.weight", {384, 768}},
      {"decoder_embed.bias", {384}},
      {"decoder_pos_embedding", {1, 216, 384}},
      {"decoder_blocks.1.weight", {384}},
      {"decoder_blocks.1.bias", {384}},
      {"decoder_pred.weight", {4096, 384}},
      {"decoder_pred.bias", {4096}},
  };
  auto add_block = [&](const std::string& p, int64_t e, int64_t mlp) {
    want[p + "norm1.weight"] = {e};
    want[p + "norm1.bias"] = {e};
    want[p + "attn.qkv.weight"] = {3 * e, e};
    want[p + "attn.out_proj.weight"] = {e, e};
    want[p + "attn.out_proj.bias"] = {e};
    want[p + "norm2.weight"] = {e};
    want[p + "norm2.bias"] = {e};
    want[p + "mlp.linear1.weight"] = {mlp, e};
    want[p + "mlp.linear1.bias"] = {mlp};
    want[p + "mlp.linear2.weight"] = {e, mlp};
    want[p + "mlp.linear2.bias"] = {e};
  };
  add_block("blocks.0.", 768, 3072);
  add_block("blocks.1.", 768, 3072);
  add_block("decoder_blocks.0.", 384, 512);
  std::map<std::string, std::vector<int64_t>> got;
  for (const auto& p : model->named_parameters()) got[p.key()] = p.value().sizes().vec();
  EXPECT_EQ(got, want);

  // Perceptron projection and qkv bias change exactly the names MONAI changes.
  mae::MaskedAutoencoder perceptron(small3d().proj_type("perceptron").qkv_bias(true));
  auto params = perceptron->named_parameters();
  EXPECT_NE(params.find("patch_embedding.patch_embeddings.1.weight"), nullptr);
  EXPECT_EQ(params["patch_embedding.patch_embeddings.1.weight"].sizes(), (std::vector<int64_t>{48, 64}));
  EXPECT_NE(params.find("blocks.0.attn.qkv.bias"), nullptr);
  EXPECT_EQ(params.find("patch_embedding.patch_embeddings.weight"), nullptr);
}

TEST_F(Model, InitialisationAndFrozenTables) {
  mae::MaskedAutoencoder model(small3d());
  auto p = model->named_parameters();
  EXPECT_FALSE(p["patch_embedding.position_embeddings"].requires_grad());
  EXPECT_FALSE(p["decoder_pos_embedding"].requires_grad());
  EXPECT_TRUE(torch::allclose(p["patch_embedding.position_embeddings"], mae::sincos_position_table({4, 4, 4}, 48)));
  EXPECT_TRUE(torch::allclose(p["decoder_pos_embedding"], mae::sincos_position_table({4, 4, 4}, 24)));
  EXPECT_EQ(p["blocks.0.norm1.weight"].sum().item<float>(), 48.0f);
  EXPECT_EQ(p["blocks.0.mlp.linear1.bias"].abs().sum().item<float>(), 0.0f);
  // xavier-uniform bound sqrt(6 / (fan_in + fan_out)).
  const float bound = std::sqrt(6.0f / (48 + 96));
  EXPECT_LE(p["blocks.0.mlp.linear1.weight"].abs().max().item<float>(), bound);
  EXPECT_GT(p["blocks.0.mlp.linear1.weight"].abs().max().item<float>(), 0.9f * bound);
  EXPECT_NEAR(p["cls_token"].std().item<float>(), 0.02f, 0.01f);

  // Decay groups: frozen tables left out; biases, norms and tokens undecayed; matrices decayed.
  auto groups = mae::decay_groups(*model);
  int64_t trainable = 0;
  for (const auto& t : model->parameters()) trainable += t.requires_grad() ? 1 : 0;
  EXPECT_EQ(static_cast<int64_t>(groups.first.size() + groups.second.size()), trainable);
  for (const auto& t : groups.first) EXPECT_GE(t.dim(), 2);
  auto has = [](const std::vector<torch::Tensor>& v, const torch::Tensor& t) {
    for (const auto& x : v)
      if (x.is_same(t)) return true;
    return false;
  };
  EXPECT_TRUE(has(groups.second, p["cls_token"]));
  EXPECT_TRUE(has(groups.second, p["mask_tokens"]));
  EXPECT_TRUE(has(groups.first, p["patch_embedding.patch_embeddings.weight"]));
  mae::MaskedAutoencoder learnable(small3d().pos_embed_type("learnable"));
  auto lp = learnable->named_parameters();
  EXPECT_TRUE(has(mae::decay_groups(*learnable).second, lp["patch_embedding.position_embeddings"]));
}

// --- agreement with MONAI's algorithm, written with plain ops --------------------------------------

torch::Tensor ref_block(const std::map<std::string, torch::Tensor>& p, const std::string& pre, torch::Tensor x,
                        int64_t heads) {
  auto ln = [&](const torch::Tensor& t, const std::string& n) {
    return torch::layer_norm(t, {t.size(-1)}, p.at(pre + n + ".weight"), p.at(pre + n + ".bias"), 1e-5);
  };
  const int64_t B = x.size(0), T = x.size(1), E = x.size(2), hd = E / heads;
  auto qkv = torch::linear(ln(x, "norm1"), p.at(pre + "attn.qkv.weight"));
  // MONAI: rearrange "b h (qkv l d) -> qkv b l h d", then einsum and scale after the product.
  qkv = qkv.view({B, T, 3, heads, hd}).permute({2, 0, 3, 1, 4});
  auto att = (torch::einsum("blxd,blyd->blxy", {qkv[0], qkv[1]}) * (1.0 / std::sqrt(double(hd)))).softmax(-1);
  auto o = torch::einsum("bhxy,bhyd->bhxd", {att, qkv[2]}).permute({0, 2, 1, 3}).reshape({B, T, E});
  x = x + torch::linear(o, p.at(pre + "attn.out_proj.weight"), p.at(pre + "attn.out_proj.bias"));
  auto m = torch::gelu(torch::linear(ln(x, "norm2"), p.at(pre + "mlp.linear1.weight"), p.at(pre + "mlp.linear1.bias")));
  return x + torch::linear(m, p.at(pre + "mlp.linear2.weight"), p.at(pre + "mlp.linear2.bias"));
}

TEST_F(Model, ForwardEqualsMonaiAlgorithmOnAllPatchesThenGather) {
  auto opts = small3d().in_channels(2).decoder_pos_embed_type("learnable");
  mae::MaskedAutoencoder model(opts);
  model->eval();
  std::map<std::string, torch::Tensor> p;
  for (const auto& item : model->named_parameters()) p[item.key()] = item.value().detach();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 2, 16, 16, 16});
  auto gen = at::detail::createCPUGenerator(5);
  auto out = model->forward(x, std::nullopt, gen);

  // MONAI: conv over all patches + positions, then keep the selected tokens.
  auto emb =
      torch::conv3d(x, p["patch_embedding.patch_embeddings.weight"], p["patch_embedding.patch_embeddings.bias"], 4)
          .flatten(2)
          .transpose(1, 2) +
      p["patch_embedding.position_embeddings"];
  auto gen2 = at::detail::createCPUGenerator(5);
  auto sel = torch::multinomial(torch::ones({2, 64}), 16, false, gen2);
  ASSERT_TRUE(torch::equal(sel, out.visible));
  auto ar = torch::arange(2).unsqueeze(1);
  auto h = torch::cat({p["cls_token"].expand({2, 1, 48}), emb.index({ar, sel})}, 1);
  for (int i = 0; i < 2; ++i) h = ref_block(p, "blocks." + std::to_string(i) + ".", h, 4);
  h = torch::layer_norm(h, {48}, p["blocks.2.weight"], p["blocks.2.bias"], 1e-5);
  h = torch::linear(h, p["decoder_embed.weight"], p["decoder_embed.bias"]);
  auto full = p["mask_tokens"].repeat({2, 64, 1});
  full.index_put_({ar, sel}, h.slice(1, 1));
  full = full + p["decoder_pos_embedding"];
  h = torch::cat({h.slice(1, 0, 1), full}, 1);
  h = ref_block(p, "decoder_blocks.0.", h, 4);
  h = torch::layer_norm(h, {24}, p["decoder_blocks.1.weight"], p["decoder_blocks.1.bias"], 1e-5);
  auto pred = torch::linear(h, p["decoder_pred.weight"], p["decoder_pred.bias"]).slice(1, 1);
  EXPECT_TRUE(torch::allclose(out.pred, pred, 1e-4, 1e-5)) << (out.pred - pred).abs().max();
  auto mask = torch::ones({2, 64});
  mask.index_put_({ar, sel}, 0);
  EXPECT_TRUE(torch::equal(out.mask, mask));

  // encode(): all patches, no cls token, final norm — MONAI's ViT forward.
  auto e = emb;
  for (int i = 0; i < 2; ++i) e = ref_block(p, "blocks." + std::to_string(i) + ".", e, 4);
  e = torch::layer_norm(e, {48}, p["blocks.2.weight"], p["blocks.2.bias"], 1e-5);
  EXPECT_TRUE(torch::allclose(model->encode(x), e, 1e-4, 1e-5));
}

TEST_F(Model, SameSeedSameOutputAndInitialisationFromGlobalSeed) {
  torch::manual_seed(3);
  mae::MaskedAutoencoder a(small3d());
  torch::manual_seed(3);
  mae::MaskedAutoencoder b(small3d());
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) ASSERT_TRUE(torch::equal(pa[i], pb[i]));
  auto x = torch::randn({2, 1, 16, 16, 16});
  auto ga = at::detail::createCPUGenerator(9), gb = at::detail::createCPUGenerator(9);
  EXPECT_TRUE(torch::equal(a->forward(x, std::nullopt, ga).pred, b->forward(x, std::nullopt, gb).pred));
}

TEST_F(Model, BackwardReachesEveryTrainableParameter) {
  mae::MaskedAutoencoder model(small3d().pos_embed_type("learnable").qkv_bias(true));
  auto x = torch::randn({2, 1, 16, 16, 16});
  auto out = model->forward(x);
  mae::masked_mse_loss(out.pred, model->target(x), out.mask).backward();
  for (const auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<float>(), 0.0f) << p.key();
  }
}

TEST_F(Model, SmallModelOverfitsOneVolume) {
  auto opts = mae::MaskedAutoencoderOptions(1, {16, 16, 16}, {4, 4, 4})
                  .hidden_size(96)
                  .mlp_dim(192)
                  .num_layers(2)
                  .num_heads(4)
                  .decoder_hidden_size(48)
                  .decoder_mlp_dim(96)
                  .decoder_num_layers(1)
                  .decoder_num_heads(4)
                  .masking_ratio(0.5);
  mae::MaskedAutoencoder model(opts);
  // A smooth volume: sums of sinusoids, so masked patches are predictable from visible ones.
  auto g = torch::linspace(0, 3.14159, 16);
  auto x = (torch::sin(g).view({16, 1, 1}) + torch::cos(2 * g).view({1, 16, 1}) + torch::sin(3 * g).view({1, 1, 16}))
               .unsqueeze(0)
               .unsqueeze(0);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0.0));
  auto target = model->target(x);
  auto gen = at::detail::createCPUGenerator(1);
  double first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    optimizer.zero_grad();
    auto out = model->forward(x, std::nullopt, gen);
    auto loss = mae::masked_mse_loss(out.pred, target, out.mask);
    loss.backward();
    optimizer.step();
    if (step == 0) first = loss.item<double>();
    last = loss.item<double>();
  }
  EXPECT_LT(last, first / 10.0) << "first " << first << " last " << last;
}

TEST_F(Model, FlopCountMatchesHandCount) {
  // Preset A: 216 patches, 54 visible.
  auto a = mae::MaskedAutoencoderOptions(1, {96, 96, 96}, {16, 16, 16});
  const double enc_block =
      2.0 * 55 * 768 * 3 * 768 + 4.0 * 55 * 55 * 768 + 2.0 * 55 * 768 * 768 + 4.0 * 55 * 768 * 3072;
  const double dec_block =
      2.0 * 217 * 384 * 3 * 384 + 4.0 * 217 * 217 * 384 + 2.0 * 217 * 384 * 384 + 4.0 * 217 * 384 * 512;
  const double want =
      2.0 * 54 * 4096 * 768 + 12 * enc_block + 2.0 * 55 * 768 * 384 + 4 * dec_block + 2.0 * 216 * 384 * 4096;
  EXPECT_NEAR(mae::forward_flops(a, 1), want, want * 1e-12);
  EXPECT_NEAR(mae::forward_flops(a, 2), 2 * want, want * 1e-12);
}

// --- fused attention (LibTorch 2.x) -----------------------------------------------------------------

TEST_F(Model, FusedAttentionEqualsExplicitSoftmaxPath) {
  if (!mae::compat::kHasFusedAttention)
    GTEST_SKIP() << "LibTorch " TORCH_VERSION " has no scaled_dot_product_attention";
  // The kernel alone, with more tokens than one SIMD block and a head width that is not a power of two.
  auto q = torch::randn({2, 3, 37, 12}), k = torch::randn({2, 3, 37, 12}), v = torch::randn({2, 3, 37, 12});
  auto fused = mae::attention(q, k, v, 0.0, /*fused=*/true);
  auto plain = mae::attention(q, k, v, 0.0, /*fused=*/false);
  EXPECT_LT((fused - plain).abs().max().item<double>(), 1e-5);

  // The whole model, forward and backward, on the same weights and the same visible patches.
  torch::manual_seed(3);
  mae::MaskedAutoencoder a(small3d().fused_attention(true));
  mae::MaskedAutoencoder b(small3d().fused_attention(false));
  {
    torch::NoGradGuard no_grad;
    auto pa = a->named_parameters(), pb = b->named_parameters();
    for (const auto& item : pa) pb[item.key()].copy_(item.value());
  }
  auto x = torch::randn({2, 1, 16, 16, 16});
  auto gen = at::detail::createCPUGenerator(7);
  auto visible = mae::draw_visible(2, 64, 0.75, gen);
  auto oa = a->forward_visible(x, visible), ob = b->forward_visible(x, visible);
  EXPECT_LT((oa.pred - ob.pred).abs().max().item<double>(), 1e-5);
  mae::masked_mse_loss(oa.pred, a->target(x), oa.mask).backward();
  mae::masked_mse_loss(ob.pred, b->target(x), ob.mask).backward();
  auto gb = b->named_parameters();
  for (const auto& item : a->named_parameters()) {
    if (!item.value().requires_grad()) continue;  // frozen sin-cos tables
    const auto& ga = item.value().grad();
    ASSERT_TRUE(ga.defined()) << item.key();
    EXPECT_LT((ga - gb[item.key()].grad()).abs().max().item<double>(), 1e-5 * (1.0 + ga.abs().max().item<double>()))
        << item.key();
  }
}

TEST_F(Model, BatchSlicesWithDropoutComputeWhatTheWholeBatchComputes) {
  // Data-parallel ranks each hold half of a global batch of 4: with dropout, each rank's forward
  // (same weights, same generator state) must equal its rows of one forward over the whole batch.
  for (const bool fused : {true, false}) {
    torch::manual_seed(5);
    mae::MaskedAutoencoder model(small3d().dropout_rate(0.3).fused_attention(fused));
    model->train();
    auto x = torch::randn({4, 1, 16, 16, 16});
    auto gen = at::detail::createCPUGenerator(11);
    auto visible = mae::draw_visible(4, 64, 0.75, gen);
    torch::manual_seed(17);
    const auto whole = model->forward_visible(x, visible).pred;
    std::vector<torch::Tensor> halves;
    for (int64_t r = 0; r < 2; ++r) {
      torch::manual_seed(17);  // every rank's global generator is in the same state
      model->set_batch_slice({4, 2 * r});
      halves.push_back(model->forward_visible(x.narrow(0, 2 * r, 2), visible.narrow(0, 2 * r, 2)).pred);
    }
    model->set_batch_slice({});
    const auto sliced = torch::cat(halves, 0);
    EXPECT_LT((sliced - whole).abs().max().item<double>(), 1e-5) << "fused " << fused;
    // The noise is really there: another generator state gives another output.
    torch::manual_seed(18);
    EXPECT_GT((model->forward_visible(x, visible).pred - whole).abs().max().item<double>(), 1e-3);
  }
  auto t = torch::ones({2, 3});
  EXPECT_THROW(mae::dropout(t, 0.5, {3, 2}), c10::Error);  // rows 2..3 of 3
  EXPECT_TRUE(torch::equal(mae::dropout(t, 1.0), torch::zeros({2, 3})));
}

}  // namespace
