// mae-bench: speed of the masked autoencoder's training step on this machine, as JSON lines.
// Each line also carries the same run's matrix-product rate on the same device and in the same
// precision (fp32, or bf16 under --precision bf16), so the result reads as a fraction of what this
// machine can do (mfu = gflops / matmul_gflops).
#include <sys/resource.h>
#include <torch/torch.h>
#ifdef MAE3D_HAVE_C10_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "bench.h"
#include "cli.h"
#include "core/compat.h"
#include "core/cpu_arena.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"
#include "model/flops.h"
#include "model/linear.h"
#include "model/mae.h"
#include "model/ops.h"
#include "model/presets.h"
#include "train/adamw.h"

namespace mae::bench {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Peak bytes the CUDA caching allocator handed out since the last reset, in MiB; -1 where this
// LibTorch has no CUDA library to ask (CPU-only builds) or the device is not a GPU.
double peak_device_mb(torch::Device device) {
#ifdef MAE3D_HAVE_C10_CUDA
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    return static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024.0);  // [0]: StatType::AGGREGATE
  }
#endif
  (void)device;
  return -1.0;
}

void reset_peak_device(torch::Device device) {
#ifdef MAE3D_HAVE_C10_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  (void)device;
}

}  // namespace

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

namespace {

// One "Key:  1234 kB" line of /proc/self/status, in MiB; -1 where it is missing.
double status_mb(const std::string& key) {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) / 1024.0;
  }
  return -1.0;
}

}  // namespace

double current_rss_mb() { return status_mb("VmRSS:"); }

double current_anon_mb() { return status_mb("RssAnon:"); }

c10::Device parse_device(const std::string& name) {
  torch::Device device(name);
  if (device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, 0);
  return device;
}

double matmul_gflops(int64_t size, int reps, torch::Device device, bool bf16) {
  torch::NoGradGuard no_grad;
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat;
  // On a CPU the size grows from 256 up to `size` while the next size's product (8x the work) would
  // take under a second: where products are emulated (bf16 without AVX512_BF16 or AMX, at a few
  // GFLOP/s or less) a 2048^3 one takes minutes, a fast CPU reaches `size` at once.
  int64_t n = device.is_cuda() ? size : std::min<int64_t>(size, 256);
  auto a = torch::randn({n, n}).to(device, dtype), b = torch::randn({n, n}).to(device, dtype);
  // float32 CPU products on the library the model's Linear layers use (lib/model/linear.h).
  const bool onednn = !bf16 && device.is_cpu() && fp32_matmul() == Fp32Matmul::onednn;
  auto product = [&](torch::Tensor& out) {
    if (onednn) {
      onednn_mm(a, b, out);
    } else {
      torch::mm_out(out, a, b);
    }
  };
  auto c = torch::empty_like(a);  // n x n
  product(c);                     // warm-up
  while (n < size) {
    const auto t0 = Clock::now();
    product(c);
    if (8.0 * seconds_since(t0) > 1.0) break;
    n = std::min(size, 2 * n);
    a = torch::randn({n, n}).to(device, dtype);
    b = torch::randn({n, n}).to(device, dtype);
    c = torch::empty_like(a);
    product(c);  // warm-up at the new size
  }
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    const auto t0 = Clock::now();
    product(c);
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    times.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n * n * n) / median(times) / 1e9;
}

