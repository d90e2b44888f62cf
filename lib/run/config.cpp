#include "run/config.h"

#include <limits>
#include <sstream>

#include "core/error.h"
#include "core/json_reader.h"
#include "core/printable.h"
#include "core/threads.h"

namespace mae {

namespace {

constexpr int64_t kMaxImgSize = 1024;  // per axis: a 1024³ float crop is already 4 GiB per sample
constexpr int64_t kMaxTokens = 65536;  // patches per crop; 216 for the 96³ / 16 default
constexpr double kMinLr = 1e-12;       // a learning rate must be positive
constexpr double kMaxLr = 1.0;         // no AdamW recipe uses more; larger values only diverge

std::string num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// Every entry of a size list in 1 .. max.
void check_sizes(const std::string& key, const std::vector<int64_t>& sizes, int64_t max, const std::string& unit) {
  for (int64_t s : sizes) {
    if (s < 1 || s > max) {
      throw ConfigError("\"" + key + "\" has " + std::to_string(s) + "; every entry must be 1 .. " +
                        std::to_string(max) + " " + unit);
    }
  }
}

void read_model(JsonReader r, ModelConfig& m) {
  r.read_range<int64_t>("in_channels", m.in_channels, 1, 64);
  r.read("img_size", m.img_size);
  r.read("patch_size", m.patch_size);
  check_sizes(r.key_path("img_size"), m.img_size, kMaxImgSize, "voxels");
  check_sizes(r.key_path("patch_size"), m.patch_size, kMaxImgSize, "voxels");
  r.read_range("masking_ratio", m.masking_ratio, 0.0, 1.0);
  r.read_range("dropout_rate", m.dropout_rate, 0.0, 1.0);
  r.read_range<int64_t>("hidden_size", m.hidden_size, 1, 16384);
  r.read_range<int64_t>("mlp_dim", m.mlp_dim, 1, 65536);
  r.read_range<int64_t>("num_layers", m.num_layers, 1, 256);
  r.read_range<int64_t>("num_heads", m.num_heads, 1, 1024);
  r.read_range<int64_t>("decoder_hidden_size", m.decoder_hidden_size, 1, 16384);
  r.read_range<int64_t>("decoder_mlp_dim", m.decoder_mlp_dim, 1, 65536);
  r.read_range<int64_t>("decoder_num_layers", m.decoder_num_layers, 1, 256);
  r.read_range<int64_t>("decoder_num_heads", m.decoder_num_heads, 1, 1024);
  r.read("proj_type", m.proj_type);
  r.read("pos_embed_type", m.pos_embed_type);
  r.read("decoder_pos_embed_type", m.decoder_pos_embed_type);
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
  // Sizes are each <= 1024 and patch_size divides img_size, so this product cannot overflow.
  int64_t tokens = 1;
  for (size_t i = 0; i < m.img_size.size(); ++i) tokens *= m.img_size[i] / m.patch_size[i];
  if (tokens > kMaxTokens) {
    throw ConfigError("\"model.img_size\" / \"model.patch_size\" give " + std::to_string(tokens) +
                      " patches per crop; at most " + std::to_string(kMaxTokens) +
                      " are allowed (attention cost grows with the square of the count): use larger patches or a "
                      "smaller img_size");
  }
}

void read_probe_volumes(JsonReader& r, const std::string& key, std::vector<ProbeVolumeConfig>& out) {
  const nlohmann::json* list = r.raw(key);
  if (!list || list->is_null()) return;
  const std::string name = r.key_path(key);
  if (!list->is_array()) {
    throw ConfigError("\"" + name + "\" must be a list of {\"image\": ..., \"labels\": ...} objects");
  }
  for (size_t i = 0; i < list->size(); ++i) {
    const std::string item = name + "[" + std::to_string(i) + "]";
    if (!(*list)[i].is_object()) {
      throw ConfigError("\"" + item + "\" must be an object {\"image\": ..., \"labels\": ...}");
    }
    JsonReader e((*list)[i], item);
    ProbeVolumeConfig v;
    e.read("image", v.image);
    e.read("labels", v.labels);
    e.finish();
    if (v.image.empty() || v.labels.empty()) {
      throw ConfigError("\"" + item + "\" needs both \"image\" and \"labels\"");
    }
    out.push_back(v);
  }
}

void read_probe(JsonReader r, ProbeConfig& p) {
  read_probe_volumes(r, "train", p.train);
  read_probe_volumes(r, "test", p.test);
  r.read_choice("target", p.target, {"fractions", "majority"});
  r.read_choice("split", p.split, {"none", "checkerboard"});
  r.read("include_background", p.include_background);
  r.read_range<int64_t>("folds", p.folds, 2, 10);
  r.read_range<int64_t>("every", p.every, 0, int64_t{1} << 40);
  r.finish();
  if (p.every == 0) return;
  if (p.train.empty())
    throw ConfigError("\"probe.every\" = " + std::to_string(p.every) + " needs \"probe.train\" volumes");
  if (p.split == "none" && p.test.empty()) {
    throw ConfigError(
        "\"probe.test\" is empty: give test volumes, or \"probe.split\" = \"checkerboard\" to score "
        "on alternating blocks of the train volumes");
  }
  if (p.split == "checkerboard" && !p.test.empty()) {
    throw ConfigError(
        "\"probe.test\": with \"probe.split\" = \"checkerboard\" the test patches come from the "
        "train volumes; leave \"probe.test\" out");
  }
}

void read_train(JsonReader r, TrainConfig& t) {
  r.read_range<int64_t>("batch_size", t.batch_size, 1, 4096);
  r.read_range<int64_t>("max_steps", t.max_steps, 0, int64_t{1} << 40);
  r.read_range<int64_t>("epochs", t.epochs, 0, int64_t{1} << 30);
  if (r.has("lr")) {
    double lr = 0.0;
    r.read_range("lr", lr, kMinLr, kMaxLr);
    t.lr = lr;
  }
  r.read_range("base_lr", t.base_lr, kMinLr, kMaxLr);
  r.read_range("lr_min", t.lr_min, 0.0, kMaxLr);
  r.read_range<int64_t>("lr_warmup_steps", t.lr_warmup_steps, 0, int64_t{1} << 40);
  r.read_range("weight_decay", t.weight_decay, 0.0, 10.0);
  r.read_range("beta1", t.beta1, 0.0, 0.999999);
  r.read_range("beta2", t.beta2, 0.0, 0.999999);
  r.read_range<int64_t>("grad_accum_steps", t.grad_accum_steps, 1, 65536);
  r.read_range("grad_clip_norm", t.grad_clip_norm, 0.0, 1e6);
  r.read_choice("precision", t.precision, {"fp32", "bf16"});
  r.read_choice("fp32_matmul", t.fp32_matmul, {"auto", "onednn", "blas"});
  r.read_range<int64_t>("log_every", t.log_every, 1, int64_t{1} << 40);
  r.read_range<int64_t>("checkpoint_every", t.checkpoint_every, 1, int64_t{1} << 40);
  r.read_range<int64_t>("keep_last", t.keep_last, 1, 1000000);
  r.read_range<int64_t>("val_every", t.val_every, 0, int64_t{1} << 40);
  r.read_choice("best_by", t.best_by, {"val_loss", "probe"});
  r.read_choice("on_nonfinite", t.on_nonfinite, {"error", "skip"});
  r.read_range<int64_t>("max_nonfinite", t.max_nonfinite, 1, int64_t{1} << 40);
  r.finish();
  if (t.max_steps == 0 && t.epochs == 0) {
    throw ConfigError("\"train.max_steps\" and \"train.epochs\" are both 0; set one of them");
  }
  if (t.lr && t.lr_min > *t.lr) {
    throw ConfigError("\"train.lr_min\" = " + num(t.lr_min) + " is larger than \"train.lr\" = " + num(*t.lr));
  }
  if (!t.lr) {
    // The MAE rule scales base_lr by the effective batch (of one process; more processes scale it further).
    const double effective = static_cast<double>(t.batch_size) * static_cast<double>(t.grad_accum_steps);
    const double lr = t.base_lr * effective / 256.0;
    if (lr > kMaxLr) {
      throw ConfigError("\"train.base_lr\" = " + num(t.base_lr) + " with an effective batch of " + num(effective) +
                        " (batch_size x grad_accum_steps) gives a learning rate of " + num(lr) + ", above " +
                        num(kMaxLr) + "; set a smaller base_lr or an explicit \"train.lr\"");
    }
    if (t.lr_min > lr) {
      throw ConfigError("\"train.lr_min\" = " + num(t.lr_min) + " is larger than the learning rate " + num(lr) +
                        " that \"train.base_lr\" gives");
    }
  }
}

void read_distributed(JsonReader r, DistributedConfig& d) {
  r.read_choice("backend", d.backend, {"auto", "gloo", "nccl"});
  r.read_range<int64_t>("timeout_s", d.timeout_s, 1, 86400);
  if (const nlohmann::json* v = r.raw("bucket_mb")) {
    const std::string key = r.key_path("bucket_mb");
    const double mb = JsonReader::convert<double>(*v, key);
    if (!(mb > 0.0 && mb <= 1024.0)) {
      throw ConfigError("\"" + key + "\" = " + json_text(*v) + " is out of range; allowed: more than 0 .. 1024 (MiB)");
    }
    d.bucket_mb = mb;
  }
  r.read("overlap", d.overlap);
  r.finish();
}

void check_device(const std::string& device) {
  if (is_device_name(device)) return;
  throw ConfigError("\"device\" = " + json_text(device) +
                    " is not allowed; use \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"");
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
  j["intensity_aug"] = {{"prob", d.intensity_aug.prob},
                        {"scale", d.intensity_aug.scale},
                        {"shift", d.intensity_aug.shift},
                        {"gamma", d.intensity_aug.gamma}};
  j["workers"] = d.workers;
  j["prefetch"] = d.prefetch;
  j["cache_dir"] = d.cache_dir;
  j["on_bad_volume"] = d.on_bad_volume;
  j["time_point"] = d.time_point;
  j["dicom_slice_tolerance"] = d.dicom_slice_tolerance;
  j["fourth_axis_as_channels"] = d.fourth_axis_as_channels;
  return j;
}

nlohmann::json override_value(const std::string& item, const std::string& text) {
  // JSON when it parses (numbers, true, null, [1,2], "quoted"); a value that starts like a JSON
  // list, object or string must parse; anything else is taken as a bare string (device=cpu).
  std::string problem;
  if (auto value = try_parse_json_strict(text, problem)) return std::move(*value);
  const auto first = text.find_first_not_of(" \t");
  const char c = first == std::string::npos ? '\0' : text[first];
  if (c == '[' || c == '{' || c == '"') {
    throw ConfigError("--set \"" + printable(item) + "\": the value is " + problem +
                      "; to pass text starting with [, { or \", write it as a JSON string: 'key=\"[a\"'");
  }
  if (problem.find("number overflow") != std::string::npos) {
    throw ConfigError("--set \"" + printable(item) + "\": the number " + printable(text) + " is too large");
  }
  return text;
}

}  // namespace

void apply_overrides(nlohmann::json& tree, const std::vector<std::string>& overrides) {
  for (const auto& item : overrides) {
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0) {
      throw ConfigError("--set \"" + printable(item) + "\": expected key=value, e.g. --set train.lr=2e-4");
    }
    const std::string key = item.substr(0, eq), text = item.substr(eq + 1);
    const nlohmann::json value = override_value(item, text);
    nlohmann::json* node = &tree;
    std::vector<std::string> names;
    for (size_t start = 0;;) {  // split on '.', keeping empty segments so that "a..b" is refused
      const auto dot = key.find('.', start);
      names.push_back(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    std::string path;
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i].empty()) throw ConfigError("--set \"" + printable(item) + "\": empty key segment");
      path += (path.empty() ? "" : ".") + names[i];
      if (i + 1 == names.size()) {
        (*node)[names[i]] = value;
      } else {
        if (!node->contains(names[i]) || (*node)[names[i]].is_null()) (*node)[names[i]] = nlohmann::json::object();
        if (!(*node)[names[i]].is_object())
          throw ConfigError("--set \"" + printable(item) + "\": \"" + printable(path) + "\" is not a section");
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
    out.read("tensorboard", c.output.tensorboard);
    out.finish();
    if (c.output.dir.empty()) throw ConfigError("\"output.dir\" is empty; name the run folder");
  }
  read_distributed(r.child("distributed"), c.distributed);
  read_probe(r.child("probe"), c.probe);
  if (c.train.best_by == "probe" && c.probe.every == 0) {
    throw ConfigError("\"train.best_by\" = \"probe\" needs the probe on: set \"probe.every\" (and its volumes)");
  }
  if (c.train.best_by == "probe" && c.train.checkpoint_every % c.probe.every != 0) {
    throw ConfigError("\"train.best_by\" = \"probe\": \"probe.every\" = " + std::to_string(c.probe.every) +
                      " must divide \"train.checkpoint_every\" = " + std::to_string(c.train.checkpoint_every) +
                      ", so that every checkpoint has a probe score");
  }
  if (c.distributed.backend == "nccl" && c.device == "cpu") {
    throw ConfigError(
        "\"distributed.backend\" = \"nccl\" needs a CUDA device, but \"device\" = \"cpu\"; use \"gloo\" or \"auto\" "
        "on the CPU");
  }
  r.finish();
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  nlohmann::json tree = read_json_file<ConfigError>(path, "config file");
  const std::string shown = printable(path);
  if (!tree.is_object())
    throw ConfigError(shown + ": the config must be a JSON object { ... }, not " + json_text(tree));
  apply_overrides(tree, overrides);  // its errors name the --set item, not the file
  try {
    return config_from_json(tree);
  } catch (const ConfigError& e) {
    throw ConfigError(shown + ": " + e.what());
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
                {"fp32_matmul", t.fp32_matmul},
                {"log_every", t.log_every},
                {"checkpoint_every", t.checkpoint_every},
                {"keep_last", t.keep_last},
                {"val_every", t.val_every},
                {"on_nonfinite", t.on_nonfinite},
                {"max_nonfinite", t.max_nonfinite},
                {"best_by", t.best_by}};
  j["output"] = {{"dir", c.output.dir}, {"tensorboard", c.output.tensorboard}};
  auto volumes = [](const std::vector<ProbeVolumeConfig>& list) {
    nlohmann::json a = nlohmann::json::array();
    for (const auto& v : list) a.push_back({{"image", v.image}, {"labels", v.labels}});
    return a;
  };
  j["probe"] = {{"train", volumes(c.probe.train)},
                {"test", volumes(c.probe.test)},
                {"target", c.probe.target},
                {"split", c.probe.split},
                {"include_background", c.probe.include_background},
                {"folds", c.probe.folds},
                {"every", c.probe.every}};
  j["distributed"] = {{"backend", c.distributed.backend},
                      {"timeout_s", c.distributed.timeout_s},
                      {"bucket_mb", c.distributed.bucket_mb},
                      {"overlap", c.distributed.overlap}};
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
