// Helpers of the infer tests; see helpers.h.
#include "helpers.h"

#include <ATen/ATen.h>
#include <unistd.h>

#include <atomic>

#include "run/config.h"
#include "train/trainer.h"

namespace mae::test {

Volume synthetic_volume(int64_t d, int64_t h, int64_t w, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const auto zd = at::arange(d, at::kFloat).view({d, 1, 1});
  const auto zh = at::arange(h, at::kFloat).view({1, h, 1});
  const auto zw = at::arange(w, at::kFloat).view({1, 1, w});
  auto x =
      2.0 + at::sin(zd / 3.0) + at::cos(zh / 4.0) * at::sin(zw / 2.5) + 0.05 * at::randn({d, h, w}, gen, at::kFloat);
  Volume v;
  v.data = x.unsqueeze(0).contiguous();
  v.spacing = {1.0, 1.5, 2.0};
  v.origin = {5.0, -3.0, 10.0};
  v.direction = {0, -1, 0, 1, 0, 0, 0, 0, 1};  // x -> P, y -> R, z -> S
  return v;
}

std::string tiny_config_json(const std::string& volume_path, const std::string& dir, bool norm_pix) {
  nlohmann::json j = {
      {"seed", 1},
      {"device", "cpu"},
      {"threads", 1},
      {"data",
       {{"dataset", volume_path},
        {"orientation", "RAS"},
        {"intensity", {{"mode", "none"}}},
        {"val_fraction", 0.0},
        {"num_samples", 2},
        {"workers", 0},
        {"cache_dir", dir + "/cache"}}},
      {"model",
       {{"in_channels", 1},
        {"img_size", {16, 16, 16}},
        {"patch_size", {4, 4, 4}},
        {"hidden_size", 24},
        {"mlp_dim", 48},
        {"num_layers", 1},
        {"num_heads", 2},
        {"decoder_hidden_size", 24},
        {"decoder_mlp_dim", 48},
        {"decoder_num_layers", 1},
        {"decoder_num_heads", 2},
        {"norm_pix_loss", norm_pix}}},
      {"train",
       {{"batch_size", 2},
        {"max_steps", 3},
        {"lr", 1e-3},
        {"lr_warmup_steps", 1},
        {"log_every", 1},
        {"checkpoint_every", 3},
        {"keep_last", 1}}},
      {"output", {{"dir", dir + "/run"}}},
  };
  return j.dump();
}

std::string train_tiny(const std::string& volume_path, const std::string& dir) {
  const Config config = config_from_json(nlohmann::json::parse(tiny_config_json(volume_path, dir)));
  clear_stop_request();
  const TrainResult r = train(config, TrainOptions{});
  EXPECT_EQ(r.step, 3);
  return config.output.dir;
}

}  // namespace mae::test