StepTiming time_training_step(const MaskedAutoencoderOptions& options, int64_t batch, torch::Device device, bool bf16,
                              int warmup, int iters) {
  torch::manual_seed(0);
  MaskedAutoencoder model(options);
  model->to(device);
  model->train();
  auto groups = decay_groups(*model);
  AdamW optimizer({{groups.first, /*weight_decay=*/0.05}, {groups.second, /*weight_decay=*/0.0}}, AdamWOptions{});

  std::vector<int64_t> shape{batch, options.in_channels()};
  shape.insert(shape.end(), options.img_size().begin(), options.img_size().end());
  auto x = torch::randn(shape).to(device);
  auto gen = at::detail::createCPUGenerator(1234);

  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  };
  std::vector<double> fwd, bwd, opt, step;
  double t_anon = -1.0;
  for (int i = 0; i < warmup + iters; ++i) {
    if (i == warmup) reset_peak_device(device);  // peak_device_mb: the timed steps' peak
    sync();
    const auto t0 = Clock::now();
    optimizer.zero_grad();
    torch::Tensor loss;
    {
      compat::AutocastScope autocast(bf16, device.type());
      auto out = model->forward(x, std::nullopt, gen);
      loss = masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask);
    }
    sync();
    const double t_fwd = seconds_since(t0);
    const auto t1 = Clock::now();
    loss.backward();
    sync();
    const double t_bwd = seconds_since(t1);
    // The step's largest in-use memory is reached by the end of the backward (all gradients, and
    // the heap the activations left); ~20 us, outside the timed phases.
    if (i >= warmup) t_anon = std::max(t_anon, current_anon_mb());
    const auto t2 = Clock::now();
    optimizer.step();
    sync();
    const double t_opt = seconds_since(t2);
    if (i >= warmup) {
      fwd.push_back(t_fwd);
      bwd.push_back(t_bwd);
      opt.push_back(t_opt);
      step.push_back(t_fwd + t_bwd + t_opt);
      t_anon = std::max(t_anon, current_anon_mb());
    }
  }
  StepTiming t;
  t.fwd_s = median(fwd);
  t.bwd_s = median(bwd);
  t.optim_s = median(opt);
  t.step_s = median(step);
  t.anon_mb = t_anon;
  t.step_gflop = 3.0 * forward_flops(options, batch) / 1e9;
  t.attention_share = forward_attention_flops(options, batch) / forward_flops(options, batch);
  for (const auto& p : model->parameters()) {
    t.params += p.numel();
    if (p.requires_grad()) t.trainable += p.numel();
  }
  return t;
}

