// Process group, rendezvous, failure reports and bucketed gradient averaging (see distributed.h).
// Only this file talks to c10d, through c10d_compat.h; no logging here (errors are exceptions).
#include "train/distributed.h"

#include "train/c10d_compat.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace mae {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr int64_t kBroadcastBufferBytes = 25LL << 20;  // 25 MiB per flattened broadcast buffer
constexpr milliseconds kPollInterval{10};

std::string rank_prefix(int rank) { return "rank " + std::to_string(rank) + ": "; }

// "5 s", "2.5 s", "250 ms".
std::string duration_text(milliseconds d) {
  const auto ms = d.count();
  if (ms < 1000) return std::to_string(ms) + " ms";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + " s";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(ms) / 1000.0);
  return buf;
}

// The first non-empty line of an exception's message, without c10's backtrace.
std::string one_line(const std::exception& e) {
  std::string text;
  if (const auto* c10e = dynamic_cast<const c10::Error*>(&e)) {
    text = c10e->what_without_backtrace();
  } else {
    text = e.what();
  }
  // 2.x's Gloo appends advice meant for Python users to "Connection closed by peer".
  const auto advice = text.find(". This is typically caused by a remote worker crashing");
  if (advice != std::string::npos) text.erase(advice);
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos) continue;
    const auto e2 = line.find_last_not_of(" \t\r");
    line = line.substr(b, e2 - b + 1);
    if (line.size() > 400) line = line.substr(0, 400) + "...";
    return line;
  }
  return "unknown error";
}

bool contains(const std::string& s, const char* needle) { return s.find(needle) != std::string::npos; }

std::mutex g_abort_mu;
std::function<bool()> g_abort;  // set_rendezvous_abort

bool rendezvous_aborted() {
  std::lock_guard<std::mutex> lock(g_abort_mu);
  return g_abort && g_abort();
}

// Thrown out of a rendezvous wait that set_rendezvous_abort's check ended.
struct RendezvousAborted : std::runtime_error {
  RendezvousAborted() : std::runtime_error("stopped by a signal during the rendezvous") {}
};

std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string text(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

// Waits until a TCP connection to host:port succeeds (then closes it) or the deadline passes.
// Returns "ok" on success, else why not: "" when nothing accepted connections, or "MASTER_ADDR ...
// cannot be resolved: ..." when the name never resolved.
std::string await_listener(const std::string& host, int port, std::chrono::steady_clock::time_point deadline) {
  std::string why;
  while (true) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    const int gai = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
    if (gai != 0) {
      why = "MASTER_ADDR " + host + " cannot be resolved: " + ::gai_strerror(gai);
    } else {
      why.clear();
      for (addrinfo* ai = found; ai; ai = ai->ai_next) {
        const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) continue;
        bool ok = ::connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
        if (!ok && errno == EINPROGRESS) {
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
          pollfd pfd{fd, POLLOUT, 0};
          if (::poll(&pfd, 1, static_cast<int>(std::clamp<long long>(left, 1, 1000))) == 1) {
            int err = 0;
            socklen_t len = sizeof err;
            ok = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
          }
        }
        ::close(fd);
        if (ok) {
          ::freeaddrinfo(found);
          return "ok";
        }
      }
      ::freeaddrinfo(found);
    }
    if (Clock::now() + milliseconds(50) >= deadline) return why;
    if (rendezvous_aborted()) throw RendezvousAborted();
    std::this_thread::sleep_for(milliseconds(50));
  }
}

bool is_loopback(const std::string& host) { return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0; }

std::string ranks_text(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// --- JSON comparison -------------------------------------------------------------------------

std::string join_key(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

bool same_scalar(const nlohmann::json& a, const nlohmann::json& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_number_float() || b.is_number_float()) return a.get<double>() == b.get<double>();
    return a == b;  // integers, signed/unsigned compare by value
  }
  return a.type() == b.type() && a == b;
}

// First difference below `path`; sets va/vb to the differing values (nullptr where absent).
bool find_difference(const nlohmann::json& a, const nlohmann::json& b, const std::string& path, std::string& where,
                     const nlohmann::json*& va, const nlohmann::json*& vb) {
  if (a.is_object() && b.is_object()) {
    // nlohmann::json keeps object keys sorted: walk the union in order.
    auto ia = a.begin(), ib = b.begin();
    while (ia != a.end() || ib != b.end()) {
      if (ib == b.end() || (ia != a.end() && ia.key() < ib.key())) {
        where = join_key(path, ia.key()), va = &ia.value(), vb = nullptr;
        return true;
      }
      if (ia == a.end() || ib.key() < ia.key()) {
        where = join_key(path, ib.key()), va = nullptr, vb = &ib.value();
        return true;
      }
      if (find_difference(ia.value(), ib.value(), join_key(path, ia.key()), where, va, vb)) return true;
      ++ia, ++ib;
    }
    return false;
  }
  if (a.is_array() && b.is_array()) {
    const size_t n = std::min(a.size(), b.size());
    for (size_t i = 0; i < n; ++i) {
      if (find_difference(a[i], b[i], path + "[" + std::to_string(i) + "]", where, va, vb)) return true;
    }
    if (a.size() != b.size()) {
      where = path + "[" + std::to_string(n) + "]";
      va = a.size() > n ? &a[n] : nullptr;
      vb = b.size() > n ? &b[n] : nullptr;
      return true;
    }
    return false;
  }
  if (same_scalar(a, b)) return false;
  where = path.empty() ? "(top level)" : path, va = &a, vb = &b;
  return true;
}

