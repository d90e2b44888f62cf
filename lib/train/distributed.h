// Multi-process data-parallel training on top of c10d: the launch environment (torchrun, SLURM),
// a process group (TCPStore rendezvous + Gloo, or NCCL where LibTorch has it), DDP-style gradient
// averaging over flattened buckets, and failure handling that keeps every rank from hanging.
//
// This header includes no c10d header (those pull in the torch wheel's fmt, which clashes with
// Debian's spdlog); everything c10d lives in distributed.cpp and c10d_compat.h. The library reports
// errors only by exceptions and return values, never by logging.
//
// Store key protocol (all keys under "mae/" in the TCPStore that rank 0 hosts, or torchrun's agent
// hosts: then under "mae/restart<n>/"):
//   alive/<r>     = "<world_size>"   rank r connected (join). Rank 0 waits for all of them.
//   rendezvous    = "ok <N>" | message  rank 0's verdict on the join (N: its world size); the others wait for it.
//   ack/<r>                           rank r read a failed verdict (rank 0 waits briefly for it).
//   config/<n>/<r> = JSON text        check_same_config (n: how many calls came before).
//   failed/<r>    = message           report_failure: rank r is going down, and why.
//   seen/<r>                          describe_failure: rank r is alive and saw a collective fail
//                                     (also the acknowledgement rank 0's report_failure waits for).
//   finished/<r>                      rank r (> 0) is done with the store (its destructor ran);
//                                     rank 0's destructor waits for every rank it has not lost
//                                     (up to min(timeout, 5 s)) so nobody loses the store early.
//   user/<key>                        store_set / store_get.
// A rank that vanishes without writing failed/<r> (killed) is recognised in describe_failure by
// having neither failed/<r> nor seen/<r> after a short wait (min(timeout, 2 s)).
#pragma once

#include <ATen/Tensor.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace mae {

/// A collective or rendezvous failed (lost rank, unreachable store, port in use, timeout). Exit 1.
struct DistributedError : Error {
  using Error::Error;
};

/// The launch environment as torchrun / SLURM wrappers set it.
struct DistributedEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;  // MASTER_ADDR
  int master_port = 0;      // MASTER_PORT
  /// "torchrun" (RANK/WORLD_SIZE), "slurm" (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID when
  /// RANK/WORLD_SIZE are unset) or "" when single-process.
  std::string source;
  /// TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent hosts the TCPStore on MASTER_PORT, and
  /// every rank (rank 0 too) connects to it as a client.
  bool agent_store = false;
  /// TORCHELASTIC_RESTART_COUNT: the keys of a restarted attempt live apart from earlier ones.
  std::string restart;
  bool distributed() const { return world_size > 1; }
};

/// Reads the variables via `get` (defaults to ::getenv). WORLD_SIZE unset or 1 -> single process
/// (no MASTER_* needed). ConfigError naming the variable and its value for: non-integer, RANK
/// outside [0, WORLD_SIZE), LOCAL_RANK < 0, WORLD_SIZE < 1, RANK unset while WORLD_SIZE > 1,
/// missing MASTER_ADDR / MASTER_PORT when WORLD_SIZE > 1, port outside 1..65535.
DistributedEnv read_distributed_env(const std::function<const char*(const char*)>& get = {});

/// Hash-free comparison helper: first differing dotted key path between two JSON trees ("train.lr",
/// array elements as "data.files[2]", "(top level)" when the roots themselves differ), "" if equal.
/// Numbers compare by value (1 == 1.0), everything else by type and value.
std::string first_difference(const nlohmann::json& a, const nlohmann::json& b);

/// A check that the rendezvous waits of ProcessGroup's constructor poll (every 10-50 ms): when it
/// returns true (the trainer passes "a SIGINT or SIGTERM arrived"), the wait ends at once with
/// DistributedError "rank r: stopped by a signal during the rendezvous". {} = never.
void set_rendezvous_abort(std::function<bool()> should_abort);

class ProcessGroup {  // one per process; non-copyable
 public:
  /// Rendezvous through c10d::TCPStore at master_addr:master_port: rank 0 hosts it and waits up to
  /// `timeout` for all world_size ranks to join, the others connect (retrying up to `timeout`).
  /// backend "gloo" (CPU tensors) or "nccl" (CUDA; ConfigError "this LibTorch was built without
  /// NCCL" where USE_C10D_NCCL is undefined or NCCL's headers were not found). Gloo device: GLOO_SOCKET_IFNAME if set
  /// (createDeviceForInterface), else the loopback address when MASTER_ADDR is a loopback
  /// address (all ranks on this machine), else createDefaultDevice().
  /// A world of one needs no network: an in-process store, collectives are no-ops.
  /// Throws DistributedError with one line naming this rank and the cause:
  ///   "rank 1: cannot reach the rendezvous store at 127.0.0.1:29501 within 5 s (MASTER_ADDR/MASTER_PORT; is rank 0
  ///   running?)" "rank 0: MASTER_PORT 29501 is in use (...)" "rank 0: only 1 of 2 ranks joined within 5 s (...)" (rank
  ///   0; the joined ranks get it too)
  ProcessGroup(const DistributedEnv& env, const std::string& backend, std::chrono::milliseconds timeout);
  /// Rank 0 first waits (up to min(timeout, 5 s)) for the other ranks' finished/<r>, unless they
  /// are known to be lost or report_failure ran. Never throws.
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const;
  int size() const;
  const std::string& backend() const;
  std::chrono::milliseconds timeout() const;

