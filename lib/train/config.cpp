#include "train/config.h"

#include <fstream>
#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/json_reader.h"

namespace mae {

namespace {

void read_model(JsonReader r, ModelConfig& m) {
  r.read_range<int64_t>("in_channels", m.in_channels, 1, 64);
  r.read("img_size", m.img_size);
  r.read("patch_size", m.patch_size);
  r.read_range<int64_t>("hidden_size", m.hidden_size, 1, 16384);
  r.read_range<int64_t>("mlp_dim", m.mlp_dim, 1, 65536);
  r.read_range<int64_t>("num_layers", m.num_layers, 1, 256);
  r.read_range<int64_t>("num_heads", m.num_heads, 1, 1024);
  r.read("masking_ratio", m.masking_ratio);
  r.read_range<int64_t>("decoder_hidden_size", m.decoder_hidden_size, 1, 16384);
  r.read_range<int64_t>("decoder_mlp_dim", m.decoder_mlp_dim, 1, 65536);
  r.read_range<int64_t>("decoder_num_layers", m.decoder_num_layers, 1, 256);
  r.read_range<int64_t>("decoder_num_heads", m.decoder_num_heads, 1, 1024);
  r.read("proj_type", m.proj_type);
  r.read("pos_embed_type", m.pos_embed_type);
  r.read("decoder_pos_embed_type", m.decoder_pos_embed_type);
  r.read("dropout_rate", m.dropout_rate);
  r.read("qkv_bias", m.qkv_bias);
  r.read("norm_pix_loss", m.norm_pix_loss);
  r.finish();
  if (m.img_size.size() != 3) {
    throw ConfigError("\"model.img_size\" must have 3 entries (D, H, W): training reads 3D volumes");
  }
  // The model's own checks, surfaced under the config's key names.
  try {
    model_options_from(m).validate();
  } catch (const ConfigError& e) {
    throw ConfigError(std::string("model.") + e.what());
  }
}

void read_train(JsonReader r, TrainConfig& t) {
  r.read_range<int64_t>("batch_size", t.batch_size, 1, 4096);
  r.read_range<int64_t>("max_steps", t.max_steps, 0, int64_t{1} << 40);
  r.read_range<int64_t>("epochs", t.epochs, 0, int64_t{1} << 30);
  if (r.has("lr")) {
    double lr = 0.0;
    r.read_range("lr", lr, 1e-12, 10.0);
    t.lr = lr;
  }
  r.read_range("base_lr", t.base_lr, 1e-12, 10.0);
  r.read_range("lr_min", t.lr_min, 0.0, 10.0);
  r.read_range<int64_t>("lr_warmup_steps", t.lr_warmup_steps, 0, int64_t{1} << 40);
  r.read_range("weight_decay", t.weight_decay, 0.0, 10.0);
  r.read_range("beta1", t.beta1, 0.0, 0.999999);
  r.read_range("beta2", t.beta2, 0.0, 0.999999);
  r.read_range<int64_t>("grad_accum_steps", t.grad_accum_steps, 1, 65536);
  r.read_range("grad_clip_norm", t.grad_clip_norm, 0.0, 1e6);
  r.read_choice("precision", t.precision, {"fp32", "bf16"});
  r.read_range<int64_t>("log_every", t.log_every, 1, int64_t{1} << 40);
  r.read_range<int64_t>("checkpoint_every", t.checkpoint_every, 1, int64_t{1} << 40);
  r.read_range<int64_t>("keep_last", t.keep_last, 1, 1000000);
  r.read_range<int64_t>("val_every", t.val_every, 0, int64_t{1} << 40);
  r.read_choice("on_nonfinite", t.on_nonfinite, {"error", "skip"});
  r.read_range<int64_t>("max_nonfinite", t.max_nonfinite, 1, int64_t{1} << 40);
  r.finish();
  if (t.max_steps == 0 && t.epochs == 0) {
    throw ConfigError("\"train.max_steps\" and \"train.epochs\" are both 0; set one of them");
  }
  if (t.lr && t.lr_min > *t.lr) {
    throw ConfigError("\"train.lr_min\" = " + std::to_string(t.lr_min) +
                      " is larger than \"train.lr\" = " + std::to_string(*t.lr));
  }
}

void check_device(const std::string& device) {
  if (device == "cpu" || device == "cuda" || device == "auto") return;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos) {
    return;
  }
  throw ConfigError("\"device\" = \"" + device + "\" is not allowed; use \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"");
}

nlohmann::json data_to_json(const DataConfig& d) {
  nlohmann::json j;
  j["dataset"] = d.dataset;
  j["val_fraction"] = d.val_fraction;
  j["orientation"] = d.orientation;
  j["spacing_mm"] = d.spacing_mm ? nlohmann::json(*d.spacing_mm) : nlohmann::json();
  j["intensity"] = {{"mode", d.intensity.mode},
                    {"a_min", d.intensity.a_min},
                    {"a_max", d.intensity.a_max},
                    {"b_min", d.intensity.b_min},
                    {"b_max", d.intensity.b_max},
                    {"clip", d.intensity.clip},
                    {"lower_percentile", d.intensity.lower_percentile},
                    {"upper_percentile", d.intensity.upper_percentile}};
  j["foreground_threshold"] = d.foreground_threshold ? nlohmann::json(*d.foreground_threshold) : nlohmann::json();
  j["num_samples"] = d.num_samples;
  j["flip_prob"] = d.flip_prob;
  j["workers"] = d.workers;
  j["prefetch"] = d.prefetch;
  j["cache_dir"] = d.cache_dir;
  j["on_bad_volume"] = d.on_bad_volume;
  j["time_point"] = d.time_point;
  j["fourth_axis_as_channels"] = d.fourth_axis_as_channels;
  return j;
}

}  // namespace

void apply_overrides(nlohmann::json& tree, const std::vector<std::string>& overrides) {
  for (const auto& item : overrides) {
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw ConfigError("--set \"" + item + "\": expected key=value, e.g. --set train.lr=2e-4");
    }
    const std::string key = item.substr(0, eq), text = item.substr(eq + 1);
    nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (value.is_discarded()) value = text;
    nlohmann::json* node = &tree;
    std::stringstream parts(key);
    std::string part, path;
    std::vector<std::string> names;
    while (std::getline(parts, part, '.')) names.push_back(part);
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i].empty()) throw ConfigError("--set \"" + item + "\": empty key segment");
      path += (path.empty() ? "" : ".") + names[i];
      if (i + 1 == names.size()) {
        (*node)[names[i]] = value;
      } else {
        if (!node->contains(names[i]) || (*node)[names[i]].is_null()) (*node)[names[i]] = nlohmann::json::object();
        if (!(*node)[names[i]].is_object())
          throw ConfigError("--set \"" + item + "\": \"" + path + "\" is not a section");
        node = &(*node)[names[i]];
      }
    }
  }
}

