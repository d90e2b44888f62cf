#include "export/monai_export.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "core/error.h"
#include "run/config.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

std::string py_bool(bool b) { return b ? "True" : "False"; }

std::string py_tuple(const std::vector<int64_t>& v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

std::string py_float(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  std::string s = buf;
  // Shortest form that reads back exactly, without an exponent for ordinary magnitudes (250, not 2.5e+02).
  const bool plain = x == 0.0 || (std::abs(x) >= 1e-4 && std::abs(x) < 1e15);
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x && (!plain || std::strchr(buf, 'e') == nullptr)) {
      s = buf;
      break;
    }
  }
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string py_str(const std::string& s) { return nlohmann::json(s).dump(); }

// Adds MONAI's unused cross-attention layers of one block of width `width` (nothing for none).
void add_cross_attention(NamedTensors& out, const std::string& prefix, int64_t width, bool qkv_bias,
                         CrossAttentionKeys keys) {
  if (keys == CrossAttentionKeys::none) return;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  out.emplace_back(prefix + "norm_cross_attn.weight", at::ones({width}, opts));
  out.emplace_back(prefix + "norm_cross_attn.bias", at::zeros({width}, opts));
  if (keys == CrossAttentionKeys::norm) return;
  out.emplace_back(prefix + "cross_attn.out_proj.weight", at::zeros({width, width}, opts));
  out.emplace_back(prefix + "cross_attn.out_proj.bias", at::zeros({width}, opts));
  for (const char* name : {"to_q", "to_k", "to_v"}) {
    out.emplace_back(prefix + "cross_attn." + name + ".weight", at::zeros({width, width}, opts));
    if (qkv_bias) out.emplace_back(prefix + "cross_attn." + name + ".bias", at::zeros({width}, opts));
  }
}

const char* network_name(ExportFormat format) {
  switch (format) {
    case ExportFormat::monai_vit:
      return "ViT";
    case ExportFormat::monai_unetr:
      return "UNETR";
    case ExportFormat::monai_mae:
      return "MaskedAutoEncoderViT";
  }
  return "?";
}

// The MONAI releases whose TransformerBlock holds exactly `keys`' cross-attention layers.
const char* exact_versions(CrossAttentionKeys keys) {
  switch (keys) {
    case CrossAttentionKeys::none:
      return "1.3";
    case CrossAttentionKeys::full:
      return "1.4 - 1.5";
    case CrossAttentionKeys::norm:
      return ">= 1.6";
  }
  return "?";
}

std::string load_snippet(ExportFormat format, const MaskedAutoencoderOptions& o, CrossAttentionKeys keys,
                         AxisOrder axis_order, const std::string& path) {
  const bool cross = keys != CrossAttentionKeys::none;
  std::ostringstream s;
  s << "import torch\n"
    << "from monai.networks.nets import " << network_name(format) << "\n\n";
  if (format == ExportFormat::monai_unetr) s << "num_classes = 2  # your number of output classes\n";
  s << "net = " << monai_constructor(o, format, axis_order) << "\n"
    << "sd = torch.load(" << py_str(path) << ", map_location=\"cpu\")\n";
  if (cross) {
    s << "# Unused cross-attention layers differ by MONAI release (this file has MONAI " << exact_versions(keys)
      << "'s):\n# drop those this MONAI does not build.\n"
      << "own = net.state_dict()\n"
      << "sd = {k: v for k, v in sd.items() if k in own or \"cross_attn\" not in k}\n";
  }
  if (format == ExportFormat::monai_unetr) {
    s << "missing, unexpected = net.load_state_dict(sd, strict=False)  # only vit.* is pretrained\n"
      << "assert not unexpected, unexpected\n"
      << "assert not [k for k in missing if k.startswith(\"vit.\")" << (cross ? "" : " and \"cross_attn\" not in k")
      << "], missing\n";
  } else if (cross) {
    s << "net.load_state_dict(sd, strict=True)\n";
  } else {
    s << "missing, unexpected = net.load_state_dict(sd, strict=False)  # MONAI >= 1.4 also has unused cross_attn "
         "layers\n"
      << "assert not unexpected and all(\"cross_attn\" in k for k in missing), (missing, unexpected)\n";
  }
  if (format == ExportFormat::monai_vit) {
    s << (axis_order == AxisOrder::monai
              ? "# x: (B, " + std::to_string(o.in_channels()) +
                    ", i, j, k) as MONAI's transforms give it (see \"axis_order\"), preprocessed as \"preprocessing\" "
                    "says\n"
              : "# x: (B, " + std::to_string(o.in_channels()) +
                    ", D, H, W) in mae3d's axis order (see \"axis_order\"), preprocessed as \"preprocessing\" says\n")
      << "tokens, hidden_states = net(x)  # tokens: (B, " << o.num_patches() << ", " << o.hidden_size()
      << ") after the final norm\n";
  }
  return s.str();
}

}  // namespace

