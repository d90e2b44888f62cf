// mae-selftest: does training work on this device, and does a save/resume round trip continue
// exactly? Needs only LibTorch (it is part of model-only builds, where the ITK trainer is absent),
// so it is the training check of GPU machines. One JSON line on stdout; exit 0 when every check
// passes, 1 when one fails, 2 for bad usage.
//
// On a fixed synthetic batch (smooth random volumes) with masks drawn from their own generator:
//   1. uninterrupted: T AdamW steps from a seeded model; the loss must fall (mean of the last five
//      steps below (1 - min_drop) x the mean of the first five: single steps vary with the mask);
//   2. interrupted: K steps from the same seeds, then model, optimizer and every random state
//      (mask generator, global CPU generator, the CUDA generator) saved with torch::save archives;
//   3. resumed: a model and optimizer built from other seeds, loaded from those files, T - K more
//      steps. Its losses and final weights must equal run 1's bit for bit.
// Deterministic algorithms are on (and CUBLAS_WORKSPACE_CONFIG set) unless --deterministic off.
#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>

#include "cli.h"
#include "core/compat.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"
#include "model/mae.h"
#include "model/ops.h"
#include "model/presets.h"
#include "train/adamw.h"

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

struct Settings {
  std::string preset = "tiny";
  std::string device = "cpu";
  std::string precision = "fp32";
  std::string attention = "fused";
  std::string deterministic = "strict";  // strict | warn | off
  int64_t batch = 0;                     // 0: the preset's
  int steps = 40;
  int resume_at = 30;
  double lr = 0.0;  // 0: the preset's (tiny 2e-3, B 5e-4)
  double min_drop = 0.2;
  std::string out;  // checkpoint folder; "" = a fresh temporary folder, removed afterwards
  bool keep = false;
};

// Models small enough that the whole check takes seconds: "tiny" (32³) everywhere, "B" (64³) where a
// GPU makes it cheap; both are mae-bench's presets.
constexpr uint64_t kModelSeed = 7, kMaskSeed = 11, kDataSeed = 13;
constexpr uint64_t kOtherModelSeed = 1001, kOtherMaskSeed = 1002;  // the resumed run must not depend on these

// Smooth random volumes: Gaussian noise on a grid of half the patch grid's size (at least 2 per
// axis), trilinearly upsampled, then each volume standardised: structure that the visible patches
// predict, so that a few dozen steps visibly lower the loss whatever the patch size.
torch::Tensor synthetic_batch(const mae::MaskedAutoencoderOptions& o, int64_t batch, torch::Device device) {
  auto gen = at::detail::createCPUGenerator(kDataSeed);
  std::vector<int64_t> coarse{batch, o.in_channels()}, size;
  const auto grid = o.grid();
  for (size_t i = 0; i < grid.size(); ++i) {
    coarse.push_back(std::max<int64_t>(2, grid[i] / 2));
    size.push_back(o.img_size()[i]);
  }
  auto x = at::randn(coarse, gen, torch::TensorOptions().dtype(torch::kFloat));
  x = torch::nn::functional::interpolate(
      x, torch::nn::functional::InterpolateFuncOptions().size(size).mode(torch::kTrilinear).align_corners(false));
  const auto dims = std::vector<int64_t>{1, 2, 3, 4};
  x = (x - x.mean(dims, true)) / x.std(dims, true, true);
  return x.to(device);
}

