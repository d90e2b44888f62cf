// mae-pretrain as a user runs it: exit statuses for SIGINT / SIGTERM / SIGKILL, resume after each,
// and one-line errors for bad configs.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <thread>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/threads.h"
#include "io/io.h"
#include "run/trained_model.h"

namespace fs = std::filesystem;

namespace {

struct Result {
  int status = -1;
  std::string out;
};

class PretrainCli : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    dir_ = fs::temp_directory_path() / ("mae3d_cli_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    std::ofstream list(dir_ / "list.txt");
    for (int i = 0; i < 2; ++i) {
      mae::Volume v;
      v.data = (torch::rand({1, 20, 20, 20}) + 1.0).contiguous();
      const std::string name = "v" + std::to_string(i) + ".nii.gz";
      mae::write_volume(v, (dir_ / name).string());
      list << name << "\n";
    }
    nlohmann::json cfg = {
        {"device", "cpu"},
        {"threads", 1},
        {"data",
         {{"dataset", (dir_ / "list.txt").string()}, {"cache_dir", (dir_ / "cache").string()}, {"val_fraction", 0}}},
        {"model",
         {{"img_size", {16, 16, 16}},
          {"patch_size", {4, 4, 4}},
          {"hidden_size", 24},
          {"mlp_dim", 48},
          {"num_layers", 1},
          {"num_heads", 2},
          {"decoder_hidden_size", 12},
          {"decoder_mlp_dim", 24},
          {"decoder_num_layers", 1},
          {"decoder_num_heads", 2}}},
        {"train", {{"batch_size", 2}, {"max_steps", 1000000}, {"log_every", 1}, {"checkpoint_every", 3}}},
        {"output", {{"dir", (dir_ / "run").string()}}}};
    std::ofstream(dir_ / "config.json") << cfg.dump(2);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Starts mae-pretrain with `args`; output goes to dir_/out.txt. A nonzero `file_limit` caps the
  // size of every file the program writes, as a full disk would.
  pid_t start(const std::vector<std::string>& args, rlim_t file_limit = 0) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      if (file_limit > 0) {
        std::signal(SIGXFSZ, SIG_IGN);
        rlimit limit{file_limit, file_limit};
        ::setrlimit(RLIMIT_FSIZE, &limit);
      }
      const std::string out = (dir_ / "out.txt").string();
      FILE* f = std::freopen(out.c_str(), "w", stdout);
      (void)f;
      ::dup2(::fileno(stdout), 2);
      std::vector<char*> argv{const_cast<char*>(MAE_PRETRAIN_BIN)};
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv(MAE_PRETRAIN_BIN, argv.data());
      ::_exit(127);
    }
    return pid;
  }

  Result finish(pid_t pid) {
    Result r;
    int status = 0;
    ::waitpid(pid, &status, 0);
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::ifstream in(dir_ / "out.txt");
    r.out.assign(std::istreambuf_iterator<char>(in), {});
    return r;
  }

  Result run(const std::vector<std::string>& args, rlim_t file_limit = 0) { return finish(start(args, file_limit)); }

  // run() with MAE3D_CPU_ALLOCATOR set to `allocator` for the child only.
  Result run_with_allocator(const std::string& allocator, const std::vector<std::string>& args) {
    ::setenv("MAE3D_CPU_ALLOCATOR", allocator.c_str(), 1);
    const pid_t pid = start(args);
    ::unsetenv("MAE3D_CPU_ALLOCATOR");
    return finish(pid);
  }

  // Waits until metrics.jsonl has at least `lines` records.
  bool wait_for_steps(int lines) {
    for (int i = 0; i < 600; ++i) {
      std::ifstream in(dir_ / "run" / "metrics.jsonl");
      int n = 0;
      std::string line;
      while (std::getline(in, line)) ++n;
      if (n >= lines) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  std::string config() const { return (dir_ / "config.json").string(); }
  fs::path dir_;
};

TEST_F(PretrainCli, SigintWritesACheckpointAndExits130ThenResumeContinues) {
  const pid_t pid = start({"--config", config()});
  ASSERT_TRUE(wait_for_steps(4));
  ::kill(pid, SIGINT);
  const auto r = finish(pid);
  EXPECT_EQ(r.status, 130) << r.out;
  EXPECT_NE(r.out.find("continue with --resume"), std::string::npos) << r.out;
  ASSERT_TRUE(fs::exists(dir_ / "run" / "checkpoints" / "latest"));
  std::string name;
  std::ifstream(dir_ / "run" / "checkpoints" / "latest") >> name;
  const int64_t stopped = std::stoll(name.substr(5));
  EXPECT_GE(stopped, 4);
  // Resume and run a few more steps to a fixed end.
  const auto resumed =
      run({"--config", config(), "--resume", "--set", "train.max_steps=" + std::to_string(stopped + 2)});
  EXPECT_EQ(resumed.status, 0) << resumed.out;
  EXPECT_NE(resumed.out.find("resuming from"), std::string::npos) << resumed.out;
}

TEST_F(PretrainCli, SigtermExits143) {
  const pid_t pid = start({"--config", config()});
  ASSERT_TRUE(wait_for_steps(2));
  ::kill(pid, SIGTERM);
  EXPECT_EQ(finish(pid).status, 143);
  EXPECT_TRUE(fs::exists(dir_ / "run" / "checkpoints" / "latest"));
}

TEST_F(PretrainCli, SigkillLeavesThePreviousCheckpointLoadable) {
  const pid_t pid = start({"--config", config()});
  ASSERT_TRUE(wait_for_steps(8));
  ::kill(pid, SIGKILL);
  finish(pid);
  const auto resumed = run({"--config", config(), "--resume", "--set", "train.max_steps=12"});
  EXPECT_EQ(resumed.status, 0) << resumed.out;
}

TEST_F(PretrainCli, BadConfigsGiveOneLineErrorsAndStatus2) {
  auto r = run({"--config", config(), "--set", "train.lr_warmup_step=3"});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("did you mean \"train.lr_warmup_steps\"?"), std::string::npos) << r.out;
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  r = run({"--config", (dir_ / "nope.json").string()});
  EXPECT_EQ(r.status, 2);
  EXPECT_NE(r.out.find("nope.json: cannot open"), std::string::npos) << r.out;
  r = run({"--config", config(), "--set", "device=cuda:0"});
  EXPECT_EQ(r.status, 2) << r.out;
  r = run({"--config", config(), "--print-config"});
  EXPECT_EQ(r.status, 0);
  EXPECT_NE(r.out.find("\"lr_warmup_steps\": 100"), std::string::npos);
  r = run({"--config", config(), "--dry-run"});
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "run")) << "a dry run creates nothing";
  // The memory pre-flight refuses an impossible size in the dry run, before building the model.
  // (1024^3 crops of 32^3 patches, a ViT-B and an 8-layer decoder: terabytes of attention matrices.)
  r = run({"--config",
           config(),
           "--dry-run",
           "--set",
           "model.img_size=[1024,1024,1024]",
           "--set",
           "model.patch_size=[32,32,32]",
           "--set",
           "model.hidden_size=768",
           "--set",
           "model.mlp_dim=3072",
           "--set",
           "model.num_layers=12",
           "--set",
           "model.num_heads=12",
           "--set",
           "model.decoder_hidden_size=384",
           "--set",
           "model.decoder_num_layers=8",
           "--set",
           "model.decoder_num_heads=12",
           "--set",
           "train.batch_size=8"});
  EXPECT_EQ(r.status, 2) << r.out;
  EXPECT_NE(r.out.find("model.img_size"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("GiB"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "run"));
}