  /// In-place broadcast from `root` of many tensors (flattened into buffers of up to 25 MiB per
  /// dtype and device, then copied back), e.g. parameters and buffers at start.
  void broadcast(std::vector<at::Tensor> tensors, int root = 0);
  /// In-place sum all-reduce, blocking.
  void allreduce_sum(at::Tensor& t);

  /// Handle of an async all-reduce. Must not outlive its ProcessGroup. Move-only.
  class Pending {
   public:
    Pending();
    Pending(Pending&&) noexcept;
    Pending& operator=(Pending&&) noexcept;
    ~Pending();  // does not wait
    /// Waits for the all-reduce (and copies the result into a non-contiguous target); throws
    /// DistributedError on failure or timeout. A second wait() is a no-op.
    void wait();
    /// True until wait() has returned or thrown; false for a default-constructed handle.
    bool valid() const;
    struct State;

   private:
    friend class ProcessGroup;
    std::unique_ptr<State> s_;
  };
  /// Async in-place sum all-reduce of one tensor; wait() on the handle.
  Pending allreduce_sum_async(at::Tensor& t);
  /// All ranks reach this point (a 1-element all-reduce; same in 1.13 and 2.x).
  void barrier();

  /// Every rank publishes its resolved config (JSON text) in the store; each rank compares its own
  /// with rank 0's and rank 0 compares every rank's with its own. On a difference: ConfigError on
  /// the ranks concerned naming the first differing key path and both values, e.g.
  /// `rank 1: the config differs from rank 0's at "train.lr" (0.001 here, 0.002 on rank 0); every
  /// rank must run the same config`; rank 0's message names the other rank (the first that
  /// differs). Keys whose values may legitimately differ per rank are passed in `ignore` (dotted
  /// paths like "threads", "train.device"; removed from both sides before comparing).
  void check_same_config(const nlohmann::json& resolved, const std::vector<std::string>& ignore = {});

  /// Store helpers (string values under "user/"), all with the group timeout; DistributedError on
  /// failure (store_get: the key did not appear within the timeout, or the store is gone).
  void store_set(const std::string& key, const std::string& value);
  std::string store_get(const std::string& key);

  /// Called by the trainer when this rank fails (any exception) or when a collective threw.
  /// Publishes failed/<rank> = message (best effort), then drops this rank's connections (destroys
  /// the Gloo group, so that peers' pending collectives fail now instead of at the timeout; if a
  /// collective of this rank is still running after a short wait the group is left for the process
  /// exit to close). On rank 0 (the store host) it then waits up to min(timeout, 5 s) for each
  /// other rank's seen/failed/finished key before returning, so they can read the message.
  /// Afterwards every collective throws DistributedError. Never throws.
  void report_failure(const std::string& message);
  /// For a rank whose collective threw (`what`: "all-reduce", "gradient all-reduce", ...): marks
  /// this rank seen, reads the other ranks' failure reports (waiting up to min(timeout, 2 s) for
  /// each to say failed or seen) and returns one line naming the rank(s) lost and the cause:
  ///   "rank 0: rank 1 failed: <its message>"              it reported
  ///   "rank 0: lost rank 1 (it stopped answering during <what>: <c10d/gloo message>)"   it did not
  ///   "rank 1: lost rank 0, which hosts the rendezvous store (it stopped answering during <what>: ...)"
  ///   "rank 0: <what> failed: <message>"                 every other rank is alive
  /// Never throws.
  std::string describe_failure(const std::string& what, const std::exception& e);

  struct Impl;

 private:
  friend class GradientSync;
  std::unique_ptr<Impl> impl_;
};

/// Data-parallel gradient averaging over flattened buckets, DDP-style, for the given parameters
/// (those with requires_grad, in the given order). Buckets: consecutive parameters in REVERSE order
/// (the order backward produces them), up to bucket_bytes each (a larger parameter gets a bucket of
/// its own), same dtype and device in one bucket. With overlap a hook on every parameter writes
/// (grad + incoming) into the bucket's flat buffer, and a complete bucket's async all-reduce starts
/// at once, strictly in bucket index order. Hooks act only when armed (arm(true) before the last
/// micro-batch's backward). finish() fills what the hooks did not (a parameter without gradient
/// counts as zeros), launches the remaining buckets in order, waits, divides by the world size and
/// writes the averages into each p.grad() (creating it if undefined). Results are bit-identical with
/// overlap on and off. In a world of one nothing is registered and finish() leaves the gradients.
/// Must not outlive the ProcessGroup or the parameters.
class GradientSync {
 public:
  GradientSync(ProcessGroup& group, std::vector<at::Tensor> params, int64_t bucket_bytes, bool overlap);
  ~GradientSync();  // removes hooks; does not wait for all-reduces in flight
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  /// Arms the hooks for the coming backward when `last_micro_batch` (overlap only), disarms them
  /// otherwise. Arming after a step whose finish() did not run first waits for its all-reduces.
  void arm(bool last_micro_batch);
  /// Returns seconds spent waiting in finish() for all-reduces (the part not hidden behind
  /// backward). Throws DistributedError when an all-reduce failed (then describe_failure).
  double finish();
  int64_t bucket_count() const;
  /// Buckets whose all-reduce the hooks started during the last finished step's backward (the rest
  /// started in finish()); 0 without overlap.
  int64_t overlapped_buckets() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace mae
