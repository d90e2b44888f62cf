// Hands a pretrained encoder (or the whole masked autoencoder) to MONAI: the weights renamed to the
// state-dict keys of MONAI's ViT, UNETR (`vit.` prefix) or MaskedAutoEncoderViT, written as a plain
// dict[str, Tensor] that `torch.load` reads, plus a JSON description with the architecture, the
// preprocessing the encoder was trained on and the exact MONAI constructor call that loads it.
//
// Key conventions (checked against the state_dict() of MONAI 1.5's and 1.6's own classes by
// tests/export/test_export.py):
//   - encoder blocks keep their names (`blocks.{i}.norm1|attn.qkv|attn.out_proj|norm2|mlp.linear1|2`);
//   - the encoder's final norm, mae3d's `blocks.{L}`, is `norm` in ViT (`vit.norm` in UNETR) and
//     keeps its name `blocks.{L}` in MaskedAutoEncoderViT, which holds it as the last entry of the
//     nn.Sequential `blocks`; likewise the decoder's final norm stays `decoder_blocks.{Ld}`;
//   - ViT/UNETR exports drop `cls_token` (ViT with classification=False has none), `mask_tokens`
//     and every `decoder_*` key;
//   - keys come in the order MONAI's own state_dict() lists them.
//
// Cross-attention keys: every TransformerBlock of MONAI >= 1.4 builds layers for cross-attention
// even when with_cross_attention=False (the default in ViT, UNETR and MaskedAutoEncoderViT), so
// strict loading expects their keys: MONAI 1.4 - 1.5 build `norm_cross_attn` and `cross_attn` (a
// CrossAttentionBlock: to_q, to_k, to_v, out_proj), MONAI >= 1.6 only `norm_cross_attn`
// (`cross_attn` is nn.Identity). The export adds the layout chosen (1.4 - 1.5's by default) with
// LayerNorm weight 1, bias 0 (as a freshly built nn.LayerNorm) and zero Linear weights and biases;
// to_q/to_k/to_v carry a bias only when qkv_bias is set (MONAI passes qkv_bias to the
// CrossAttentionBlock). They never reach the forward pass. Whoever turns cross-attention on must
// re-initialise them: an all-zero q/k/v/out_proj branch passes no gradient to its weights. MONAI
// registers no buffers in these blocks (causal_mask only exists for causal=True), so there are no
// other keys to add. MONAI 1.3 builds no cross-attention: export with the keys off.
//
// Axis order (export/axis_order.h): by default the weights are rewritten for MONAI's (C, i, j, k)
// arrays (patch kernels and in-patch voxel orders over the reversed axes, token tables in the raster
// of the reversed grid, img_size / patch_size reversed in the constructor); --axis-order native keeps
// mae3d's (C, D, H, W) weights as trained.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "export/axis_order.h"
#include "export/tensor_file.h"
#include "model/mae.h"
#include "run/trained_model.h"

namespace mae {

/// Which MONAI network the export is for.
enum class ExportFormat {
  monai_vit,    ///< monai.networks.nets.ViT (classification=False): encoder only
  monai_unetr,  ///< monai.networks.nets.UNETR: the encoder under `vit.` (the rest stays untrained)
  monai_mae,    ///< monai.networks.nets.MaskedAutoEncoderViT: encoder and decoder
};

/// "monai-vit", "monai-unetr" or "monai-mae".
const char* to_string(ExportFormat format);

/// Parses a --format value; ConfigError naming the flag and the choices for anything else.
ExportFormat parse_export_format(const std::string& name);

/// The unused cross-attention layers of MONAI's TransformerBlock (with_cross_attention=False),
/// which depend on the MONAI release; named by their --cross-attention-keys value.
enum class CrossAttentionKeys {
  none,  ///< "false": MONAI 1.3, no cross-attention layers
  full,  ///< "true": MONAI 1.4 - 1.5, norm_cross_attn and cross_attn.{out_proj,to_q,to_k,to_v}
  norm,  ///< "norm": MONAI >= 1.6, norm_cross_attn only (cross_attn is nn.Identity)
};

/// "false", "true" or "norm".
const char* to_string(CrossAttentionKeys keys);

/// Parses a --cross-attention-keys value; ConfigError naming the flag and the choices for anything else.
CrossAttentionKeys parse_cross_attention_keys(const std::string& value);

/// What to export.
struct ExportOptions {
  ExportFormat format = ExportFormat::monai_vit;  ///< target network
  bool cross_attention_keys = true;               ///< add MONAI >= 1.4's unused cross-attention keys
  AxisOrder axis_order = AxisOrder::monai;        ///< spatial axis order the exported network expects
  bool allow_diverged = false;                    ///< export a checkpoint marked diverged anyway
  /// With cross_attention_keys: also the cross_attn linears of MONAI 1.4 - 1.5 (false: MONAI >= 1.6's
  /// norm_cross_attn only).
  bool cross_attention_linears = true;

