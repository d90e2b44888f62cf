// The model's Linear layers (x W^T + b) with a choice of the library that runs their float32 CPU
// products. OpenBLAS runs whatever kernels its environment allows (on some machines an older
// generation's: OPENBLAS_CORETYPE); oneDNN (Debian's libdnnl, the library LibTorch already runs
// bfloat16 products on) picks its kernels from the processor itself. Everything that is not a
// float32 CPU product (CUDA, bfloat16, autocast) is torch::linear in either case.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace mae {

/// The library behind float32 CPU matrix products in linear().
enum class Fp32Matmul { blas, onednn };

/// True when this build links oneDNN (found at configure time: Debian's libdnnl-dev).
bool onednn_built();

/// "blas" or "onednn" for a config or command-line value: "auto" is onednn where built, else blas.
/// `key` names the setting in the error when "onednn" is asked of a build without it, or the value
/// is none of the three.
Fp32Matmul resolve_fp32_matmul(const std::string& choice, const std::string& key);

/// "blas" or "onednn".
const char* fp32_matmul_name(Fp32Matmul engine);

/// The engine linear() uses, process-wide; onednn where built, else blas, until set.
Fp32Matmul fp32_matmul();
void set_fp32_matmul(Fp32Matmul engine);

/// x W^T + b as torch::linear (bias may be undefined), differentiable in all three. On the CPU in
/// float32 outside autocast, with the engine onednn, the three products of the forward and backward
/// run on oneDNN.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

/// Products run on oneDNN so far in this process (all threads): tells tests which path ran.
int64_t onednn_products();

/// c = a b (+ bias per column) on oneDNN: 2-D float32 CPU tensors, a and b with any strides, c
/// with unit column stride. Throws when this build has no oneDNN.
void onednn_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor* bias = nullptr);

}  // namespace mae
