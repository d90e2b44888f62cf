// Multi-process tests of lib/train/distributed.*: every rank is a fork()ed child of the test process
// (which itself creates no torch object, so no LibTorch/Gloo thread exists when it forks), talking
// over 127.0.0.1 on a port found free by binding port 0. Each child sends its findings back through
// a pipe ("F <failure>" / "I <info>" lines) and ends with _exit; the parent waits with a deadline and
// kills what is left.
#include "train/distributed.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace mae;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A TCP port on 127.0.0.1 that nobody listens on right now.
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) std::abort();
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

DistributedEnv env_for(int rank, int size, int port) {
  DistributedEnv env;
  env.rank = rank, env.world_size = size, env.local_rank = rank;
  env.master_addr = "127.0.0.1", env.master_port = port;
  env.source = "torchrun";
  return env;
}

// What a child reports to the parent.
struct Report {
  std::ostringstream out;
  void fail(const std::string& s) { out << "F " << s << "\n"; }
  void info(const std::string& s) { out << "I " << s << "\n"; }
  void check(bool ok, const std::string& s) {
    if (!ok) fail(s);
  }
  void contains(const std::string& text, const std::string& needle) {
    if (text.find(needle) == std::string::npos) fail("\"" + text + "\" does not contain \"" + needle + "\"");
  }
};

struct RankOutcome {
  int status = -1;   // exit status, or 128 + signal
  std::string text;  // what the child reported
};

// Runs body(rank, report) in `n` forked children and returns each one's outcome. A child that
// throws reports it; one that has not ended after `deadline` is killed (status 128 + 9).
std::vector<RankOutcome> run_ranks(int n, const std::function<void(int, Report&)>& body,
                                   milliseconds deadline = milliseconds(90000)) {
  std::vector<pid_t> pids(n);
  std::vector<int> fds(n);
  for (int r = 0; r < n; ++r) {
    int p[2];
    if (::pipe(p) != 0) std::abort();
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::close(p[0]);
      for (int k = 0; k < r; ++k) ::close(fds[k]);
      at::set_num_threads(1);
      Report rep;
      int code = 0;
      try {
        body(r, rep);
      } catch (const std::exception& e) {
        rep.fail(std::string("uncaught exception: ") + e.what());
        code = 3;
      }
      const std::string s = rep.out.str();
      size_t off = 0;
      while (off < s.size()) {
        const ssize_t w = ::write(p[1], s.data() + off, s.size() - off);
        if (w <= 0) break;
        off += static_cast<size_t>(w);
      }
      ::close(p[1]);
      ::_exit(code);
    }
    ::close(p[1]);
    pids[r] = pid;
    fds[r] = p[0];
  }
  std::vector<RankOutcome> out(n);
  const auto end = Clock::now() + deadline;
  std::vector<bool> open(n, true), done(n, false);
  int remaining = n;
  while (remaining > 0) {
    for (int r = 0; r < n; ++r) {
      if (open[r]) {
        pollfd pfd{fds[r], POLLIN, 0};
        if (::poll(&pfd, 1, 0) > 0) {
          char buf[4096];
          const ssize_t k = ::read(fds[r], buf, sizeof buf);
          if (k > 0) {
            out[r].text.append(buf, static_cast<size_t>(k));
          } else {
            open[r] = false;
            ::close(fds[r]);
          }
        }
      }
      if (!done[r]) {
        int st = 0;
        if (::waitpid(pids[r], &st, WNOHANG) == pids[r]) {
          done[r] = true;
          --remaining;
          out[r].status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        }
      }
    }
    if (Clock::now() > end) {
      for (int r = 0; r < n; ++r) {
        if (!done[r]) {
          ::kill(pids[r], SIGKILL);
          int st = 0;
          ::waitpid(pids[r], &st, 0);
          done[r] = true;
          out[r].status = 128 + SIGKILL;
          out[r].text += "F killed after the deadline of " + std::to_string(deadline.count()) + " ms\n";
        }
      }
      break;
    }
    std::this_thread::sleep_for(milliseconds(5));
  }
  for (int r = 0; r < n; ++r) {
    while (open[r]) {
      char buf[4096];
      const ssize_t k = ::read(fds[r], buf, sizeof buf);
      if (k > 0) {
        out[r].text.append(buf, static_cast<size_t>(k));
      } else {
        open[r] = false;
        ::close(fds[r]);
      }
    }
  }
  return out;
}

