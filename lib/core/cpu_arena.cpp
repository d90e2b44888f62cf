#include "core/cpu_arena.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "core/compat.h"
#include "core/error.h"

namespace mae {

namespace {

constexpr size_t kAlignment = 64;  // as c10's gAlignment: what vectorised kernels assume

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

CpuArena::CpuArena(size_t reserve_bytes, size_t min_block)
    : reserve_(round_up(reserve_bytes, kAlignment)), min_block_(std::max<size_t>(min_block, 1)) {
  void* p = mmap(nullptr, reserve_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    reserve_ = 0;
    return;
  }
  base_ = static_cast<char*>(p);
  stats_.reserved = reserve_;
}

CpuArena::~CpuArena() {
  if (base_) munmap(base_, reserve_);
}

void* CpuArena::allocate(size_t bytes) {
  if (!base_ || bytes < min_block_) return nullptr;
  const size_t size = round_up(bytes, kAlignment);
  std::lock_guard<std::mutex> lock(mutex_);
  size_t offset = 0;
  auto fit = by_size_.lower_bound({size, 0});
  if (fit != by_size_.end()) {
    const auto [range_size, range_offset] = *fit;
    by_size_.erase(fit);
    by_offset_.erase({range_offset, range_size});
    offset = range_offset;
    if (range_size > size) {
      by_size_.insert({range_size - size, range_offset + size});
      by_offset_.insert({range_offset + size, range_size - size});
    }
  } else {
    if (size > reserve_ - top_) {
      ++stats_.fallbacks;
      return nullptr;
    }
    offset = top_;
    top_ += size;
    stats_.high_water = std::max(stats_.high_water, top_);
  }
  used_.emplace(offset, size);
  stats_.in_use += size;
  stats_.peak_in_use = std::max(stats_.peak_in_use, stats_.in_use);
  return base_ + offset;
}

bool CpuArena::owns(const void* p) const {
  const char* c = static_cast<const char*>(p);
  return base_ && c >= base_ && c < base_ + reserve_;
}

void CpuArena::release(void* p) {
  size_t offset = static_cast<size_t>(static_cast<char*>(p) - base_);
  std::lock_guard<std::mutex> lock(mutex_);
  const auto block = used_.find(offset);
  if (block == used_.end()) return;  // not a live block: nothing to give back
  size_t size = block->second;
  used_.erase(block);
  stats_.in_use -= size;
  // Merge with the free range that follows and the one that precedes.
  auto next = by_offset_.lower_bound({offset, 0});
  if (next != by_offset_.end() && next->first == offset + size) {
    size += next->second;
    by_size_.erase({next->second, next->first});
    next = by_offset_.erase(next);
  }
  if (next != by_offset_.begin()) {
    const auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      offset = prev->first;
      size += prev->second;
      by_size_.erase({prev->second, prev->first});
      by_offset_.erase(prev);
    }
  }
  if (offset + size == top_) {
    top_ = offset;  // the range joins the untouched top
  } else {
    by_size_.insert({size, offset});
    by_offset_.insert({offset, size});
  }
}

CpuArenaStats CpuArena::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  CpuArenaStats s = stats_;
  s.free_ranges = by_offset_.size();
  return s;
}

namespace {

CpuArena* g_arena = nullptr;  // never destroyed: tensors may be freed during exit

void release_block(void* p) {
  if (!p) return;
  if (g_arena && g_arena->owns(p)) {
    g_arena->release(p);
  } else {
    c10::free_cpu(p);
  }
}

// LibTorch's CPU allocator interface over g_arena; what the arena declines (small blocks, a full
// reservation) goes to LibTorch's own allocation function, whose out-of-memory error names the size.
class ArenaAllocator final : public compat::CpuAllocatorBase {
 public:
  c10::DeleterFnPtr raw_deleter() const override { return &release_block; }

 protected:
  c10::DataPtr allocate_bytes(size_t n) const override {
    void* p = g_arena->allocate(n);
    if (!p) p = c10::alloc_cpu(n);
    return {p, p, &release_block, c10::Device(c10::DeviceType::CPU)};
  }
};

std::string install_once() {
  const char* env = std::getenv("MAE3D_CPU_ALLOCATOR");
  const std::string choice = env ? env : "";
  if (choice == "system") return "system";
  if (!choice.empty() && choice != "arena") {
    throw ConfigError("MAE3D_CPU_ALLOCATOR=" + choice + " is not an allocator; use arena (the default) or system");
  }
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return "system";
  auto* arena = new CpuArena(static_cast<size_t>(pages) * static_cast<size_t>(page));
  if (!arena->reserved()) {  // e.g. vm.overcommit_memory=2 refuses the reservation
    delete arena;
    return "system";
  }
  g_arena = arena;
  static ArenaAllocator allocator;
  c10::SetCPUAllocator(&allocator, /*priority=*/1);  // over LibTorch's default (priority 0)
  return "arena";
}

}  // namespace

std::string install_cpu_arena() {
  static const std::string installed = install_once();
  return installed;
}

CpuArenaStats cpu_arena_stats() { return g_arena ? g_arena->stats() : CpuArenaStats{}; }

}  // namespace mae