// True once `pid` has a handler for `sig` (its SigCgt mask in /proc).
// True when `sig` is set in one of the signal masks `fields` ("SigCgt:", "SigBlk:") of /proc/PID/status.
// Only once the child runs the launcher or the program: right after fork it is still a copy of this
// test process, whose masks say nothing about the program (a SIGINT then kills it by default).
bool in_signal_mask(pid_t pid, int sig, std::initializer_list<const char*> fields) {
  std::error_code ec;
  const auto exe = fs::read_symlink("/proc/" + std::to_string(pid) + "/exe", ec);
  if (ec || exe == fs::read_symlink("/proc/self/exe", ec)) return false;
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  bool set = false;
  while (std::getline(in, line)) {
    for (const char* f : fields) {
      if (line.rfind(f, 0) == 0) set = set || ((std::stoull(line.substr(7), nullptr, 16) >> (sig - 1)) & 1ULL);
    }
  }
  return set;
}

// True once the program has installed its handler for `sig`.
bool catches(pid_t pid, int sig) { return in_signal_mask(pid, sig, {"SigCgt:"}); }

// bf16 on a CPU that would emulate its products runs, with one warning that says fp32 is faster
// here; on a CPU with native bf16 there is no warning. The dry run still creates nothing.
TEST_F(PretrainCli, Bf16OnACpuWithoutNativeBf16IsWarnedAbout) {
  const auto r = run({"--config", config(), "--dry-run", "--set", "train.precision=bf16"});
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "run"));
  const auto native = mae::cpu_native_bf16();
  const std::string warning = "train.precision = \"bf16\" on a CPU without native bf16 products";
  EXPECT_EQ(r.out.find(warning) != std::string::npos, native.has_value() && !*native) << r.out;
  const auto fp32 = run({"--config", config(), "--dry-run"});
  EXPECT_EQ(fp32.out.find("without native bf16"), std::string::npos) << fp32.out;
}

