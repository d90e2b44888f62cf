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
#include <sstream>

#include "core/atomic_file.h"
#include "core/compat.h"
#include "core/error.h"
#include "core/printable.h"
#include "core/threads.h"
#include "data/cache.h"
#include "data/check.h"
#include "data/dataset.h"
#include "data/loader.h"
#include "data/transforms.h"
#include "model/linear.h"
#include "model/ops.h"
#include "probe/probe.h"
#include "train/adamw.h"
#include "train/checkpoint.h"
#include "train/distributed.h"
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

// Seeds of the run's random mask streams, derived from the config seed; a sample's mask is drawn
// from item_seed(stream, epoch, item) of its data item, so it is the same on any number of ranks.
uint64_t mask_seed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ULL + 0x6D61736BULL; }
uint64_t val_mask_seed(uint64_t seed) { return seed * 0x9E3779B97F4A7C15ULL + 0x76616C6DULL; }

torch::Device resolve_device(const std::string& name, const DistributedEnv& env) {
  if (name == "cpu") return torch::kCPU;
  const bool cuda = torch::cuda::is_available();
  if (name == "auto" && !cuda) return torch::kCPU;
  if (name != "auto" && !cuda) {
    throw ConfigError(
        "\"device\" = \"" + name +
        "\": CUDA is not available (this LibTorch has no CUDA support or no GPU is visible); use \"cpu\"");
  }
  torch::Device d(name == "auto" ? std::string("cuda") : name);
  // Several ranks on one node: each takes the GPU of its LOCAL_RANK unless the config names one.
  if (!d.has_index() && env.distributed())
    d = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
  if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count())) {
    throw ConfigError("\"device\" = \"" + name + "\": device " + d.str() + " is asked for but only " +
                      std::to_string(torch::cuda::device_count()) + " CUDA device(s) are visible" +
                      (env.distributed() ? " (LOCAL_RANK " + std::to_string(env.local_rank) + ")" : std::string()));
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
  write_file_atomically(file.string(), kept);
}