// Turns the children's reports into gtest failures and prints their info lines.
void expect_ranks(const std::vector<RankOutcome>& outcomes, const std::map<int, int>& expected_status = {}) {
  for (size_t r = 0; r < outcomes.size(); ++r) {
    const auto it = expected_status.find(static_cast<int>(r));
    const int want = it == expected_status.end() ? 0 : it->second;
    EXPECT_EQ(outcomes[r].status, want) << "rank " << r << " exit status";
    std::istringstream in(outcomes[r].text);
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("F ", 0) == 0) ADD_FAILURE() << "rank " << r << ": " << line.substr(2);
      if (line.rfind("I ", 0) == 0) std::cout << "[rank " << r << "] " << line.substr(2) << std::endl;
    }
  }
}

// --- launch environment ----------------------------------------------------------------------

std::function<const char*(const char*)> vars(std::map<std::string, std::string> m) {
  auto held = std::make_shared<std::map<std::string, std::string>>(std::move(m));
  return [held](const char* name) -> const char* {
    auto it = held->find(name);
    return it == held->end() ? nullptr : it->second.c_str();
  };
}

std::string config_error(const std::map<std::string, std::string>& m) {
  try {
    read_distributed_env(vars(m));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(DistributedEnv, SingleProcessWhenWorldSizeUnsetOrOne) {
  auto e = read_distributed_env(vars({}));
  EXPECT_EQ(e.world_size, 1);
  EXPECT_EQ(e.rank, 0);
  EXPECT_FALSE(e.distributed());
  EXPECT_EQ(e.source, "");
  e = read_distributed_env(vars({{"WORLD_SIZE", "1"}, {"RANK", "0"}}));
  EXPECT_FALSE(e.distributed());
  EXPECT_EQ(e.source, "");
  EXPECT_EQ(e.master_addr, "");
  // The default getter is ::getenv.
  ::setenv("WORLD_SIZE", "1", 1);
  EXPECT_EQ(read_distributed_env().world_size, 1);
  ::unsetenv("WORLD_SIZE");
}

TEST(DistributedEnv, Torchrun) {
  auto e = read_distributed_env(vars({{"RANK", "3"},
                                      {"WORLD_SIZE", "4"},
                                      {"LOCAL_RANK", "1"},
                                      {"MASTER_ADDR", "node0"},
                                      {"MASTER_PORT", "29501"},
                                      {"SLURM_NTASKS", "8"},
                                      {"SLURM_PROCID", "7"}}));
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 4);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.master_addr, "node0");
  EXPECT_EQ(e.master_port, 29501);
  EXPECT_EQ(e.source, "torchrun");
  EXPECT_TRUE(e.distributed());
}

TEST(DistributedEnv, SlurmWhenRankAndWorldSizeUnset) {
  auto e = read_distributed_env(vars({{"SLURM_PROCID", "5"},
                                      {"SLURM_NTASKS", "8"},
                                      {"SLURM_LOCALID", "1"},
                                      {"MASTER_ADDR", "10.0.0.1"},
                                      {"MASTER_PORT", "12345"}}));
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.source, "slurm");
  EXPECT_EQ(e.master_port, 12345);
  e = read_distributed_env(vars({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}}));
  EXPECT_FALSE(e.distributed());
  EXPECT_EQ(e.source, "");
}