const char* to_string(CrossAttentionKeys keys) {
  switch (keys) {
    case CrossAttentionKeys::none:
      return "false";
    case CrossAttentionKeys::full:
      return "true";
    case CrossAttentionKeys::norm:
      return "norm";
  }
  return "?";
}

CrossAttentionKeys parse_cross_attention_keys(const std::string& value) {
  for (auto k : {CrossAttentionKeys::full, CrossAttentionKeys::none, CrossAttentionKeys::norm}) {
    if (value == to_string(k)) return k;
  }
  throw ConfigError("--cross-attention-keys \"" + value +
                    "\" is not known; choose true (MONAI 1.4 - 1.5), norm (MONAI >= 1.6) or false (MONAI 1.3)");
}

CrossAttentionKeys ExportOptions::cross_attention() const {
  if (!cross_attention_keys) return CrossAttentionKeys::none;
  return cross_attention_linears ? CrossAttentionKeys::full : CrossAttentionKeys::norm;
}

void ExportOptions::set_cross_attention(CrossAttentionKeys keys) {
  cross_attention_keys = keys != CrossAttentionKeys::none;
  cross_attention_linears = keys == CrossAttentionKeys::full;
}

const char* to_string(ExportFormat format) {
  switch (format) {
    case ExportFormat::monai_vit:
      return "monai-vit";
    case ExportFormat::monai_unetr:
      return "monai-unetr";
    case ExportFormat::monai_mae:
      return "monai-mae";
  }
  return "?";
}

ExportFormat parse_export_format(const std::string& name) {
  for (auto f : {ExportFormat::monai_vit, ExportFormat::monai_unetr, ExportFormat::monai_mae}) {
    if (name == to_string(f)) return f;
  }
  throw ConfigError("--format \"" + name + "\" is not known; choose monai-vit, monai-unetr or monai-mae");
}

void check_unetr_compatible(const MaskedAutoencoderOptions& o) {
  std::vector<std::string> problems;
  if (o.spatial_dims() != 3) problems.push_back("a " + std::to_string(o.spatial_dims()) + "D model");
  if (o.num_layers() != 12) problems.push_back("num_layers = " + std::to_string(o.num_layers()));
  bool patch16 = true;
  for (int64_t p : o.patch_size()) patch16 = patch16 && p == 16;
  if (!patch16) problems.push_back("patch_size = " + py_tuple(o.patch_size()));
  if (problems.empty()) return;
  std::string what;
  for (size_t i = 0; i < problems.size(); ++i) what += (i ? ", " : "") + problems[i];
  throw ConfigError(
      "--format monai-unetr: MONAI's UNETR fixes a 3D ViT with 12 layers and patch size 16, but this "
      "checkpoint has " +
      what +
      "; export with --format monai-vit and build the segmentation network "
      "around that ViT instead");
}

