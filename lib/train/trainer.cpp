#include "train/trainer.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "core/compat.h"
#include "core/error.h"
#include "core/threads.h"
#include "data/cache.h"
#include "data/check.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/transforms.h"
#include "model/ops.h"
#include "train/adamw.h"
#include "train/checkpoint.h"
#include "train/memory.h"
#include "train/progress.h"
#include "train/schedule.h"
#include "train/tensorboard.h"

namespace fs = std::filesystem;

namespace mae {

namespace {

std::atomic<int> g_stop_signal{0};
volatile std::sig_atomic_t g_sigint_count = 0;

extern "C" void on_stop_signal(int sig) {
  if (sig == SIGINT && ++g_sigint_count >= 2) ::_exit(130);
  g_stop_signal.store(sig);
}

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Seeds of the run's random streams, derived from the config seed.
uint64_t mask_seed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ULL + 0x6D61736BULL; }
uint64_t val_mask_seed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ULL + 0x76616C6DULL; }

torch::Device resolve_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (name == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  if (!torch::cuda::is_available()) {
    throw ConfigError(
        "\"device\" = \"" + name +
        "\": CUDA is not available (this LibTorch has no CUDA support or no GPU is visible); use \"cpu\"");
  }
  torch::Device d(name);
  if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count())) {
    throw ConfigError("\"device\" = \"" + name + "\": only " + std::to_string(torch::cuda::device_count()) +
                      " CUDA device(s) are visible");
  }
  return d;
}

at::Tensor generator_state(at::Generator& gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_generator_state(at::Generator& gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

// Keeps only records with step <= `step` (after a resume, later records are recomputed).
void truncate_metrics(const fs::path& file, int64_t step) {
  std::ifstream in(file);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    auto rec = nlohmann::json::parse(line, nullptr, false);
    if (rec.is_discarded() || !rec.contains("step") || rec["step"].get<int64_t>() <= step) {
      if (!rec.is_discarded()) kept += line + "\n";
    }
  }
  in.close();
  const fs::path tmp = file.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept;
    if (!out) throw IoError(tmp.string() + ": cannot write");
  }
  fs::rename(tmp, file);
}