TEST(DistributedEnv, ErrorsNameTheVariableAndValue) {
  const std::map<std::string, std::string> ok = {
      {"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}};
  auto with = [&](const std::string& k, const std::string& v) {
    auto m = ok;
    m[k] = v;
    return m;
  };
  auto without = [&](const std::string& k) {
    auto m = ok;
    m.erase(k);
    return m;
  };
  EXPECT_EQ(config_error(ok), "(no error)");
  EXPECT_NE(config_error(with("RANK", "one")).find("RANK=\"one\" is not an integer"), std::string::npos);
  EXPECT_NE(config_error(with("WORLD_SIZE", "2x")).find("WORLD_SIZE=\"2x\" is not an integer"), std::string::npos);
  EXPECT_NE(config_error(with("WORLD_SIZE", " 2")).find("WORLD_SIZE=\" 2\" is not an integer"), std::string::npos);
  EXPECT_NE(config_error(with("LOCAL_RANK", "1.5")).find("LOCAL_RANK=\"1.5\" is not an integer"), std::string::npos);
  EXPECT_NE(config_error(with("MASTER_PORT", "http")).find("MASTER_PORT=\"http\" is not an integer"),
            std::string::npos);
  EXPECT_NE(config_error(with("RANK", "2")).find("RANK=2 is outside [0, WORLD_SIZE=2)"), std::string::npos);
  EXPECT_NE(config_error(with("RANK", "-1")).find("RANK=-1 is outside [0, WORLD_SIZE=2)"), std::string::npos);
  EXPECT_NE(config_error({{"RANK", "1"}}).find("RANK=1 is outside [0, WORLD_SIZE=1)"), std::string::npos);
  EXPECT_NE(config_error(with("WORLD_SIZE", "0")).find("WORLD_SIZE=0 must be at least 1"), std::string::npos);
  EXPECT_NE(config_error(with("LOCAL_RANK", "-2")).find("LOCAL_RANK=-2 must not be negative"), std::string::npos);
  EXPECT_NE(config_error(without("RANK")).find("RANK is not set but WORLD_SIZE=2"), std::string::npos);
  EXPECT_NE(config_error(without("MASTER_ADDR")).find("MASTER_ADDR is not set"), std::string::npos);
  EXPECT_NE(config_error(with("MASTER_ADDR", "")).find("MASTER_ADDR is not set"), std::string::npos);
  EXPECT_NE(config_error(without("MASTER_PORT")).find("MASTER_PORT is not set"), std::string::npos);
  EXPECT_NE(config_error(with("MASTER_PORT", "0")).find("MASTER_PORT=0 is outside 1..65535"), std::string::npos);
  EXPECT_NE(config_error(with("MASTER_PORT", "65536")).find("MASTER_PORT=65536 is outside 1..65535"),
            std::string::npos);
  // SLURM: the same checks under SLURM's names.
  EXPECT_NE(config_error({{"SLURM_NTASKS", "4"}, {"SLURM_PROCID", "4"}, {"MASTER_ADDR", "a"}, {"MASTER_PORT", "1"}})
                .find("SLURM_PROCID=4 is outside [0, SLURM_NTASKS=4)"),
            std::string::npos);
  EXPECT_NE(config_error({{"SLURM_NTASKS", "four"}}).find("SLURM_NTASKS=\"four\" is not an integer"),
            std::string::npos);
  EXPECT_NE(config_error({{"SLURM_NTASKS", "2"}, {"SLURM_PROCID", "1"}}).find("MASTER_ADDR is not set"),
            std::string::npos);
  // Single process: MASTER_* are not needed, and not checked.
  EXPECT_EQ(config_error({{"WORLD_SIZE", "1"}, {"MASTER_PORT", "99999"}}), "(no error)");
}

// --- JSON comparison -------------------------------------------------------------------------

TEST(FirstDifference, DottedPaths) {
  using nlohmann::json;
  const json a = json::parse(R"({"train": {"lr": 0.001, "steps": 10}, "data": {"files": ["a", "b"]}, "seed": 1})");
  EXPECT_EQ(first_difference(a, a), "");
  json b = a;
  b["train"]["lr"] = 0.002;
  EXPECT_EQ(first_difference(a, b), "train.lr");
  b = a;
  b["data"]["files"][1] = "c";
  EXPECT_EQ(first_difference(a, b), "data.files[1]");
  b = a;
  b["data"]["files"].push_back("c");
  EXPECT_EQ(first_difference(a, b), "data.files[2]");
  b = a;
  b["train"].erase("steps");
  EXPECT_EQ(first_difference(a, b), "train.steps");
  b = a;
  b["extra"] = true;
  EXPECT_EQ(first_difference(a, b), "extra");
  b = a;
  b["seed"] = 1.0;  // numbers compare by value
  EXPECT_EQ(first_difference(a, b), "");
  b["seed"] = "1";  // but not across types
  EXPECT_EQ(first_difference(a, b), "seed");
  b = a;
  b["train"] = 5;
  EXPECT_EQ(first_difference(a, b), "train");
  EXPECT_EQ(first_difference(json(1), json(2)), "(top level)");
  // The first difference in key order.
  b = a;
  b["train"]["lr"] = 1;
  b["seed"] = 2;
  EXPECT_EQ(first_difference(a, b), "seed");
}

// --- a world of one ----------------------------------------------------------------------------

TEST(ProcessGroupOfOne, CollectivesAreNoOps) {
  auto out = run_ranks(1, [](int, Report& rep) {
    ProcessGroup g(DistributedEnv{}, "gloo", milliseconds(2000));
    rep.check(g.size() == 1 && g.rank() == 0 && g.backend() == "gloo", "rank/size/backend");
    auto t = torch::arange(6, torch::kFloat);
    g.broadcast({t});
    g.allreduce_sum(t);
    auto p = g.allreduce_sum_async(t);
    p.wait();
    g.barrier();
    rep.check(torch::equal(t, torch::arange(6, torch::kFloat)), "tensor changed");
    g.check_same_config(nlohmann::json{{"a", 1}});
    g.store_set("k", "v");
    rep.check(g.store_get("k") == "v", "store round trip");
    auto lin = torch::nn::Linear(3, 2);
    std::vector<at::Tensor> params = lin->parameters();
    GradientSync sync(g, params, 1 << 20, true);
    sync.arm(true);
    lin->forward(torch::ones({4, 3})).sum().backward();
    const auto before = params[0].grad().clone();
    sync.finish();
    rep.check(torch::equal(before, params[0].grad()), "gradient changed");
    rep.contains(g.describe_failure("all-reduce", std::runtime_error("boom")), "rank 0: all-reduce failed: boom");
  });
  expect_ranks(out);
}

TEST(ProcessGroupConfig, BackendErrors) {
  auto out = run_ranks(1, [](int, Report& rep) {
    try {
      ProcessGroup g(DistributedEnv{}, "mpi", milliseconds(1000));
      rep.fail("no error for backend mpi");
    } catch (const ConfigError& e) {
      rep.contains(e.what(), "unknown distributed backend \"mpi\"");
    }
    try {
      ProcessGroup g(env_for(0, 2, free_port()), "nccl", milliseconds(1000));
      rep.info("nccl: a process group was created (CUDA present)");
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      rep.check(what.find("this LibTorch was built without NCCL") != std::string::npos ||
                    what.find("needs a CUDA device") != std::string::npos,
                "unexpected nccl error: " + what);
      rep.info(std::string("nccl: ") + what);
    } catch (const DistributedError& e) {
      rep.info(std::string("nccl (CUDA present, no peer): ") + e.what());
    }
  });
  expect_ranks(out);
}

// --- two ranks -----------------------------------------------------------------------------------

TEST(TwoRanks, BroadcastAllreduceBarrierStore) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", milliseconds(10000));
    rep.check(g.rank() == rank && g.size() == 2, "rank/size");
    // Broadcast: several dtypes, a non-contiguous tensor, and one above the 25 MiB buffer size.
    auto a = torch::arange(12, torch::kFloat).reshape({3, 4});
    auto b = torch::arange(5, torch::kLong) * 7;
    auto c_base = torch::arange(6, torch::kDouble).reshape({2, 3}) / 3.0;
    auto big = torch::arange(7'000'000, torch::kFloat).remainder(1000.0);
    const auto a0 = a.clone(), b0 = b.clone(), c0 = c_base.t().clone(), big0 = big.clone();
    at::Tensor c = c_base.t();         // a non-contiguous view
    auto w = torch::nn::Linear(4, 3);  // a parameter that requires grad
    const auto w0 = w->weight.detach().clone();
    if (rank == 1) {
      a.zero_(), b.zero_(), c_base.zero_(), big.zero_();
      torch::NoGradGuard ng;
      w->weight.fill_(-1);
    }
    // Every rank seeds the same, but the weight on rank 1 was overwritten: rank 0's w0 is the truth.
    g.broadcast({a, b, c, big, w->weight}, 0);
    rep.check(torch::equal(a, a0), "broadcast float");
    rep.check(torch::equal(b, b0), "broadcast int64");
    rep.check(torch::equal(c, c0) && torch::equal(c_base, c0.t()), "broadcast non-contiguous double");
    rep.check(torch::equal(big, big0), "broadcast 28 MB tensor");
    if (rank == 0) rep.check(torch::equal(w->weight, w0), "root's weight changed");
    // All-reduce: blocking, non-contiguous, and two async ones waited out of order.
    auto s = torch::full({4, 4}, static_cast<float>(rank + 1));
    g.allreduce_sum(s);
    rep.check(torch::equal(s, torch::full({4, 4}, 3.0f)), "allreduce_sum");
    auto nc_base = torch::full({4, 6}, static_cast<double>(rank + 1));
    at::Tensor nc = nc_base.t();
    g.allreduce_sum(nc);
    rep.check(torch::equal(nc_base, torch::full({4, 6}, 3.0, torch::kDouble)), "allreduce_sum non-contiguous");
    auto x = torch::full({100}, static_cast<float>(rank));
    auto y = torch::full({3}, static_cast<long>(10 * (rank + 1)), torch::kLong);
    auto px = g.allreduce_sum_async(x);
    auto py = g.allreduce_sum_async(y);
    rep.check(px.valid() && py.valid(), "pending handles valid");
    py.wait();
    px.wait();
    px.wait();  // a second wait is a no-op
    rep.check(!px.valid(), "pending still valid after wait");
    rep.check(torch::equal(x, torch::full({100}, 1.0f)), "async allreduce float");
    rep.check(torch::equal(y, torch::full({3}, 30L, torch::kLong)), "async allreduce int64");
    g.barrier();
    // Store helpers.
    if (rank == 1) g.store_set("greeting", "hello from rank 1");
    if (rank == 0) rep.check(g.store_get("greeting") == "hello from rank 1", "store_get");
    g.barrier();
  });
  expect_ranks(out);
}

