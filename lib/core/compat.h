// The few places where LibTorch 1.13 (Debian 12) and LibTorch 2.x (PyPI's torch wheel, the official
// archives) differ in API, each written once. Everything else in mae3d is the same code on both.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Allocator.h>
#include <torch/version.h>

#include <optional>

namespace mae::compat {

/// True when this LibTorch has at::scaled_dot_product_attention (2.0 and later).
#if TORCH_VERSION_MAJOR >= 2
inline constexpr bool kHasFusedAttention = true;
#else
inline constexpr bool kHasFusedAttention = false;
#endif

/// Softmax attention softmax(q k^T / sqrt(d)) v through LibTorch's fused kernel. q, k, v:
/// (B, heads, T, d). dropout_p is applied to the attention weights (pass 0 in evaluation).
/// Only called when kHasFusedAttention; on 1.13 it throws.
inline at::Tensor fused_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p) {
#if TORCH_VERSION_MAJOR >= 2
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, dropout_p, /*is_causal=*/false);
#else
  (void)q, (void)k, (void)v, (void)dropout_p;
  TORCH_CHECK(false, "fused attention needs LibTorch 2.x");
#endif
}

/// Turns bfloat16/float16 autocast on or off for one device type (kCPU or kCUDA).
inline void set_autocast(at::DeviceType device, bool enabled, at::ScalarType dtype) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  at::autocast::set_autocast_enabled(device, enabled);
  if (enabled) at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == at::kCUDA) {
    at::autocast::set_enabled(enabled);
    if (enabled) at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_cpu_enabled(enabled);
    if (enabled) at::autocast::set_autocast_cpu_dtype(dtype);
  }
#endif
}

/// True while autocast is on for the CPU (in this thread).
inline bool cpu_autocast_enabled() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  return at::autocast::is_autocast_enabled(at::kCPU);
#else
  return at::autocast::is_cpu_enabled();
#endif
}

/// bfloat16 autocast for the lifetime of the object, on the device's autocast path (CPU or CUDA).
class AutocastScope {
 public:
  AutocastScope(bool enabled, at::DeviceType device) : enabled_(enabled), device_(device) {
    if (!enabled_) return;
    set_autocast(device_, true, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~AutocastScope() {
    if (!enabled_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    set_autocast(device_, false, at::kBFloat16);
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  bool enabled_;
  at::DeviceType device_;
};

/// Base of a CPU allocator for c10::SetCPUAllocator. LibTorch 2.3 made Allocator::allocate
/// non-const and added the pure virtual copy_data; a subclass implements allocate_bytes only.
/// (Built and tested on 1.13 and 2.15; the 2.3 boundary is where the interface changed.)
class CpuAllocatorBase : public c10::Allocator {
 public:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  c10::DataPtr allocate(size_t n) override { return allocate_bytes(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
#else
  c10::DataPtr allocate(size_t n) const override { return allocate_bytes(n); }
#endif

 protected:
  /// The block for a tensor of `n` bytes, with this allocator's deleter.
  virtual c10::DataPtr allocate_bytes(size_t n) const = 0;
};

}  // namespace mae::compat