namespace {

constexpr int64_t kMaxSteps = 100000;  // --warmup / --iters: a day of preset A steps on two cores

struct BenchSettings {
  int64_t batch = 0;  // 0: the preset's own
  int warmup = 2;
  int iters = 5;
  std::string device = "cpu";
  std::string precision = "fp32";    // fp32 | bf16 (autocast, as the trainer's train.precision)
  std::string attention = "fused";   // fused | explicit (MaskedAutoencoderOptions::fused_attention)
  std::string fp32_matmul = "auto";  // auto | blas | onednn (lib/model/linear.h)
  std::vector<int64_t> img, patch;   // empty: the preset's
  // Model options over the preset's; 0 (or a negative ratio) = the preset's.
  int64_t hidden_size = 0, mlp_dim = 0, num_layers = 0, num_heads = 0;
  int64_t decoder_hidden_size = 0, decoder_mlp_dim = 0, decoder_num_layers = 0, decoder_num_heads = 0;
  double masking_ratio = -1.0;
  std::string end_to_end;              // --end-to-end CONFIG
  std::vector<std::string> overrides;  // --set KEY=VALUE for --end-to-end
  bool optimizer = false;              // --optimizer: the optimizer's variants alone
};

// A size list of 1 entry means a cube.
std::vector<int64_t> per_axis(const std::vector<int64_t>& v, size_t dims) {
  return v.size() == 1 ? std::vector<int64_t>(dims, v[0]) : v;
}

// The preset with the command line's changes; ConfigError (naming the flag) for a bad combination.
MaskedAutoencoderOptions bench_options(const std::string& name, const BenchSettings& s, int64_t& batch) {
  auto o = benchmark_preset(name, batch);
  if (s.batch > 0) batch = s.batch;
  const size_t dims = o.img_size().size();
  if (!s.img.empty()) o.img_size(per_axis(s.img, dims));
  if (!s.patch.empty()) o.patch_size(per_axis(s.patch, dims));
  if (s.hidden_size > 0) o.hidden_size(s.hidden_size);
  if (s.mlp_dim > 0) o.mlp_dim(s.mlp_dim);
  if (s.num_layers > 0) o.num_layers(s.num_layers);
  if (s.num_heads > 0) o.num_heads(s.num_heads);
  if (s.decoder_hidden_size > 0) o.decoder_hidden_size(s.decoder_hidden_size);
  if (s.decoder_mlp_dim > 0) o.decoder_mlp_dim(s.decoder_mlp_dim);
  if (s.decoder_num_layers > 0) o.decoder_num_layers(s.decoder_num_layers);
  if (s.decoder_num_heads > 0) o.decoder_num_heads(s.decoder_num_heads);
  if (s.masking_ratio >= 0.0) o.masking_ratio(s.masking_ratio);
  o.fused_attention(s.attention == "fused");
  try {
    o.validate();
  } catch (const ConfigError& e) {
    // The options' own names are the flags' with '_' for '-': say so once.
    throw ConfigError("preset " + name + " with the given flags: " + e.what() +
                      " (flags --img, --patch, --hidden-size, ...)");
  }
  return o;
}

std::string bench_one(const std::string& name, const BenchSettings& s, double mm_gflops, double start_rss_mb) {
  int64_t batch = 0;
  const auto options = bench_options(name, s, batch);
  // What actually runs: LibTorch 1.13 has no fused kernel and takes the explicit path either way.
  const bool fused = options.fused_attention() && compat::kHasFusedAttention;
  const auto device = parse_device(s.device);
  const auto t = time_training_step(options, batch, device, s.precision == "bf16", s.warmup, s.iters);
  const double gflops = t.step_gflop / t.step_s;
  const double rss = peak_rss_mb();
  // fp32 weights, gradients and AdamW's two moments: what any fp32-master trainer must hold.
  const double floor_mb = 16.0 * static_cast<double>(t.trainable) / (1024.0 * 1024.0);
  const int64_t keep = num_visible(options.num_patches(), options.masking_ratio());
  const std::string blas = blas_core_name();
  std::ostringstream os;
  os << std::setprecision(4) << "{\"preset\": \"" << name << "\", \"img\": " << sizes_str(options.img_size())
     << ", \"patch\": " << sizes_str(options.patch_size()) << ", \"batch\": " << batch
     << ", \"encoder_tokens\": " << keep + 1 << ", \"decoder_tokens\": " << options.num_patches() + 1
     << ", \"threads\": " << at::get_num_threads() << ", \"device\": \"" << s.device << "\", \"precision\": \""
     << s.precision << "\", \"attention\": \"" << (fused ? "fused" : "explicit")
     << "\", \"cpu_native_bf16\": " << (cpu_native_bf16() ? (*cpu_native_bf16() ? "true" : "false") : "null")
     << ", \"blas_core\": " << (blas.empty() ? "null" : "\"" + blas + "\"") << ", \"fp32_matmul\": "
     << (s.precision == "fp32" && device.is_cpu() ? std::string("\"") + fp32_matmul_name(fp32_matmul()) + "\""
                                                  : std::string("null"))
     << ", \"params_m\": " << static_cast<double>(t.params) / 1e6 << ", \"fwd_s\": " << t.fwd_s
     << ", \"bwd_s\": " << t.bwd_s << ", \"optim_s\": " << t.optim_s << ", \"step_s\": " << t.step_s
     << ", \"step_gflop\": " << t.step_gflop << ", \"attention_share\": " << t.attention_share
     << ", \"gflops\": " << gflops << ", \"matmul_gflops\": " << mm_gflops << ", \"mfu\": " << gflops / mm_gflops
     << ", \"peak_rss_mb\": " << rss << ", \"state_floor_mb\": " << floor_mb << ", \"overhead_mb\": " << rss - floor_mb;
  // The process as it started (libraries, LibTorch's operator tables): what the step itself cannot
  // shrink; the net overhead is the rest (activations, workspaces, allocator slack).
  if (start_rss_mb >= 0)
    os << ", \"start_rss_mb\": " << start_rss_mb << ", \"net_overhead_mb\": " << rss - floor_mb - start_rss_mb;
  // Without the libraries' clean file-backed pages (shared with every process that maps them).
  if (t.anon_mb >= 0) os << ", \"anon_mb\": " << t.anon_mb << ", \"anon_overhead_mb\": " << t.anon_mb - floor_mb;
  // Which CPU allocator held the tensors (MAE3D_CPU_ALLOCATOR); for the arena, the most its blocks
  // ever held at once and the highest offset it handed out (what it can have resident).
  const std::string allocator = install_cpu_arena();
  os << ", \"cpu_allocator\": \"" << allocator << "\"";
  if (allocator == "arena") {
    const auto arena = cpu_arena_stats();
    os << ", \"arena_peak_mb\": " << static_cast<double>(arena.peak_in_use) / (1024.0 * 1024.0)
       << ", \"arena_high_water_mb\": " << static_cast<double>(arena.high_water) / (1024.0 * 1024.0);
  }
  const double device_mb = peak_device_mb(device);
  if (device_mb >= 0) os << ", \"peak_device_mb\": " << device_mb;
  os << ", \"iters\": " << s.iters << "}";
  return os.str();
}

// --optimizer: the preset model's AdamW update alone, in the variants a training step can take,
// alternated within every iteration so that the machine's drift hits them alike: the update; the
// update with the gradient norm taken in the same pass (a logging step); clipping as the trainer does
// it (one norm pass, the factor folded into the update); and the two torch ways: a norm per parameter
// then the update, and clip_grad_norm_ then the update. Fresh random gradients before each.
std::string bench_optimizer(const std::string& name, const BenchSettings& s) {
  int64_t batch = 0;
  const auto options = bench_options(name, s, batch);
  torch::manual_seed(0);
  MaskedAutoencoder model(options);
  const auto device = parse_device(s.device);
  model->to(device);
  auto groups = decay_groups(*model);
  AdamW optimizer({{groups.first, /*weight_decay=*/0.05}, {groups.second, /*weight_decay=*/0.0}}, AdamWOptions{});
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  };
  std::vector<torch::Tensor> params = groups.first;
  params.insert(params.end(), groups.second.begin(), groups.second.end());
  int64_t count = 0;
  for (const auto& p : params) count += p.numel();
  const char* names[] = {"update_s", "update_with_norm_s", "clip_s", "torch_norm_then_update_s",
                         "torch_clip_grad_norm_then_update_s"};
  constexpr int kVariants = 5;
  std::vector<double> times[kVariants];
  torch::NoGradGuard no_grad;
  for (int i = 0; i < s.warmup + s.iters; ++i) {
    for (int k = 0; k < kVariants; ++k) {
      for (auto& p : params) p.mutable_grad() = torch::randn_like(p).mul_(1e-3);
      sync();
      const auto t0 = Clock::now();
      double sq = 0.0;
      AdamW::StepOptions o;
      if (k == 0) {
        optimizer.step();
      } else if (k == 1) {
        o.grad_sq_norm = &sq;
        optimizer.step(o);
      } else if (k == 2) {
        o.grad_scale = std::min(1.0, 1e-3 / (std::sqrt(optimizer.grad_sq_norm()) + 1e-6));
        optimizer.step(o);
      } else if (k == 3) {
        for (const auto& p : params) sq += std::pow(p.grad().norm().item<double>(), 2);
        optimizer.step();
      } else {
        torch::nn::utils::clip_grad_norm_(params, 1e-3);
        optimizer.step();
      }
      sync();
      if (i >= s.warmup) times[k].push_back(seconds_since(t0));
    }
  }
  std::ostringstream os;
  os << std::setprecision(4) << "{\"preset\": \"" << name
     << "\", \"optimizer\": \"AdamW\", \"threads\": " << at::get_num_threads()
     << ", \"params_m\": " << static_cast<double>(count) / 1e6;
  for (int k = 0; k < kVariants; ++k) os << ", \"" << names[k] << "\": " << median(times[k]);
  os << ", \"iters\": " << s.iters << "}";
  return os.str();
}

}  // namespace

}  // namespace mae::bench