// A small network with parameters of two dtypes, one layer used only on rank 1.
struct Model {
  torch::nn::Sequential seq{torch::nn::Linear(8, 16), torch::nn::ReLU(), torch::nn::Linear(16, 16),
                            torch::nn::Linear(16, 4)};
  torch::nn::Linear extra{8, 4};
  at::Tensor scale = torch::full({1}, 0.5, torch::kDouble).set_requires_grad(true);

  std::vector<at::Tensor> params() {
    auto p = seq->parameters();
    for (auto& q : extra->parameters()) p.push_back(q);
    p.push_back(scale);
    return p;
  }
  static at::Tensor input(int rank, int micro) {
    auto gen = at::detail::createCPUGenerator(1000 + 10 * rank + micro);
    return at::randn({6, 8}, gen);
  }
  at::Tensor loss(int rank, const at::Tensor& x) {
    auto l = (seq->forward(x).pow(2).to(torch::kDouble) * scale).mean();
    if (rank == 1) l = l + extra->forward(x).pow(2).mean();
    return l;
  }
  void clear_grads() {
    for (auto& p : params()) p.mutable_grad() = at::Tensor();
  }
};

std::vector<at::Tensor> grads_of(Model& m) {
  std::vector<at::Tensor> out;
  for (auto& p : m.params()) out.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  return out;
}