// Console logging, plus <run_dir>/train.log when given (never for a dry run or data check).
void setup_logging(const std::optional<fs::path>& run_dir) {
  auto console = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  std::vector<spdlog::sink_ptr> sinks{console};
  if (run_dir) {
    std::shared_ptr<spdlog::sinks::basic_file_sink_mt> file;
    try {
      file = std::make_shared<spdlog::sinks::basic_file_sink_mt>((*run_dir / "train.log").string());
    } catch (const spdlog::spdlog_ex& e) {
      throw IoError((*run_dir / "train.log").string() + ": cannot open the log file: " + e.what());
    }
    file->set_level(spdlog::level::info);
    sinks.push_back(file);
  }
  auto logger = std::make_shared<spdlog::logger>("mae3d", sinks.begin(), sinks.end());
  logger->set_level(spdlog::get_level());
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

struct RunData {
  std::vector<DatasetEntry> train, val;
  DataConfig config;
};

// The pre-flight check. With `report_only` the caller gets the report (for --check-data) and no
// training lists; otherwise bad volumes are logged and refused or skipped per on_bad_volume.
RunData prepare_data(const Config& config, bool report_only, CheckReport* checked) {
  RunData d;
  d.config = config.data;
  if (d.config.cache_dir.empty()) d.config.cache_dir = default_cache_dir();
  auto split = split_validation(read_dataset(d.config.dataset), d.config.val_fraction, config.seed);
  std::vector<DatasetEntry> all = split.training;
  all.insert(all.end(), split.validation.begin(), split.validation.end());
  spdlog::info("pre-flight check of {} volume(s) ({} training, {} validation), cache {}", all.size(),
               split.training.size(), split.validation.size(), d.config.cache_dir);
  const auto report = check_data(all, d.config);
  for (const auto& v : report.volumes) spdlog::debug("{}", v.line());
  if (report_only) {
    *checked = report;
    return d;
  }
  spdlog::info("{}", report.summary());
  if (report.failures() > 0 && d.config.on_bad_volume != "skip") {
    for (const auto& v : report.volumes)
      if (!v.ok) spdlog::error("{}", v.failure());
  }
  const auto usable = usable_entries(report, d.config);
  auto keep = [&](const std::vector<DatasetEntry>& list) {
    std::vector<DatasetEntry> out;
    for (const auto& e : list)
      for (const auto& u : usable)
        if (u.name() == e.name()) {
          out.push_back(e);
          break;
        }
    return out;
  };
  d.train = keep(split.training);
  d.val = keep(split.validation);
  if (d.train.empty()) throw InputError(d.config.dataset + ": no usable training volume");
  return d;
}

double validate(MaskedAutoencoder& model, const RunData& data, const Config& config, const torch::Device& device,
                bool bf16) {
  DataConfig vcfg = data.config;
  vcfg.flip_prob = 0.0;
  LoaderOptions lo;
  lo.crop_size = {config.model.img_size[0], config.model.img_size[1], config.model.img_size[2]};
  lo.batch_size = config.train.batch_size;
  lo.seed = config.seed + 1;
  lo.shuffle = false;
  lo.drop_last = false;
  Loader loader(data.val, vcfg, lo);
  auto gen = at::detail::createCPUGenerator(val_mask_seed(config.seed));
  torch::NoGradGuard no_grad;
  model->eval();
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < loader.batches_per_epoch(); ++b) {
    auto batch = loader.next();
    auto x = batch.images.to(device);
    compat::AutocastScope autocast(bf16, device.type());
    auto out = model->forward(x, std::nullopt, gen);
    auto loss = masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask, config.model.norm_pix_loss);
    sum += loss.item<double>() * static_cast<double>(x.size(0));
    count += x.size(0);
  }
  model->train();
  return count > 0 ? sum / static_cast<double>(count) : std::nan("");
}

// The window TensorBoard's validation picture shows: the centre crop of model.img_size of `entry`
// (padded as the loader pads a small volume), its origin moved so every voxel keeps its position.
Volume validation_window(const DatasetEntry& entry, const DataConfig& data, const Config& config) {
  Volume v = VolumeCache(data).load(entry).volume;
  const auto shape = v.shape_dhw();
  const Dhw crop{config.model.img_size[0], config.model.img_size[1], config.model.img_size[2]};
  at::Tensor x = pad_to_size(v.data, crop, pad_value(data.intensity));
  std::array<int64_t, 3> offset{};  // (D, H, W) index of the window's first voxel in the volume
  for (int a = 0; a < 3; ++a) {
    const int64_t before = std::max<int64_t>(0, crop[a] - shape[a]) / 2;
    const int64_t start = (x.size(a + 1) - crop[a]) / 2;
    x = x.narrow(a + 1, start, crop[a]);
    offset[a] = start - before;
  }
  v.data = x.contiguous();
  const std::array<double, 3> index_xyz{static_cast<double>(offset[2]), static_cast<double>(offset[1]),
                                        static_cast<double>(offset[0])};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) v.origin[i] += v.direction[i * 3 + j] * v.spacing[j] * index_xyz[j];
  return v;
}

}  // namespace

void request_stop(int signal) { g_stop_signal.store(signal == 0 ? SIGINT : signal); }

void clear_stop_request() {
  g_stop_signal.store(0);
  g_sigint_count = 0;
}

void install_stop_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  // A launcher may have blocked them across exec so that a signal during dynamic loading waits:
  // unblocking delivers such a pending signal to the handler now.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigprocmask(SIG_UNBLOCK, &set, nullptr);
}