std::string value_text(const nlohmann::json* v) {
  if (!v) return "absent";
  std::string s = v->dump();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

void erase_path(nlohmann::json& j, const std::string& dotted) {
  nlohmann::json* node = &j;
  size_t start = 0;
  while (true) {
    const size_t dot = dotted.find('.', start);
    const std::string key = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!node->is_object()) return;
    auto it = node->find(key);
    if (it == node->end()) return;
    if (dot == std::string::npos) {
      node->erase(it);
      return;
    }
    node = &it.value();
    start = dot + 1;
  }
}

// --- environment -----------------------------------------------------------------------------

struct EnvReader {
  std::function<const char*(const char*)> get;
  const char* raw(const char* name) const {
    const char* v = get(name);
    return (v && *v) ? v : nullptr;
  }
  bool has(const char* name) const { return raw(name) != nullptr; }
  int integer(const char* name, int fallback) const {
    const char* v = raw(name);
    if (!v) return fallback;
    const std::string s(v);
    int out = 0;
    const auto* end = s.data() + s.size();
    const auto r = std::from_chars(s.data(), end, out);
    if (r.ec != std::errc() || r.ptr != end) {
      throw ConfigError(std::string(name) + "=\"" + s + "\" is not an integer (launch environment)");
    }
    return out;
  }
  std::string str(const char* name) const {
    const char* v = raw(name);
    return v ? std::string(v) : std::string();
  }
};

}  // namespace

DistributedEnv read_distributed_env(const std::function<const char*(const char*)>& get) {
  EnvReader env{get ? get : std::function<const char*(const char*)>([](const char* n) { return ::getenv(n); })};
  DistributedEnv out;
  const char *rank_var = "RANK", *size_var = "WORLD_SIZE", *local_var = "LOCAL_RANK";
  std::string source;
  if (env.has("RANK") || env.has("WORLD_SIZE")) {
    source = "torchrun";
  } else if (env.has("SLURM_NTASKS")) {
    source = "slurm";
    rank_var = "SLURM_PROCID", size_var = "SLURM_NTASKS", local_var = "SLURM_LOCALID";
  }
  out.world_size = env.integer(size_var, 1);
  if (out.world_size < 1) {
    throw ConfigError(std::string(size_var) + "=" + std::to_string(out.world_size) +
                      " must be at least 1 (launch environment)");
  }
  if (out.world_size > 1 && !env.has(rank_var)) {
    throw ConfigError(std::string(rank_var) + " is not set but " + size_var + "=" + std::to_string(out.world_size) +
                      " (launch environment)");
  }
  out.rank = env.integer(rank_var, 0);
  if (out.rank < 0 || out.rank >= out.world_size) {
    throw ConfigError(std::string(rank_var) + "=" + std::to_string(out.rank) + " is outside [0, " + size_var + "=" +
                      std::to_string(out.world_size) + ") (launch environment)");
  }
  out.local_rank = env.integer(local_var, 0);
  if (out.local_rank < 0) {
    throw ConfigError(std::string(local_var) + "=" + std::to_string(out.local_rank) +
                      " must not be negative (launch environment)");
  }
  if (out.world_size == 1) return out;  // single process: MASTER_* not needed, source ""
  out.source = source;
  out.master_addr = env.str("MASTER_ADDR");
  if (out.master_addr.empty()) {
    throw ConfigError("MASTER_ADDR is not set but " + std::string(size_var) + "=" + std::to_string(out.world_size) +
                      " (the address of rank 0's host; launch environment)");
  }
  if (!env.has("MASTER_PORT")) {
    throw ConfigError("MASTER_PORT is not set but " + std::string(size_var) + "=" + std::to_string(out.world_size) +
                      " (a free TCP port on rank 0's host; launch environment)");
  }
  out.master_port = env.integer("MASTER_PORT", 0);
  if (out.master_port < 1 || out.master_port > 65535) {
    throw ConfigError("MASTER_PORT=" + std::to_string(out.master_port) + " is outside 1..65535 (launch environment)");
  }
  // torchrun's agent already hosts a TCPStore on MASTER_PORT and says so; rank 0 then joins it as
  // a client like the others. A restart (--max-restarts) gets keys of its own in that store.
  const std::string agent = env.str("TORCHELASTIC_USE_AGENT_STORE");
  out.agent_store = agent == "True" || agent == "true" || agent == "1";
  if (env.has("TORCHELASTIC_RESTART_COUNT")) out.restart = env.str("TORCHELASTIC_RESTART_COUNT");
  return out;
}

std::string first_difference(const nlohmann::json& a, const nlohmann::json& b) {
  std::string where;
  const nlohmann::json *va = nullptr, *vb = nullptr;
  return find_difference(a, b, "", where, va, vb) ? where : std::string();
}

// --- ProcessGroup ----------------------------------------------------------------------------

struct ProcessGroup::Impl {
  int rank = 0, size = 1, local_rank = 0;
  std::string backend;
  milliseconds timeout{0};
  std::string addr;
  int port = 0;
  c10d_compat::StorePtr store;       // TCPStore (or HashStore for a world of one)
  c10d_compat::StorePtr keys;        // store under "mae/" ("mae/restart<n>/" under torchrun)
  bool agent_store = false;          // torchrun's agent hosts the store: rank 0 is a client too
  c10d_compat::CollectivesPtr coll;  // null for a world of one and after report_failure
  bool failed = false;               // report_failure ran
  int config_round = 0;              // check_same_config calls so far (keys are per call)
  std::vector<bool> lost;            // ranks describe_failure found gone
  std::mutex works_mu;
  std::vector<c10::weak_intrusive_ptr<::c10d::Work>> in_flight;