NamedTensors monai_state_dict(MaskedAutoencoderImpl& model, const ExportOptions& export_options) {
  const auto& o = model.options();
  const ExportFormat format = export_options.format;
  if (format == ExportFormat::monai_unetr) check_unetr_compatible(o);
  const bool full = format == ExportFormat::monai_mae;
  const CrossAttentionKeys cross = export_options.cross_attention();
  const std::string prefix = format == ExportFormat::monai_unetr ? "vit." : "";
  const bool monai_axes = export_options.axis_order == AxisOrder::monai;
  const int64_t C = o.in_channels();
  int64_t P = 1;
  for (int64_t p : o.patch_size()) P *= p;

  std::map<std::string, at::Tensor> source;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) source[item.key()] = item.value();
  for (const auto& item : model.named_buffers(/*recurse=*/true)) source[item.key()] = item.value();
  std::set<std::string> used;
  NamedTensors out;
  // `reorder` rewrites the copy for MONAI's axis order (export/axis_order.h); empty: order-free.
  using Reorder = std::function<at::Tensor(const at::Tensor&)>;
  auto take = [&](const std::string& from, const std::string& to, const Reorder& reorder = {}) {
    auto it = source.find(from);
    if (it == source.end()) throw Error("export: the model has no parameter \"" + from + "\" (model/export mismatch)");
    used.insert(from);
    auto t = it->second.detach().to(at::kCPU, at::kFloat).clone(at::MemoryFormat::Contiguous);
    if (monai_axes && reorder) t = reorder(t);
    out.emplace_back(to, t);
  };
  // Token tables (1, N, X): the raster over the reversed grid.
  const Reorder tokens = [&](const at::Tensor& t) { return reverse_raster(t, o.grid()); };
  // Conv kernel (E, C, p...): spatial axes reversed.
  const Reorder kernel = [](const at::Tensor& t) { return reverse_spatial_axes(t); };
  // Perceptron weight (E, P·C): columns in (p... c) order, made the voxel raster over the reversed patch.
  const Reorder voxel_columns = [&](const at::Tensor& t) {
    return reverse_raster(t.view({t.size(0), P, C}), o.patch_size()).view(t.sizes());
  };
  // decoder_pred weight (P·C, Ed) or bias (P·C): rows in (p... c) order, likewise.
  const Reorder voxel_rows = [&](const at::Tensor& t) {
    return reverse_raster(t.reshape({1, P, -1}), o.patch_size()).view(t.sizes());
  };
  // MONAI's TransformerBlock state_dict order: mlp, norm1, attn (out_proj before qkv), norm2,
  // norm_cross_attn, cross_attn (out_proj, to_q, to_k, to_v).
  auto block = [&](const std::string& from, const std::string& to, int64_t width) {
    for (const char* name :
         {"mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias", "norm1.weight",
          "norm1.bias", "attn.out_proj.weight", "attn.out_proj.bias", "attn.qkv.weight"}) {
      take(from + name, to + name);
    }
    if (o.qkv_bias()) take(from + "attn.qkv.bias", to + "attn.qkv.bias");
    take(from + "norm2.weight", to + "norm2.weight");
    take(from + "norm2.bias", to + "norm2.bias");
    add_cross_attention(out, to, width, o.qkv_bias(), cross);
  };

  // MaskedAutoEncoderViT's own parameters come first in its state_dict.
  if (full) {
    take("cls_token", "cls_token");
    take("mask_tokens", "mask_tokens");
    take("decoder_pos_embedding", "decoder_pos_embedding", tokens);
  }
  take("patch_embedding.position_embeddings", prefix + "patch_embedding.position_embeddings", tokens);
  const bool conv = o.proj_type() == "conv";
  const std::string proj = conv ? "patch_embedding.patch_embeddings." : "patch_embedding.patch_embeddings.1.";
  take(proj + "weight", prefix + proj + "weight", conv ? kernel : voxel_columns);
  take(proj + "bias", prefix + proj + "bias");
  const int64_t L = o.num_layers();
  for (int64_t i = 0; i < L; ++i) {
    block("blocks." + std::to_string(i) + ".", prefix + "blocks." + std::to_string(i) + ".", o.hidden_size());
  }
  // ViT keeps its final LayerNorm as `norm`; MaskedAutoEncoderViT as the last entry of its
  // nn.Sequential `blocks`, where mae3d keeps it too.
  const std::string norm = full ? "blocks." + std::to_string(L) + "." : prefix + "norm.";
  take("blocks." + std::to_string(L) + ".weight", norm + "weight");
  take("blocks." + std::to_string(L) + ".bias", norm + "bias");
  if (full) {
    take("decoder_embed.weight", "decoder_embed.weight");
    take("decoder_embed.bias", "decoder_embed.bias");
    const int64_t Ld = o.decoder_num_layers();
    for (int64_t j = 0; j < Ld; ++j) {
      block("decoder_blocks." + std::to_string(j) + ".", "decoder_blocks." + std::to_string(j) + ".",
            o.decoder_hidden_size());
    }
    take("decoder_blocks." + std::to_string(Ld) + ".weight", "decoder_blocks." + std::to_string(Ld) + ".weight");
    take("decoder_blocks." + std::to_string(Ld) + ".bias", "decoder_blocks." + std::to_string(Ld) + ".bias");
    take("decoder_pred.weight", "decoder_pred.weight", voxel_rows);
    take("decoder_pred.bias", "decoder_pred.bias", voxel_rows);
  }

  // Everything left must be something the encoder-only formats drop on purpose.
  for (const auto& [name, tensor] : source) {
    if (used.count(name)) continue;
    const bool dropped = !full && (name == "cls_token" || name == "mask_tokens" || name.rfind("decoder_", 0) == 0);
    if (!dropped) throw Error("export: the model parameter \"" + name + "\" has no MONAI name (model/export mismatch)");
  }
  return out;
}

