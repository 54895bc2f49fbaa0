// The per-device kernel table: the DeLoRA-specific passes, one implementation per device.
//
// delora_cpu.cpp fills cpu_kernels() and delora_cuda.cu cuda_kernels(); registration.cpp registers a device's
// table together with the op entry points at that device's dispatch key, so an entry point always finds the table
// of the device it was dispatched for. The kernels run on the current device and stream: each entry point sets the
// device once (one guard per op call, delora_ops.cpp), and no kernel sets it again.
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "delora.h"

namespace delora_ext {

// All adapter-sized tensors are contiguous and in the opmath dtype (float or double), except Ad and Bd below,
// which are in the GEMM dtype (x's dtype).
//   A (r×in), B (out×r), lam (1), w (in)  ->  one launch writing
struct PrepOutputs {
  Tensor s, a, b;  // (r): s_k = λ/(r·â_k·b̂_k) and the raw norms a_k = ‖A[k,:]‖, b_k = ‖B[:,k]‖   (required)
  Tensor Af;       // (r×in) A⊙w in opmath                                                  (optional)
  Tensor sa;       // (r)    the A-side factor of the split scale: 1/â_k, or λ/(r·â_k) when a_times_sa (optional)
  Tensor Ad;       // (r×in) A⊙w in the GEMM dtype, times λ/(r·â_k) when a_times_sa          (optional)
  Tensor Bd;       // (out×r) bd_alpha·B⊙s in the GEMM dtype, or B⊙λ/(r·b̂_k) when b_over_bhat, or B when b_plain
  bool a_times_sa = false, b_over_bhat = false, b_plain = false;
  double bd_alpha = 1.0;  // host scalar (merge's ±1 or a merge weight), not λ
};

// Where the small-N CUDA forward can run (Tuning::small_n aside): fp32 adapters (16 fp64 accumulators do not fit
// a 1024-thread block's 64 registers a thread), x not fp64 (fp32 accumulation would round its output),
// 1..kSmallN rows, no empty size, and v (N×r fp32) within the update kernel's 48 KiB of shared memory.
inline bool small_n_fits(int64_t N, int64_t r, int64_t in, int64_t out, at::ScalarType adapter_dtype,
                         at::ScalarType x_dtype) {
  return adapter_dtype == at::kFloat && x_dtype != at::kDouble && N >= 1 && N <= kSmallN && r >= 1 && in >= 1 &&
         out >= 1 && N * r * 4 <= 48 * 1024;
}

struct DeviceKernels {
  // A⊙w, s, the raw norms and the GEMM operands into `o`, in one pass over A and B.
  void (*prep)(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, PrepOutputs& o) = nullptr;

  // M = gᵀu (out×r) and Q (r×in, undefined when dA is not wanted), both in the input dtype. Q is s-scaled:
  // Q = (g·(B⊙s))ᵀ x_d, with qscale undefined (= 1); with the split scale (fp16) the caller has the unscaled
  // Q = (g·B)ᵀ x_d instead and passes qscale = s (r, opmath).
  //   gs_k = Σ_o M[o,k] B[o,k]
  //   dA   = qscale_k Q[k,j] w_j − (gs_k s_k / a_k²) A[k,j]   (norm term where a_raw ≥ eps)
  //   dB   = M[o,k] s_k − (gs_k s_k / b_k²) B[o,k]            (norm term where b_raw ≥ eps)
  //   dλ   = Σ_k gs_k / (r a_k b_k)
  // dA, dB, dlam are written when defined (opmath dtype).
  void (*finalize)(const Tensor& M, const Tensor& Q, const Tensor& qscale, const Tensor& A, const Tensor& B,
                   const Tensor& w, const Tensor& s, const Tensor& a_raw, const Tensor& b_raw, Tensor& dA, Tensor& dB,
                   Tensor& dlam) = nullptr;

  // dst = src ⊙ keep(seed, i) / (1 − p) over the flattened index i of a contiguous src (dst may alias src).
  void (*dropout)(const Tensor& src, Tensor& dst, const Tensor& seed, double p) = nullptr;

  // Optional: nullptr where the device has none.
  // weight += Bs·Af in one pass (fp32/fp64 accumulation, one rounding); false (nothing launched) when this weight
  // is not for the kernel (no unit stride, grid limits): the caller then merges through ATen.
  bool (*merge)(Tensor& weight, const Tensor& Bs, const Tensor& Af) = nullptr;
  // Small-N forward (Tuning::small_n) in two launches: u = x_d (A⊙w)ᵀ (x's dtype), s, a_raw, b_raw as prep writes
  // them, and y (N×out, contiguous, x's dtype) = [y +] (u⊙s) Bᵀ with u⊙s and B in opmath, one rounding. x_d (N×in)
  // contiguous in x's dtype; A, B, lam, w contiguous fp32. False (nothing launched) outside small_n_fits. y comes
  // from base() (on the current stream; x Wᵀ + bias, or an empty tensor when accumulate is false), issued before the
  // u launch, or concurrently with it on a side stream when overlap is true.
  bool (*small_n_forward)(const Tensor& x_d, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
                          const std::function<Tensor()>& base, bool overlap, Tensor& y, bool accumulate, Tensor& u,
                          Tensor& s, Tensor& a_raw, Tensor& b_raw) = nullptr;
};

DeviceKernels cpu_kernels();   // delora_cpu.cpp
DeviceKernels cuda_kernels();  // delora_cuda.cu, in builds with the CUDA kernels

// The table registry (delora_ops.cpp): filled at load time by registration.cpp, read by the entry points.
void set_device_kernels(c10::DeviceType device, const DeviceKernels& kernels);
bool has_device_kernels(c10::DeviceType device);
const DeviceKernels& device_kernels(c10::Device device);

}  // namespace delora_ext