  std::string prefix() const { return rank_prefix(rank); }
  milliseconds short_wait(milliseconds cap) const { return std::min(timeout, cap); }

  void set(const std::string& key, const std::string& value) { keys->set(key, bytes(value)); }
  std::string get(const std::string& key) { return text(keys->get(key)); }
  bool has(const std::string& key) { return keys->check({key}); }

  void check_usable(const char* what) const {
    if (failed) {
      throw DistributedError(prefix() + "cannot run " + what +
                             ": this rank's process group was shut down after a failure");
    }
    if (!coll) throw DistributedError(prefix() + "cannot run " + what + ": the process group is closed");
  }

  void track(const c10d_compat::WorkPtr& w) {
    std::lock_guard<std::mutex> lock(works_mu);
    in_flight.erase(std::remove_if(in_flight.begin(), in_flight.end(),
                                   [](const auto& weak) {
                                     auto strong = weak.lock();
                                     return !strong || c10d_compat::completed(strong);
                                   }),
                    in_flight.end());
    in_flight.emplace_back(w);
  }

  c10d_compat::WorkPtr allreduce(at::Tensor& contiguous, const char* what) {
    check_usable(what);
    std::vector<at::Tensor> v{contiguous};
    c10d_compat::WorkPtr w;
    try {
      w = coll->allreduce(v, ::c10d::AllreduceOptions());
    } catch (const std::exception& e) {
      throw DistributedError(prefix() + what + " failed: " + one_line(e));
    }
    track(w);
    return w;
  }

  void wait(const c10d_compat::WorkPtr& w, const char* what) {
    try {
      c10d_compat::wait(w);
    } catch (const std::exception& e) {
      throw DistributedError(prefix() + what + " failed: " + one_line(e));
    }
  }

  // Destroys the collectives (closing this rank's connections) unless one of this rank's operations
  // is still running after `grace`: destroying the group would then block on it, so it is left for
  // the process exit to close.
  void drop_collectives(milliseconds grace) {
    if (!coll) return;
    std::vector<c10d_compat::WorkPtr> running;
    {
      std::lock_guard<std::mutex> lock(works_mu);
      for (auto& weak : in_flight) {
        if (auto strong = weak.lock()) running.push_back(strong);
      }
      in_flight.clear();
    }
    const auto deadline = Clock::now() + grace;
    bool all_done = true;
    for (auto& w : running) {
      while (!c10d_compat::completed(w) && Clock::now() < deadline) std::this_thread::sleep_for(kPollInterval);
      all_done = all_done && c10d_compat::completed(w);
    }
    running.clear();
    if (all_done) {
      try {
        coll.reset();
      } catch (...) {
      }
    } else {
      (void)coll.release();  // deliberately leaked: its threads are blocked in a collective
    }
  }

  // Polls until, for every rank r != self not in `skip`, one of keys "<k>/<r>" exists, or the deadline.
  // Returns the ranks left unresolved. Throws what the store throws.
  std::vector<int> await_any(const std::vector<std::string>& kinds, Clock::time_point deadline,
                             const std::vector<bool>& skip) {
    std::vector<int> open;
    for (int r = 0; r < size; ++r) {
      if (r != rank && !(r < static_cast<int>(skip.size()) && skip[r])) open.push_back(r);
    }
    while (true) {
      open.erase(std::remove_if(open.begin(), open.end(),
                                [&](int r) {
                                  for (const auto& k : kinds) {
                                    if (has(k + "/" + std::to_string(r))) return true;
                                  }
                                  return false;
                                }),
                 open.end());
      if (open.empty() || Clock::now() >= deadline) return open;
      if (rendezvous_aborted()) throw RendezvousAborted();
      std::this_thread::sleep_for(kPollInterval);
    }
  }

  void connect_store(Clock::time_point t0);
  void join(Clock::time_point t0);
  void make_collectives();
};