TrainResult train(const Config& config, const TrainOptions& options) {
  TrainResult result;
  // Stopped before anything started (a signal during start-up): nothing to do, nothing written.
  auto stopped_before_training = [&](int sig) {
    result.interrupted = true;
    result.before_training = true;
    result.signal = sig;
    return result;
  };
  if (const int sig = g_stop_signal.load()) return stopped_before_training(sig);
  const int threads = set_threads(config.threads);
  const torch::Device device = resolve_device(config.device);
  const fs::path run_dir(config.output.dir);
  // A dry run and a data check only read: no folder, log, config.json or lock is written.
  const bool writes = !options.dry_run && !options.check_data_only;
  if (!options.check_data_only && device.is_cpu()) check_training_memory(config, physical_memory_bytes());
  std::optional<RunLock> run_lock;
  if (writes) {
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec || !fs::is_directory(run_dir)) {
      throw IoError(run_dir.string() + ": cannot create the run folder (output.dir): " +
                    (ec ? ec.message() : std::string("not a folder")));
    }
    if (::access(run_dir.c_str(), W_OK) != 0) throw IoError(run_dir.string() + ": the run folder is not writable");
    run_lock.emplace(run_dir.string());  // ConfigError naming the holder when another process trains here
    setup_logging(run_dir);
    remove_partial_checkpoints(run_dir.string());  // folders of writes a crash interrupted
  } else {
    setup_logging(std::nullopt);
  }

  // Checkpoint to continue from, if any.
  CheckpointReadLock resume_lock;
  std::string resume_dir;
  if (options.resume) {
    resume_lock = lock_checkpoint(options.resume_from.empty() ? run_dir.string() : options.resume_from);
    resume_dir = resume_lock.dir();
  } else if (!options.check_data_only && !options.dry_run && !latest_checkpoint(run_dir.string()).empty()) {
    throw ConfigError("\"output.dir\" = \"" + run_dir.string() +
                      "\" already holds checkpoints; pass --resume to continue that run or choose another output.dir");
  }
  CheckpointInfo resumed;
  if (!resume_dir.empty()) {
    resumed = read_checkpoint_info(resume_dir);
    // Another run's checkpoint resumed into a folder holding a run would mix the two (and abandon
    // the folder's own later checkpoints): refused. Into an empty folder, the run continues there.
    const std::string own = run_id_of(run_dir.string());
    if (!own.empty() && own != resumed.run_id) {
      throw CheckpointError(resume_dir + ": is a checkpoint of run " + resumed.run_id + ", but \"output.dir\" = \"" +
                            run_dir.string() + "\" holds run " + own +
                            "; resume it into its own run folder or an empty output.dir");
    }
    const auto current = config_to_json(config);
    if (!resumed.config.contains("model") || resumed.config.at("model") != current.at("model")) {
      throw CheckpointError(resume_dir + ": its model section differs from the config's; resume with the same model");
    }
    // Keys that decide data order, crops and masks: changing them would silently break exact resume.
    for (const char* key : {"/seed", "/train/batch_size", "/train/grad_accum_steps", "/data/dataset",
                            "/data/val_fraction", "/data/num_samples", "/data/flip_prob", "/data/orientation",
                            "/data/spacing_mm", "/data/intensity", "/data/foreground_threshold"}) {
      const nlohmann::json::json_pointer ptr(key);
      if (!resumed.config.contains(ptr) || resumed.config.at(ptr) != current.at(ptr)) {
        std::string name = std::string(key).substr(1);
        std::replace(name.begin(), name.end(), '/', '.');
        throw CheckpointError(resume_dir + ": \"" + name + "\" was " +
                              (resumed.config.contains(ptr) ? resumed.config.at(ptr).dump() : std::string("absent")) +
                              " in the checkpoint and is " + current.at(ptr).dump() +
                              " now; resume with the checkpoint's value (data order and masks depend on it)");
      }
    }
    if (resumed.diverged) {
      spdlog::warn("{}: resuming a checkpoint marked diverged ({})", resume_dir, resumed.diverged_reason);
    }
  }

  CheckReport checked;
  RunData data;
  try {
    data = prepare_data(config, options.check_data_only, &checked);
  } catch (const InputError& e) {
    // Ctrl-C during the pre-flight: the user asked to stop, which wins over what the check found.
    const int sig = g_stop_signal.load();
    if (sig == 0 || options.check_data_only) throw;
    spdlog::warn("{}", e.what());
    return stopped_before_training(sig);
  }
  if (options.check_data_only) {
    result.data_failures = checked.failures();
    result.data_report = checked.text();
    return result;
  }
  if (const int sig = g_stop_signal.load()) return stopped_before_training(sig);  // during the pre-flight

  torch::manual_seed(config.seed);
  MaskedAutoencoder model(model_options_from(config.model));
  model->to(device);
  model->train();
  auto groups = decay_groups(*model);
  AdamW optimizer({{groups.first, config.train.weight_decay}, {groups.second, 0.0}},
                  AdamWOptions{0.0, config.train.beta1, config.train.beta2, 1e-8});

  LoaderOptions lo;
  lo.crop_size = {config.model.img_size[0], config.model.img_size[1], config.model.img_size[2]};
  lo.batch_size = config.train.batch_size;
  lo.seed = config.seed;
  LoaderPosition start;
  int64_t step = 0, skipped = 0;
  double smoothed = std::nan("");
  std::optional<double> best_val;
  auto mask_gen = at::detail::createCPUGenerator(mask_seed(config.seed));
  const int64_t accum = config.train.grad_accum_steps;
  if (!resume_dir.empty()) {
    const auto& s = resumed.trainer_state;
    const std::string state_file = resume_dir + "/trainer_state.json";
    step = s.step;
    skipped = s.nonfinite_skipped;
    start.epoch = s.loader_epoch;
    start.batch = s.loader_batch;
    // The loader position must be one this step count can reach: every optimizer step read accum
    // batches, every skipped one between 1 and accum.
    const int64_t per_epoch = Loader(data.train, data.config, lo).batches_per_epoch();
    if (start.batch >= per_epoch) {
      throw CheckpointError(state_file + ": \"loader_batch\" = " + std::to_string(start.batch) +
                            " is outside an epoch of " + std::to_string(per_epoch) + " batches");
    }
    const __int128 read = static_cast<__int128>(start.epoch) * per_epoch + start.batch;
    const __int128 least = static_cast<__int128>(step) * accum + skipped;
    const __int128 most = static_cast<__int128>(step + skipped) * accum;
    if (read < least || read > most) {
      throw CheckpointError(state_file + ": loader position (\"loader_epoch\" " + std::to_string(start.epoch) +
                            ", \"loader_batch\" " + std::to_string(start.batch) + ") does not fit \"step\" " +
                            std::to_string(step) + " and \"nonfinite_skipped\" " + std::to_string(skipped) + " with " +
                            std::to_string(per_epoch) + " batches per epoch and " + std::to_string(accum) +
                            " per step");
    }
    smoothed = s.smoothed_loss ? *s.smoothed_loss : std::nan("");
    best_val = s.best_val_loss;
    load_model(resume_dir, *model, resumed);
    std::map<const void*, std::string> names;
    for (const auto& p : model->named_parameters()) names[p.value().unsafeGetTensorImpl()] = p.key();
    std::vector<std::pair<std::string, at::Tensor>> params;
    for (const auto* group : {&groups.first, &groups.second}) {
      for (const auto& t : *group) params.emplace_back(names[t.unsafeGetTensorImpl()], t);
    }
    load_optimizer(resume_dir, optimizer, params, resumed);
    const auto rng = load_rng(resume_dir, resumed);
    const std::string rng_file = resume_dir + "/rng.pt";
    auto global = at::detail::getDefaultCPUGenerator();
    auto restore = [&](at::Generator& gen, const char* key) {
      const auto it = rng.find(key);
      if (it == rng.end()) throw CheckpointError(rng_file + ": the \"" + std::string(key) + "\" state is missing");
      try {
        set_generator_state(gen, it->second);
      } catch (const std::exception& e) {
        throw CheckpointError(rng_file + ": the \"" + std::string(key) + "\" state is damaged");
      }
    };
    restore(mask_gen, "mask");
    restore(global, "global_cpu");
    if (device.is_cuda() && rng.count("cuda")) {
      auto cuda = at::globalContext().defaultGenerator(device);
      restore(cuda, "cuda");
    }
    resume_lock.release();  // everything is in memory; pruning may delete the folder later
    result.resumed_from = resume_dir;
  }
  const std::string run_id = resume_dir.empty() ? new_run_id() : resumed.run_id;
  Loader loader(data.train, data.config, lo, start);
  const int64_t total = config.train.max_steps > 0
                            ? config.train.max_steps
                            : std::max<int64_t>(1, config.train.epochs * loader.batches_per_epoch() / accum);
  const int64_t effective_batch = config.train.batch_size * accum;
  const double peak = config.train.lr ? *config.train.lr : scaled_lr(config.train.base_lr, effective_batch);
  const bool bf16 = config.train.precision == "bf16";
  const int64_t val_every = config.train.val_every > 0 ? config.train.val_every : config.train.checkpoint_every;

  const auto estimate = estimate_training_memory(config);
  spdlog::info(
      "model: {:.2f} M parameters, {} patches of {} voxels, {} visible; device {}, {} threads; a step needs about "
      "{} (estimate){}",
      [&] {
        double n = 0;
        for (const auto& p : model->parameters()) n += static_cast<double>(p.numel());
        return n / 1e6;
      }(),
      model->options().num_patches(), model->options().patch_dim(),
      num_visible(model->options().num_patches(), config.model.masking_ratio), device.str(), threads,
      format_bytes(estimate.total), device.is_cpu() ? " of " + format_bytes(physical_memory_bytes()) : "");
  spdlog::info(
      "data: {} training and {} validation volume(s), {} batch(es) per epoch; lr {:.3g} (effective batch {}), "
      "{} steps{}",
      data.train.size(), data.val.size(), loader.batches_per_epoch(), peak, effective_batch, total,
      resume_dir.empty() ? "" : ", resuming from " + resume_dir + " at step " + std::to_string(step));
  if (options.dry_run) {
    result.step = step;
    return result;
  }

  // The resolved config and the run id, written once per start.
  {
    const auto resolved = config_to_json(config);
    std::ofstream out(run_dir / "config.json", std::ios::trunc);
    out << resolved.dump(2) << "\n";
    if (!out) throw IoError((run_dir / "config.json").string() + ": cannot write");
    std::ofstream id(run_dir / "run_id", std::ios::trunc);
    id << run_id << "\n";
    if (!id) throw IoError((run_dir / "run_id").string() + ": cannot write");
  }

  const fs::path metrics_path = run_dir / "metrics.jsonl";
  if (resume_dir.empty()) {
    std::ofstream(metrics_path, std::ios::trunc);
  } else {
    truncate_metrics(metrics_path, step);
  }
  std::ofstream metrics(metrics_path, std::ios::app);
  if (!metrics) throw IoError(metrics_path.string() + ": cannot open for writing");
  // TensorBoard: existing event files are cut back to this start's step like metrics.jsonl (also
  // with output.tensorboard off, so the folder's curves never disagree), then a new file is begun.
  const auto cut = truncate_events(run_dir.string(), step);
  if (cut.records_removed > 0 || !cut.files_removed.empty()) {
    spdlog::info("TensorBoard event files: {} record(s) after step {} removed, {} file(s) without data deleted",
                 cut.records_removed, step, cut.files_removed.size());
  }
  std::optional<EventWriter> events;
  std::optional<Volume> val_window;
  if (config.output.tensorboard) {
    events.emplace(run_dir.string(), step + 1);
    spdlog::info("TensorBoard events: {}", events->path());
    if (options.validation_image && !data.val.empty()) {
      val_window = validation_window(data.val.front(), data.config, config);
    }
  }

  auto trainer_state = [&](const LoaderPosition& pos) {
    TrainerState t;
    t.step = step;
    t.loader_epoch = pos.epoch;
    t.loader_batch = pos.batch;
    t.nonfinite_skipped = skipped;
    if (std::isfinite(smoothed)) t.smoothed_loss = smoothed;
    t.best_val_loss = best_val;
    t.lr_peak = peak;
    t.total_steps = total;
    return t;
  };
  const int64_t start_step = step;
  int64_t last_saved_step = resume_dir.empty() ? -1 : step;
  // Checkpoints after the resumed step belong to the abandoned continuation: removed once this
  // start's first checkpoint is safely written (and `latest` names it), never before.
  bool abandon_pending = !resume_dir.empty();
  auto write_checkpoint = [&](bool diverged, std::optional<double> val_loss, const LoaderPosition& pos,
                              const std::string& reason) {
    CheckpointInfo info;
    info.step = step;
    info.run_id = run_id;
    info.config = config_to_json(config);
    info.trainer_state = trainer_state(pos);
    info.diverged = diverged;
    info.diverged_reason = reason;
    info.val_loss = val_loss;
    if (events) events->sync();  // the curves up to this checkpoint are on disk with it
    auto global = at::detail::getDefaultCPUGenerator();
    std::map<std::string, at::Tensor> rng{{"mask", generator_state(mask_gen)}, {"global_cpu", generator_state(global)}};
    if (device.is_cuda()) {
      auto cuda = at::globalContext().defaultGenerator(device);
      rng["cuda"] = generator_state(cuda);
    }
    result.checkpoint = save_checkpoint(run_dir.string(), info, *model, &optimizer, rng);
    if (!diverged) {
      last_saved_step = step;
      if (abandon_pending) {
        remove_checkpoints_after(run_dir.string(), start_step, result.checkpoint);
        abandon_pending = false;
      }
      prune_checkpoints(run_dir.string(), config.train.keep_last);
    }
    spdlog::info("checkpoint {}{}", result.checkpoint, diverged ? " (marked diverged)" : "");
  };

  Progress progress(total, step, config.train.log_every);
  LoaderPosition position = loader.position();
  while (step < total) {
    if (const int sig = g_stop_signal.load()) {
      progress.finish();
      if (step == start_step) {  // no step done in this start: nothing new to save
        spdlog::warn("stop requested (signal {}) before the first step", sig);
        result.step = step;
        return stopped_before_training(sig);
      }
      if (last_saved_step == step) {
        spdlog::warn("stop requested (signal {}): step {} is already saved in {}", sig, step, result.checkpoint);
      } else {
        spdlog::warn("stop requested (signal {}): writing a checkpoint at step {}", sig, step);
        write_checkpoint(false, std::nullopt, position, "");
      }
      result.interrupted = true;
      result.signal = sig;
      result.step = step;
      return result;
    }
    const auto t_step = Clock::now();
    const double lr = lr_at(step, total, config.train.lr_warmup_steps, peak, config.train.lr_min);
    optimizer.set_lr(lr);
    double data_wait = 0.0, loss_value = 0.0;
    int64_t samples = 0;
    bool finite = true;
    for (int64_t micro = 0; micro < accum; ++micro) {
      const auto t_data = Clock::now();
      auto batch = loader.next();
      data_wait += seconds_since(t_data);
      auto x = batch.images.to(device);
      if (x.size(1) != config.model.in_channels) {
        throw InputError(data.config.dataset + ": volumes have " + std::to_string(x.size(1)) +
                         " channel(s) but model.in_channels is " + std::to_string(config.model.in_channels));
      }
      samples += x.size(0);
      torch::Tensor loss;
      {
        compat::AutocastScope autocast(bf16, device.type());
        auto out = model->forward(x, std::nullopt, mask_gen);
        loss = masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask, config.model.norm_pix_loss);
      }
      const double v = loss.item<double>();
      if (!std::isfinite(v)) {
        finite = false;
        loss_value = v;
        break;
      }
      loss_value += v / static_cast<double>(accum);
      (accum > 1 ? loss / static_cast<double>(accum) : loss).backward();
    }
    const LoaderPosition next_position = loader.position();
    if (!finite) {
      optimizer.zero_grad();
      if (config.train.on_nonfinite == "error") {
        progress.finish();
        write_checkpoint(
            true, std::nullopt, position,
            "the loss was not finite (" + std::to_string(loss_value) + ") at step " + std::to_string(step + 1));
        throw Error("step " + std::to_string(step + 1) + ": the loss is not finite (" + std::to_string(loss_value) +
                    "); checkpoint " + result.checkpoint +
                    " marked diverged. Lower train.lr, enable train.grad_clip_norm, or set train.on_nonfinite "
                    "\"skip\"");
      }
      ++skipped;
      spdlog::warn("step {}: non-finite loss, batch skipped ({} so far)", step + 1, skipped);
      if (skipped > config.train.max_nonfinite) {
        throw Error("step " + std::to_string(step + 1) + ": " + std::to_string(skipped) +
                    " batches had a non-finite loss (train.max_nonfinite = " +
                    std::to_string(config.train.max_nonfinite) + "); stopping");
      }
      position = next_position;
      continue;
    }
    const bool log_now = (step + 1) % config.train.log_every == 0 || step + 1 == total;
    double grad_norm = std::nan("");
    if (config.train.grad_clip_norm > 0.0) {
      grad_norm = torch::nn::utils::clip_grad_norm_(model->parameters(), config.train.grad_clip_norm);
    } else if (log_now) {
      double sq = 0.0;
      for (const auto& p : model->parameters()) {
        if (p.grad().defined()) {
          const double n = p.grad().norm().item<double>();  // no temporary, unlike pow(2).sum()
          sq += n * n;
        }
      }
      grad_norm = std::sqrt(sq);
    }
    optimizer.step();
    optimizer.zero_grad();
    ++step;
    position = next_position;
    smoothed = std::isfinite(smoothed) ? 0.98 * smoothed + 0.02 * loss_value : loss_value;
    const double step_s = seconds_since(t_step);
    progress.update(step, loss_value, smoothed, lr, static_cast<double>(samples) / step_s, data_wait / step_s, step_s);

    std::optional<double> val_loss;
    if (!data.val.empty() && (step % val_every == 0 || step == total)) {
      val_loss = validate(model, data, config, device, bf16);
      if (!best_val || *val_loss < *best_val) best_val = val_loss;
      progress.note("step " + std::to_string(step) + ": validation loss " + std::to_string(*val_loss));
    }
    if (log_now || val_loss) {
      nlohmann::json rec = {{"step", step},
                            {"epoch", position.epoch},
                            {"loss", loss_value},
                            {"lr", lr},
                            {"samples_per_s", static_cast<double>(samples) / step_s},
                            {"data_wait_s", data_wait},
                            {"data_wait_share", data_wait / step_s},
                            {"step_s", step_s}};
      rec["grad_norm"] = std::isfinite(grad_norm) ? nlohmann::json(grad_norm) : nlohmann::json();
      rec["val_loss"] = val_loss ? nlohmann::json(*val_loss) : nlohmann::json();
      metrics << rec.dump() << "\n";
      metrics.flush();
      if (!metrics) throw IoError(metrics_path.string() + ": cannot write (disk full?)");
      if (events) events->write_scalars(step, record_scalars(rec));
    }
    if (val_loss && val_window) {
      std::optional<at::Tensor> image;
      try {
        torch::NoGradGuard no_grad;
        model->eval();
        image = options.validation_image(model, *val_window, data.val.front().name(), step);
      } catch (const std::exception& e) {  // a picture is not worth the run
        spdlog::warn("step {}: no TensorBoard validation picture: {}", step, e.what());
      }
      model->train();
      if (image) events->write_image(step, "val/reconstruction", *image);
    }
    if (step % config.train.checkpoint_every == 0 || step == total) {
      progress.pause();
      write_checkpoint(false, val_loss, position, "");
    }
    if (options.on_step) options.on_step(step, loss_value);
  }
  progress.finish();
  result.step = step;
  spdlog::info("done: {} steps, last checkpoint {}", step, result.checkpoint);
  return result;
}

}  // namespace mae