  /// The layout the two flags above select.
  CrossAttentionKeys cross_attention() const;
  /// Sets both flags for `keys`.
  void set_cross_attention(CrossAttentionKeys keys);
};

/// CheckpointError naming the checkpoint and its divergence reason when `trained` is marked diverged
/// and `allow` is false (mae-export's --allow-diverged sets it).
void refuse_diverged(const TrainedModel& trained, bool allow);

/// The "checkpoint" entry of export descriptions: path, step, run id, and the diverged flag and
/// reason when the checkpoint is marked diverged.
nlohmann::json checkpoint_description(const TrainedModel& trained);

/// Throws ConfigError (naming --format monai-unetr and what differs) unless the model fits MONAI's
/// UNETR: 3D, exactly 12 encoder layers and patch size 16 on every axis.
void check_unetr_compatible(const MaskedAutoencoderOptions& options);

/// The model's weights under MONAI's names for `export_options.format`, in MONAI's state_dict
/// order, rewritten for `export_options.axis_order`; tensors are float32 CPU copies. Throws
/// ConfigError for an UNETR-incompatible model, and Error when the model holds a parameter the
/// mapping does not know (so nothing is lost silently).
NamedTensors monai_state_dict(MaskedAutoencoderImpl& model, const ExportOptions& export_options);

/// The Python constructor call of the MONAI network matching `options` for `format`, e.g.
/// `ViT(in_channels=1, img_size=(96, 96, 96), patch_size=(16, 16, 16), ...)`; img_size and
/// patch_size in `axis_order` (reversed for monai).
std::string monai_constructor(const MaskedAutoencoderOptions& options, ExportFormat format,
                              AxisOrder axis_order = AxisOrder::monai);

/// The JSON description of an export of `trained` into `pt_path` holding `tensors`: format,
/// checkpoint, architecture, preprocessing, tensor names and shapes, MONAI constructor and loading
/// snippet, notes on positions, axis order and cross-attention keys.
nlohmann::json export_description(const TrainedModel& trained, const ExportOptions& export_options,
                                  const NamedTensors& tensors, const std::string& pt_path);

/// The training preprocessing of `config` as JSON (orientation, spacing, intensity, foreground
/// crop, model input size and tensor axis order in `axis_order`), for the descriptions next to
/// exported files.
nlohmann::json preprocessing_description(const Config& config, AxisOrder axis_order);

/// What a network exported in `axis_order` expects as input, given the training orientation code
/// (`orientation`, "" = the files' own): one sentence for the JSON descriptions.
std::string axis_order_description(AxisOrder axis_order, const std::string& orientation);

/// Where an export went.
struct ExportResult {
  std::string pt_path;      ///< the tensor file
  std::string json_path;    ///< the description beside it
  int64_t num_tensors = 0;  ///< keys in the tensor file
  int64_t num_values = 0;   ///< scalars over all tensors
};

/// Loads the checkpoint (folder or run folder) with its own config, exports it to `out_path` and
/// writes the description beside it. CheckpointError for a bad checkpoint or a diverged one (unless
/// export_options.allow_diverged), ConfigError for an impossible format, IoError naming the file
/// when it cannot be written.
ExportResult export_checkpoint(const std::string& checkpoint, const std::string& out_path,
                               const ExportOptions& export_options);

}  // namespace mae