void ProcessGroup::Impl::connect_store(Clock::time_point t0) {
  const std::string where = addr + ":" + std::to_string(port);
  try {
    if (rank == 0 && !agent_store) {
      store = c10d_compat::make_tcp_store(addr, static_cast<std::uint16_t>(port), true, timeout);
    } else {
      // A client waits until `timeout` after t0. LibTorch's own connect loop does not keep to its
      // timeout (1.13 gives up up to a second early and does not retry below ~1.5 s; 2.x's backoff
      // overruns by seconds), so first wait here for something to accept connections at the address,
      // then let TCPStore connect with the time left, retrying until the deadline.
      const auto deadline = t0 + timeout;
      const std::string reached = await_listener(addr, port, deadline);
      if (reached != "ok") {
        throw DistributedError(prefix() + "cannot reach the rendezvous store at " + where + " within " +
                               duration_text(timeout) + " (" + (reached.empty() ? "" : reached + "; ") +
                               "MASTER_ADDR/MASTER_PORT; is rank 0 running?)");
      }
      while (true) {
        const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now());
        try {
          store = c10d_compat::make_tcp_store(addr, static_cast<std::uint16_t>(port), false,
                                              std::max(left, milliseconds(1)));
          break;
        } catch (const std::exception&) {
          if (Clock::now() + milliseconds(100) >= deadline) throw;
          if (rendezvous_aborted()) throw RendezvousAborted();
          std::this_thread::sleep_for(milliseconds(100));
        }
      }
    }
  } catch (const RendezvousAborted& e) {
    throw DistributedError(prefix() + e.what());
  } catch (const std::exception& e) {
    const std::string cause = one_line(e);
    const std::string full = e.what();
    if (rank == 0 && !agent_store) {
      if (contains(full, "Address already in use") || contains(full, "errno: 98") || contains(full, "EADDRINUSE")) {
        throw DistributedError(prefix() + "MASTER_PORT " + std::to_string(port) +
                               " is in use (another process on this host listens on it; choose a free MASTER_PORT)");
      }
      throw DistributedError(prefix() + "cannot host the rendezvous store at " + where + ": " + cause +
                             " (MASTER_ADDR must be an address of this host)");
    }
    // Nobody accepting connections there until the timeout (1.13 gives up early and says "timed
    // out"; 2.x retries until the timeout): the common case, said plainly.
    std::string lower = full;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (contains(lower, "timed out") || contains(lower, "timeout") || contains(lower, "refused") ||
        Clock::now() - t0 + milliseconds(100) >= timeout) {
      throw DistributedError(prefix() + "cannot reach the rendezvous store at " + where + " within " +
                             duration_text(timeout) + " (MASTER_ADDR/MASTER_PORT; is rank 0 running?)");
    }
    throw DistributedError(prefix() + "cannot reach the rendezvous store at " + where + ": " + cause +
                           " (MASTER_ADDR/MASTER_PORT; is rank 0 running?)");
  }
}

void ProcessGroup::Impl::join(Clock::time_point t0) {
  const std::string me = std::to_string(rank);
  try {
    set("alive/" + me, std::to_string(size));
  } catch (const std::exception& e) {
    throw DistributedError(prefix() + "the rendezvous store at " + addr + ":" + std::to_string(port) +
                           " failed: " + one_line(e));
  }
  if (rank == 0) {
    std::string verdict;
    std::vector<int> missing;
    try {
      missing = await_any({"alive"}, t0 + timeout, {});
      if (!missing.empty()) {
        verdict = "only " + std::to_string(size - static_cast<int>(missing.size())) + " of " + std::to_string(size) +
                  " ranks joined within " + duration_text(timeout) + " (missing " + ranks_text(missing) +
                  "; every rank needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE)";
      } else {
        for (int r = 1; r < size && verdict.empty(); ++r) {
          const std::string their = get("alive/" + std::to_string(r));
          if (their != std::to_string(size)) {
            verdict = "rank " + std::to_string(r) + " was started with WORLD_SIZE=" + their + ", rank 0 with " +
                      std::to_string(size);
          }
        }
      }
      if (verdict.empty()) {
        set("rendezvous", "ok " + std::to_string(size));
        return;
      }
      set("rendezvous", verdict);
      // Let the ranks that did come read the verdict before this process (the store) goes.
      std::vector<bool> skip(size, false);
      for (int r : missing) skip[r] = true;
      await_any({"ack"}, Clock::now() + short_wait(milliseconds(2000)), skip);
    } catch (const RendezvousAborted& e) {
      throw DistributedError(prefix() + e.what());
    } catch (const std::exception& e) {
      if (verdict.empty()) verdict = "the rendezvous store failed: " + one_line(e);
    }
    throw DistributedError(prefix() + verdict);
  }
  // Rank 0 gives its verdict at the latest `timeout` after it started; allow for a late start.
  std::string verdict;
  try {
    const auto until = Clock::now() + timeout + short_wait(milliseconds(5000));
    while (!has("rendezvous")) {
      if (Clock::now() >= until) throw std::runtime_error("no verdict within " + duration_text(timeout));
      if (rendezvous_aborted()) throw RendezvousAborted();
      std::this_thread::sleep_for(kPollInterval);
    }
    verdict = get("rendezvous");
  } catch (const RendezvousAborted& e) {
    throw DistributedError(prefix() + e.what());
  } catch (const std::exception& e) {
    throw DistributedError(prefix() + "rank 0 (" + addr + ":" + std::to_string(port) +
                           ") did not complete the rendezvous: " + one_line(e));
  }
  if (verdict == "ok " + std::to_string(size)) return;
  try {
    set("ack/" + me, "1");
  } catch (...) {
  }
  if (verdict.rfind("ok ", 0) == 0) {
    throw DistributedError(prefix() + "WORLD_SIZE=" + std::to_string(size) + " here but " + verdict.substr(3) +
                           " on rank 0");
  }
  throw DistributedError(prefix() + verdict + " (reported by rank 0)");
}