std::string monai_constructor(const MaskedAutoencoderOptions& o, ExportFormat format, AxisOrder axis_order) {
  std::ostringstream s;
  const std::string img_size = py_tuple(in_axis_order(o.img_size(), axis_order));
  const std::string patch_size = py_tuple(in_axis_order(o.patch_size(), axis_order));
  const std::string common_tail = "dropout_rate=" + py_float(o.dropout_rate()) +
                                  ", spatial_dims=" + std::to_string(o.spatial_dims()) +
                                  ", qkv_bias=" + py_bool(o.qkv_bias()) + ")";
  switch (format) {
    case ExportFormat::monai_vit:
      s << "ViT(in_channels=" << o.in_channels() << ", img_size=" << img_size << ", patch_size=" << patch_size
        << ", hidden_size=" << o.hidden_size() << ", mlp_dim=" << o.mlp_dim() << ", num_layers=" << o.num_layers()
        << ", num_heads=" << o.num_heads() << ", proj_type=" << py_str(o.proj_type())
        << ", pos_embed_type=" << py_str(o.pos_embed_type()) << ", classification=False, " << common_tail;
      break;
    case ExportFormat::monai_unetr:
      s << "UNETR(in_channels=" << o.in_channels() << ", out_channels=num_classes, img_size=" << img_size
        << ", feature_size=16, hidden_size=" << o.hidden_size() << ", mlp_dim=" << o.mlp_dim()
        << ", num_heads=" << o.num_heads() << ", proj_type=" << py_str(o.proj_type())
        << ", norm_name=\"instance\", conv_block=True, res_block=True, " << common_tail;
      break;
    case ExportFormat::monai_mae:
      s << "MaskedAutoEncoderViT(in_channels=" << o.in_channels() << ", img_size=" << img_size
        << ", patch_size=" << patch_size << ", hidden_size=" << o.hidden_size() << ", mlp_dim=" << o.mlp_dim()
        << ", num_layers=" << o.num_layers() << ", num_heads=" << o.num_heads()
        << ", masking_ratio=" << py_float(o.masking_ratio()) << ", decoder_hidden_size=" << o.decoder_hidden_size()
        << ", decoder_mlp_dim=" << o.decoder_mlp_dim() << ", decoder_num_layers=" << o.decoder_num_layers()
        << ", decoder_num_heads=" << o.decoder_num_heads() << ", proj_type=" << py_str(o.proj_type())
        << ", pos_embed_type=" << py_str(o.pos_embed_type())
        << ", decoder_pos_embed_type=" << py_str(o.decoder_pos_embed_type()) << ", " << common_tail;
      break;
  }
  return s.str();
}

std::string axis_order_description(AxisOrder axis_order, const std::string& orientation) {
  const std::string oriented =
      orientation.empty() ? "in the files' own orientation (training did not reorient: add no Orientationd)"
                          : "after Orientationd(axcodes=" + py_str(orientation) + "), the training orientation";
  const std::string codes =
      "; orientation codes use the nibabel/MONAI convention (letter = direction the index increases towards)";
  if (axis_order == AxisOrder::monai) {
    return "network input (B, C, i, j, k): the arrays MONAI's LoadImaged(ensure_channel_first=True) gives " + oriented +
           ", i the fastest image index (NIfTI i, ITK x), k the slowest (NIfTI k, ITK z); no transpose. The weights "
           "were rewritten from mae3d's (C, D, H, W) = (C, k, j, i) order (patch kernels, in-patch voxel order, "
           "token raster), so img_size and patch_size read (i, j, k) and tokens are in the raster of the (i, j, k) "
           "patch grid" +
           codes + ".";
  }
  return "network input (B, C, D, H, W) in mae3d's order: D is the slowest image index (NIfTI k, ITK z), W the fastest "
         "(NIfTI i, ITK x), " +
         oriented + codes +
         ". MONAI's LoadImage gives (C, i, j, k): reverse the spatial axes "
         "before the network (x.permute(0, 1, 4, 3, 2)), or export with --axis-order monai.";
}

