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
#include <iomanip>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"
#include "model/flops.h"
#include "model/mae.h"
#include "model/ops.h"
#include "model/presets.h"
#include "train/adamw.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

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

// Median GFLOP/s of a size³ matrix product of `dtype` on `device`.
double matmul_gflops(int64_t size, int reps, torch::Device device, torch::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  auto a = torch::randn({size, size}).to(device, dtype), b = torch::randn({size, size}).to(device, dtype);
  auto c = torch::mm(a, b);  // warm-up
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    const auto t0 = Clock::now();
    torch::mm_out(c, a, b);
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
    times.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(size * size * size) / median(times) / 1e9;
}

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

constexpr int64_t kMaxSteps = 100000;  // --warmup / --iters: a day of preset A steps on two cores

struct BenchSettings {
  int64_t batch = 0;  // 0: the preset's own
  int warmup = 2;
  int iters = 5;
  std::string device = "cpu";
  std::string precision = "fp32";   // fp32 | bf16 (autocast, as the trainer's train.precision)
  std::string attention = "fused";  // fused | explicit (MaskedAutoencoderOptions::fused_attention)
};

std::string bench_one(const std::string& name, const BenchSettings& s, double mm_gflops) {
  int64_t batch = 0;
  auto options = mae::benchmark_preset(name, batch);
  if (s.batch > 0) batch = s.batch;
  options.fused_attention(s.attention == "fused");
  // What actually runs: LibTorch 1.13 has no fused kernel and takes the explicit path either way.
  const bool fused = options.fused_attention() && mae::compat::kHasFusedAttention;
  const bool bf16 = s.precision == "bf16";
  torch::Device device(s.device);
  if (device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, 0);
  torch::manual_seed(0);
  mae::MaskedAutoencoder model(options);
  model->to(device);
  model->train();
  auto groups = mae::decay_groups(*model);
  mae::AdamW optimizer({{groups.first, /*weight_decay=*/0.05}, {groups.second, /*weight_decay=*/0.0}},
                       mae::AdamWOptions{});

  std::vector<int64_t> shape{batch, options.in_channels()};
  shape.insert(shape.end(), options.img_size().begin(), options.img_size().end());
  auto x = torch::randn(shape).to(device);
  auto gen = at::detail::createCPUGenerator(1234);

  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize(device.index());
  };
  std::vector<double> fwd, bwd, opt, step;
  for (int i = 0; i < s.warmup + s.iters; ++i) {
    if (i == s.warmup) reset_peak_device(device);  // peak_device_mb: the timed steps' peak
    sync();
    const auto t0 = Clock::now();
    optimizer.zero_grad();
    torch::Tensor loss;
    {
      mae::compat::AutocastScope autocast(bf16, device.type());
      auto out = model->forward(x, std::nullopt, gen);
      loss = mae::masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask);
    }
    sync();
    const double t_fwd = seconds_since(t0);
    const auto t1 = Clock::now();
    loss.backward();
    sync();
    const double t_bwd = seconds_since(t1);
    const auto t2 = Clock::now();
    optimizer.step();
    sync();
    const double t_opt = seconds_since(t2);
    if (i >= s.warmup) {
      fwd.push_back(t_fwd);
      bwd.push_back(t_bwd);
      opt.push_back(t_opt);
      step.push_back(seconds_since(t0));
    }
  }
  const double step_gflop = 3.0 * mae::forward_flops(options, batch) / 1e9;
  const double step_s = median(step);
  const double gflops = step_gflop / step_s;
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();
  std::ostringstream os;
  os << std::setprecision(4) << "{\"preset\": \"" << name << "\", \"batch\": " << batch
     << ", \"threads\": " << at::get_num_threads() << ", \"device\": \"" << s.device << "\", \"precision\": \""
     << s.precision << "\", \"attention\": \"" << (fused ? "fused" : "explicit")
     << "\", \"params_m\": " << static_cast<double>(params) / 1e6 << ", \"fwd_s\": " << median(fwd)
     << ", \"bwd_s\": " << median(bwd) << ", \"optim_s\": " << median(opt) << ", \"step_s\": " << step_s
     << ", \"step_gflop\": " << step_gflop << ", \"gflops\": " << gflops << ", \"matmul_gflops\": " << mm_gflops
     << ", \"mfu\": " << gflops / mm_gflops << ", \"peak_rss_mb\": " << peak_rss_mb();
  const double device_mb = peak_device_mb(device);
  if (device_mb >= 0) os << ", \"peak_device_mb\": " << device_mb;
  os << ", \"iters\": " << s.iters << "}";
  return os.str();
}

}  // namespace

int main(int argc, char** argv) {
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
  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
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
    for (const auto& p : presets) {
      int64_t batch = 0;
      mae::benchmark_preset(p, batch);  // refuse a bad preset before the slow matmul measurement
    }
    torch::Device device(settings.device);
    if (device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, 0);
    // A GPU needs a larger product than a CPU to reach its rate.
    const double mm = matmul_gflops(device.is_cuda() ? 8192 : 2048, 5, device,
                                    settings.precision == "bf16" ? torch::kBFloat16 : torch::kFloat);
    for (const auto& p : presets) std::cout << bench_one(p, settings, mm) << std::endl;
    return 0;
  });
}