int main(int argc, char** argv) {
  const double start_rss_mb = mae::bench::current_rss_mb();
  using mae::bench::BenchSettings;
  using mae::bench::kMaxSteps;
  CLI::App app{"mae-bench: training-step speed of the masked autoencoder, as JSON lines"};
  app.name("mae-bench");
  mae::CommonFlags common;
  BenchSettings settings;
  std::vector<std::string> presets{"A"};
  mae::add_common_flags(app, common);
  app.add_option("--preset", presets, "presets to run: A (96³, ViT-B), B (64³, ViT-S-like), tiny")
      ->expected(1, -1)
      ->check(CLI::IsMember({"A", "B", "tiny"}));
  app.add_option("--warmup", settings.warmup, "untimed steps first")->check(mae::int_range(0, kMaxSteps));
  app.add_option("--iters", settings.iters, "timed steps (median reported)")->check(mae::int_range(1, kMaxSteps));
  app.add_option("--device", settings.device, "cpu, cuda or cuda:N");
  app.add_option("--batch", settings.batch, "batch size (default: the preset's: A 2, B 4, tiny 2)")
      ->check(mae::int_range(1, 4096));
  app.add_option("--precision", settings.precision, "fp32, or bf16 (autocast, as train.precision \"bf16\")")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--attention", settings.attention,
                 "fused (scaled_dot_product_attention on LibTorch 2.x; 1.13 runs explicit) or explicit")
      ->check(CLI::IsMember({"fused", "explicit"}));
  app.add_option("--fp32-matmul", settings.fp32_matmul,
                 "library for float32 CPU products: onednn, blas (LibTorch's BLAS) or auto (onednn where built), as "
                 "train.fp32_matmul")
      ->check(CLI::IsMember({"auto", "blas", "onednn"}));
  // The model options over the preset's, named as the config's model keys.
  app.add_option("--img", settings.img, "image (crop) size: one value for a cube, or one per axis")
      ->expected(1, 3)
      ->check(mae::int_range(1, 4096));
  app.add_option("--patch", settings.patch, "patch size: one value for a cube, or one per axis")
      ->expected(1, 3)
      ->check(mae::int_range(1, 4096));
  struct IntFlag {
    const char* name;
    int64_t* value;
  };
  for (const IntFlag& f : {IntFlag{"--hidden-size", &settings.hidden_size}, IntFlag{"--mlp-dim", &settings.mlp_dim},
                           IntFlag{"--num-layers", &settings.num_layers}, IntFlag{"--num-heads", &settings.num_heads},
                           IntFlag{"--decoder-hidden-size", &settings.decoder_hidden_size},
                           IntFlag{"--decoder-mlp-dim", &settings.decoder_mlp_dim},
                           IntFlag{"--decoder-num-layers", &settings.decoder_num_layers},
                           IntFlag{"--decoder-num-heads", &settings.decoder_num_heads}}) {
    app.add_option(f.name, *f.value, std::string("model option (default: the preset's)"))
        ->check(mae::int_range(1, 1 << 20));
  }
  app.add_option("--masking-ratio", settings.masking_ratio, "share of patches masked (default: the preset's)")
      ->check(mae::real_range(0.0, 1.0));
  auto* e2e = app.add_option("--end-to-end", settings.end_to_end,
                             "CONFIG: train this config for --warmup + --iters steps through mae-pretrain's trainer "
                             "(warm volume cache, temporary run folder), then time its model alone; prints both");
  app.add_option("--set", settings.overrides, "KEY=VALUE over the --end-to-end config, as mae-pretrain --set")
      ->needs(e2e);
  app.add_flag("--optimizer", settings.optimizer,
               "time the preset model's AdamW alone: the update, with the gradient norm in the same pass, clipping, "
               "and torch's norm / clip_grad_norm_ before the update")
      ->excludes(e2e);
  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    if (!settings.end_to_end.empty()) {
      if (!mae::bench::has_end_to_end()) {
        throw mae::ConfigError("--end-to-end: this mae-bench was built without the train area");
      }
      for (const char* flag :
           {"--preset", "--batch", "--precision", "--device", "--img", "--patch", "--attention", "--fp32-matmul"}) {
        if (app.count(flag) > 0) {
          throw mae::ConfigError(std::string("--end-to-end takes the model, batch, device and precision from the "
                                             "config; use --set instead of ") +
                                 flag);
        }
      }
      mae::bench::end_to_end(settings.end_to_end, settings.overrides, settings.warmup, settings.iters);
      return 0;
    }
    if (!mae::is_device_name(settings.device, /*allow_auto=*/false)) {
      throw mae::ConfigError("--device \"" + mae::printable(settings.device) +
                             "\" is not a device; valid devices: cpu, cuda, cuda:N (N = 0 .. number of GPUs - 1)");
    }
    if (settings.device.rfind("cuda", 0) == 0) {
      if (!torch::cuda::is_available()) {
        throw mae::ConfigError("--device " + settings.device + ": CUDA is not available in this build or machine");
      }
      const auto colon = settings.device.find(':');
      const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
      if (colon != std::string::npos && std::stoll(settings.device.substr(colon + 1)) >= count) {
        throw mae::ConfigError("--device " + settings.device + ": this machine has " + std::to_string(count) +
                               " GPU(s), cuda:0 .. cuda:" + std::to_string(count - 1));
      }
    }
    mae::set_fp32_matmul(mae::resolve_fp32_matmul(settings.fp32_matmul, "--fp32-matmul"));
    for (const auto& p : presets) {
      int64_t batch = 0;
      mae::bench::bench_options(p, settings, batch);  // refuse a bad preset or flag before the slow matmul
    }
    if (settings.optimizer) {
      for (const auto& p : presets) std::cout << mae::bench::bench_optimizer(p, settings) << std::endl;
      return 0;
    }
    const auto device = mae::bench::parse_device(settings.device);
    if (settings.precision == "bf16" && device.is_cpu()) {
      const auto warning = mae::cpu_bf16_warning("--precision bf16");
      // On stderr: stdout carries only the JSON lines.
      if (!warning.empty()) std::cerr << "mae-bench: warning: " << warning << std::endl;
    }
    // A GPU needs a larger product than a CPU to reach its rate.
    const double mm =
        mae::bench::matmul_gflops(device.is_cuda() ? 8192 : 2048, 5, device, settings.precision == "bf16");
    for (const auto& p : presets) std::cout << mae::bench::bench_one(p, settings, mm, start_rss_mb) << std::endl;
    return 0;
  });
}

#ifndef MAE3D_BENCH_END_TO_END
namespace mae::bench {
bool has_end_to_end() { return false; }
void end_to_end(const std::string&, const std::vector<std::string>&, int, int) {}
}  // namespace mae::bench
#endif
