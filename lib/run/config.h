// The run configuration of mae-pretrain: one JSON file with the sections `data`, `model`, `train`,
// `output`, `distributed` and `probe` plus top-level `seed`, `device` and `threads`. Reading is strict (unknown keys
// are errors naming the closest valid key), every key has a default, and the resolved config (all keys, defaults filled
// in) is what the run folder and every checkpoint keep. configs/README.md lists every key with its default and meaning.
#pragma once

#include <nlohmann/json.hpp>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "data/config.h"
#include "model/mae.h"

namespace mae {

/// The `model` section: MaskedAutoencoderOptions under the same names, plus the loss option.
struct ModelConfig {
  int64_t in_channels = 1;                        ///< image channels (must match the data)
  std::vector<int64_t> img_size{96, 96, 96};      ///< crop / model input size (D, H, W)
  std::vector<int64_t> patch_size{16, 16, 16};    ///< patch size (D, H, W)
  int64_t hidden_size = 768;                      ///< encoder width
  int64_t mlp_dim = 3072;                         ///< encoder MLP width
  int64_t num_layers = 12;                        ///< encoder blocks
  int64_t num_heads = 12;                         ///< encoder heads
  double masking_ratio = 0.75;                    ///< share of patches masked
  int64_t decoder_hidden_size = 384;              ///< decoder width
  int64_t decoder_mlp_dim = 512;                  ///< decoder MLP width
  int64_t decoder_num_layers = 4;                 ///< decoder blocks
  int64_t decoder_num_heads = 12;                 ///< decoder heads
  std::string proj_type = "conv";                 ///< "conv" | "perceptron"
  std::string pos_embed_type = "sincos";          ///< "sincos" | "learnable" | "none"
  std::string decoder_pos_embed_type = "sincos";  ///< "sincos" | "learnable" | "none"
  double dropout_rate = 0.0;                      ///< dropout in [0, 1]
  bool qkv_bias = false;                          ///< bias on the qkv projection
  bool norm_pix_loss = false;                     ///< normalise each target patch (MAE paper option)
};

/// The `train` section.
struct TrainConfig {
  int64_t batch_size = 2;              ///< crops per micro-batch
  int64_t max_steps = 0;               ///< optimizer steps; 0 = epochs × steps per epoch
  int64_t epochs = 100;                ///< used when max_steps is 0
  std::optional<double> lr;            ///< absolute learning rate; null = base_lr × effective batch / 256
  double base_lr = 1.5e-4;             ///< MAE paper rule: lr = base_lr × effective_batch / 256
  double lr_min = 0.0;                 ///< end of the cosine decay
  int64_t lr_warmup_steps = 100;       ///< linear warmup from 0 to lr
  double weight_decay = 0.05;          ///< AdamW decay (none on biases, norms, tokens, positions)
  double beta1 = 0.9;                  ///< AdamW β1
  double beta2 = 0.95;                 ///< AdamW β2
  int64_t grad_accum_steps = 1;        ///< micro-batches per optimizer step
  double grad_clip_norm = 0.0;         ///< clip the global gradient norm to this; 0 = off
  std::string precision = "fp32";      ///< "fp32" | "bf16" (autocast, fp32 master weights)
  std::string fp32_matmul = "auto";    ///< float32 CPU products: "auto" (onednn where built) | "onednn" | "blas"
  int64_t log_every = 10;              ///< steps between metrics records and plain progress lines
  int64_t checkpoint_every = 500;      ///< steps between checkpoints (and one at the end)
  int64_t keep_last = 3;               ///< checkpoints kept (plus the best by best_by)
  int64_t val_every = 0;               ///< steps between validations; 0 = at every checkpoint
  std::string on_nonfinite = "error";  ///< "error": checkpoint marked diverged, stop; "skip": skip the batch
  int64_t max_nonfinite = 100;         ///< with "skip": stop after this many skipped batches
  std::string best_by = "val_loss";    ///< the checkpoint kept as best: "val_loss" (lowest) | "probe" (highest score)
};

/// One labelled volume of the `probe` section.
struct ProbeVolumeConfig {
  std::string image;   ///< image file or DICOM folder (relative paths: to the current directory)
  std::string labels;  ///< integer label volume in the image's physical space
};

/// The `probe` section: a linear probe of the encoder during training (lib/probe). Off by default.
struct ProbeConfig {
  std::vector<ProbeVolumeConfig> train;  ///< volumes the probe is fitted on
  std::vector<ProbeVolumeConfig> test;   ///< volumes it is scored on (empty with split "checkerboard")
  std::string target = "fractions";      ///< "fractions" (ridge, R²) | "majority" (logistic, accuracy)
  std::string split = "none";            ///< "none" | "checkerboard" (2x2x2-patch blocks of the train volumes)
  bool include_background = false;       ///< keep patches whose voxels are all background
  int64_t folds = 3;                     ///< cross-validation folds for the L2 strength, 2 .. 10
  int64_t every = 0;                     ///< steps between probes (and at the last step); 0 = off
};

/// The `output` section.
struct OutputConfig {
  std::string dir = "runs/mae";  ///< run folder: config, log, metrics, checkpoints
  bool tensorboard = true;       ///< also write TensorBoard event files (scalars, validation montage) there
};

/// The `distributed` section: how ranks talk when WORLD_SIZE > 1 (torchrun, SLURM or
/// scripts/launch_local.sh start them); unused by a single process. Every rank must read the same values.
struct DistributedConfig {
  std::string backend = "auto";  ///< "auto" (Gloo on CPU, NCCL on CUDA) | "gloo" | "nccl"
  int64_t timeout_s = 300;       ///< seconds a rendezvous or collective may wait before all ranks give up; 1 .. 86400
  double bucket_mb = 25.0;       ///< gradient all-reduce bucket size in MiB; > 0, <= 1024
  bool overlap = true;           ///< start each bucket's all-reduce during the backward pass
};

/// The whole run configuration.
struct Config {
  uint64_t seed = 0;              ///< fixes data order, crops, flips, masks and initialisation
  std::string device = "auto";    ///< "cpu" | "cuda" | "cuda:N" | "auto" (CUDA when available)
  int threads = 0;                ///< intra-op threads, 0 = all hardware threads
  DataConfig data;                ///< see data/config.h
  ModelConfig model;              ///< model options
  TrainConfig train;              ///< optimisation
  OutputConfig output;            ///< where results go
  DistributedConfig distributed;  ///< multi-process training (WORLD_SIZE > 1)
  ProbeConfig probe;              ///< linear probe during training (off by default)
};

/// Applies "a.b.c=value" overrides to a JSON tree. The value is JSON when it parses (numbers, true,
/// null, [1,2], "text"); a value starting with [, { or " must be valid JSON (ConfigError with the
/// parse position otherwise: `[16,16` is a typo, not a name); anything else is a bare string
/// (device=cpu, output.dir=runs/b). ConfigError for a malformed item, a number too large for JSON,
/// an empty key segment or a key inside a value that is not a section.
void apply_overrides(nlohmann::json& tree, const std::vector<std::string>& overrides);

/// Reads a config from JSON strictly (ConfigError naming the key and value).
Config config_from_json(const nlohmann::json& tree);

/// Reads a config file (read_json_file: a folder, a missing, unreadable or empty file, invalid
/// JSON with its line and column, a key given twice), applies overrides and reads strictly.
/// ConfigError naming the file.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});

/// The resolved config: every key with its value.
nlohmann::json config_to_json(const Config& config);

/// Model options from the model section (the only bridge between config and model).
MaskedAutoencoderOptions model_options_from(const ModelConfig& model);

}  // namespace mae
