// mae-bench --end-to-end CONFIG: the trainer with its loader on the config's own data, against the
// same model's step alone, in one process and one run.
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench.h"
#include "core/error.h"
#include "core/threads.h"
#include "run/config.h"
#include "train/trainer.h"

namespace fs = std::filesystem;

namespace mae::bench {

namespace {

// Removes the temporary run folder however the benchmark ends.
struct TempRunDir {
  fs::path path;
  ~TempRunDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

bool has_end_to_end() { return true; }

void end_to_end(const std::string& config_path, const std::vector<std::string>& overrides, int warmup, int iters) {
  Config config = load_config(config_path, overrides);
  if (config.train.grad_accum_steps != 1) {
    throw ConfigError(config_path + ": train.grad_accum_steps = " + std::to_string(config.train.grad_accum_steps) +
                      "; --end-to-end compares one micro-batch per step, set it to 1");
  }
  TempRunDir dir{fs::temp_directory_path() / ("mae3d_bench_" + std::to_string(::getpid()))};
  const int64_t steps = warmup + iters;
  config.output.dir = dir.path.string();
  config.output.tensorboard = false;
  config.train.max_steps = steps;
  config.train.log_every = 1;  // a metrics record (with step_s and data_wait_s) for every step
  config.train.checkpoint_every = steps;
  config.train.best_by = "val_loss";
  config.probe.every = 0;
  config.data.val_fraction = 0.0;

  // Warm the volume cache first, so that data wait measures the loader and not the first read.
  // (Volumes the check refuses are left out by the trainer as by mae-pretrain.)
  if (config.threads > 0) set_threads(config.threads);
  check_training_data(config);
  train(config, TrainOptions{});

  std::ifstream metrics(dir.path / "metrics.jsonl");
  std::vector<double> step_s;
  double wait = 0.0, total = 0.0;
  for (std::string line; std::getline(metrics, line);) {
    const auto rec = nlohmann::json::parse(line);
    if (rec.value("step", int64_t{0}) <= warmup) continue;  // the first steps carry start-up costs
    step_s.push_back(rec.at("step_s").get<double>());
    wait += rec.at("data_wait_s").get<double>();
    total += rec.at("step_s").get<double>();
  }
  if (step_s.empty()) throw Error(config_path + ": the run wrote no timed metrics records");

  const auto options = model_options_from(config.model);
  const bool bf16 = config.train.precision == "bf16";
  const auto device =
      parse_device(config.device == "auto" ? (torch::cuda::is_available() ? "cuda" : "cpu") : config.device);
  const auto model_only = time_training_step(options, config.train.batch_size, device, bf16, warmup, iters);
  const double mm = matmul_gflops(device.is_cuda() ? 8192 : 2048, 5, device, bf16);
  const double e2e = median(step_s);

  std::ostringstream os;
  os << std::setprecision(4) << "{\"end_to_end\": " << nlohmann::json(config_path).dump()
     << ", \"batch\": " << config.train.batch_size << ", \"precision\": \"" << config.train.precision
     << "\", \"device\": \"" << device.str() << "\", \"threads\": " << at::get_num_threads()
     << ", \"workers\": " << config.data.workers << ", \"steps\": " << iters << ", \"e2e_step_s\": " << e2e
     << ", \"data_wait_share\": " << wait / total << ", \"model_only_step_s\": " << model_only.step_s
     << ", \"e2e_over_model_only\": " << e2e / model_only.step_s << ", \"step_gflop\": " << model_only.step_gflop
     << ", \"matmul_gflops\": " << mm << ", \"mfu_e2e\": " << model_only.step_gflop / e2e / mm
     << ", \"peak_rss_mb\": " << peak_rss_mb() << "}";
  std::cout << os.str() << std::endl;
}

}  // namespace mae::bench