void ProcessGroup::Impl::make_collectives() {
  auto coll_store = c10d_compat::prefixed(backend, store);
  try {
    if (backend == "nccl") {
#ifdef MAE_C10D_NCCL
      coll = c10d_compat::make_nccl(coll_store, rank, size, timeout, local_rank);
#endif
      return;
    }
    std::vector<c10d_compat::GlooDevice> devices;
    const char* ifname = ::getenv("GLOO_SOCKET_IFNAME");
    if (ifname && *ifname) {
      std::string list(ifname);
      size_t start = 0;
      while (start <= list.size()) {
        const size_t comma = list.find(',', start);
        const std::string name = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!name.empty()) devices.push_back(c10d_compat::gloo_device_for_interface(name));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
    if (devices.empty()) {
      devices.push_back(is_loopback(addr)
                            ? c10d_compat::gloo_device_for_hostname(addr == "localhost" ? "127.0.0.1" : addr)
                            : c10d_compat::gloo_default_device());
    }
    coll = c10d_compat::make_gloo(coll_store, rank, size, timeout, devices);
  } catch (const std::exception& e) {
    throw DistributedError(prefix() + "cannot connect the " + backend + " group: " + one_line(e));
  }
}

void set_rendezvous_abort(std::function<bool()> should_abort) {
  std::lock_guard<std::mutex> lock(g_abort_mu);
  g_abort = std::move(should_abort);
}

ProcessGroup::ProcessGroup(const DistributedEnv& env, const std::string& backend, milliseconds timeout)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.rank = env.rank, m.size = env.world_size, m.local_rank = env.local_rank, m.backend = backend, m.timeout = timeout;
  m.addr = env.master_addr, m.port = env.master_port;
  if (backend != "gloo" && backend != "nccl") {
    throw ConfigError("unknown distributed backend \"" + backend + "\" (gloo or nccl)");
  }
  if (backend == "nccl" && !c10d_compat::kHaveNccl) {
    throw ConfigError("this LibTorch was built without NCCL (backend \"nccl\"); use \"gloo\"");
  }
  if (backend == "nccl") {
    const int devices = static_cast<int>(torch::cuda::device_count());
    if (devices == 0) throw ConfigError("backend \"nccl\" needs a CUDA device, and none is visible; use \"gloo\"");
    if (env.local_rank >= devices) {
      throw ConfigError("LOCAL_RANK=" + std::to_string(env.local_rank) + " but this process sees only " +
                        std::to_string(devices) + " CUDA device(s) (backend \"nccl\" uses device LOCAL_RANK)");
    }
  }
  if (timeout.count() <= 0) throw ConfigError("the distributed timeout must be positive");
  if (m.size < 1 || m.rank < 0 || m.rank >= m.size) {
    throw ConfigError("rank " + std::to_string(m.rank) + " is outside [0, world size " + std::to_string(m.size) + ")");
  }
  m.lost.assign(m.size, false);
  if (m.size == 1) {
    m.store = c10d_compat::make_local_store();
    m.keys = c10d_compat::prefixed("mae", m.store);
    return;
  }
  if (m.addr.empty()) throw ConfigError("MASTER_ADDR is empty (needed for world size " + std::to_string(m.size) + ")");
  if (m.port < 1 || m.port > 65535) {
    throw ConfigError("MASTER_PORT=" + std::to_string(m.port) + " is outside 1..65535");
  }
  const auto t0 = Clock::now();
  if (env.agent_store && !c10d_compat::kJoinsAgentStore) {
    throw ConfigError(m.prefix() +
                      "TORCHELASTIC_USE_AGENT_STORE=True: torchrun hosts the rendezvous store, and this "
                      "mae-pretrain, built against LibTorch " TORCH_VERSION
                      ", cannot join it; build against "
                      "LibTorch 2.x, or launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend c10d, "
                      "scripts/launch_local.sh or srun");
  }
  m.agent_store = env.agent_store;
  m.connect_store(t0);
  m.keys = c10d_compat::prefixed(env.restart.empty() ? "mae" : "mae/restart" + env.restart, m.store);
  m.join(t0);
  m.make_collectives();
}

ProcessGroup::~ProcessGroup() {
  if (!impl_) return;
  auto& m = *impl_;
  if (m.size > 1 && m.keys) {
    try {
      if (m.rank != 0) {
        m.set("finished/" + std::to_string(m.rank), "1");
      } else if (!m.failed) {
        // Keep the store up until every rank still here is done with it.
        m.await_any({"finished", "failed"}, Clock::now() + m.short_wait(milliseconds(5000)), m.lost);
      }
    } catch (...) {
    }
  }
  m.drop_collectives(milliseconds(1000));
  try {
    m.keys.reset();
    m.store.reset();
  } catch (...) {
  }
}

int ProcessGroup::rank() const { return impl_->rank; }
int ProcessGroup::size() const { return impl_->size; }
const std::string& ProcessGroup::backend() const { return impl_->backend; }
milliseconds ProcessGroup::timeout() const { return impl_->timeout; }

void ProcessGroup::broadcast(std::vector<at::Tensor> tensors, int root) {
  auto& m = *impl_;
  if (root < 0 || root >= m.size) {
    throw ConfigError(m.prefix() + "broadcast root " + std::to_string(root) + " is outside [0, " +
                      std::to_string(m.size) + ")");
  }
  if (m.size == 1) return;
  m.check_usable("broadcast");
  at::NoGradGuard no_grad;
  // Group by dtype and device (in order of first appearance), then cut each group into buffers.
  std::vector<std::pair<std::pair<at::ScalarType, std::string>, std::vector<size_t>>> groups;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    if (!t.defined()) continue;
    const auto key = std::make_pair(t.scalar_type(), t.device().str());
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
    if (it == groups.end()) {
      groups.push_back({key, {}});
      it = std::prev(groups.end());
    }
    it->second.push_back(i);
  }
  for (const auto& group : groups) {
    size_t begin = 0;
    const auto& idx = group.second;
    while (begin < idx.size()) {
      size_t end = begin;
      int64_t bytes_in = 0;
      while (end < idx.size()) {
        const auto& t = tensors[idx[end]];
        const int64_t b = t.numel() * static_cast<int64_t>(t.element_size());
        if (end > begin && bytes_in + b > kBroadcastBufferBytes) break;
        bytes_in += b;
        ++end;
      }
      std::vector<at::Tensor> parts;
      for (size_t k = begin; k < end; ++k) parts.push_back(tensors[idx[k]].reshape({-1}));
      at::Tensor flat = at::cat(parts);
      std::vector<at::Tensor> v{flat};
      ::c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.rootTensor = 0;
      c10d_compat::WorkPtr w;
      try {
        w = m.coll->broadcast(v, opts);
      } catch (const std::exception& e) {
        throw DistributedError(m.prefix() + "broadcast failed: " + one_line(e));
      }
      m.track(w);
      m.wait(w, "broadcast");
      if (m.rank != root) {
        int64_t offset = 0;
        for (size_t k = begin; k < end; ++k) {
          auto& t = tensors[idx[k]];
          t.copy_(flat.narrow(0, offset, t.numel()).view(t.sizes()));
          offset += t.numel();
        }
      }
      begin = end;
    }
  }
}

