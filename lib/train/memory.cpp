#include "train/memory.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <vector>

#include "core/error.h"

namespace mae {

// The estimate counts what each transformer block keeps for backward, per token: its input, the
// two LayerNorm outputs, qkv (3 E), the attention output and the residual sum (E each), the MLP's
// hidden and GELU outputs (2 M), plus the softmax probabilities (heads x tokens per token, and as
// much again for a dropout mask). The block being differentiated needs about as much again for its
// gradients, and the attention scores exist twice at their peak. bf16 autocast is counted at 3
// bytes per activation value (a mix of bf16 and float32) plus bf16 copies of the weights.
// Checked against the peak RSS of mae-pretrain (Debian LibTorch 1.13, fp32, 2 threads, Colin27
// MRI, a few steps and a checkpoint), estimate / measured:
//   ViT-B 96^3, decoder 384/512/4 layers, batch 2 (bench preset A)   1.93 / 1.86 GiB
//   ViT-B 96^3, decoder 384/1536/8 layers, batch 4 (configs/ct_96)    2.41 / 2.28 GiB
//   ViT-B 128^3, decoder 384/512/4, batch 2                          2.30 / 2.08 GiB
//   configs/demo.json (64^3, 192 wide, batch 4)                       0.54 / 0.50 GiB
//   160^3 with 8^3 patches (8000 tokens), 192 wide, batch 1           18.8 / 18.9 GiB (attention-bound)
// so within about 1.15x either way; the check refuses only an estimate above physical memory.

namespace {

double block_params(double e, double m, bool qkv_bias) {
  return 4.0 * e + 3.0 * e * e + (qkv_bias ? 3.0 * e : 0.0) + e * e + e + 2.0 * e * m + m + e;
}

// Bytes per sample of what one block keeps for backward over `t` tokens.
double block_saved(double t, double e, double m, double heads, bool dropout, double elem) {
  return elem * (t * (8.0 * e + 2.0 * m) + heads * t * t * (dropout ? 2.0 : 1.0));
}

// Extra bytes per sample at the peak of one block: its gradients and the scores before softmax.
double block_peak(double t, double e, double m, double heads, double elem) {
  return elem * (t * (8.0 * e + 2.0 * m) + 2.0 * heads * t * t);
}

}  // namespace

MemoryEstimate estimate_training_memory(const Config& config) {
  const auto& mc = config.model;
  MemoryEstimate m;
  double voxels = 1.0, patch = 1.0;
  for (size_t i = 0; i < mc.img_size.size(); ++i) {
    voxels *= static_cast<double>(mc.img_size[i]);
    patch *= static_cast<double>(i < mc.patch_size.size() && mc.patch_size[i] > 0 ? mc.patch_size[i] : 1);
  }
  const double c = static_cast<double>(mc.in_channels);
  const double n = voxels / patch;  // patches
  const double p = patch * c;       // values per patch
  const double keep = std::max(1.0, std::floor((1.0 - mc.masking_ratio) * n + 1e-6));
  const double e = static_cast<double>(mc.hidden_size), ed = static_cast<double>(mc.decoder_hidden_size);
  const double mlp = static_cast<double>(mc.mlp_dim), dmlp = static_cast<double>(mc.decoder_mlp_dim);
  const double layers = static_cast<double>(mc.num_layers), dlayers = static_cast<double>(mc.decoder_num_layers);
  const double heads = static_cast<double>(mc.num_heads), dheads = static_cast<double>(mc.decoder_num_heads);
  const double batch = static_cast<double>(config.train.batch_size);
  const bool bf16 = config.train.precision == "bf16";
  const bool dropout = mc.dropout_rate > 0.0;
  const double elem = bf16 ? 3.0 : 4.0;  // bf16 autocast keeps a mix of bf16 and float32 activations

  m.parameters = p * e + e + n * e + e + layers * block_params(e, mlp, mc.qkv_bias) + 2.0 * e + e * ed + ed + ed +
                 n * ed + dlayers * block_params(ed, dmlp, mc.qkv_bias) + 2.0 * ed + ed * p + p;
  m.weights = m.parameters * (16.0 + (bf16 ? 2.0 : 0.0));

  const double te = keep + 1.0, td = n + 1.0;  // encoder: visible patches + cls; decoder: all + cls
  const double enc = layers * block_saved(te, e, mlp, heads, dropout, elem);
  const double dec = dlayers * block_saved(td, ed, dmlp, dheads, dropout, elem) + elem * td * ed * 3.0;
  const double peak = std::max(layers > 0 ? block_peak(te, e, mlp, heads, elem) : 0.0,
                               dlayers > 0 ? block_peak(td, ed, dmlp, dheads, elem) : 0.0);
  m.activations = batch * (enc + dec + peak + elem * keep * (p + e));
  m.io = batch * 4.0 * (2.0 * voxels * c + 6.0 * n * p);
  m.runtime = 0.35 * 1024.0 * 1024.0 * 1024.0;
  m.total = m.weights + m.activations + m.io + m.runtime;
  return m;
}

double physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
  double bytes = pages > 0 && page > 0 ? static_cast<double>(pages) * static_cast<double>(page) : 0.0;
  std::ifstream cg("/sys/fs/cgroup/memory.max");
  std::string limit;
  if (cg >> limit && limit != "max") {
    try {
      const double l = std::stod(limit);
      if (l > 0 && (bytes == 0.0 || l < bytes)) bytes = l;
    } catch (const std::exception&) {
    }
  }
  return bytes;
}

std::string format_bytes(double bytes) {
  char buf[64];
  const double gib = bytes / (1024.0 * 1024.0 * 1024.0);
  if (gib >= 1024.0 * 1024.0) {
    std::snprintf(buf, sizeof(buf), "%.3g GiB", gib);
  } else if (gib >= 1.0) {
    std::snprintf(buf, sizeof(buf), "%.1f GiB", gib);
  } else {
    std::snprintf(buf, sizeof(buf), "%.0f MiB", bytes / (1024.0 * 1024.0));
  }
  return buf;
}

void check_training_memory(const Config& config, double available_bytes) {
  if (available_bytes <= 0) return;
  const MemoryEstimate m = estimate_training_memory(config);
  if (m.total <= available_bytes) return;
  auto list = [](const std::vector<int64_t>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return s + "]";
  };
  throw ConfigError("\"model.img_size\" = " + list(config.model.img_size) +
                    " with \"train.batch_size\" = " + std::to_string(config.train.batch_size) +
                    ": a training step needs about " + format_bytes(m.total) + " (weights and optimizer " +
                    format_bytes(m.weights) + ", activations " + format_bytes(m.activations + m.io) +
                    "), more than this machine's " + format_bytes(available_bytes) +
                    " of memory; lower model.img_size, train.batch_size or the model's size");
}

}  // namespace mae