Config config_from_json(const nlohmann::json& tree) {
  Config c;
  JsonReader r(tree, "");
  int64_t seed = 0;
  r.read_range<int64_t>("seed", seed, 0, std::numeric_limits<int64_t>::max());
  c.seed = static_cast<uint64_t>(seed);
  r.read("device", c.device);
  check_device(c.device);
  r.read_range("threads", c.threads, 0, 4096);
  {
    auto data = r.child("data");
    c.data = read_data_config(data);
  }
  read_model(r.child("model"), c.model);
  read_train(r.child("train"), c.train);
  {
    auto out = r.child("output");
    out.read("dir", c.output.dir);
    out.finish();
    if (c.output.dir.empty()) throw ConfigError("\"output.dir\" is empty; name the run folder");
  }
  r.finish();
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open the config file");
  nlohmann::json tree;
  try {
    tree = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    std::string what = e.what();
    const auto colon = what.find("parse error");
    throw ConfigError(path + ": not valid JSON: " + (colon == std::string::npos ? what : what.substr(colon)));
  }
  if (!tree.is_object()) throw ConfigError(path + ": the config must be a JSON object");
  apply_overrides(tree, overrides);
  try {
    return config_from_json(tree);
  } catch (const ConfigError& e) {
    throw ConfigError(path + ": " + e.what());
  }
}

nlohmann::json config_to_json(const Config& c) {
  const auto& m = c.model;
  const auto& t = c.train;
  nlohmann::json j;
  j["seed"] = c.seed;
  j["device"] = c.device;
  j["threads"] = c.threads;
  j["data"] = data_to_json(c.data);
  j["model"] = {{"in_channels", m.in_channels},
                {"img_size", m.img_size},
                {"patch_size", m.patch_size},
                {"hidden_size", m.hidden_size},
                {"mlp_dim", m.mlp_dim},
                {"num_layers", m.num_layers},
                {"num_heads", m.num_heads},
                {"masking_ratio", m.masking_ratio},
                {"decoder_hidden_size", m.decoder_hidden_size},
                {"decoder_mlp_dim", m.decoder_mlp_dim},
                {"decoder_num_layers", m.decoder_num_layers},
                {"decoder_num_heads", m.decoder_num_heads},
                {"proj_type", m.proj_type},
                {"pos_embed_type", m.pos_embed_type},
                {"decoder_pos_embed_type", m.decoder_pos_embed_type},
                {"dropout_rate", m.dropout_rate},
                {"qkv_bias", m.qkv_bias},
                {"norm_pix_loss", m.norm_pix_loss}};
  j["train"] = {{"batch_size", t.batch_size},
                {"max_steps", t.max_steps},
                {"epochs", t.epochs},
                {"lr", t.lr ? nlohmann::json(*t.lr) : nlohmann::json()},
                {"base_lr", t.base_lr},
                {"lr_min", t.lr_min},
                {"lr_warmup_steps", t.lr_warmup_steps},
                {"weight_decay", t.weight_decay},
                {"beta1", t.beta1},
                {"beta2", t.beta2},
                {"grad_accum_steps", t.grad_accum_steps},
                {"grad_clip_norm", t.grad_clip_norm},
                {"precision", t.precision},
                {"log_every", t.log_every},
                {"checkpoint_every", t.checkpoint_every},
                {"keep_last", t.keep_last},
                {"val_every", t.val_every},
                {"on_nonfinite", t.on_nonfinite},
                {"max_nonfinite", t.max_nonfinite}};
  j["output"] = {{"dir", c.output.dir}};
  return j;
}

MaskedAutoencoderOptions model_options_from(const ModelConfig& m) {
  return MaskedAutoencoderOptions(m.in_channels, m.img_size, m.patch_size)
      .hidden_size(m.hidden_size)
      .mlp_dim(m.mlp_dim)
      .num_layers(m.num_layers)
      .num_heads(m.num_heads)
      .masking_ratio(m.masking_ratio)
      .decoder_hidden_size(m.decoder_hidden_size)
      .decoder_mlp_dim(m.decoder_mlp_dim)
      .decoder_num_layers(m.decoder_num_layers)
      .decoder_num_heads(m.decoder_num_heads)
      .proj_type(m.proj_type)
      .pos_embed_type(m.pos_embed_type)
      .decoder_pos_embed_type(m.decoder_pos_embed_type)
      .dropout_rate(m.dropout_rate)
      .qkv_bias(m.qkv_bias);
}

}  // namespace mae
