#include "core/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "core/error.h"

namespace mae {

bool is_device_name(const std::string& device, bool allow_auto) {
  if (device == "cpu" || device == "cuda" || (allow_auto && device == "auto")) return true;
  return device.rfind("cuda:", 0) == 0 && device.size() > 5 && device.size() <= 8 &&
         device.find_first_not_of("0123456789", 5) == std::string::npos;
}

int hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

int set_threads(int threads) {
  if (threads < 0) {
    throw ConfigError("threads: " + std::to_string(threads) + " is negative; use 0 for all cores or a count >= 1");
  }
  const int n = threads == 0 ? hardware_threads() : threads;
  at::set_num_threads(n);
  return n;
}

void setup_background_thread() {
  // ATen sets a thread's OpenMP team size to the process-wide count on the thread's first parallel
  // op or get_num_threads() call; calling it now (inside LibTorch, so that its own once-per-thread
  // flag is the one set) lets the setting below stick. Without it every loader thread ran its crops
  // on a team of all cores, beside the training threads.
  (void)at::get_num_threads();
#if defined(_OPENMP)
  omp_set_num_threads(1);  // this thread's own OpenMP setting; the training thread keeps its own
#endif
#if defined(__linux__) && defined(SCHED_IDLE)
  sched_param param{};
  param.sched_priority = 0;
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &param);
#endif
}

std::string blas_core_name() {
  using Corename = char* (*)();
  auto* corename = reinterpret_cast<Corename>(::dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  const char* name = corename ? corename() : nullptr;
  return name ? std::string(name) : std::string();
}

void tune_allocator() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024);
  mallopt(M_TOP_PAD, 256 * 1024 * 1024);
#endif
}

std::optional<bool> native_bf16_in_cpuinfo(const std::string& cpuinfo) {
  std::istringstream lines(cpuinfo);
  bool listed = false;
  for (std::string line; std::getline(lines, line);) {
    // x86: "flags\t\t: fpu vme ...", Arm: "Features\t: fp asimd ...".
    if (line.rfind("flags", 0) != 0 && line.rfind("Features", 0) != 0) continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    listed = true;
    std::istringstream words(line.substr(colon + 1));
    for (std::string w; words >> w;) {
      if (w == "avx512_bf16" || w == "amx_bf16" || w == "bf16") return true;
    }
  }
  if (!listed) return std::nullopt;
  return false;
}

std::optional<bool> cpu_native_bf16() {
  static const std::optional<bool> native = [] {
    std::ifstream in("/proc/cpuinfo");
    if (!in) return std::optional<bool>();
    std::ostringstream text;
    text << in.rdbuf();
    return native_bf16_in_cpuinfo(text.str());
  }();
  return native;
}

std::string cpu_bf16_warning(const std::string& setting) {
  const auto native = cpu_native_bf16();
  if (!native || *native) return "";
  return setting +
         " on a CPU without native bf16 products (no avx512_bf16, amx_bf16 or Arm bf16 flag in /proc/cpuinfo): "
         "LibTorch "
         "emulates them, so a bf16 step takes longer than an fp32 one (1.6x to 30x on the machines in the README); "
         "fp32 is the faster choice here";
}

}  // namespace mae