nlohmann::json preprocessing_description(const Config& config, AxisOrder axis_order) {
  const auto data = config_to_json(config)["data"];
  const auto& d = config.data;
  nlohmann::json p;
  p["orientation"] = d.orientation;
  p["spacing_mm"] = data["spacing_mm"];
  p["intensity"] = data["intensity"];
  p["foreground_threshold"] = data["foreground_threshold"];
  p["time_point"] = d.time_point;
  p["fourth_axis_as_channels"] = d.fourth_axis_as_channels;
  p["input_size"] = in_axis_order(config.model.img_size, axis_order);
  p["rounding"] = "voxels rounded to float16 precision after preprocessing (as the training cache stores them)";
  p["axis_order"] = axis_order_description(axis_order, d.orientation);
  // An approximate MONAI pipeline; mae3d's own preprocessing (mae-export --features) is the reference.
  std::vector<std::string> t{"LoadImaged(keys=\"image\", ensure_channel_first=True)"};
  if (!d.orientation.empty()) t.push_back("Orientationd(keys=\"image\", axcodes=" + py_str(d.orientation) + ")");
  if (d.spacing_mm) {
    const auto& s = *d.spacing_mm;
    t.push_back("Spacingd(keys=\"image\", pixdim=(" + py_float(s[0]) + ", " + py_float(s[1]) + ", " + py_float(s[2]) +
                "), mode=\"bilinear\")");
  }
  const auto& in = d.intensity;
  if (in.mode == "ct_window") {
    t.push_back("ScaleIntensityRanged(keys=\"image\", a_min=" + py_float(in.a_min) + ", a_max=" + py_float(in.a_max) +
                ", b_min=" + py_float(in.b_min) + ", b_max=" + py_float(in.b_max) + ", clip=" + py_bool(in.clip) + ")");
  } else if (in.mode == "zscore_nonzero") {
    t.push_back("NormalizeIntensityd(keys=\"image\", nonzero=True, channel_wise=True)");
  } else if (in.mode == "percentile") {
    t.push_back("ScaleIntensityRangePercentilesd(keys=\"image\", lower=" + py_float(in.lower_percentile) +
                ", upper=" + py_float(in.upper_percentile) + ", b_min=" + py_float(in.b_min) +
                ", b_max=" + py_float(in.b_max) + ", clip=" + py_bool(in.clip) + ", channel_wise=True)");
  }
  if (d.foreground_threshold) {
    t.push_back("CropForegroundd(keys=\"image\", source_key=\"image\", select_fn=lambda x: x > " +
                py_float(*d.foreground_threshold) + ")");
  }
  if (axis_order == AxisOrder::native) {
    t.push_back("Transposed(keys=\"image\", indices=(0, 3, 2, 1))  # (C, i, j, k) -> (C, D, H, W)");
  }
  p["monai_transforms_approximate"] = t;
  return p;
}

void refuse_diverged(const TrainedModel& trained, bool allow) {
  if (!trained.diverged || allow) return;
  throw CheckpointError(trained.dir + ": the checkpoint is marked diverged (" + trained.diverged_reason +
                        "); export an earlier checkpoint, or pass --allow-diverged to export it anyway");
}

nlohmann::json checkpoint_description(const TrainedModel& trained) {
  nlohmann::json c = {{"path", fs::absolute(trained.dir).lexically_normal().string()},
                      {"step", trained.step},
                      {"run_id", trained.run_id}};
  if (trained.diverged) {
    c["diverged"] = true;
    c["diverged_reason"] = trained.diverged_reason;
  }
  return c;
}

