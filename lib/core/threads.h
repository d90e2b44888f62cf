// Intra-op thread setup. Debian's LibTorch starts with one thread on some machines, so every
// program sets the count explicitly.
#pragma once

namespace mae {

/// Number of hardware threads (at least 1).
int hardware_threads();

/// Sets LibTorch's intra-op thread count; 0 means all hardware threads. Returns the count set.
/// Throws ConfigError for a negative count.
int set_threads(int threads);

}  // namespace mae