TEST(TwoRanks, GradientSyncAveragesGradients) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    torch::manual_seed(0);
    Model model;
    ProcessGroup g(env_for(rank, 2, port), "gloo", milliseconds(10000));
    g.broadcast(model.params(), 0);
    const int micro_batches = 2;
    // The expected average, computed here from both ranks' inputs without any communication.
    std::vector<at::Tensor> expected;
    for (int r = 0; r < 2; ++r) {
      model.clear_grads();
      for (int mb = 0; mb < micro_batches; ++mb) model.loss(r, Model::input(r, mb)).backward();
      auto gr = grads_of(model);
      auto params = model.params();
      for (size_t i = 0; i < gr.size(); ++i) {
        at::Tensor gi = gr[i].defined() ? gr[i] : torch::zeros_like(params[i]);
        if (r == 0) {
          expected.push_back(gi / 2);
        } else {
          expected[i] = expected[i] + gi / 2;
        }
      }
    }
    auto run = [&](bool overlap, int steps, int64_t* buckets) {
      std::vector<at::Tensor> got;
      GradientSync sync(g, model.params(), 256, overlap);
      if (buckets) *buckets = sync.bucket_count();
      const int64_t n = sync.bucket_count();
      for (int step = 0; step < steps; ++step) {
        model.clear_grads();
        for (int mb = 0; mb < micro_batches; ++mb) {
          sync.arm(mb == micro_batches - 1);
          model.loss(rank, Model::input(rank, mb)).backward();
        }
        const double waited = sync.finish();
        rep.check(waited >= 0.0, "negative wait");
        // Rank 1 produces every gradient, so the hooks launch every bucket; rank 0 has none for
        // `extra` (bucket 1), so only bucket 0 (`scale`) can go before finish().
        const int64_t early = sync.overlapped_buckets();
        const int64_t want = !overlap ? 0 : rank == 1 ? n : 1;
        rep.check(early == want, "overlapped buckets: " + std::to_string(early) + ", expected " + std::to_string(want));
        auto gr = grads_of(model);
        if (step == 0) {
          got = gr;
        } else {
          for (size_t i = 0; i < gr.size(); ++i) rep.check(torch::equal(gr[i], got[i]), "step 2 differs from step 1");
        }
      }
      return got;
    };
    int64_t buckets = 0;
    const auto plain = run(false, 1, &buckets);
    const auto overlapped = run(true, 2, nullptr);
    rep.check(buckets >= 4, "only " + std::to_string(buckets) + " buckets");
    rep.info("buckets: " + std::to_string(buckets));
    rep.check(plain.size() == expected.size(), "gradient count");
    for (size_t i = 0; i < plain.size() && i < expected.size(); ++i) {
      if (!plain[i].defined() || !overlapped[i].defined()) {
        rep.fail("gradient " + std::to_string(i) + " undefined after finish()");
        continue;
      }
      rep.check(torch::equal(plain[i], overlapped[i]), "overlap on/off differ for parameter " + std::to_string(i));
      const double diff = (plain[i].to(torch::kDouble) - expected[i].to(torch::kDouble)).abs().max().item<double>();
      rep.check(diff <= 1e-6,
                "parameter " + std::to_string(i) + " differs from the average by " + std::to_string(diff));
    }
    // Both ranks hold the same averages (rank 0 has no own gradient for `extra`).
    for (auto& t : plain) {
      auto copy = t.clone();
      auto sum = copy.clone();
      g.allreduce_sum(sum);
      rep.check(torch::equal(sum, copy * 2), "ranks hold different averages");
    }
  });
  expect_ranks(out);
}

