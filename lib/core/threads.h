// Process set-up for compute: intra-op threads and the allocator. Debian's LibTorch starts with one thread on some
// machines, so every program sets the count explicitly.
#pragma once

#include <optional>
#include <string>

namespace mae {

/// True for a device name the programs accept: "cpu", "cuda", "cuda:N" (N of at most 3 digits)
/// and, when `allow_auto`, "auto" (CUDA when available).
bool is_device_name(const std::string& device, bool allow_auto = true);

/// Number of hardware threads (at least 1).
int hardware_threads();

/// Sets LibTorch's intra-op thread count; 0 means all hardware threads. Returns the count set.
/// Throws ConfigError for a negative count.
int set_threads(int threads);

/// Prepares a background thread (the data loader's workers) to stay out of the compute threads'
/// way: the ops it runs use one intra-op thread (not a second OpenMP team per worker), and on Linux
/// it runs under SCHED_IDLE, so it takes a core only when training leaves one idle instead of
/// preempting an OpenMP thread that its partner then spins waiting for.
void setup_background_thread();

/// The kernels the BLAS that LibTorch calls runs on, as OpenBLAS names them (openblas_get_corename:
/// "Haswell", "SkylakeX", "Cooperlake", ...), or "" where that BLAS is not OpenBLAS (PyPI's wheels use
/// MKL). OpenBLAS chooses once as it loads, from the CPU or, where it is set, from OPENBLAS_CORETYPE;
/// fp32 products ran 2x apart between its AVX2 and AVX-512 kernels on a Zen 5 EPYC.
std::string blas_core_name();

/// Tunes glibc's allocator for training: freed blocks up to 32 MiB stay in the heap and the heap
/// is not trimmed, so the gradient and activation buffers of each step reuse memory instead of
/// being mapped and zero-filled by the kernel again (measured: training step 1.01 s -> 0.76 s on
/// preset A). Call once at program start; does nothing where glibc is absent.
void tune_allocator();

/// Whether the text of a /proc/cpuinfo shows native bfloat16 matrix instructions: x86's avx512_bf16
/// or amx_bf16 flag, Arm's bf16 feature. nullopt when the text has no flags or features line.
std::optional<bool> native_bf16_in_cpuinfo(const std::string& cpuinfo);

/// native_bf16_in_cpuinfo of this machine's /proc/cpuinfo (read once); nullopt where it cannot be
/// read (not Linux).
std::optional<bool> cpu_native_bf16();

/// For a bf16 run on the CPU: a one-line warning, starting with `setting` (e.g. `train.precision =
/// "bf16"`), when this CPU has no native bf16 products, where LibTorch emulates them and a bf16 step
/// is slower than an fp32 one (1.6x to 30x on the machines in the README). Empty otherwise.
std::string cpu_bf16_warning(const std::string& setting);

}  // namespace mae