struct ProcessGroup::Pending::State {
  ProcessGroup::Impl* group = nullptr;
  c10d_compat::WorkPtr work;  // null for a world of one
  at::Tensor target, buffer;  // buffer != target when target is not contiguous
  bool open = true;
};

ProcessGroup::Pending::Pending() = default;
ProcessGroup::Pending::Pending(Pending&&) noexcept = default;
ProcessGroup::Pending& ProcessGroup::Pending::operator=(Pending&&) noexcept = default;
ProcessGroup::Pending::~Pending() = default;

bool ProcessGroup::Pending::valid() const { return s_ && s_->open; }

void ProcessGroup::Pending::wait() {
  if (!s_ || !s_->open) return;
  s_->open = false;
  auto work = std::move(s_->work);
  if (work) s_->group->wait(work, "all-reduce");
  work.reset();
  if (s_->buffer.defined() && !s_->buffer.is_same(s_->target)) {
    at::NoGradGuard no_grad;
    s_->target.copy_(s_->buffer);
  }
  s_->buffer.reset();
  s_->target.reset();
}

ProcessGroup::Pending ProcessGroup::allreduce_sum_async(at::Tensor& t) {
  auto& m = *impl_;
  if (!t.defined()) throw DistributedError(m.prefix() + "all-reduce of an undefined tensor");
  Pending p;
  p.s_ = std::make_unique<Pending::State>();
  p.s_->group = &m;
  if (m.size == 1) return p;
  p.s_->target = t;
  if (m.backend == "nccl" && !t.is_cuda()) {
    // NCCL reduces CUDA tensors only: small CPU values (losses, flags, counts) go through this
    // rank's GPU and back.
    p.s_->buffer = t.to(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(m.local_rank)));
  } else {
    p.s_->buffer = t.is_contiguous() ? t : t.contiguous();
  }
  p.s_->work = m.allreduce(p.s_->buffer, "all-reduce");
  return p;
}

void ProcessGroup::allreduce_sum(at::Tensor& t) { allreduce_sum_async(t).wait(); }

void ProcessGroup::barrier() {
  if (impl_->size == 1) return;
  at::Tensor one = at::zeros({1}, at::kFloat);
  auto p = allreduce_sum_async(one);
  p.wait();
}

void ProcessGroup::check_same_config(const nlohmann::json& resolved, const std::vector<std::string>& ignore) {
  auto& m = *impl_;
  if (m.size == 1) return;
  nlohmann::json mine = resolved;
  for (const auto& path : ignore) erase_path(mine, path);
  const std::string round = "config/" + std::to_string(m.config_round++) + "/";
  auto fetch = [&](int r) {
    try {
      return nlohmann::json::parse(m.get(round + std::to_string(r)));
    } catch (const nlohmann::json::exception& e) {
      throw DistributedError(m.prefix() + "rank " + std::to_string(r) +
                             "'s config in the store is not JSON: " + e.what());
    } catch (const std::exception& e) {
      throw DistributedError(m.prefix() + "cannot read rank " + std::to_string(r) +
                             "'s config from the store: " + one_line(e));
    }
  };
  try {
    m.set(round + std::to_string(m.rank), mine.dump());
  } catch (const std::exception& e) {
    throw DistributedError(m.prefix() + "cannot publish the config in the store: " + one_line(e));
  }
  const auto compare = [&](int other) {
    const nlohmann::json theirs = fetch(other);
    std::string where;
    const nlohmann::json *va = nullptr, *vb = nullptr;
    if (!find_difference(mine, theirs, "", where, va, vb)) return;
    const std::string on = "rank " + std::to_string(other);
    throw ConfigError(m.prefix() + "the config differs from " + on + "'s at \"" + where + "\" (" + value_text(va) +
                      " here, " + value_text(vb) + " on " + on + "); every rank must run the same config");
  };
  if (m.rank != 0) {
    compare(0);
  } else {
    for (int r = 1; r < m.size; ++r) compare(r);
  }
}

void ProcessGroup::store_set(const std::string& key, const std::string& value) {
  auto& m = *impl_;
  try {
    m.set("user/" + key, value);
  } catch (const std::exception& e) {
    throw DistributedError(m.prefix() + "cannot set \"" + key + "\" in the rendezvous store: " + one_line(e));
  }
}

std::string ProcessGroup::store_get(const std::string& key) {
  auto& m = *impl_;
  try {
    return m.get("user/" + key);
  } catch (const std::exception& e) {
    throw DistributedError(m.prefix() + "cannot get \"" + key + "\" from the rendezvous store within " +
                           duration_text(m.timeout) + ": " + one_line(e));
  }
}