TEST(TwoRanks, CheckSameConfigNamesTheDifferingKey) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", milliseconds(10000));
    nlohmann::json cfg = {{"train", {{"lr", rank == 0 ? 0.001 : 0.002}, {"steps", 10}}},
                          {"threads", 4 + rank},
                          {"data", {{"files", {"a.nii.gz", "b.nii.gz"}}}}};
    g.check_same_config(cfg, {"threads", "train.lr"});  // differs only where ignored: passes
    try {
      g.check_same_config(cfg, {"threads"});
      rep.fail("no ConfigError");
    } catch (const ConfigError& e) {
      if (rank == 1) {
        rep.check(std::string(e.what()) ==
                      "rank 1: the config differs from rank 0's at \"train.lr\" (0.002 here, 0.001 on rank 0); every "
                      "rank must run the same config",
                  std::string("rank 1 message: ") + e.what());
      } else {
        rep.check(std::string(e.what()) ==
                      "rank 0: the config differs from rank 1's at \"train.lr\" (0.001 here, 0.002 on rank 1); every "
                      "rank must run the same config",
                  std::string("rank 0 message: ") + e.what());
      }
    }
  });
  expect_ranks(out);
}

// --- failures ------------------------------------------------------------------------------------

constexpr milliseconds kFailTimeout{10000};
constexpr double kMargin = 2.0;  // seconds on top of a timeout that a failure may take

