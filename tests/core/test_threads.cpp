// Background (loader) threads must run their tensor ops on one intra-op thread, whatever ATen's
// process-wide count is: a second OpenMP team per loader thread competed with training for the
// cores (preset A end to end with two loader threads: 1.07-1.16x the model-only step before the fix,
// 0.97-1.02x after).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/threads.h"

namespace {

// Largest number of threads an at::parallel_for over many small chunks ran on at once.
int threads_of_a_parallel_op() {
  std::atomic<int> inside{0}, most{0};
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    const int now = ++inside;
    for (int seen = most.load(); now > seen && !most.compare_exchange_weak(seen, now);) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    --inside;
  });
  return most.load();
}

TEST(BackgroundThread, RunsItsOpsOnOneIntraOpThreadAndLeavesTheCallerAlone) {
  at::set_num_threads(2);
  int before = -1, after_op = -1, team = -1;
  std::thread worker([&] {
    mae::setup_background_thread();
    before = at::get_num_threads();
    auto x = at::randn({1 << 20});
    (x * 2).sum().item<float>();  // ATen's first parallel op in this thread
    after_op = at::get_num_threads();
    team = threads_of_a_parallel_op();
  });
  worker.join();
  EXPECT_EQ(before, 1);
  EXPECT_EQ(after_op, 1);
  EXPECT_EQ(team, 1);
  EXPECT_EQ(at::get_num_threads(), 2) << "the calling thread keeps its own count";
}

}  // namespace
