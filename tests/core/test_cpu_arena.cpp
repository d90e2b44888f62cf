// The best-fit arena behind LibTorch's large CPU tensors: placement, merging, limits, and that no
// two live blocks ever overlap under random and concurrent use.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "core/cpu_arena.h"

namespace {

constexpr size_t kMiB = 1024 * 1024;

TEST(CpuArena, PlacesABlockInTheSmallestFreeRangeThatFits) {
  mae::CpuArena arena(64 * kMiB);
  ASSERT_TRUE(arena.reserved());
  void* a = arena.allocate(1 * kMiB);
  void* big = arena.allocate(4 * kMiB);
  void* b = arena.allocate(1 * kMiB);
  void* small = arena.allocate(2 * kMiB);
  void* c = arena.allocate(1 * kMiB);
  ASSERT_TRUE(a && big && b && small && c);
  arena.release(big);
  arena.release(small);
  EXPECT_EQ(arena.allocate(2 * kMiB), small);  // the 2 MiB range, not the first (4 MiB) one
  EXPECT_EQ(arena.allocate(3 * kMiB), big);
  EXPECT_EQ(arena.stats().high_water, 9 * kMiB);  // nothing new was taken from the top
  EXPECT_EQ(arena.stats().free_ranges, 1u);       // the last MiB of the 4 MiB range
}

TEST(CpuArena, MergesFreedNeighboursOnBothSides) {
  mae::CpuArena arena(64 * kMiB);
  void* a = arena.allocate(1 * kMiB);
  void* b = arena.allocate(1 * kMiB);
  void* c = arena.allocate(1 * kMiB);
  void* guard = arena.allocate(1 * kMiB);
  ASSERT_TRUE(a && b && c && guard);
  arena.release(a);
  arena.release(c);
  EXPECT_EQ(arena.stats().free_ranges, 2u);
  arena.release(b);  // joins a (before) and c (after)
  EXPECT_EQ(arena.stats().free_ranges, 1u);
  EXPECT_EQ(arena.allocate(3 * kMiB), a);
  arena.release(guard);
  EXPECT_EQ(arena.stats().in_use, 3 * kMiB);
}

TEST(CpuArena, AFreedTopBlockIsReusedAndTheCountersFollow) {
  mae::CpuArena arena(64 * kMiB);
  void* a = arena.allocate(3 * kMiB + 1);  // rounded up to 64 bytes
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(arena.stats().in_use, 3 * kMiB + 64);
  arena.release(a);
  const auto s = arena.stats();
  EXPECT_EQ(s.in_use, 0u);
  EXPECT_EQ(s.peak_in_use, 3 * kMiB + 64);
  EXPECT_EQ(s.free_ranges, 0u);  // returned to the top, not kept as a fragment
  EXPECT_EQ(arena.allocate(2 * kMiB), a);
  EXPECT_EQ(arena.stats().high_water, 3 * kMiB + 64);
}

TEST(CpuArena, DeclinesSmallBlocksAndWhatDoesNotFit) {
  mae::CpuArena arena(8 * kMiB);
  EXPECT_EQ(arena.allocate(mae::CpuArena::kDefaultMinBlock - 1), nullptr);
  EXPECT_EQ(arena.allocate(0), nullptr);
  void* a = arena.allocate(6 * kMiB);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(arena.allocate(3 * kMiB), nullptr);
  EXPECT_EQ(arena.stats().fallbacks, 1u);
  EXPECT_FALSE(arena.owns(&arena));
  EXPECT_TRUE(arena.owns(a));
  arena.release(a);
  EXPECT_NE(arena.allocate(8 * kMiB), nullptr);
}

// Random sizes, random frees: blocks are 64-byte aligned, inside the range, never overlap, and
// keep what was written into them; freeing everything leaves one untouched range.
TEST(CpuArena, RandomUseNeverOverlapsLiveBlocks) {
  mae::CpuArena arena(256 * kMiB, /*min_block=*/1);
  std::mt19937 rng(7);
  std::map<uintptr_t, std::pair<size_t, unsigned char>> live;  // address -> (size, fill byte)
  auto overlaps = [&](uintptr_t p, size_t n) {
    auto next = live.lower_bound(p);
    if (next != live.end() && next->first < p + n) return true;
    if (next != live.begin() && std::prev(next)->first + std::prev(next)->second.first > p) return true;
    return false;
  };
  for (int i = 0; i < 4000; ++i) {
    if (!live.empty() && rng() % 2 == 0) {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      const auto* bytes = reinterpret_cast<const unsigned char*>(it->first);
      ASSERT_EQ(bytes[0], it->second.second);
      ASSERT_EQ(bytes[it->second.first - 1], it->second.second);
      arena.release(reinterpret_cast<void*>(it->first));
      live.erase(it);
    } else {
      const size_t n = 1 + rng() % (512 * 1024);
      void* p = arena.allocate(n);
      ASSERT_NE(p, nullptr);
      const auto addr = reinterpret_cast<uintptr_t>(p);
      ASSERT_EQ(addr % 64, 0u);
      ASSERT_FALSE(overlaps(addr, n)) << "block " << i;
      const auto fill = static_cast<unsigned char>(i);
      std::memset(p, fill, n);
      live[addr] = {n, fill};
    }
  }
  for (const auto& [addr, block] : live) arena.release(reinterpret_cast<void*>(addr));
  const auto s = arena.stats();
  EXPECT_EQ(s.in_use, 0u);
  EXPECT_EQ(s.free_ranges, 0u);
  EXPECT_GT(s.peak_in_use, 0u);
  EXPECT_LE(s.peak_in_use, s.high_water);
}

TEST(CpuArena, ThreadsAllocatingAndFreeingAtOnceKeepTheirBytes) {
  mae::CpuArena arena(512 * kMiB, /*min_block=*/1);
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<std::pair<unsigned char*, size_t>> mine;
      for (int i = 0; i < 3000; ++i) {
        if (!mine.empty() && rng() % 2 == 0) {
          const size_t k = rng() % mine.size();
          auto [p, n] = mine[k];
          if (std::count(p, p + n, static_cast<unsigned char>(t + 1)) != static_cast<std::ptrdiff_t>(n)) ++bad[t];
          arena.release(p);
          mine.erase(mine.begin() + static_cast<std::ptrdiff_t>(k));
        } else {
          const size_t n = 1 + rng() % (256 * 1024);
          auto* p = static_cast<unsigned char*>(arena.allocate(n));
          if (!p) {
            ++bad[t];
            continue;
          }
          std::memset(p, t + 1, n);
          mine.emplace_back(p, n);
        }
      }
      for (auto [p, n] : mine) arena.release(p);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
  EXPECT_EQ(arena.stats().in_use, 0u);
  EXPECT_EQ(arena.stats().free_ranges, 0u);
}

}  // namespace