void ProcessGroup::report_failure(const std::string& message) {
  auto& m = *impl_;
  if (m.failed) return;
  m.failed = true;
  if (m.size == 1) return;
  try {
    m.set("failed/" + std::to_string(m.rank), message);
  } catch (...) {
  }
  m.drop_collectives(milliseconds(1000));
  if (m.rank != 0) return;
  try {
    m.await_any({"seen", "failed", "finished"}, Clock::now() + m.short_wait(milliseconds(5000)), m.lost);
  } catch (...) {
  }
}

std::string ProcessGroup::describe_failure(const std::string& what, const std::exception& e) {
  auto& m = *impl_;
  std::string cause = one_line(e);
  // A DistributedError of ours already starts with "rank N: <what> failed: "; keep only the cause.
  for (const std::string& lead : {m.prefix() + what + " failed: ", m.prefix()}) {
    if (cause.rfind(lead, 0) == 0) {
      cause = cause.substr(lead.size());
      break;
    }
  }
  if (m.size == 1) return m.prefix() + what + " failed: " + cause;
  std::map<int, std::string> reported;
  std::vector<int> finished;
  std::vector<int> open;
  bool store_lost = false;
  try {
    m.set("seen/" + std::to_string(m.rank), cause);
    const auto deadline = Clock::now() + m.short_wait(milliseconds(2000));
    for (int r = 0; r < m.size; ++r) {
      if (r != m.rank) open.push_back(r);
    }
    while (true) {
      open.erase(std::remove_if(open.begin(), open.end(),
                                [&](int r) {
                                  const std::string rs = std::to_string(r);
                                  if (m.has("failed/" + rs)) {
                                    reported[r] = m.get("failed/" + rs);
                                    return true;
                                  }
                                  if (m.has("seen/" + rs)) return true;
                                  if (m.has("finished/" + rs)) {
                                    finished.push_back(r);
                                    return true;
                                  }
                                  return false;
                                }),
                 open.end());
      if (open.empty() || Clock::now() >= deadline) break;
      std::this_thread::sleep_for(kPollInterval);
    }
  } catch (...) {
    store_lost = true;
  }
  std::vector<std::string> parts;
  for (const auto& [r, msg] : reported) parts.push_back("rank " + std::to_string(r) + " failed: " + msg);
  const std::string during = "during " + what + ": " + cause;
  if (store_lost && m.rank != 0) {
    if (!reported.count(0)) {
      m.lost[0] = true;
      parts.push_back("lost rank 0, which hosts the rendezvous store (it stopped answering " + during + ")");
    }
  } else if (!store_lost) {
    if (!open.empty()) {
      for (int r : open) m.lost[r] = true;
      parts.push_back("lost " + ranks_text(open) + (open.size() == 1 ? " (it" : " (they") + " stopped answering " +
                      during + ")");
    }
    if (!finished.empty()) {
      parts.push_back(ranks_text(finished) + (finished.size() == 1 ? " had" : " have") +
                      " already finished while this rank was in " + what +
                      " (did the ranks run different numbers of steps?)");
    }
  }
  if (parts.empty()) return m.prefix() + what + " failed: " + cause;
  std::string out = m.prefix();
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? "; " : "") + parts[i];
  return out;
}

// --- GradientSync ----------------------------------------------------------------------------

struct GradientSync::Impl {
  ProcessGroup::Impl* group = nullptr;
  bool overlap = false;
  std::vector<at::Tensor> params;
  struct Slot {
    size_t bucket = 0;
    int64_t offset = 0, numel = 0;
    bool filled = false;
  };
  struct Bucket {
    std::vector<size_t> members;  // parameter indices, in reverse parameter order
    int64_t numel = 0;
    at::ScalarType dtype = at::kFloat;
    at::Device device = at::kCPU;
    at::Tensor flat;
    int remaining = 0;  // members whose hook has not run this step
    c10d_compat::WorkPtr work;
    bool launched = false;
  };
  std::vector<Slot> slots;
  std::vector<Bucket> buckets;
  std::vector<unsigned> hooks;
  std::mutex mu;
  bool armed = false;
  bool dirty = false;  // something was filled or launched since the last reset
  size_t next_launch = 0;
  int64_t early = 0;            // buckets the hooks launched this step
  int64_t last_overlapped = 0;  // `early` of the last finished step
  std::exception_ptr launch_error;

  void reset_step() {
    for (auto& s : slots) s.filled = false;
    for (auto& b : buckets) {
      b.remaining = static_cast<int>(b.members.size());
      b.work.reset();
      b.launched = false;
    }
    next_launch = 0;
    early = 0;
    dirty = false;
    launch_error = nullptr;
  }

  at::Tensor view(size_t i) {
    const auto& s = slots[i];
    return buckets[s.bucket].flat.narrow(0, s.offset, s.numel);
  }

  // Copies what p.grad() holds (zeros where it has none) into parameter i's place in its bucket.
  void fill_from_grad(size_t i) {
    auto v = view(i);
    const auto& g = params[i].grad();
    if (g.defined()) {
      v.copy_(g.reshape({-1}));
    } else {
      v.zero_();
    }
    slots[i].filled = true;
  }

  void launch(Bucket& b) {
    b.work = group->allreduce(b.flat, "gradient all-reduce");
    b.launched = true;
  }