TEST_F(PretrainCli, SigintAtStartUpIsAHandledStopWithNothingToResume) {
  const pid_t pid = start({"--config", config()});
  // As soon as the handler is there (the first thing main does), before config and data are read.
  bool installed = false;
  for (int i = 0; i < 20000 && !installed; ++i) {
    installed = catches(pid, SIGINT);
    if (!installed) std::this_thread::sleep_for(std::chrono::microseconds(250));
  }
  ASSERT_TRUE(installed);
  ::kill(pid, SIGINT);
  const auto r = finish(pid);
  EXPECT_EQ(r.status, 130) << r.out;
  EXPECT_NE(r.out.find("stopped before training started; nothing to resume"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("checkpoint  ("), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir_ / "run" / "checkpoints"));
}

// True once `sig` is blocked in `pid` (the launcher's first act) or caught (the program's).
bool holds_back(pid_t pid, int sig) { return in_signal_mask(pid, sig, {"SigBlk:", "SigCgt:"}); }

// While LibTorch and ITK load (a few tenths of a second before any code of the program runs), a
// Ctrl-C waits instead of killing the process: at once, and at moments through the loading.
TEST_F(PretrainCli, SigintWhileTheLibrariesLoadIsAHandledStop) {
  for (const int delay_ms : {0, 20, 80}) {
    const pid_t pid = start({"--config", config()});
    bool held = false;
    for (int i = 0; i < 200000 && !held; ++i) {  // up to 20 s on a loaded machine
      held = holds_back(pid, SIGINT);
      if (!held) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    ASSERT_TRUE(held);
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    ::kill(pid, SIGINT);
    const auto r = finish(pid);
    EXPECT_EQ(r.status, 130) << "SIGINT " << delay_ms << " ms after start: " << r.out;
    EXPECT_NE(r.out.find("nothing to resume"), std::string::npos)
        << "SIGINT " << delay_ms << " ms after start, status " << r.status << ": [" << r.out << "]";
  }
}

TEST_F(PretrainCli, SecondProcessOnTheSameRunFolderIsRefusedNamingTheHolder) {
  const pid_t pid = start({"--config", config()});
  ASSERT_TRUE(wait_for_steps(2));
  // The second one writes to its own output file.
  const pid_t second = ::fork();
  if (second == 0) {
    FILE* f = std::freopen((dir_ / "out2.txt").c_str(), "w", stdout);
    (void)f;
    ::dup2(::fileno(stdout), 2);
    const std::string cfg = config();
    ::execl(MAE_PRETRAIN_BIN, MAE_PRETRAIN_BIN, "--config", cfg.c_str(), "--resume", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(second, &status, 0);
  std::ifstream in(dir_ / "out2.txt");
  const std::string out((std::istreambuf_iterator<char>(in)), {});
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 2) << out;
  EXPECT_NE(out.find("PID " + std::to_string(pid)), std::string::npos) << out;
  ::kill(pid, SIGTERM);
  EXPECT_EQ(finish(pid).status, 143);
}

TEST_F(PretrainCli, ReadersOfARunThatIsTrainingGetAConsistentCheckpoint) {
  // A checkpoint at every step and only the newest kept: every read races a prune.
  const pid_t pid =
      start({"--config", config(), "--set", "train.checkpoint_every=1", "--set", "train.keep_last=1", "--set",
             "model.hidden_size=96", "--set", "model.mlp_dim=384", "--set", "model.num_layers=2"});
  bool first = false;
  for (int i = 0; i < 600 && !first; ++i) {
    first = fs::exists(dir_ / "run" / "checkpoints" / "latest");
    if (!first) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(first);
  int failures = 0;
  std::string last_error;
  int64_t last_step = -1;
  for (int i = 0; i < 40; ++i) {
    try {
      const auto t = mae::load_trained_model((dir_ / "run").string());
      EXPECT_GE(t.step, last_step);
      last_step = t.step;
    } catch (const mae::Error& e) {
      ++failures;
      last_error = e.what();
    }
  }
  ::kill(pid, SIGTERM);
  EXPECT_EQ(finish(pid).status, 143);
  EXPECT_EQ(failures, 0) << last_error;
  EXPECT_GT(last_step, 0);
}

TEST_F(PretrainCli, DiskFullWhileCheckpointingNamesThePathAndKeepsThePreviousCheckpoint) {
  // A model whose weights (~1.4 MB) do not fit under the 1 MB file limit used below.
  const std::vector<std::string> wide = {"--set", "model.hidden_size=96", "--set", "model.mlp_dim=384",
                                         "--set", "model.num_layers=3"};
  auto args = std::vector<std::string>{"--config", config(), "--set", "train.max_steps=3"};
  args.insert(args.end(), wide.begin(), wide.end());
  ASSERT_EQ(run(args).status, 0);
  args = {"--config", config(), "--resume", "--set", "train.max_steps=6"};
  args.insert(args.end(), wide.begin(), wide.end());
  const auto full = run(args, /*file_limit=*/1 << 20);
  EXPECT_EQ(full.status, 1) << full.out;
  EXPECT_NE(full.out.find("checkpoints/"), std::string::npos) << full.out;
  EXPECT_NE(full.out.find("cannot"), std::string::npos) << full.out;
  std::string name;
  std::ifstream(dir_ / "run" / "checkpoints" / "latest") >> name;
  EXPECT_EQ(name, "step_00000003");
  EXPECT_FALSE(fs::exists(dir_ / "run" / "checkpoints" / "step_00000006"));
  // The previous checkpoint still loads and the run completes once space is back.
  EXPECT_EQ(run(args).status, 0);
}

}  // namespace

// The CPU tensor arena changes where tensors live, never what training computes: the same config
// trained with LibTorch's own allocator and with the arena ends with the same bits in every weight.
TEST_F(PretrainCli, TheCpuAllocatorDoesNotChangeTheTrainedWeights) {
  const std::vector<std::string> model{"--set", "train.max_steps=4", "--set", "model.hidden_size=96",
                                       "--set", "model.mlp_dim=384", "--set", "model.num_layers=2"};
  for (const std::string allocator : {"system", "arena"}) {
    std::vector<std::string> args{"--config", config(), "--set", "output.dir=" + (dir_ / allocator).string()};
    args.insert(args.end(), model.begin(), model.end());
    const auto r = run_with_allocator(allocator, args);
    ASSERT_EQ(r.status, 0) << allocator << ": " << r.out;
  }
  const auto system = mae::load_trained_model((dir_ / "system").string());
  const auto arena = mae::load_trained_model((dir_ / "arena").string());
  EXPECT_EQ(system.step, 4);
  EXPECT_EQ(arena.step, 4);
  const auto a = system.model->named_parameters(), b = arena.model->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& p : a) {
    EXPECT_TRUE(torch::equal(p.value(), b[p.key()])) << p.key();
  }
  const auto bad = run_with_allocator("jemalloc", {"--config", config()});
  EXPECT_EQ(bad.status, 2) << bad.out;
  EXPECT_NE(bad.out.find("MAE3D_CPU_ALLOCATOR=jemalloc is not an allocator"), std::string::npos) << bad.out;
}

// The library of the float32 products (train.fp32_matmul) is saved resolved, so that a resume can
// say when it continues on another one: its products round differently, so the continuation is not
// bit-identical to an uninterrupted run. Resuming on the same one says nothing of it.
TEST_F(PretrainCli, ResumeOnAnotherFloat32ProductLibraryIsWarnedAbout) {
  const auto first = run({"--config", config(), "--set", "train.max_steps=3", "--set", "train.fp32_matmul=auto"});
  ASSERT_EQ(first.status, 0) << first.out;
  std::ifstream saved_config(dir_ / "run" / "config.json");
  const auto saved = nlohmann::json::parse(saved_config);
  const std::string ran = saved.at("train").at("fp32_matmul").get<std::string>();
  ASSERT_TRUE(ran == "onednn" || ran == "blas") << "\"auto\" was saved as " << ran;
  const auto same =
      run({"--config", config(), "--resume", "--set", "train.max_steps=6", "--set", "train.fp32_matmul=" + ran});
  ASSERT_EQ(same.status, 0) << same.out;
  EXPECT_EQ(same.out.find("train.fp32_matmul"), std::string::npos) << same.out;
  if (ran != "onednn") return;  // a build without oneDNN has no other library to resume on
  const auto other =
      run({"--config", config(), "--resume", "--set", "train.max_steps=9", "--set", "train.fp32_matmul=blas"});
  ASSERT_EQ(other.status, 0) << other.out;
  EXPECT_NE(other.out.find("trained with float32 products on onednn, continuing on blas (\"train.fp32_matmul\")"),
            std::string::npos)
      << other.out;
}
