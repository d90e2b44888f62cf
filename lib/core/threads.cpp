#include "core/threads.h"

#include <ATen/Parallel.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <string>
#include <thread>

#include "core/error.h"

namespace mae {

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

void tune_allocator() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024);
  mallopt(M_TOP_PAD, 256 * 1024 * 1024);
#endif
}

}  // namespace mae