  // Launches complete buckets in index order (overlap path; errors kept for finish()).
  void launch_ready() {
    while (!launch_error && next_launch < buckets.size() && buckets[next_launch].remaining == 0) {
      try {
        launch(buckets[next_launch]);
      } catch (...) {
        launch_error = std::current_exception();
        return;
      }
      ++next_launch;
      ++early;
    }
  }

  void on_grad(size_t i, const at::Tensor& incoming) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed || slots[i].filled || !incoming.defined()) return;
    at::NoGradGuard no_grad;
    auto v = view(i);
    const auto& g = params[i].grad();
    // The hook sees the gradient before autograd accumulates it: write what .grad() will hold.
    if (g.defined()) {
      at::add_out(v, g.reshape({-1}), incoming.reshape({-1}));
    } else {
      v.copy_(incoming.reshape({-1}));
    }
    slots[i].filled = true;
    dirty = true;
    auto& b = buckets[slots[i].bucket];
    if (--b.remaining == 0) launch_ready();
  }

  // Waits for whatever a step left running (its results are not used).
  void drain() {
    for (auto& b : buckets) {
      if (b.work) {
        auto w = std::move(b.work);
        group->wait(w, "gradient all-reduce");
      }
    }
  }
};

GradientSync::GradientSync(ProcessGroup& group, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  if (bucket_bytes <= 0) throw ConfigError("the gradient bucket size must be positive");
  m.group = group.impl_.get();
  m.overlap = overlap;
  for (auto& p : params) {
    if (p.defined() && p.requires_grad()) m.params.push_back(p);
  }
  m.slots.resize(m.params.size());
  // Reverse parameter order: the order in which backward produces the gradients.
  for (size_t k = m.params.size(); k-- > 0;) {
    const auto& p = m.params[k];
    const int64_t nbytes = p.numel() * static_cast<int64_t>(p.element_size());
    bool fresh = m.buckets.empty();
    if (!fresh) {
      auto& b = m.buckets.back();
      fresh = b.dtype != p.scalar_type() || b.device != p.device() ||
              (b.numel * static_cast<int64_t>(p.element_size()) + nbytes > bucket_bytes);
    }
    if (fresh) {
      Impl::Bucket b;
      b.dtype = p.scalar_type();
      b.device = p.device();
      m.buckets.push_back(std::move(b));
    }
    auto& b = m.buckets.back();
    m.slots[k] = {m.buckets.size() - 1, b.numel, p.numel(), false};
    b.members.push_back(k);
    b.numel += p.numel();
  }
  if (m.group->size == 1) return;  // nothing to average
  for (auto& b : m.buckets) b.flat = at::zeros({b.numel}, at::TensorOptions().dtype(b.dtype).device(b.device));
  m.reset_step();
  if (overlap) {
    Impl* self = impl_.get();
    for (size_t i = 0; i < m.params.size(); ++i) {
      m.hooks.push_back(m.params[i].register_hook([self, i](const at::Tensor& grad) { self->on_grad(i, grad); }));
    }
  }
}

GradientSync::~GradientSync() {
  if (!impl_) return;
  for (size_t i = 0; i < impl_->hooks.size(); ++i) {
    try {
      impl_->params[i].remove_hook(impl_->hooks[i]);
    } catch (...) {
    }
  }
}

void GradientSync::arm(bool last_micro_batch) {
  auto& m = *impl_;
  if (m.group->size == 1) return;
  std::lock_guard<std::mutex> lock(m.mu);
  if (last_micro_batch && m.dirty) {
    // A step that never reached finish(): let its all-reduces end before the buffers are reused.
    struct Reset {
      Impl& m;
      ~Reset() { m.reset_step(); }
    } reset{m};
    m.drain();
  }
  m.armed = last_micro_batch && m.overlap;
}

double GradientSync::finish() {
  auto& m = *impl_;
  if (m.group->size == 1) return 0.0;
  std::lock_guard<std::mutex> lock(m.mu);
  struct Reset {
    Impl& m;
    ~Reset() {
      m.armed = false;
      m.reset_step();
    }
  } reset{m};
  at::NoGradGuard no_grad;
  if (m.launch_error) std::rethrow_exception(m.launch_error);
  m.group->check_usable("gradient all-reduce");
  m.last_overlapped = m.early;
  for (size_t k = m.next_launch; k < m.buckets.size(); ++k) {
    auto& b = m.buckets[k];
    for (size_t i : b.members) {
      if (!m.slots[i].filled) m.fill_from_grad(i);
    }
    m.launch(b);
  }
  m.next_launch = m.buckets.size();
  const auto t0 = Clock::now();
  for (auto& b : m.buckets) {
    auto w = std::move(b.work);
    m.group->wait(w, "gradient all-reduce");
  }
  const double waited = std::chrono::duration<double>(Clock::now() - t0).count();
  const double world = static_cast<double>(m.group->size);
  for (auto& b : m.buckets) b.flat.div_(world);
  for (size_t i = 0; i < m.params.size(); ++i) {
    auto& p = m.params[i];
    auto avg = m.view(i).view(p.sizes());
    if (p.grad().defined()) {
      p.mutable_grad().copy_(avg);
    } else {
      p.mutable_grad() = avg.clone();
    }
  }
  return waited;
}

int64_t GradientSync::bucket_count() const { return static_cast<int64_t>(impl_->buckets.size()); }
int64_t GradientSync::overlapped_buckets() const { return impl_->last_overlapped; }

}  // namespace mae
