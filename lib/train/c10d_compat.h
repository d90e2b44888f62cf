// The one place that knows how c10d differs between LibTorch 1.13 (Debian) and 2.x (PyPI wheel):
// every `#if` on the LibTorch version for the distributed code is here, and only distributed.cpp
// includes this header (c10d headers must stay out of headers that spdlog users include: the
// wheel's c10d pulls in its own fmt).
//
// Differences handled:
// - 1.13: ProcessGroupGloo/NCCL derive from c10d::ProcessGroup, which holds the collectives.
//   2.x: they derive from c10d::Backend (ProcessGroup became a dispatcher over backends); a
//   backend used on its own has the same collective calls, so we hold the backend directly.
// - 2.x TCPStoreOptions has `useLibUV` (default true) and `masterListenFd`; 1.13 has neither.
// - 2.x createDevice* take an extra `lazyInit` flag (default false, which is what we want).
// - Gloo and NCCL are enabled by macros: USE_C10D_GLOO (ProcessGroupGloo.hpp is empty without it;
//   both LibTorch builds put it on torch_cpu's interface, lib/train/CMakeLists.txt sets it too) and
//   USE_C10D_NCCL (the CUDA wheel only).
#pragma once

#include <torch/version.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifndef USE_C10D_GLOO
#error "c10d_compat.h needs USE_C10D_GLOO (lib/train/CMakeLists.txt defines it for mae_distributed)"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
// NCCL: where LibTorch has it (USE_C10D_NCCL, which the CUDA wheel's torch_cuda target defines for
// every consumer) and the build found its headers (else it defines MAE3D_NO_NCCL).
#if defined(USE_C10D_NCCL) && !defined(MAE3D_NO_NCCL)
#define MAE_C10D_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#if !defined(TORCH_VERSION_MAJOR)
#error "torch/version.h did not define TORCH_VERSION_MAJOR"
#endif

namespace mae::c10d_compat {

#if TORCH_VERSION_MAJOR >= 2
/// What runs the collectives: a c10d::Backend in 2.x.
using Collectives = ::c10d::Backend;
#else
/// What runs the collectives: a c10d::ProcessGroup in 1.13.
using Collectives = ::c10d::ProcessGroup;
#endif
using CollectivesPtr = c10::intrusive_ptr<Collectives>;
using WorkPtr = c10::intrusive_ptr<::c10d::Work>;
using StorePtr = c10::intrusive_ptr<::c10d::Store>;

/// Whether this LibTorch's TCPStore client speaks the protocol of the store torchrun's agent hosts
/// (torchrun of torch 2.x; 1.13's client hangs on it, and Debian's own 1.13 torchrun does not run
/// under Python 3.11).
constexpr bool kJoinsAgentStore = TORCH_VERSION_MAJOR >= 2;

/// True when this LibTorch's c10d was compiled with NCCL and this build enabled it.
constexpr bool kHaveNccl =
#ifdef MAE_C10D_NCCL
    true;
#else
    false;
#endif

/// A TCPStore at host:port. The server (rank 0) does not wait for workers here (the caller runs
/// its own join protocol, which can say how many ranks came); `timeout` is the connect timeout of
/// a client and the default timeout of get()/wait() for both.
inline c10::intrusive_ptr<::c10d::TCPStore> make_tcp_store(const std::string& host, std::uint16_t port, bool is_server,
                                                           std::chrono::milliseconds timeout) {
  ::c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = is_server;
  opts.waitWorkers = false;  // numWorkers stays unset: no built-in worker count
  opts.timeout = timeout;
  opts.multiTenant = false;
#if TORCH_VERSION_MAJOR >= 2
  // 2.x defaults to the libuv server backend; keep that default explicit (the wheel is built
  // with libuv; the classic backend is the fallback c10d chooses itself when it is not).
  opts.useLibUV = true;
#endif
  return c10::make_intrusive<::c10d::TCPStore>(host, opts);
}

/// An in-process store for a world of one (no network).
inline StorePtr make_local_store() { return c10::make_intrusive<::c10d::HashStore>(); }

/// `store` with every key prefixed by `prefix` + "/".
inline StorePtr prefixed(const std::string& prefix, const StorePtr& store) {
  return c10::make_intrusive<::c10d::PrefixStore>(prefix, store);
}

using GlooDevice = std::shared_ptr<::gloo::transport::Device>;

inline GlooDevice gloo_device_for_interface(const std::string& interface) {
  return ::c10d::ProcessGroupGloo::createDeviceForInterface(interface);
}
inline GlooDevice gloo_device_for_hostname(const std::string& hostname) {
  return ::c10d::ProcessGroupGloo::createDeviceForHostname(hostname);
}
inline GlooDevice gloo_default_device() { return ::c10d::ProcessGroupGloo::createDefaultDevice(); }

/// A Gloo group over `store` (connects the full mesh; throws when a peer does not come within
/// `timeout`). `timeout` is also the time every collective may wait for a peer.
inline CollectivesPtr make_gloo(const StorePtr& store, int rank, int size, std::chrono::milliseconds timeout,
                                const std::vector<GlooDevice>& devices) {
  auto opts = ::c10d::ProcessGroupGloo::Options::create(timeout);
  opts->devices = devices;
  opts->threads = 2;
  return c10::make_intrusive<::c10d::ProcessGroupGloo>(store, rank, size, opts);
}

#ifdef MAE_C10D_NCCL
/// An NCCL group over `store`, on CUDA device `device` (made current first, as NCCL expects).
inline CollectivesPtr make_nccl(const StorePtr& store, int rank, int size, std::chrono::milliseconds timeout,
                                int device) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  auto opts = ::c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = timeout;
  return c10::make_intrusive<::c10d::ProcessGroupNCCL>(store, rank, size, opts);
}
#endif

/// Blocks until `work` is done and rethrows its failure. No time limit of its own: Gloo fails an
/// operation whose peer is silent for the group timeout (Options::timeout), NCCL's watchdog does the
/// same. Both versions: Work::wait() returns true or throws; a false return is treated as a failure.
inline void wait(const WorkPtr& work) {
  if (!work->wait()) throw std::runtime_error("the operation did not complete");
}

/// Whether `work` has finished (successfully or not).
inline bool completed(const WorkPtr& work) { return work->isCompleted(); }

}  // namespace mae::c10d_compat
