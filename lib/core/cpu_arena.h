// A best-fit arena for LibTorch's large CPU tensors. glibc serves big blocks from the top of its
// heap and leaves the holes that the forward's activations leave behind in the backward too small
// for the gradients allocated meanwhile, so a training step's heap ends up ~170 MB above what its
// tensors ever hold at once (preset A). The arena places each block in the smallest free range that
// fits (lowest address first) and merges neighbours on free, which keeps the resident memory within
// a few tens of MB of the tensors' own peak.
#pragma once

#include <cstddef>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>

namespace mae {

/// What the arena holds, in bytes.
struct CpuArenaStats {
  size_t reserved = 0;     ///< address space reserved (not memory: pages count once written)
  size_t in_use = 0;       ///< held by live blocks now
  size_t peak_in_use = 0;  ///< most ever held by live blocks at once
  size_t high_water = 0;   ///< highest offset ever handed out: the most the arena can have resident
  size_t free_ranges = 0;  ///< free ranges below the top (fragments)
  size_t fallbacks = 0;    ///< requests that did not fit in the reservation (served by LibTorch's allocator)
};

/// Best-fit allocator over one reserved range of address space. Thread-safe. Blocks are 64-byte
/// aligned (as LibTorch's CPU allocator). Memory it touched stays resident for reuse (as CUDA's
/// caching allocator does); the range is unmapped when the arena is destroyed.
class CpuArena {
 public:
  /// Reserves `reserve_bytes` of address space (MAP_NORESERVE); blocks under `min_block` bytes
  /// are left to the caller's fallback. reserved() is false when the reservation failed.
  explicit CpuArena(size_t reserve_bytes, size_t min_block = kDefaultMinBlock);
  ~CpuArena();
  CpuArena(const CpuArena&) = delete;
  CpuArena& operator=(const CpuArena&) = delete;

  /// Blocks below this size go to glibc, whose bins suit small blocks.
  static constexpr size_t kDefaultMinBlock = 64 * 1024;

  /// True when the address range was reserved.
  bool reserved() const { return base_ != nullptr; }
  /// A block of at least `bytes`, or nullptr when it is below min_block or does not fit.
  void* allocate(size_t bytes);
  /// True when `p` lies in the arena's range (a block it handed out).
  bool owns(const void* p) const;
  /// Returns a block from allocate() to the arena.
  void release(void* p);
  /// A consistent snapshot of the counters.
  CpuArenaStats stats() const;

 private:
  char* base_ = nullptr;
  size_t reserve_ = 0;
  size_t min_block_ = 0;
  mutable std::mutex mutex_;
  size_t top_ = 0;                                 // everything from here to reserve_ is free
  std::set<std::pair<size_t, size_t>> by_size_;    // free ranges below top_: (size, offset)
  std::set<std::pair<size_t, size_t>> by_offset_;  // the same ranges: (offset, size)
  std::unordered_map<size_t, size_t> used_;        // live blocks: offset -> size
  CpuArenaStats stats_;
};

/// Makes a process-wide CpuArena LibTorch's CPU allocator, reserving the machine's physical memory
/// in address space. MAE3D_CPU_ALLOCATOR=system keeps LibTorch's own allocator (glibc), e.g. to run
/// under a memory checker; "arena" or unset installs the arena. Returns the allocator in use,
/// "arena" or "system" ("system" also when the reservation failed). Throws ConfigError on another
/// value of MAE3D_CPU_ALLOCATOR. Calling it again returns the first answer.
std::string install_cpu_arena();

/// The installed arena's counters; all zero when install_cpu_arena() did not install one.
CpuArenaStats cpu_arena_stats();

}  // namespace mae
