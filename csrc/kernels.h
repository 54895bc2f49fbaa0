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
#include "delora_math.h"

namespace delora_ext {

// The launchers' arguments, one struct per pass (as FlashAttention's Flash_fwd_params): tensors the entry point
// allocated, each launcher reading and writing through them. Adapter-sized tensors are contiguous and in the opmath
// dtype (float or double) unless said otherwise.

// prep: one launch over A and B writing s, the norms, and whichever of Af, Ad, Bd, sa are defined.
struct PrepParams {
  Tensor A, B, lam, w;     // A (r×in), B (out×r), lam (1), w (in)
  Tensor s, a_raw, b_raw;  // (r) s_k = λ/(r·â_k·b̂_k) and the raw norms a_k = ‖A[k,:]‖, b_k = ‖B[:,k]‖ (required)
  Tensor Af;               // (r×in) A⊙w in opmath                                             (optional)
  Tensor sa;               // (r) the A-side factor of the split scale (ScaleMode)             (optional)
  Tensor Ad;               // (r×in) in the GEMM dtype (x's dtype), as ScaleMode says          (optional)
  Tensor Bd;               // (out×r) in the GEMM dtype, as ScaleMode says                     (optional)
  ScaleMode mode = ScaleMode::kFull;
  double bd_alpha = 1.0;  // host scalar (merge's ±1 or a merge weight), not λ

  // The GEMM-dtype outputs (when asked for) share one dtype; without them it is irrelevant.
  at::ScalarType gemm_dtype() const {
    return Ad.defined() ? Ad.scalar_type() : (Bd.defined() ? Bd.scalar_type() : A.scalar_type());
  }
};

// finalize: the parameter gradients from the products the entry point computed with ATen GEMMs.
//   M = gᵀu (out×r) and Q (r×in, undefined when dA is not wanted), both in the input dtype. Q is s-scaled:
//   Q = (g·(B⊙s))ᵀ x_d, with qscale undefined (= 1); with the split scale (fp16) the caller has the unscaled
//   Q = (g·B)ᵀ x_d instead and passes qscale = s (r, opmath).
//     gs_k = Σ_o M[o,k] B[o,k]
//     dA   = qscale_k Q[k,j] w_j − (gs_k s_k / a_k²) A[k,j]   (norm term where a_raw ≥ eps)
//     dB   = M[o,k] s_k − (gs_k s_k / b_k²) B[o,k]            (norm term where b_raw ≥ eps)
//     dλ   = Σ_k gs_k / (r a_k b_k)
struct FinalizeParams {
  Tensor M, Q, qscale;
  Tensor A, B, w, s, a_raw, b_raw;  // the adapter and the forward's s and raw norms
  Tensor dA, dB, dlam;              // written when defined (opmath)
};

// The small-N forward (Tuning::small_n) in two launches: u = x_d (A⊙w)ᵀ (x's dtype), s, a_raw, b_raw as prep
// writes them, and y (N×out, contiguous, x's dtype) = [y +] (u⊙s) Bᵀ with u⊙s and B in opmath, one rounding.
struct SmallNParams {
  Tensor x_d;           // (N×in) contiguous, x's dtype
  Tensor A, B, lam, w;  // fp32
  // y's initial value, on the current stream: x Wᵀ + bias when accumulating, else an empty (N×out) tensor. Called
  // before the u launch, or concurrently with it on a side stream when overlap is true.
  std::function<Tensor()> base;
  bool overlap = false, accumulate = false;
  Tensor y;                   // out: base()'s tensor, updated
  Tensor u, s, a_raw, b_raw;  // out: allocated by the caller
};

// Where the small-N CUDA forward can run (Tuning::small_n aside): fp32 adapters (16 fp64 accumulators do not fit
// a 1024-thread block's 64 registers a thread), x not fp64 (fp32 accumulation would round its output),
// 1..kSmallN rows, no empty size, and v (N×r fp32) within the update kernel's 48 KiB of shared memory.
inline bool small_n_fits(int64_t N, int64_t r, int64_t in, int64_t out, at::ScalarType adapter_dtype,
                         at::ScalarType x_dtype) {
  return adapter_dtype == at::kFloat && x_dtype != at::kDouble && N >= 1 && N <= kSmallN && r >= 1 && in >= 1 &&
         out >= 1 && N * r * 4 <= 48 * 1024;
}

// The fused small-shape path (CPU, Tuning::cpu_fused): a forward's or a backward's adapter part in one pass of
// plain loops, no GEMM, prep or finalize calls, where the per-call cost of those calls exceeds the arithmetic.
// Everything is in the opmath dtype (x, the adapter and the outputs alike; cpu_fused_fits says where it applies)
// and contiguous; the caller has done the base GEMM.
//   forward   s, a_raw, b_raw as prep writes them; u = x_d (A⊙w)ᵀ; y += u (B⊙s)ᵀ
//   backward  G = g (B⊙s); dx += (G (A⊙w)) [⊙ dropout mask]; M = gᵀu; Q = Gᵀ x_d; dA, dB, dλ as finalize
struct FusedFwdParams {
  Tensor x_d;                 // (N×in) the input after dropout
  Tensor A, B, lam, w;        // the adapter
  Tensor y;                   // (N×out) x Wᵀ (+ bias), accumulated into
  Tensor u, s, a_raw, b_raw;  // out: allocated by the caller, (N×r), (r), (r), (r)
};

struct FusedBwdParams {
  Tensor g;                         // (N×out) dL/dy
  Tensor x_d;                       // (N×in) the input after dropout (read for dA only)
  Tensor u;                         // (N×r) the forward's u
  Tensor A, B, w, s, a_raw, b_raw;  // the adapter and the forward's s and raw norms
  Tensor dx;                        // (N×in) accumulated into when defined (g W, or zeros, already there)
  Tensor dA, dB, dlam;              // written when defined
  double dropout_p = 0.0;           // the forward's dropout: dx's adapter part is masked and scaled as x was
  uint64_t seed = 0;
};

// Where the fused CPU path can run: x and the adapter in one opmath dtype (fp32 or fp64), no empty size, and (unless
// `any_size`, Tuning::cpu_fused = always) at most kCpuFusedMaxWork multiply-adds per pass, N·r·(in + out)
// (the crossover measured by bench/cpu_fused_crossover.py).
constexpr int64_t kCpuFusedMaxWork = int64_t{1} << 15;
inline bool cpu_fused_fits(int64_t N, int64_t r, int64_t in, int64_t out, at::ScalarType adapter_dtype,
                           at::ScalarType x_dtype, bool any_size) {
  return (adapter_dtype == at::kFloat || adapter_dtype == at::kDouble) && x_dtype == adapter_dtype && N >= 1 &&
         r >= 1 && in >= 1 && out >= 1 && (any_size || N * r * (in + out) <= kCpuFusedMaxWork);
}

// A tensor's data, or nullptr where the tensor is undefined (an optional output not asked for, qscale = 1).
template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}
template <typename T>
const T* const_data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

