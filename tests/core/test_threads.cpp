// Background (loader) threads must run their tensor ops on one intra-op thread, whatever ATen's
// process-wide count is: a second OpenMP team per loader thread competed with training for the
// cores (preset A end to end with two loader threads: 1.07-1.16x the model-only step before the fix,
// 0.97-1.02x after).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <optional>
#include <string>
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

namespace {

// The flags a bf16 warning rests on: whole words of x86's flags line or Arm's Features line.
TEST(CpuBf16, ReadsNativeBf16FromTheFlagsOrFeaturesLine) {
  const std::string x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx avx2 fma avx512bw\n";
  EXPECT_EQ(mae::native_bf16_in_cpuinfo(x86), false);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo(x86 + "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16 avx512bw\n"), true);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo("flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"), true);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo("Features\t: fp asimd sve i8mm bf16\n"), true);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo("Features\t: fp asimd evtstrm crc32\n"), false);
  // A flag that only contains the name is not the flag.
  EXPECT_EQ(mae::native_bf16_in_cpuinfo("flags\t\t: avx512_bf16x xamx_bf16\n"), false);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo("processor\t: 0\nmodel name\t: something\n"), std::nullopt);
  EXPECT_EQ(mae::native_bf16_in_cpuinfo(""), std::nullopt);
}

// This machine's answer is its /proc/cpuinfo's, and the warning comes exactly when bf16 is emulated.
TEST(CpuBf16, ThisMachineAgreesWithProcCpuinfoAndWarnsOnlyWhenEmulated) {
  std::ifstream in("/proc/cpuinfo");
  if (!in) GTEST_SKIP() << "no /proc/cpuinfo";
  std::string line;
  bool any = false, native = false;
  while (std::getline(in, line)) {
    if (line.rfind("flags", 0) != 0 && line.rfind("Features", 0) != 0) continue;
    any = true;
    const std::string words = " " + line.substr(line.find(':') + 1) + " ";
    for (const char* f : {" avx512_bf16 ", " amx_bf16 ", " bf16 "})
      native = native || words.find(f) != std::string::npos;
  }
  const auto got = mae::cpu_native_bf16();
  ASSERT_EQ(got.has_value(), any);
  if (!any) return;
  EXPECT_EQ(*got, native);
  const auto warning = mae::cpu_bf16_warning("train.precision = \"bf16\"");
  EXPECT_EQ(warning.empty(), native) << warning;
  if (!native) {
    EXPECT_EQ(warning.rfind("train.precision = \"bf16\" on a CPU without native bf16 products", 0), 0u) << warning;
    EXPECT_EQ(warning.find('\n'), std::string::npos);
  }
}

}  // namespace
