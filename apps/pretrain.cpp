// mae-pretrain: masked-autoencoder pretraining from a JSON config. Thin: parse the command line,
// load the config, call mae::train (with mae-reconstruct's montage as TensorBoard's validation
// picture when the infer area is built).
#include <csignal>
#include <iostream>

#include "cli.h"
#include "core/error.h"
#include "run/config.h"
#include "train/trainer.h"

#ifdef MAE3D_VALIDATION_MONTAGE
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "infer/montage.h"
#include "infer/reconstruct.h"
#include "run/trained_model.h"
#endif

namespace {

#ifdef MAE3D_VALIDATION_MONTAGE
// reconstruct_volume runs on the CPU. A model on another device is copied into a new CPU model;
// building it draws initial weights from the global CPU generator, whose state is put back so that
// training's random streams (and so exact resume) are untouched.
mae::MaskedAutoencoder cpu_model(const mae::MaskedAutoencoder& model) {
  if (model->parameters().front().device().is_cpu()) return model;
  auto gen = at::detail::getDefaultCPUGenerator();
  at::Tensor state;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
  }
  mae::MaskedAutoencoder copy(model->options());
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  torch::NoGradGuard no_grad;
  const auto params = model->named_parameters();
  for (auto& p : copy->named_parameters()) p.value().copy_(params[p.key()]);
  const auto buffers = model->named_buffers();
  for (auto& b : copy->named_buffers()) b.value().copy_(buffers[b.key()]);
  copy->eval();
  return copy;
}

// TensorBoard's validation picture: mae-reconstruct's montage (middle axial, coronal and sagittal
// slices: original, masked input, reconstruction, error) of the one-window volume `window`, its
// masks drawn from the config's seed, so every validation shows the same patches hidden.
std::optional<at::Tensor> validation_montage(const mae::Config& config, const mae::MaskedAutoencoder& model,
                                             const mae::Volume& window, const std::string& name, int64_t step) {
  mae::TrainedModel trained;
  trained.step = step;
  trained.config = config;
  trained.model = cpu_model(model);
  mae::ReconstructOptions ro;
  ro.seed = config.seed;
  ro.overlap = 0.0;
  ro.batch_size = 1;
  const mae::Reconstruction rec = mae::reconstruct_volume(trained, window, ro);
  char psnr[160];
  std::snprintf(psnr, sizeof psnr, "psnr over masked voxels: model %.2f db, window-mean baseline %.2f db",
                rec.metrics.model_masked.psnr, rec.metrics.baseline_masked.psnr);
  mae::MontageInputs mi;
  mi.input = &rec.input;
  mi.reconstruction = rec.reconstruction.data;
  mi.mask = rec.mask.data;
  mi.slices = mae::resolve_slices(rec.input, {});
  mi.title = {"step " + std::to_string(step) + ": " + std::filesystem::path(name).filename().string() +
              ", centre window, " + std::to_string(static_cast<int>(std::lround(rec.masking_ratio * 100))) +
              "% of patches masked, seed " + std::to_string(config.seed)};
  mi.footer = {psnr};
  return mae::render_montage(mi);
}
#endif

// Runs from the executable's .preinit_array: before any shared library's initialisers (LibTorch's
// and ITK's static set-up take about half a second), so a Ctrl-C at any moment of start-up is a
// handled stop. The handler only sets a flag, which needs nothing initialised.
void install_handlers_before_library_init(int, char**, char**) { mae::install_stop_signal_handlers(); }

}  // namespace

__attribute__((section(".preinit_array"),
               used)) static void (*const kEarlyHandlers)(int, char**, char**) = install_handlers_before_library_init;

int main(int argc, char** argv) {
  // Again at the start of main, in case a library's set-up replaced the handlers.
  mae::install_stop_signal_handlers();
  CLI::App app{"mae-pretrain: pretrain a 3D masked autoencoder on a folder or list of volumes"};
  app.name("mae-pretrain");
  std::string config_path;
  std::vector<std::string> overrides;
  std::string resume_path;
  bool print_config = false, dry_run = false, check_data = false;
  mae::CommonFlags common;
  app.add_option("--config,-c", config_path, "run config (JSON); see configs/README.md")->required();
  app.add_option("--set", overrides, "override a config key, e.g. --set train.lr=2e-4 (repeatable)")
      ->allow_extra_args(false);
  auto* resume =
      app.add_option("--resume", resume_path,
                     "continue from the run folder's latest checkpoint, or from PATH (checkpoint or run folder)")
          ->expected(0, 1);
  app.add_flag("--print-config", print_config, "print the resolved config and exit");
  app.add_flag("--dry-run", dry_run, "check config and data, build the model, and exit");
  app.add_flag("--check-data", check_data, "read every listed volume once, report each, exit 2 if any failed");
  app.add_option("--log-level", common.log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  int threads_flag = -1;
  app.add_option("--threads", threads_flag, "intra-op threads (overrides the config's threads; 0 = all)")
      ->check(mae::int_range(0, mae::kMaxThreads));

  return mae::run_program(app, argc, argv, [&] {
    if (threads_flag >= 0) overrides.push_back("threads=" + std::to_string(threads_flag));
    const mae::Config config = mae::load_config(config_path, overrides);
    if (print_config) {
      std::cout << mae::config_to_json(config).dump(2) << std::endl;
      return 0;
    }
    common.threads = config.threads;
    mae::apply_common_flags(common);
    if (check_data) {
      const auto report = mae::check_training_data(config);
      std::cout << report.text() << std::flush;
      return report.failures() > 0 ? 2 : 0;
    }
    mae::TrainOptions options;
    options.resume = resume->count() > 0;
    options.resume_from = resume_path;
    options.dry_run = dry_run;
#ifdef MAE3D_VALIDATION_MONTAGE
    options.validation_image = [&config](const mae::MaskedAutoencoder& model, const mae::Volume& window,
                                         const std::string& name, int64_t step) {
      return validation_montage(config, model, window, name, step);
    };
#endif
    const auto result = mae::train(config, options);
    if (result.rank != 0) {  // rank 0 tells the user; the others end with the same status
      if (result.interrupted) return result.signal == SIGTERM ? 143 : 130;
      return 0;
    }
    if (result.before_training) {
      if (result.resumed_from.empty() && !options.resume) {
        std::cerr << "mae-pretrain: stopped before training started; nothing to resume" << std::endl;
      } else {
        std::cerr << "mae-pretrain: stopped before training started; the run is unchanged"
                  << (result.resumed_from.empty() ? std::string() : " at " + result.resumed_from)
                  << " (continue with --resume)" << std::endl;
      }
      return result.signal == SIGTERM ? 143 : 130;
    }
    if (dry_run) {
      std::cout << "dry run: config, data and model are fine" << std::endl;
      return 0;
    }
    if (result.interrupted) {
      std::cerr << "mae-pretrain: stopped at step " << result.step << "; checkpoint " << result.checkpoint
                << " (continue with --resume)" << std::endl;
      return result.signal == SIGTERM ? 143 : 130;
    }
    return 0;
  });
}