TEST(TwoRanks, KilledPeerFailsTheAllreduceWithinTheTimeout) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", kFailTimeout);
    g.barrier();
    if (rank == 1) {
      std::this_thread::sleep_for(milliseconds(300));
      ::_exit(9);  // rank 0 is in the all-reduce below by now
    }
    auto t = torch::ones({1000});
    const auto t0 = Clock::now();
    try {
      g.allreduce_sum(t);
      rep.fail("the all-reduce succeeded without rank 1");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      rep.info("all-reduce failed after " + std::to_string(took) + " s: " + e.what());
      rep.check(took < kFailTimeout.count() / 1000.0 + kMargin, "the failure took " + std::to_string(took) + " s");
      const auto t1 = Clock::now();
      const std::string line = g.describe_failure("all-reduce", e);
      const double described = seconds_since(t1);
      rep.info("describe_failure took " + std::to_string(described) + " s: " + line);
      rep.contains(line, "rank 0: lost rank 1 (it stopped answering during all-reduce: ");
      rep.check(line.find('\n') == std::string::npos, "more than one line");
      rep.check(took + described < kFailTimeout.count() / 1000.0 + kMargin, "failure + description too slow");
    }
  });
  expect_ranks(out, {{1, 9}});
}

TEST(TwoRanks, ReportedFailureIsNamedByThePeer) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", kFailTimeout);
    g.barrier();
    if (rank == 1) {
      std::this_thread::sleep_for(milliseconds(200));
      g.report_failure("cannot read /data/ct_017.nii.gz: truncated gzip stream");
      ::_exit(1);
    }
    auto t = torch::ones({1000});
    const auto t0 = Clock::now();
    try {
      g.allreduce_sum(t);
      rep.fail("the all-reduce succeeded without rank 1");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      const std::string line = g.describe_failure("all-reduce", e);
      const double total = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s, described after " + std::to_string(total) + " s: " + line);
      rep.check(line == "rank 0: rank 1 failed: cannot read /data/ct_017.nii.gz: truncated gzip stream",
                "message: " + line);
      rep.check(total < kFailTimeout.count() / 1000.0, "took " + std::to_string(total) + " s");
    }
  });
  expect_ranks(out, {{1, 1}});
}

TEST(TwoRanks, StoreHostFailureIsNamedByThePeer) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", kFailTimeout);
    g.barrier();
    if (rank == 0) {
      std::this_thread::sleep_for(milliseconds(200));
      const auto t0 = Clock::now();
      g.report_failure("CUDA out of memory");
      rep.info("rank 0's report_failure returned after " + std::to_string(seconds_since(t0)) + " s");
      return;  // then exits, taking the store with it, as a failed trainer would
    }
    auto t = torch::ones({1000});
    const auto t0 = Clock::now();
    try {
      g.allreduce_sum(t);
      rep.fail("the all-reduce succeeded without rank 0");
    } catch (const DistributedError& e) {
      const std::string line = g.describe_failure("all-reduce", e);
      const double total = seconds_since(t0);
      rep.info("described after " + std::to_string(total) + " s: " + line);
      rep.check(line == "rank 1: rank 0 failed: CUDA out of memory", "message: " + line);
      rep.check(total < kFailTimeout.count() / 1000.0, "took " + std::to_string(total) + " s");
    }
  });
  expect_ranks(out);
}