// Console logging, plus <run_dir>/train.log when given (never for a dry run or data check). Ranks
// other than 0 log warnings and errors only, prefixed with their rank.
void setup_logging(const std::optional<fs::path>& run_dir, int rank, int world_size) {
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
  logger->set_level(rank == 0 ? spdlog::get_level() : std::max(spdlog::get_level(), spdlog::level::warn));
  if (world_size > 1) logger->set_pattern("[%H:%M:%S.%e] [rank " + std::to_string(rank) + "] [%^%l%$] %v");
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

struct RunData {
  std::vector<DatasetEntry> train, val;
  DataConfig config;
};

DataConfig resolved_data_config(const Config& config) {
  DataConfig d = config.data;
  if (d.cache_dir.empty()) d.cache_dir = default_cache_dir();
  return d;
}

// The training and validation lists of the config, all of them (the pre-flight decides which stay).
DatasetSplit split_of(const Config& config) {
  return split_validation(read_dataset(config.data.dataset), config.data.val_fraction, config.seed);
}

CheckReport run_check(const DatasetSplit& split, const DataConfig& data) {
  std::vector<DatasetEntry> all = split.training;
  all.insert(all.end(), split.validation.begin(), split.validation.end());
  spdlog::info("pre-flight check of {} volume(s) ({} training, {} validation), cache {}", all.size(),
               split.training.size(), split.validation.size(), data.cache_dir);
  const auto report = check_data(all, data);
  for (const auto& v : report.volumes) spdlog::debug("{}", v.line());
  return report;
}

// The pre-flight check: bad volumes are logged and refused or skipped per on_bad_volume.
RunData prepare_data(const Config& config) {
  RunData d;
  d.config = resolved_data_config(config);
  const auto split = split_of(config);
  const auto report = run_check(split, d.config);
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

// Visible patches of every crop of `batch`: each drawn from its own stream
// item_seed(stream, epoch, item), so a sample's mask does not depend on the batch it is in, on the
// rank that holds it or on the number of ranks.
at::Tensor draw_batch_visible(const Batch& batch, uint64_t stream, int64_t num_patches, double ratio) {
  std::vector<at::Tensor> rows;
  rows.reserve(batch.items.size());
  for (const int64_t item : batch.items) {
    auto gen = at::detail::createCPUGenerator(item_seed(stream, batch.epoch, item));
    rows.push_back(draw_visible(1, num_patches, ratio, gen));
  }
  return at::cat(rows, 0);
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

CheckReport check_training_data(const Config& config) {
  set_threads(config.threads);
  setup_logging(std::nullopt, 0, 1);
  return run_check(split_of(config), resolved_data_config(config));
}

// ---------------------------------------------------------------------------------------------
// Trainer

struct Trainer::Impl {
  const Config config;
  const TrainOptions options;
  TrainResult result;

  // Where and how: device, threads, the process group when distributed.
  DistributedEnv env;
  std::unique_ptr<ProcessGroup> group;
  std::string collective;  // the collective in progress, named in failure messages
  int rank = 0, world = 1;
  bool main = true;    // rank 0: the one that writes
  bool writes = true;  // main and not a dry run
  int threads = 1;
  torch::Device device{torch::kCPU};
  fs::path run_dir;
  std::optional<RunLock> run_lock;

  // The checkpoint this start resumes.
  CheckpointReadLock resume_lock;
  std::string resume_dir;
  CheckpointInfo resumed;

  RunData data;
  MaskedAutoencoder model{nullptr};
  std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>> groups;
  std::unique_ptr<AdamW> optimizer;
  std::unique_ptr<GradientSync> sync;
  LoaderOptions lo;
  std::unique_ptr<Loader> loader;

  // Schedule.
  int64_t accum = 1, total = 0, effective_batch = 0, val_every = 0;
  double peak = 0.0;
  bool bf16 = false;

  // Position and counters (TrainerState).
  int64_t step = 0, skipped = 0, start_step = 0, last_saved_step = -1;
  int64_t base_step = 0, base_skipped = 0, base_read = 0;  // TrainerState's last change of world size
  double smoothed = std::nan("");
  std::optional<double> best_val;
  LoaderPosition position;
  std::string run_id;
  bool abandon_pending = false;
  int stop_agreed = 0;  // distributed: a stop every rank agreed on (signal number)
  bool stopped_in_setup = false;

  // The linear probe (probe.every > 0; rank 0 runs it): prepared volumes, targets and the
  // baselines, which do not change during the run (random init = this run's initial weights).
  std::vector<ProbeVolume> probe_volumes;
  ProbeOptions probe_options;
  std::optional<ProbeTargets> probe_targets_;
  std::optional<ProbeScores> probe_random, probe_raw;

  // Outputs (rank 0).
  fs::path metrics_path;
  std::ofstream metrics;
  std::optional<EventWriter> events;
  std::optional<Volume> val_window;
  std::optional<Progress> progress;

  Impl(const Config& c, const TrainOptions& o) : config(with_resolved_matmul(c)), options(o) {}

  // "auto" for train.fp32_matmul resolved to the library it means on this build, so that the saved
  // config names it and a resume can tell whether it continues on the same one.
  static Config with_resolved_matmul(Config c) {
    c.train.fp32_matmul = fp32_matmul_name(resolve_fp32_matmul(c.train.fp32_matmul, "\"train.fp32_matmul\""));
    return c;
  }

  // Runs a collective (or store exchange) named `what`; a failure becomes one line naming the
  // rank(s) lost.
  template <class F>
  void exchange(const std::string& what, F&& f) {
    collective = what;
    f();
    collective.clear();
  }

  // ----- set-up -----

  void setup() {
    threads = set_threads(config.threads);
    env = read_distributed_env();
    rank = env.rank;
    world = env.world_size;
    main = rank == 0;
    writes = main && !options.dry_run;
    result.rank = rank;
    result.world_size = world;
    device = resolve_device(config.device, env);
    // The library of the float32 CPU products (resolved in the constructor).
    set_fp32_matmul(resolve_fp32_matmul(config.train.fp32_matmul, "\"train.fp32_matmul\""));
    run_dir = config.output.dir;
    if (device.is_cpu()) check_training_memory(config, physical_memory_bytes());
    if (env.distributed()) {
      setup_group();
      if (stopped_in_setup) return;
    }
    setup_run_folder();
    setup_resume();
    if (g_stop_signal.load() && !env.distributed()) {
      stopped_in_setup = true;
      return;
    }
    try {
      data = prepare_data(config);
    } catch (const InputError& e) {
      // Ctrl-C during the pre-flight: the user asked to stop, which wins over what the check found.
      if (g_stop_signal.load() == 0 || env.distributed()) throw;
      spdlog::warn("{}", e.what());
      stopped_in_setup = true;
      return;
    }
    if (g_stop_signal.load() && !env.distributed()) {
      stopped_in_setup = true;
      return;
    }
    if (group) {
      // Every rank must train on the same lists (with on_bad_volume "skip" a rank could drop a
      // volume the others keep, e.g. after a read error on one node).
      nlohmann::json lists = {{"training", nlohmann::json::array()}, {"validation", nlohmann::json::array()}};
      for (const auto& e : data.train) lists["training"].push_back(e.name());
      for (const auto& e : data.val) lists["validation"].push_back(e.name());
      exchange("the data-list comparison", [&] { group->check_same_config({{"usable volumes", lists}}); });
    }
    build_model();
    setup_probe();
    setup_loader_and_state();
    log_summary();
  }

  // Reads and checks the probe's volumes before training (bad labels stop the run at once).
  void setup_probe() {
    const auto& p = config.probe;
    if (p.every == 0 || !main) return;
    probe_options.target = parse_probe_target(p.target, "probe.target");
    probe_options.split = p.split == "checkerboard" ? ProbeSplit::checkerboard : ProbeSplit::none;
    probe_options.include_background = p.include_background;
    probe_options.folds = p.folds;
    probe_options.seed = config.seed;
    const auto options = model_options_from(config.model);
    std::vector<ProbeVolume> train, test;
    for (const auto& v : p.train) train.push_back(prepare_probe_volume({v.image, v.labels}, data.config, options));
    for (const auto& v : p.test) test.push_back(prepare_probe_volume({v.image, v.labels}, data.config, options));
    probe_targets_ = probe_targets(train, test, probe_options);
    probe_volumes = std::move(train);
    for (auto& v : test) probe_volumes.push_back(std::move(v));
    spdlog::info("probe: {} {} on {} train and {} test patches every {} steps", to_string(probe_options.target),
                 probe_options.target == ProbeTarget::fractions ? "R²" : "accuracy", probe_targets_->train_rows.numel(),
                 probe_targets_->test_rows.numel(), p.every);
  }

  at::Tensor probe_features_of(MaskedAutoencoderImpl& m) {
    std::vector<at::Tensor> f;
    for (const auto& v : probe_volumes) f.push_back(probe_features(m, v, probe_options.batch));
    return at::cat(f, 0);
  }

  // The probe score at this step (rank 0, when due): pretrained, and once per start the baselines.
  std::optional<ProbeScores> maybe_probe() {
    if (!probe_targets_ || (step % config.probe.every != 0 && step != total)) return std::nullopt;
    const auto t0 = std::chrono::steady_clock::now();
    if (!probe_random) {
      auto random = random_init_model(model_options_from(config.model), config.seed);
      random->to(device);
      probe_random = fit_and_score(probe_features_of(*random), *probe_targets_, probe_options, "random_init");
      std::vector<at::Tensor> raw;
      for (const auto& v : probe_volumes) raw.push_back(v.raw);
      probe_raw = fit_and_score(at::cat(raw, 0), *probe_targets_, probe_options, "raw");
    }
    auto s = fit_and_score(probe_features_of(*model), *probe_targets_, probe_options, "pretrained");
    model->train();
    const auto t = probe_options.target;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string line = "step " + std::to_string(step) + ": probe " +
                             (t == ProbeTarget::fractions ? "R² " : "accuracy ") + std::to_string(s.score(t)) +
                             " (random-init " + std::to_string(probe_random->score(t)) + ", raw " +
                             std::to_string(probe_raw->score(t)) + "; " + std::to_string(seconds) + " s)";
    if (progress) {
      progress->note(line);
    } else {
      spdlog::info("{}", line);
    }
    return s;
  }

  void setup_group() {
    std::string backend = config.distributed.backend;
    if (backend == "auto") backend = device.is_cuda() ? "nccl" : "gloo";
    if (backend == "gloo" && device.is_cuda()) {
      throw ConfigError("\"distributed.backend\" = \"gloo\" with a CUDA device: use \"nccl\" (or \"auto\")");
    }
    const auto timeout = std::chrono::milliseconds(config.distributed.timeout_s * 1000);
    setup_logging(std::nullopt, rank, world);  // rank-prefixed console until the run folder exists
    set_rendezvous_abort([] { return g_stop_signal.load() != 0; });
    try {
      group = std::make_unique<ProcessGroup>(env, backend, timeout);
    } catch (const DistributedError&) {
      set_rendezvous_abort({});
      if (g_stop_signal.load() == 0) throw;
      stopped_in_setup = true;  // Ctrl-C or SIGTERM while waiting for the other ranks
      return;
    }
    set_rendezvous_abort({});
    exchange("the config comparison", [&] { group->check_same_config(config_to_json(config), {"threads"}); });
    if (main) {
      spdlog::info("distributed: {} ranks ({} backend, rendezvous {}:{} from {}), timeout {} s", world, backend,
                   env.master_addr, env.master_port, env.source, config.distributed.timeout_s);
    }
  }

  void setup_run_folder() {
    if (!writes) {
      setup_logging(std::nullopt, rank, world);
      return;
    }
    std::error_code ec;
    fs::create_directories(run_dir, ec);
    if (ec || !fs::is_directory(run_dir)) {
      throw IoError(run_dir.string() + ": cannot create the run folder (output.dir): " +
                    (ec ? ec.message() : std::string("not a folder")));
    }
    if (::access(run_dir.c_str(), W_OK) != 0) throw IoError(run_dir.string() + ": the run folder is not writable");
    run_lock.emplace(run_dir.string());  // ConfigError naming the holder when another process trains here
    setup_logging(run_dir, rank, world);
    remove_partial_checkpoints(run_dir.string());  // folders of writes a crash interrupted
  }

  // Finds and checks the checkpoint to continue from. Distributed: rank 0 resolves it and tells
  // the others, so that all read the same one.
  void setup_resume() {
    if (main) {
      try {
        if (options.resume) {
          resume_lock = lock_checkpoint(options.resume_from.empty() ? run_dir.string() : options.resume_from);
          resume_dir = resume_lock.dir();
        } else if (!options.dry_run && !latest_checkpoint(run_dir.string()).empty()) {
          throw ConfigError("\"output.dir\" = \"" + run_dir.string() +
                            "\" already holds checkpoints; pass --resume to continue that run or choose another "
                            "output.dir");
        }
      } catch (const std::exception& e) {
        // The other ranks wait for the checkpoint's name: tell them why there is none.
        if (group) {
          try {
            group->store_set("mae3d/resume_dir", std::string("!") + e.what());
          } catch (const std::exception&) {  // the store is gone too: the others notice that
          }
        }
        throw;
      }
    }
    if (group) {
      std::string dir;
      exchange("the start-up exchange", [&] {
        if (main) group->store_set("mae3d/resume_dir", resume_dir.empty() ? "-" : resume_dir);
        dir = group->store_get("mae3d/resume_dir");
      });
      if (!dir.empty() && dir[0] == '!') throw Error("rank 0 failed: " + dir.substr(1));
      if (!main && dir != "-") {
        resume_lock = lock_checkpoint(dir);
        resume_dir = resume_lock.dir();
      }
    }
    if (resume_dir.empty()) return;
    resumed = read_checkpoint_info(resume_dir);
    // Another run's checkpoint resumed into a folder holding a run would mix the two (and abandon
    // the folder's own later checkpoints): refused. Into an empty folder, the run continues there.
    const std::string own = main ? run_id_of(run_dir.string()) : std::string();
    if (!own.empty() && own != resumed.run_id) {
      throw CheckpointError(resume_dir + ": is a checkpoint of run " + resumed.run_id + ", but \"output.dir\" = \"" +
                            run_dir.string() + "\" holds run " + own +
                            "; resume it into its own run folder or an empty output.dir");
    }
    const auto current = config_to_json(config);
    // The checkpoint's config with the keys a newer mae3d added filled in with their defaults (a
    // checkpoint written before data.intensity_aug existed trained without it).
    nlohmann::json saved = resumed.config;
    try {
      saved = config_to_json(config_from_json(resumed.config));
    } catch (const ConfigError& e) {
      spdlog::debug("{}: its config does not read as a current one ({}); comparing it as written", resume_dir,
                    e.what());
    }
    if (!saved.contains("model") || saved.at("model") != current.at("model")) {
      throw CheckpointError(resume_dir + ": its model section differs from the config's; resume with the same model");
    }
    // Keys that decide data order, crops and masks: changing them would silently break exact resume.
    for (const char* key : {"/seed", "/train/batch_size", "/train/grad_accum_steps", "/data/dataset",
                            "/data/val_fraction", "/data/num_samples", "/data/flip_prob", "/data/intensity_aug",
                            "/data/orientation", "/data/spacing_mm", "/data/intensity", "/data/foreground_threshold"}) {
      const nlohmann::json::json_pointer ptr(key);
      if (!saved.contains(ptr) || saved.at(ptr) != current.at(ptr)) {
        std::string name = std::string(key).substr(1);
        std::replace(name.begin(), name.end(), '/', '.');
        throw CheckpointError(resume_dir + ": \"" + name + "\" was " +
                              (saved.contains(ptr) ? saved.at(ptr).dump() : std::string("absent")) +
                              " in the checkpoint and is " + current.at(ptr).dump() +
                              " now; resume with the checkpoint's value (data order and masks depend on it)");
      }
    }
    // Checkpoints written before the key existed ran on LibTorch's BLAS.
    const nlohmann::json::json_pointer matmul_key("/train/fp32_matmul");
    std::string saved_matmul = "blas";
    if (resumed.config.contains(matmul_key)) {
      const auto& v = resumed.config.at(matmul_key);
      saved_matmul = v.is_string() && (v == "blas" || v == "onednn") ? v.get<std::string>() : printable(v.dump());
    }
    // Only float32 CPU runs run products on the chosen library (bf16 autocast and CUDA do not).
    const bool fp32_cpu = device.is_cpu() && config.train.precision == "fp32";
    const bool saved_fp32 = !resumed.config.contains(nlohmann::json::json_pointer("/train/precision")) ||
                            resumed.config.at(nlohmann::json::json_pointer("/train/precision")) == "fp32";
    if (fp32_cpu && saved_fp32 && saved_matmul != config.train.fp32_matmul) {
      spdlog::warn(
          "{}: trained with float32 products on {}, continuing on {} (\"train.fp32_matmul\"); the continuation is "
          "not bit-identical to an uninterrupted run",
          resume_dir, saved_matmul, config.train.fp32_matmul);
    }
    if (resumed.diverged) {
      spdlog::warn("{}: resuming a checkpoint marked diverged ({})", resume_dir, resumed.diverged_reason);
    }
  }

  void build_model() {
    torch::manual_seed(config.seed);
    model = MaskedAutoencoder(model_options_from(config.model));
    model->to(device);
    model->train();
    groups = decay_groups(*model);
    optimizer = std::make_unique<AdamW>(
        std::vector<AdamWGroup>{{groups.first, config.train.weight_decay}, {groups.second, 0.0}},
        AdamWOptions{0.0, config.train.beta1, config.train.beta2, 1e-8});
  }

  // Rank 0's weights (and buffers) on every rank.
  void broadcast_model() {
    if (!group) return;
    std::vector<at::Tensor> tensors;
    for (const auto& p : model->parameters()) tensors.push_back(p.detach());
    for (const auto& b : model->buffers()) tensors.push_back(b.detach());
    torch::NoGradGuard no_grad;
    exchange("the weight broadcast", [&] { group->broadcast(tensors, 0); });
  }

  void setup_loader_and_state() {
    lo.crop_size = {config.model.img_size[0], config.model.img_size[1], config.model.img_size[2]};
    lo.batch_size = config.train.batch_size;
    lo.seed = config.seed;
    lo.rank = rank;
    lo.world_size = world;
    accum = config.train.grad_accum_steps;
    LoaderPosition start;
    broadcast_model();
    if (!resume_dir.empty()) start = restore();
    run_id = resume_dir.empty() ? new_run_id() : resumed.run_id;
    loader = std::make_unique<Loader>(data.train, data.config, lo, start);
    total = config.train.max_steps > 0
                ? config.train.max_steps
                : std::max<int64_t>(1, config.train.epochs * loader->batches_per_epoch() / accum);
    effective_batch = config.train.batch_size * accum * world;
    peak = config.train.lr ? *config.train.lr : scaled_lr(config.train.base_lr, effective_batch);
    bf16 = config.train.precision == "bf16";
    val_every = config.train.val_every > 0 ? config.train.val_every : config.train.checkpoint_every;
    if (group) {
      std::vector<at::Tensor> params;
      for (const auto* g : {&groups.first, &groups.second})
        for (const auto& t : *g) params.push_back(t);
      sync = std::make_unique<GradientSync>(*group, params,
                                            static_cast<int64_t>(config.distributed.bucket_mb * 1024.0 * 1024.0),
                                            config.distributed.overlap);
    }
    start_step = step;
    last_saved_step = resume_dir.empty() ? -1 : step;
    // Checkpoints after the resumed step belong to the abandoned continuation: removed once this
    // start's first checkpoint is safely written (and `latest` names it), never before.
    abandon_pending = !resume_dir.empty();
    position = loader->position();
  }

  // Loads the resumed checkpoint's weights, optimizer, generators and position; returns where the
  // loader starts. A checkpoint of another number of ranks continues with this one's global batch.
  LoaderPosition restore() {
    const auto& s = resumed.trainer_state;
    const std::string state_file = resume_dir + "/trainer_state.json";
    step = s.step;
    skipped = s.nonfinite_skipped;
    LoaderPosition start{s.loader_epoch, s.loader_batch};
    // The loader position must be one this step count can reach: every optimizer step read accum
    // batches, every skipped one between 1 and accum (batches of the checkpoint's global size).
    const int64_t items = static_cast<int64_t>(data.train.size()) * data.config.num_samples;
    const int64_t saved_world = s.world_size;
    const int64_t saved_global = (s.batch_size > 0 ? s.batch_size : config.train.batch_size) * saved_world;
    const int64_t per_epoch = items / saved_global;
    if (per_epoch < 1 || start.batch >= per_epoch) {
      throw CheckpointError(state_file + ": \"loader_batch\" = " + std::to_string(start.batch) +
                            " is outside an epoch of " + std::to_string(per_epoch) + " batches of " +
                            std::to_string(saved_global) + " crops");
    }
    // Since the last change of world size (base_*; all 0 when there was none).
    base_step = s.base_step;
    base_skipped = s.base_skipped;
    base_read = s.base_read;
    const __int128 read = static_cast<__int128>(start.epoch) * per_epoch + start.batch - base_read;
    const __int128 least = static_cast<__int128>(step - base_step) * accum + (skipped - base_skipped);
    const __int128 most = static_cast<__int128>(step - base_step + skipped - base_skipped) * accum;
    if (read < least || read > most) {
      throw CheckpointError(state_file + ": loader position (\"loader_epoch\" " + std::to_string(start.epoch) +
                            ", \"loader_batch\" " + std::to_string(start.batch) + ") does not fit \"step\" " +
                            std::to_string(step) + " and \"nonfinite_skipped\" " + std::to_string(skipped) + " with " +
                            std::to_string(per_epoch) + " batches per epoch and " + std::to_string(accum) +
                            " per step");
    }
    const int64_t global = config.train.batch_size * world;
    if (saved_world != world) {
      // The data order of an epoch does not depend on the batch: continue at the first batch of the
      // new size that starts at or before the first crop not yet seen (up to global - 1 crops are
      // seen a second time).
      const int64_t crop = start.batch * saved_global;
      LoaderPosition moved{start.epoch, crop / global};
      if (moved.batch >= items / global) moved = {start.epoch + 1, 0};
      const double old_lr = config.train.lr ? *config.train.lr : scaled_lr(config.train.base_lr, saved_global * accum);
      const double new_lr = config.train.lr ? *config.train.lr : scaled_lr(config.train.base_lr, global * accum);
      if (main) {
        spdlog::warn(
            "{}: written by {} rank(s), resumed on {}: the global batch is {} crops instead of {}, the peak learning "
            "rate {:.3g} instead of {:.3g}{}; the data continue at crop {} of epoch {} (batch {}); losses will not "
            "equal an uninterrupted {}-rank run",
            resume_dir, saved_world, world, global, saved_global, new_lr, old_lr,
            config.train.max_steps > 0 ? "" : ", and the step count follows the new batches per epoch", crop,
            start.epoch, moved.batch, saved_world);
      }
      start = moved;
      base_step = step;
      base_skipped = skipped;
      base_read = moved.epoch * (items / global) + moved.batch;
    }
    smoothed = s.smoothed_loss ? *s.smoothed_loss : std::nan("");
    best_val = s.best_val_loss;
    load_model(resume_dir, *model, resumed);
    std::map<const void*, std::string> names;
    for (const auto& p : model->named_parameters()) names[p.value().unsafeGetTensorImpl()] = p.key();
    std::vector<std::pair<std::string, at::Tensor>> params;
    for (const auto* g : {&groups.first, &groups.second}) {
      for (const auto& t : *g) params.emplace_back(names[t.unsafeGetTensorImpl()], t);
    }
    load_optimizer(resume_dir, *optimizer, params, resumed);
    const auto rng = load_rng(resume_dir, resumed);
    const std::string rng_file = resume_dir + "/rng.pt";
    auto global_gen = at::detail::getDefaultCPUGenerator();
    auto restore_gen = [&](at::Generator& gen, const char* key) {
      const auto it = rng.find(key);
      if (it == rng.end()) throw CheckpointError(rng_file + ": the \"" + std::string(key) + "\" state is missing");
      try {
        set_generator_state(gen, it->second);
      } catch (const std::exception& e) {
        throw CheckpointError(rng_file + ": the \"" + std::string(key) + "\" state is damaged");
      }
    };
    restore_gen(global_gen, "global_cpu");
    if (device.is_cuda() && rng.count("cuda")) {
      auto cuda = at::globalContext().defaultGenerator(device);
      restore_gen(cuda, "cuda");
    }
    broadcast_model();      // every rank read the same file; rank 0's copy is the one that counts
    resume_lock.release();  // everything is in memory; pruning may delete the folder later
    result.resumed_from = resume_dir;
    return start;
  }

  void log_summary() {
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
        "data: {} training and {} validation volume(s), {} batch(es) per epoch; lr {:.3g} (effective batch {}{}), "
        "{} steps{}",
        data.train.size(), data.val.size(), loader->batches_per_epoch(), peak, effective_batch,
        world > 1 ? " over " + std::to_string(world) + " ranks" : std::string(), total,
        resume_dir.empty() ? "" : ", resuming from " + resume_dir + " at step " + std::to_string(step));
    if (main && bf16 && device.is_cpu()) {
      const auto warning = cpu_bf16_warning("train.precision = \"bf16\"");
      if (!warning.empty()) spdlog::warn("{}", warning);
    }
  }

  // The resolved config and run id, metrics.jsonl and TensorBoard files of this start (rank 0).
  void open_outputs() {
    if (!writes) return;
    write_file_atomically((run_dir / "config.json").string(), config_to_json(config).dump(2) + "\n");
    write_file_atomically((run_dir / "run_id").string(), run_id + "\n");
    metrics_path = run_dir / "metrics.jsonl";
    if (resume_dir.empty()) {
      write_file_atomically(metrics_path.string(), "");
    } else {
      truncate_metrics(metrics_path, step);
    }
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) throw IoError(metrics_path.string() + ": cannot open for writing");
    // TensorBoard: existing event files are cut back to this start's step like metrics.jsonl (also
    // with output.tensorboard off, so the folder's curves never disagree), then a new file is begun.
    const auto cut = truncate_events(run_dir.string(), step);
    if (cut.records_removed > 0 || !cut.files_removed.empty()) {
      spdlog::info("TensorBoard event files: {} record(s) after step {} removed, {} file(s) without data deleted",
                   cut.records_removed, step, cut.files_removed.size());
    }
    if (config.output.tensorboard) {
      events.emplace(run_dir.string(), step + 1);
      spdlog::info("TensorBoard events: {}", events->path());
      if (options.validation_image && !data.val.empty()) {
        val_window = validation_window(data.val.front(), data.config, config);
      }
    }
  }

  // ----- checkpoints -----

  TrainerState trainer_state(const LoaderPosition& pos) const {
    TrainerState t;
    t.step = step;
    t.loader_epoch = pos.epoch;
    t.loader_batch = pos.batch;
    t.nonfinite_skipped = skipped;
    if (std::isfinite(smoothed)) t.smoothed_loss = smoothed;
    t.best_val_loss = best_val;
    t.lr_peak = peak;
    t.total_steps = total;
    t.world_size = world;
    t.batch_size = config.train.batch_size;
    t.base_step = base_step;
    t.base_skipped = base_skipped;
    t.base_read = base_read;
    return t;
  }

  // Rank 0 writes; the others have nothing to write (their state equals rank 0's).
  void write_checkpoint(bool diverged, std::optional<double> val_loss, const LoaderPosition& pos,
                        const std::string& reason, std::optional<double> probe_score = std::nullopt) {
    if (!main) return;
    CheckpointInfo info;
    info.step = step;
    info.run_id = run_id;
    info.config = config_to_json(config);
    info.trainer_state = trainer_state(pos);
    info.diverged = diverged;
    info.diverged_reason = reason;
    info.val_loss = val_loss;
    info.probe_score = probe_score;
    if (events) events->sync();  // the curves up to this checkpoint are on disk with it
    auto global = at::detail::getDefaultCPUGenerator();
    std::map<std::string, at::Tensor> rng{{"global_cpu", generator_state(global)}};
    if (device.is_cuda()) {
      auto cuda = at::globalContext().defaultGenerator(device);
      rng["cuda"] = generator_state(cuda);
    }
    result.checkpoint = save_checkpoint(run_dir.string(), info, *model, optimizer.get(), rng);
    if (!diverged) {
      last_saved_step = step;
      if (abandon_pending) {
        remove_checkpoints_after(run_dir.string(), start_step, result.checkpoint);
        abandon_pending = false;
      }
      prune_checkpoints(run_dir.string(), config.train.keep_last, config.train.best_by == "probe");
    }
    spdlog::info("checkpoint {}{}", result.checkpoint, diverged ? " (marked diverged)" : "");
  }

  void maybe_checkpoint(std::optional<double> val_loss, const std::optional<ProbeScores>& probe) {
    if (step % config.train.checkpoint_every != 0 && step != total) return;
    if (progress) progress->pause();
    write_checkpoint(false, val_loss, position, "",
                     probe ? std::optional<double>(probe->score(probe_options.target)) : std::nullopt);
  }

  // ----- one step -----

  struct StepStats {
    bool done = false;  // false: the batch was skipped (non-finite loss)
    double loss = 0.0, lr = 0.0, grad_norm = std::nan(""), data_wait = 0.0, allreduce = 0.0, seconds = 0.0;
    int64_t samples = 0;
  };

  // The loss of one micro-batch, averaged over all ranks, with the stop requests of all ranks.
  double agree_on_loss(double local) {
    if (!group) return local;
    const int sig = g_stop_signal.load();
    auto t = torch::tensor({local, sig == SIGINT ? 1.0 : 0.0, sig != 0 && sig != SIGINT ? 1.0 : 0.0},
                           torch::TensorOptions().dtype(torch::kDouble));
    exchange("the loss exchange of step " + std::to_string(step + 1), [&] { group->allreduce_sum(t); });
    const auto a = t.accessor<double, 1>();
    if (a[2] > 0.0) {
      stop_agreed = SIGTERM;
    } else if (a[1] > 0.0 && stop_agreed == 0) {
      stop_agreed = SIGINT;
    }
    return a[0] / static_cast<double>(world);
  }

  StepStats step_once() {
    StepStats st;
    const auto t_step = Clock::now();
    st.lr = lr_at(step, total, config.train.lr_warmup_steps, peak, config.train.lr_min);
    optimizer->set_lr(st.lr);
    const int64_t num_patches = model->options().num_patches();
    bool finite = true;
    for (int64_t micro = 0; micro < accum; ++micro) {
      const auto t_data = Clock::now();
      auto batch = loader->next();
      st.data_wait += seconds_since(t_data);
      auto x = batch.images.to(device);
      if (x.size(1) != config.model.in_channels) {
        throw InputError(data.config.dataset + ": volumes have " + std::to_string(x.size(1)) +
                         " channel(s) but model.in_channels is " + std::to_string(config.model.in_channels));
      }
      st.samples += x.size(0);
      if (world > 1) model->set_batch_slice({x.size(0) * world, x.size(0) * rank});
      const auto visible =
          draw_batch_visible(batch, mask_seed(config.seed), num_patches, config.model.masking_ratio).to(device);
      torch::Tensor loss;
      {
        compat::AutocastScope autocast(bf16, device.type());
        auto out = model->forward_visible(x, visible);
        loss = masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask, config.model.norm_pix_loss);
      }
      const auto t_exchange = Clock::now();
      const double v = agree_on_loss(loss.item<double>());
      st.allreduce += group ? seconds_since(t_exchange) : 0.0;
      if (!std::isfinite(v)) {
        finite = false;
        st.loss = v;
        break;
      }
      st.loss += v / static_cast<double>(accum);
      if (sync) sync->arm(micro + 1 == accum);
      (accum > 1 ? loss / static_cast<double>(accum) : loss).backward();
    }
    const LoaderPosition next_position = loader->position();
    if (!finite) {
      optimizer->zero_grad();
      st.seconds = seconds_since(t_step);
      handle_nonfinite(st.loss);
      position = next_position;
      return st;
    }
    if (sync) {
      collective = "the gradient all-reduce of step " + std::to_string(step + 1);
      st.allreduce += sync->finish();
      collective.clear();
    }
    const bool log_now = (step + 1) % config.train.log_every == 0 || step + 1 == total;
    // The global gradient norm comes from the optimizer's own pass over the gradients: for clipping
    // one read pass first, the clip factor then folded into the update (torch's clip_grad_norm_
    // reads, then rescales every gradient); for logging alone, the update pass itself.
    AdamW::StepOptions update;
    double sq = std::nan("");
    if (config.train.grad_clip_norm > 0.0) {
      st.grad_norm = std::sqrt(optimizer->grad_sq_norm());
      const double coef = config.train.grad_clip_norm / (st.grad_norm + 1e-6);  // as clip_grad_norm_
      if (coef < 1.0 || !std::isfinite(coef)) update.grad_scale = coef;
    } else if (log_now) {
      update.grad_sq_norm = &sq;
    }
    optimizer->step(update);
    if (update.grad_sq_norm) st.grad_norm = std::sqrt(sq);
    optimizer->zero_grad();
    ++step;
    position = next_position;
    smoothed = std::isfinite(smoothed) ? 0.98 * smoothed + 0.02 * st.loss : st.loss;
    st.done = true;
    st.seconds = seconds_since(t_step);
    return st;
  }

  // The loss was not finite (on some rank: every rank sees the same averaged loss and decides alike).
  void handle_nonfinite(double loss_value) {
    if (config.train.on_nonfinite == "error") {
      if (progress) progress->finish();
      write_checkpoint(
          true, std::nullopt, position,
          "the loss was not finite (" + std::to_string(loss_value) + ") at step " + std::to_string(step + 1));
      barrier("the diverged checkpoint");  // the other ranks end only once it is written
      throw Error("step " + std::to_string(step + 1) + ": the loss is not finite (" + std::to_string(loss_value) + ")" +
                  (main ? "; checkpoint " + result.checkpoint + " marked diverged" : std::string()) +
                  ". Lower train.lr, enable train.grad_clip_norm, or set train.on_nonfinite \"skip\"");
    }
    ++skipped;
    if (main) spdlog::warn("step {}: non-finite loss, batch skipped ({} so far)", step + 1, skipped);
    if (skipped > config.train.max_nonfinite) {
      throw Error("step " + std::to_string(step + 1) + ": " + std::to_string(skipped) +
                  " batches had a non-finite loss (train.max_nonfinite = " +
                  std::to_string(config.train.max_nonfinite) + "); stopping");
    }
  }

  // ----- validation -----

  // Mean masked loss over the validation volumes (crops of seed + 1 without flips, fixed masks per
  // item); distributed, each rank takes its slice of every batch and the sums are all-reduced.
  double validate() {
    DataConfig vcfg = data.config;
    vcfg.flip_prob = 0.0;
    vcfg.intensity_aug.prob = 0.0;
    LoaderOptions vo = lo;
    vo.seed = config.seed + 1;
    vo.shuffle = false;
    vo.drop_last = false;
    Loader vloader(data.val, vcfg, vo);
    torch::NoGradGuard no_grad;
    model->eval();
    double sum = 0.0, count = 0.0;
    for (int64_t b = 0; b < vloader.batches_per_epoch(); ++b) {
      auto batch = vloader.next();
      if (!batch.images.defined()) continue;  // this rank's slice of the last batch is empty
      auto x = batch.images.to(device);
      const auto visible = draw_batch_visible(batch, val_mask_seed(config.seed), model->options().num_patches(),
                                              config.model.masking_ratio)
                               .to(device);
      compat::AutocastScope autocast(bf16, device.type());
      auto out = model->forward_visible(x, visible);
      auto loss = masked_mse_loss(out.pred.to(torch::kFloat), model->target(x), out.mask, config.model.norm_pix_loss);
      sum += loss.item<double>() * static_cast<double>(x.size(0));
      count += static_cast<double>(x.size(0));
    }
    model->train();
    if (group) {
      auto t = torch::tensor({sum, count}, torch::TensorOptions().dtype(torch::kDouble));
      exchange("the validation of step " + std::to_string(step), [&] { group->allreduce_sum(t); });
      sum = t[0].item<double>();
      count = t[1].item<double>();
    }
    return count > 0 ? sum / count : std::nan("");
  }

  std::optional<double> maybe_validate() {
    if (data.val.empty() || (step % val_every != 0 && step != total)) return std::nullopt;
    const double v = validate();
    if (!best_val || v < *best_val) best_val = v;
    if (progress) progress->note("step " + std::to_string(step) + ": validation loss " + std::to_string(v));
    return v;
  }

  void write_metrics(const StepStats& st, std::optional<double> val_loss, const std::optional<ProbeScores>& probe) {
    const bool log_now = step % config.train.log_every == 0 || step == total;
    if (!main || !(log_now || val_loss || probe) || !metrics.is_open()) return;
    nlohmann::json rec = {{"step", step},
                          {"epoch", position.epoch},
                          {"loss", st.loss},
                          {"lr", st.lr},
                          {"samples_per_s", static_cast<double>(st.samples * world) / st.seconds},
                          {"data_wait_s", st.data_wait},
                          {"data_wait_share", st.data_wait / st.seconds},
                          {"step_s", st.seconds},
                          {"world_size", world},
                          {"allreduce_s", st.allreduce},
                          {"allreduce_share", st.allreduce / st.seconds}};
    rec["grad_norm"] = std::isfinite(st.grad_norm) ? nlohmann::json(st.grad_norm) : nlohmann::json();
    rec["val_loss"] = val_loss ? nlohmann::json(*val_loss) : nlohmann::json();
    if (probe) {
      const auto t = probe_options.target;
      const std::string metric = t == ProbeTarget::fractions ? "r2" : "acc";
      rec["probe_" + metric] = probe->score(t);
      rec["probe_random_" + metric] = probe_random->score(t);
      rec["probe_raw_" + metric] = probe_raw->score(t);
    }
    metrics << rec.dump() << "\n";
    metrics.flush();
    if (!metrics) throw IoError(metrics_path.string() + ": cannot write (disk full?)");
    if (events) events->write_scalars(step, record_scalars(rec));
  }

  void validation_picture() {
    if (!val_window || !events) return;
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

  // ----- the loop -----

  TrainResult stopped_before_training(int sig) {
    result.interrupted = true;
    result.before_training = true;
    result.signal = sig;
    result.step = step;
    return result;
  }

  // Distributed: every rank learns whether any rank was asked to stop (before the first step).
  int agreed_start_stop() {
    if (!group) return g_stop_signal.load();
    agree_on_loss(0.0);
    return stop_agreed;
  }

  // Writes the stop checkpoint (when the step is not saved yet) and says so.
  TrainResult stop(int sig) {
    if (progress) progress->finish();
    if (step == start_step) {  // no step done in this start: nothing new to save
      if (main) spdlog::warn("stop requested (signal {}) before the first step", sig);
      barrier("the stop");
      return stopped_before_training(sig);
    }
    if (last_saved_step == step) {
      if (main)
        spdlog::warn("stop requested (signal {}): step {} is already saved in {}", sig, step, result.checkpoint);
    } else {
      if (main) spdlog::warn("stop requested (signal {}): writing a checkpoint at step {}", sig, step);
      write_checkpoint(false, std::nullopt, position, "");
    }
    barrier("the stop");  // the other ranks end only once rank 0's checkpoint is written
    result.interrupted = true;
    result.signal = sig;
    result.step = step;
    return result;
  }

  void barrier(const std::string& what) {
    if (group) exchange(what, [&] { group->barrier(); });
  }

  TrainResult loop() {
    if (stopped_in_setup) return stopped_before_training(g_stop_signal.load());
    if (const int sig = agreed_start_stop()) return stopped_before_training(sig);
    if (options.dry_run) {
      barrier("the end of the dry run");
      result.step = step;
      return result;
    }
    open_outputs();
    if (main) progress.emplace(total, step, config.train.log_every);
    while (step < total) {
      if (const int sig = group ? stop_agreed : g_stop_signal.load()) return stop(sig);
      const StepStats st = step_once();
      if (!st.done) continue;
      if (progress) {
        progress->update(step, st.loss, smoothed, st.lr, static_cast<double>(st.samples * world) / st.seconds,
                         st.data_wait / st.seconds, st.seconds);
      }
      const auto val_loss = maybe_validate();
      const auto probe = maybe_probe();
      write_metrics(st, val_loss, probe);
      if (val_loss && main) validation_picture();
      maybe_checkpoint(val_loss, probe);
      if (options.on_step) options.on_step(step, st.loss);
    }
    if (progress) progress->finish();
    barrier("the end of training");
    result.step = step;
    spdlog::info("done: {} steps, last checkpoint {}", step, result.checkpoint);
    return result;
  }

  // Any failure of a distributed rank: tell the others (so none waits for this one) and name the
  // lost rank when a collective failed.
  [[noreturn]] void fail_distributed(const std::exception& e) {
    if (dynamic_cast<const DistributedError*>(&e) && !collective.empty()) {
      const std::string line = group->describe_failure(collective, e);
      group->report_failure(line);
      throw DistributedError(line);
    }
    group->report_failure(e.what());
    throw;
  }
};

Trainer::Trainer(const Config& config, const TrainOptions& options) : impl_(std::make_unique<Impl>(config, options)) {
  // Distributed, a stop is agreed with the other ranks (or ends the rendezvous wait) instead.
  if (g_stop_signal.load() && !read_distributed_env().distributed()) {
    impl_->stopped_in_setup = true;
    return;
  }
  try {
    impl_->setup();
  } catch (const std::exception& e) {
    if (!impl_->group) throw;
    impl_->fail_distributed(e);
  }
}

Trainer::~Trainer() = default;

TrainResult Trainer::run() {
  try {
    return impl_->loop();
  } catch (const std::exception& e) {
    if (!impl_->group) throw;
    impl_->fail_distributed(e);
  }
}

TrainResult train(const Config& config, const TrainOptions& options) { return Trainer(config, options).run(); }

}  // namespace mae