nlohmann::json export_description(const TrainedModel& trained, const ExportOptions& export_options,
                                  const NamedTensors& tensors, const std::string& pt_path) {
  const auto o = trained.model->options();
  const ExportFormat format = export_options.format;
  const CrossAttentionKeys keys = export_options.cross_attention();
  const bool cross = keys != CrossAttentionKeys::none;
  const AxisOrder axis_order = export_options.axis_order;
  const std::string abs_path = fs::absolute(pt_path).lexically_normal().string();
  nlohmann::json j;
  j["format"] = to_string(format);
  j["file"] = abs_path;
  j["created_by"] = std::string("mae-export (mae3d ") + MAE3D_VERSION + ", LibTorch " + TORCH_VERSION + ")";
  j["checkpoint"] = checkpoint_description(trained);

  nlohmann::json a;
  a["spatial_dims"] = o.spatial_dims();
  a["in_channels"] = o.in_channels();
  a["axis_order"] = to_string(axis_order);
  a["img_size"] = in_axis_order(o.img_size(), axis_order);
  a["patch_size"] = in_axis_order(o.patch_size(), axis_order);
  a["grid"] = in_axis_order(o.grid(), axis_order);
  a["num_patches"] = o.num_patches();
  a["hidden_size"] = o.hidden_size();
  a["mlp_dim"] = o.mlp_dim();
  a["num_layers"] = o.num_layers();
  a["num_heads"] = o.num_heads();
  a["proj_type"] = o.proj_type();
  a["pos_embed_type"] = o.pos_embed_type();
  a["qkv_bias"] = o.qkv_bias();
  a["dropout_rate"] = o.dropout_rate();
  a["norm"] = "pre-norm LayerNorm, eps 1e-5; exact (erf) GELU; fused qkv split as (3, heads, head_dim)";
  if (format == ExportFormat::monai_mae) {
    a["masking_ratio"] = o.masking_ratio();
    a["decoder_hidden_size"] = o.decoder_hidden_size();
    a["decoder_mlp_dim"] = o.decoder_mlp_dim();
    a["decoder_num_layers"] = o.decoder_num_layers();
    a["decoder_num_heads"] = o.decoder_num_heads();
    a["decoder_pos_embed_type"] = o.decoder_pos_embed_type();
  }
  j["architecture"] = a;
  j["axis_order"] = {{"order", to_string(axis_order)},
                     {"input", axis_order_description(axis_order, trained.config.data.orientation)}};
  j["preprocessing"] = preprocessing_description(trained.config, axis_order);

  int64_t values = 0;
  nlohmann::json list = nlohmann::json::array();
  for (const auto& [name, t] : tensors) {
    values += t.numel();
    list.push_back({{"name", name}, {"shape", t.sizes().vec()}});
  }
  j["num_tensors"] = tensors.size();
  j["num_values"] = values;
  j["dtype"] = "float32";

  nlohmann::json m;
  m["network"] = std::string("monai.networks.nets.") + network_name(format);
  m["min_version"] = keys == CrossAttentionKeys::none ? "1.3" : keys == CrossAttentionKeys::full ? "1.4" : "1.6";
  m["exact_versions"] = exact_versions(keys);
  m["constructor"] = monai_constructor(o, format, axis_order);
  m["strict"] = format != ExportFormat::monai_unetr && cross;
  m["load"] = load_snippet(format, o, keys, axis_order, abs_path);
  j["monai"] = m;

  std::vector<std::string> notes;
  if (o.pos_embed_type() == "sincos" && axis_order == AxisOrder::native) {
    notes.push_back(
        "patch_embedding.position_embeddings holds the fixed sin-cos table the encoder was trained with "
        "(MONAI builds the same table for pos_embed_type=\"sincos\"; loading overwrites it either way).");
  } else if (o.pos_embed_type() == "sincos") {
    notes.push_back(
        "patch_embedding.position_embeddings holds the fixed sin-cos table the encoder was trained with, "
        "its tokens reordered to the (i, j, k) raster. MONAI's own sin-cos table for the reversed grid "
        "gives the i and k axes each other's channel blocks, so it is not this table: keep the loaded one "
        "(loading overwrites MONAI's; do not rebuild it).");
  } else {
    notes.push_back("patch_embedding.position_embeddings holds the encoder's \"" + o.pos_embed_type() +
                    "\" position table as trained (zeros for \"none\").");
  }
  if (format == ExportFormat::monai_unetr) {
    notes.push_back(
        "UNETR builds its ViT with pos_embed_type=\"learnable\": the loaded positions become trainable "
        "during fine-tuning. Only vit.* is pretrained; encoder1-4, decoder2-5 and out start fresh.");
  }
  if (format != ExportFormat::monai_mae) {
    notes.push_back("cls_token, mask_tokens and the decoder are not exported; blocks." +
                    std::to_string(o.num_layers()) + " (the encoder's final LayerNorm) is exported as norm.");
  } else {
    notes.push_back("The encoder's and decoder's final LayerNorms keep their names blocks." +
                    std::to_string(o.num_layers()) + " and decoder_blocks." + std::to_string(o.decoder_num_layers()) +
                    ": MaskedAutoEncoderViT holds them as the last entries of its nn.Sequential blocks and "
                    "decoder_blocks, as mae3d does.");
    notes.push_back(axis_order == AxisOrder::monai
                        ? "decoder_pred predicts, per token of the (i, j, k) raster, the patch voxels in (p1 p2 p3 c) "
                          "order over the (i, j, k) axes: Rearrange(\"b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 "
                          "c)\") of the (B, C, i, j, k) input. decoder_pos_embedding is reordered like the encoder's "
                          "positions."
                        : "decoder_pred predicts, per token of the (D, H, W) raster, the patch voxels in (p1 p2 p3 c) "
                          "order over mae3d's (D, H, W) axes.");
  }
  std::string cross_note;
  switch (keys) {
    case CrossAttentionKeys::full:
      cross_note =
          "MONAI 1.4 - 1.5 build an unused cross-attention layer in every TransformerBlock "
          "(with_cross_attention=False), so strict loading expects norm_cross_attn.* and cross_attn.{out_proj,"
          "to_q,to_k,to_v}.*; they are written as a fresh LayerNorm (weight 1, bias 0) and zero Linear "
          "weights/biases (to_q/to_k/to_v biases only with qkv_bias). The forward pass never uses them. If you "
          "enable cross-attention, re-initialise them: an all-zero branch gets no gradient. MONAI >= 1.6 builds "
          "norm_cross_attn only (cross_attn is nn.Identity): drop the cross_attn.* keys it does not have, as the "
          "load snippet does, or export with --cross-attention-keys norm. MONAI 1.3 has no such layers: drop them "
          "all, or export with --cross-attention-keys false.";
      break;
    case CrossAttentionKeys::norm:
      cross_note =
          "MONAI >= 1.6 builds an unused norm_cross_attn LayerNorm in every TransformerBlock "
          "(with_cross_attention=False; cross_attn is nn.Identity), so strict loading expects norm_cross_attn.*; "
          "written as a fresh LayerNorm (weight 1, bias 0), never used by the forward pass. MONAI 1.4 - 1.5 also "
          "build the cross_attn linears: export with --cross-attention-keys true there.";
      break;
    case CrossAttentionKeys::none:
      cross_note =
          "Not included: loads strictly into MONAI 1.3; on MONAI >= 1.4 load with strict=False (only "
          "cross_attn/norm_cross_attn keys are then missing, and unused).";
      break;
  }
  j["cross_attention_keys"] = {{"included", cross},
                               {"linears", keys == CrossAttentionKeys::full},
                               {"value", to_string(keys)},
                               {"exact_versions", exact_versions(keys)},
                               {"note", cross_note}};
  notes.push_back("No buffers: MONAI's attention blocks register causal_mask only for causal=True.");
  j["notes"] = notes;
  j["tensors"] = list;
  return j;
}

ExportResult export_checkpoint(const std::string& checkpoint, const std::string& out_path,
                               const ExportOptions& export_options) {
  TrainedModel trained = load_trained_model(checkpoint);
  refuse_diverged(trained, export_options.allow_diverged);
  if (export_options.format == ExportFormat::monai_unetr) check_unetr_compatible(trained.model->options());
  check_output_folder(out_path, "--out");
  const NamedTensors tensors = monai_state_dict(*trained.model, export_options);
  ExportResult result;
  result.pt_path = out_path;
  result.json_path = description_path(out_path);
  const auto description = export_description(trained, export_options, tensors, out_path);
  save_tensor_dict(tensors, result.pt_path);
  write_json_file(description, result.json_path);
  result.num_tensors = static_cast<int64_t>(tensors.size());
  result.num_values = description["num_values"].get<int64_t>();
  return result;
}

}  // namespace mae