TEST(TwoRanks, KilledStoreHostIsNamedByThePeer) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    ProcessGroup g(env_for(rank, 2, port), "gloo", kFailTimeout);
    g.barrier();
    if (rank == 0) {
      std::this_thread::sleep_for(milliseconds(300));
      ::_exit(9);
    }
    auto t = torch::ones({1000});
    const auto t0 = Clock::now();
    try {
      g.allreduce_sum(t);
      rep.fail("the all-reduce succeeded without rank 0");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      const std::string line = g.describe_failure("all-reduce", e);
      const double total = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s, described after " + std::to_string(total) + " s: " + line);
      rep.contains(line,
                   "rank 1: lost rank 0, which hosts the rendezvous store (it stopped answering during all-reduce: ");
      rep.check(total < kFailTimeout.count() / 1000.0 + kMargin, "took " + std::to_string(total) + " s");
    }
  });
  expect_ranks(out, {{0, 9}});
}

TEST(Rendezvous, UnreachableStoreFailsWithinTheTimeout) {
  const int port = free_port();  // nobody listens there
  auto out = run_ranks(1, [port](int, Report& rep) {
    const auto t0 = Clock::now();
    try {
      ProcessGroup g(env_for(1, 2, port), "gloo", milliseconds(2000));
      rep.fail("connected to a port nobody listens on");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s: " + e.what());
      rep.check(
          std::string(e.what()) == "rank 1: cannot reach the rendezvous store at 127.0.0.1:" + std::to_string(port) +
                                       " within 2 s (MASTER_ADDR/MASTER_PORT; is rank 0 running?)",
          std::string("message: ") + e.what());
      rep.check(took < 2.0 + kMargin, "took " + std::to_string(took) + " s");
    }
  });
  expect_ranks(out);
}

TEST(Rendezvous, StoreHostStartingLateIsWaitedFor) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    if (rank == 0) std::this_thread::sleep_for(milliseconds(1500));
    const auto t0 = Clock::now();
    ProcessGroup g(env_for(rank, 2, port), "gloo", milliseconds(5000));
    auto t = torch::ones({3});
    g.allreduce_sum(t);
    rep.check(torch::equal(t, torch::full({3}, 2.0f)), "allreduce after a late start");
    if (rank == 1) rep.info("joined after " + std::to_string(seconds_since(t0)) + " s");
  });
  expect_ranks(out);
}

TEST(Rendezvous, PeerThatNeverJoins) {
  const int port = free_port();
  auto out = run_ranks(1, [port](int, Report& rep) {
    const auto t0 = Clock::now();
    try {
      ProcessGroup g(env_for(0, 2, port), "gloo", milliseconds(2000));
      rep.fail("rank 0 went on without rank 1");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s: " + e.what());
      rep.contains(e.what(), "rank 0: only 1 of 2 ranks joined within 2 s (missing rank 1;");
      rep.check(took < 2.0 + kMargin, "took " + std::to_string(took) + " s");
    }
  });
  expect_ranks(out);
}

TEST(Rendezvous, JoinedRankHearsThatAnotherNeverCame) {
  const int port = free_port();
  auto out = run_ranks(2, [port](int rank, Report& rep) {
    const auto t0 = Clock::now();
    try {
      ProcessGroup g(env_for(rank, 3, port), "gloo", milliseconds(2000));  // rank 2 never starts
      rep.fail("the group formed without rank 2");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s: " + e.what());
      rep.contains(e.what(), "rank " + std::to_string(rank) + ": only 2 of 3 ranks joined within 2 s (missing rank 2;");
      rep.check(took < 2.0 + kMargin, "took " + std::to_string(took) + " s");
    }
  });
  expect_ranks(out);
}

TEST(Rendezvous, PortInUse) {
  // Something else listens on the port (on all addresses, as TCPStore's server would).
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(fd, 4), 0);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  const int port = ntohs(a.sin_port);
  auto out = run_ranks(1, [port](int, Report& rep) {
    const auto t0 = Clock::now();
    try {
      ProcessGroup g(env_for(0, 2, port), "gloo", milliseconds(2000));
      rep.fail("rank 0 hosted the store on a port in use");
    } catch (const DistributedError& e) {
      const double took = seconds_since(t0);
      rep.info("failed after " + std::to_string(took) + " s: " + e.what());
      rep.contains(e.what(), "rank 0: MASTER_PORT " + std::to_string(port) + " is in use (");
      rep.check(took < 2.0 + kMargin, "took " + std::to_string(took) + " s");
    }
  });
  ::close(fd);
  expect_ranks(out);
}

}  // namespace