struct DeviceKernels {
  void (*prep)(const PrepParams& p) = nullptr;
  void (*finalize)(const FinalizeParams& p) = nullptr;
  // dst = src ⊙ keep(seed, i) / (1 − p) over the flattened index i of a contiguous src (dst may alias src).
  void (*dropout)(const Tensor& src, Tensor& dst, const Tensor& seed, double p) = nullptr;

  // Optional: nullptr where the device has none.
  // weight += Bs·Af in one pass (fp32/fp64 accumulation, one rounding); false (nothing launched) when this weight
  // is not for the kernel (no unit stride, grid limits): the caller then merges through ATen.
  bool (*merge)(Tensor& weight, const Tensor& Bs, const Tensor& Af) = nullptr;
  // False (nothing launched) outside small_n_fits.
  bool (*small_n_forward)(SmallNParams& p) = nullptr;
  // The fused small-shape passes, called only where cpu_fused_fits holds.
  void (*fused_forward)(const FusedFwdParams& p) = nullptr;
  void (*fused_backward)(const FusedBwdParams& p) = nullptr;
};

DeviceKernels cpu_kernels();   // delora_cpu.cpp
DeviceKernels cuda_kernels();  // delora_cuda.cu, in builds with the CUDA kernels

// The table registry (delora_ops.cpp): filled at load time by registration.cpp, read by the entry points.
void set_device_kernels(c10::DeviceType device, const DeviceKernels& kernels);
bool has_device_kernels(c10::DeviceType device);
const DeviceKernels& device_kernels(c10::Device device);

}  // namespace delora_ext