at::Tensor generator_state(at::Generator& gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_generator_state(at::Generator& gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// One training setup: model, optimizer and the mask generator, as the trainer builds them.
struct Run {
  Run(const mae::MaskedAutoencoderOptions& options, torch::Device device, uint64_t model_seed, uint64_t mask_seed,
      double lr)
      : model(nullptr), mask_gen(at::detail::createCPUGenerator(mask_seed)) {
    torch::manual_seed(model_seed);  // also reseeds the CUDA generators
    model = mae::MaskedAutoencoder(options);
    model->to(device);
    model->train();
    auto groups = mae::decay_groups(*model);
    mae::AdamWOptions o;
    o.lr = lr;
    optimizer =
        std::make_unique<mae::AdamW>(std::vector<mae::AdamWGroup>{{groups.first, 0.05}, {groups.second, 0.0}}, o);
  }
  mae::MaskedAutoencoder model;
  std::unique_ptr<mae::AdamW> optimizer;
  at::Generator mask_gen;
};

// Learning rate of step `step` (0-based): linear warm-up over 5 steps, then constant. A function
// of the step only, so a resumed run follows the same schedule.
double lr_at(int step, double peak) { return peak * std::min(1.0, static_cast<double>(step + 1) / 5.0); }

void train(Run& run, const torch::Tensor& x, int from, int to, double peak, bool bf16, std::vector<float>& losses) {
  for (int step = from; step < to; ++step) {
    run.optimizer->set_lr(lr_at(step, peak));
    run.optimizer->zero_grad();
    torch::Tensor loss;
    {
      mae::compat::AutocastScope autocast(bf16, x.device().type());
      auto out = run.model->forward(x, std::nullopt, run.mask_gen);
      loss = mae::masked_mse_loss(out.pred.to(torch::kFloat), run.model->target(x), out.mask);
    }
    loss.backward();
    run.optimizer->step();
    losses.push_back(loss.item<float>());
  }
}

std::vector<std::pair<std::string, torch::Tensor>> state_tensors(const torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> all;
  for (const auto& p : model.named_parameters(true)) all.emplace_back(p.key(), p.value());
  for (const auto& b : model.named_buffers(true)) all.emplace_back("buffer:" + b.key(), b.value());
  return all;
}

// Writes model.pt, optimizer.pt and rng.pt into dir; returns the bytes written.
uintmax_t save_state(Run& run, torch::Device device, const fs::path& dir) {
  fs::create_directories(dir);
  torch::serialize::OutputArchive model_archive;
  for (const auto& [name, t] : state_tensors(*run.model)) model_archive.write(name, t, /*is_buffer=*/true);
  model_archive.save_to((dir / "model.pt").string());
  torch::serialize::OutputArchive opt_archive;
  run.optimizer->save(opt_archive);
  opt_archive.save_to((dir / "optimizer.pt").string());
  torch::serialize::OutputArchive rng_archive;
  rng_archive.write("mask", generator_state(run.mask_gen), true);
  auto global = at::detail::getDefaultCPUGenerator();
  rng_archive.write("global_cpu", generator_state(global), true);
  if (device.is_cuda()) {
    auto cuda = at::globalContext().defaultGenerator(device);
    rng_archive.write("cuda", generator_state(cuda), true);
  }
  rng_archive.save_to((dir / "rng.pt").string());
  uintmax_t bytes = 0;
  for (const char* f : {"model.pt", "optimizer.pt", "rng.pt"}) bytes += fs::file_size(dir / f);
  return bytes;
}

void load_state(Run& run, torch::Device device, const fs::path& dir) {
  torch::NoGradGuard no_grad;
  torch::serialize::InputArchive model_archive;
  model_archive.load_from((dir / "model.pt").string());
  for (auto& [name, t] : state_tensors(*run.model)) {
    torch::Tensor stored;
    model_archive.read(name, stored, true);
    if (!stored.sizes().equals(t.sizes())) throw mae::CheckpointError(name + ": wrong shape in model.pt");
    t.copy_(stored);
  }
  torch::serialize::InputArchive opt_archive;
  opt_archive.load_from((dir / "optimizer.pt").string());
  run.optimizer->load(opt_archive);
  torch::serialize::InputArchive rng_archive;
  rng_archive.load_from((dir / "rng.pt").string());
  torch::Tensor state;
  rng_archive.read("mask", state, true);
  set_generator_state(run.mask_gen, state);
  rng_archive.read("global_cpu", state, true);
  auto global = at::detail::getDefaultCPUGenerator();
  set_generator_state(global, state);
  if (device.is_cuda()) {
    rng_archive.read("cuda", state, true);
    auto cuda = at::globalContext().defaultGenerator(device);
    set_generator_state(cuda, state);
  }
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  std::ostringstream os;
  os << std::setprecision(9) << v;
  return os.str();
}

std::string json_losses(const std::vector<float>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + json_number(v[i]);
  return s + "]";
}

torch::Device resolve_device(const std::string& name) {
  if (!mae::is_device_name(name, /*allow_auto=*/false)) {
    throw mae::ConfigError("--device \"" + mae::printable(name) +
                           "\" is not a device; valid devices: cpu, cuda, cuda:N (N = 0 .. number of GPUs - 1)");
  }
  if (name == "cpu") return torch::kCPU;
  if (!torch::cuda::is_available()) {
    throw mae::ConfigError("--device " + name + ": CUDA is not available in this build or machine");
  }
  torch::Device d(name);
  const int64_t count = static_cast<int64_t>(torch::cuda::device_count());
  if (d.has_index() && d.index() >= count) {
    throw mae::ConfigError("--device " + name + ": this machine has " + std::to_string(count) +
                           " GPU(s), cuda:0 .. cuda:" + std::to_string(count - 1));
  }
  return d.has_index() ? d : torch::Device(torch::kCUDA, 0);
}

struct Outcome {
  std::vector<float> straight, first_part, resumed;
  double param_max_abs_diff = 0.0;
  bool params_identical = true;
  uintmax_t checkpoint_bytes = 0;
  int64_t params = 0;
};

Outcome run_checks(const Settings& s, const mae::MaskedAutoencoderOptions& options, int64_t batch, torch::Device device,
                   const fs::path& dir) {
  const bool bf16 = s.precision == "bf16";
  const auto x = synthetic_batch(options, batch, device);
  Outcome o;
  std::vector<torch::Tensor> final_straight;
  {
    Run run(options, device, kModelSeed, kMaskSeed, s.lr);
    for (const auto& p : run.model->parameters()) o.params += p.numel();
    train(run, x, 0, s.steps, s.lr, bf16, o.straight);
    for (const auto& [name, t] : state_tensors(*run.model)) final_straight.push_back(t.detach().clone());
  }
  {
    Run run(options, device, kModelSeed, kMaskSeed, s.lr);
    train(run, x, 0, s.resume_at, s.lr, bf16, o.first_part);
    o.checkpoint_bytes = save_state(run, device, dir);
  }
  Run run(options, device, kOtherModelSeed, kOtherMaskSeed, s.lr);
  load_state(run, device, dir);
  train(run, x, s.resume_at, s.steps, s.lr, bf16, o.resumed);
  const auto final_resumed = state_tensors(*run.model);
  for (size_t i = 0; i < final_straight.size(); ++i) {
    const auto& a = final_straight[i];
    const auto& b = final_resumed[i].second;
    if (!torch::equal(a, b)) o.params_identical = false;
    o.param_max_abs_diff =
        std::max(o.param_max_abs_diff, (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>());
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any cuBLAS handle exists: deterministic cuBLAS needs a fixed workspace configuration.
  ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  CLI::App app{"mae-selftest: a short training run and an exact save/resume round trip, as one JSON line"};
  app.name("mae-selftest");
  mae::CommonFlags common;
  Settings s;
  mae::add_common_flags(app, common);
  app.add_option("--device", s.device, "cpu, cuda or cuda:N");
  app.add_option("--preset", s.preset, "tiny (32³) or B (64³, mae-bench's preset B)")
      ->check(CLI::IsMember({"tiny", "B"}));
  app.add_option("--batch", s.batch, "batch size (default: the preset's: tiny 2, B 4)")->check(mae::int_range(1, 4096));
  app.add_option("--precision", s.precision, "fp32 or bf16 (autocast, as train.precision)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--attention", s.attention, "fused or explicit")->check(CLI::IsMember({"fused", "explicit"}));
  app.add_option("--steps", s.steps, "training steps in all")->check(mae::int_range(10, 100000));
  app.add_option("--resume-at", s.resume_at, "step after which the state is saved and reloaded")
      ->check(mae::int_range(1, 100000));
  app.add_option("--lr", s.lr, "peak learning rate, 5 warm-up steps (default: tiny 2e-3, B 5e-4)")
      ->check(mae::real_range(1e-8, 1.0));
  app.add_option("--min-drop", s.min_drop,
                 "the loss must fall by this fraction (mean of the last 5 steps vs the first 5)")
      ->check(mae::real_range(0.0, 1.0));
  app.add_option("--deterministic", s.deterministic,
                 "strict (deterministic algorithms; falls back to warn where an op has none), warn, off")
      ->check(CLI::IsMember({"strict", "warn", "off"}));
  app.add_option("--out", s.out, "folder for the saved state (default: a temporary folder, removed afterwards)");
  app.add_flag("--keep", s.keep, "keep the temporary folder");
  return mae::run_program(app, argc, argv, [&] {
    mae::apply_common_flags(common);
    if (s.resume_at >= s.steps) {
      throw mae::ConfigError("--resume-at " + std::to_string(s.resume_at) + " must be below --steps " +
                             std::to_string(s.steps));
    }
    const torch::Device device = resolve_device(s.device);
    int64_t batch = 0;
    auto options = mae::benchmark_preset(s.preset, batch);
    if (s.batch > 0) batch = s.batch;
    if (s.lr <= 0.0) s.lr = s.preset == "B" ? 5e-4 : 2e-3;
    options.fused_attention(s.attention == "fused");
    const bool fused = options.fused_attention() && mae::compat::kHasFusedAttention;

    fs::path dir = s.out;
    bool temporary = false;
    if (dir.empty()) {
      std::string tmpl = (fs::temp_directory_path() / "mae-selftest-XXXXXX").string();
      if (!::mkdtemp(tmpl.data())) throw mae::IoError(tmpl + ": cannot create a temporary folder");
      dir = tmpl;
      temporary = true;
    }
    struct Remove {  // the temporary folder goes on every way out, errors included
      fs::path dir;
      ~Remove() {
        std::error_code ec;
        if (!dir.empty()) fs::remove_all(dir, ec);
      }
    } remove{temporary && !s.keep ? dir : fs::path()};

    std::string deterministic = s.deterministic, strict_refused;
    auto set_mode = [&](const std::string& mode) {
      at::globalContext().setDeterministicAlgorithms(mode != "off", /*warn_only=*/mode == "warn");
      at::globalContext().setDeterministicCuDNN(mode != "off");
      at::globalContext().setBenchmarkCuDNN(false);
    };
    const auto t0 = Clock::now();
    Outcome o;
    set_mode(deterministic);
    try {
      o = run_checks(s, options, batch, device, dir);
    } catch (const c10::Error& e) {
      // An op without a deterministic kernel on this device refuses strict mode: say which, and
      // run again with warnings instead (the identity checks then tell whether it mattered).
      const std::string what = e.what_without_backtrace();
      if (deterministic != "strict" || what.find("deterministic") == std::string::npos) throw;
      strict_refused = what.substr(0, what.find('\n'));
      deterministic = "warn";
      set_mode(deterministic);
      o = run_checks(s, options, batch, device, dir);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();

    const float first = o.straight.front(), last = o.straight.back();
    double head = 0.0, tail = 0.0;
    for (int i = 0; i < 5; ++i) head += o.straight[i] / 5.0;
    for (int i = s.steps - 5; i < s.steps; ++i) tail += o.straight[i] / 5.0;
    const bool finite = std::all_of(o.straight.begin(), o.straight.end(), [](float v) { return std::isfinite(v); });
    const bool falls = finite && tail < (1.0 - s.min_drop) * head;
    bool first_identical = true, resume_identical = true;
    double max_loss_diff = 0.0;
    for (int i = 0; i < s.resume_at; ++i) {
      if (!same_bits(o.first_part[i], o.straight[i])) first_identical = false;
    }
    for (int i = s.resume_at; i < s.steps; ++i) {
      const float a = o.straight[i], b = o.resumed[i - s.resume_at];
      if (!same_bits(a, b)) resume_identical = false;
      max_loss_diff = std::max(max_loss_diff, std::abs(static_cast<double>(a) - b));
    }
    const bool pass = falls && resume_identical && o.params_identical;
    std::ostringstream os;
    os << "{\"selftest\": \"train-resume\", \"preset\": \"" << s.preset << "\", \"device\": \"" << device.str()
       << "\", \"precision\": \"" << s.precision << "\", \"attention\": \"" << (fused ? "fused" : "explicit")
       << "\", \"deterministic\": \"" << deterministic << "\"";
    if (!strict_refused.empty()) os << ", \"strict_refused\": " << nlohmann::json(strict_refused).dump();
    os << ", \"threads\": " << at::get_num_threads()
       << ", \"params_m\": " << json_number(static_cast<double>(o.params) / 1e6) << ", \"batch\": " << batch
       << ", \"steps\": " << s.steps << ", \"resume_at\": " << s.resume_at << ", \"lr\": " << json_number(s.lr)
       << ", \"first_loss\": " << json_number(first) << ", \"last_loss\": " << json_number(last)
       << ", \"first5_mean\": " << json_number(head) << ", \"last5_mean\": " << json_number(tail)
       << ", \"loss_drop\": " << json_number(1.0 - tail / head) << ", \"min_drop\": " << json_number(s.min_drop)
       << ", \"loss_falls\": " << (falls ? "true" : "false")
       << ", \"rerun_identical\": " << (first_identical ? "true" : "false")
       << ", \"resume_identical\": " << (resume_identical ? "true" : "false")
       << ", \"resume_max_loss_diff\": " << json_number(max_loss_diff)
       << ", \"params_identical\": " << (o.params_identical ? "true" : "false")
       << ", \"param_max_abs_diff\": " << json_number(o.param_max_abs_diff)
       << ", \"checkpoint_bytes\": " << o.checkpoint_bytes << ", \"seconds\": " << json_number(seconds)
       << ", \"losses\": " << json_losses(o.straight) << ", \"resumed_losses\": " << json_losses(o.resumed)
       << ", \"pass\": " << (pass ? "true" : "false") << "}";
    std::cout << os.str() << std::endl;
    return pass ? 0 : 1;
  });
}
