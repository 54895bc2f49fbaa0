// Host entry points of the delora_ext ops and the per-device kernel launchers they call.
//
// The entry points (delora_ops.cpp) are written once for every device: GEMMs go through ATen (MKL/oneDNN
// on CPU, cuBLAS on CUDA) and the DeLoRA-specific passes go through the launchers below, which have one
// implementation per device (delora_cpu.cpp, delora_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <functional>
#include <optional>
#include <tuple>

namespace delora_ext {

using Tensor = at::Tensor;

// ---- op entry points (schemas and their math: registration.cpp) ----------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor> prep(const Tensor& A, const Tensor& B, const Tensor& lam,
                                                const Tensor& w);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight,
                                                              const std::optional<Tensor>& bias,
                                                              const Tensor& A, const Tensor& B,
                                                              const Tensor& lam, const Tensor& w,
                                                              double dropout_p,
                                                              const std::optional<Tensor>& seed);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd(const Tensor& x, const Tensor& A,
                                                               const Tensor& B, const Tensor& lam,
                                                               const Tensor& w, double dropout_p,
                                                               const std::optional<Tensor>& seed);

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_bwd(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& A,
    const Tensor& B, const Tensor& lam, const Tensor& w, const Tensor& u, const Tensor& s,
    const Tensor& a_norm, const Tensor& b_norm, double dropout_p, const std::optional<Tensor>& seed,
    std::array<bool, 4> output_mask);

void merge_(Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
            double alpha);

void merge_many_(Tensor& weight, at::TensorList A, at::TensorList B, at::TensorList lam, at::TensorList w,
                 at::ArrayRef<double> alpha);

Tensor delta_weight(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w);

// keep/(1−p) for every element of a contiguous (N×in) tensor shaped like x2, in dtype `dt`: the mask the ops
// regenerate from `seed` (used by the differentiable create_graph backward in registration.cpp).
Tensor dropout_scale(const Tensor& x2, const Tensor& seed, double p, at::ScalarType dt);

// The entry points above are device-independent (they dispatch to the launchers below): registered once per
// dispatch key, CPU in delora_cpu.cpp and CUDA in delora_cuda.cu, from this one list.
inline void register_device_impls(torch::Library& m) {
  m.impl("prep", &prep);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("adapter_fwd", &adapter_fwd);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("merge_", &merge_);
  m.impl("merge_many_", &merge_many_);
  m.impl("delta_weight", &delta_weight);
}

// ---- runtime switches between kernel variants ------------------------------------------------------
// Process-wide, read at every call (so one benchmark process can A/B them). Python sets them through
// delora_ext._C.set_tuning (delora_ext.ops.set_tuning; env DELORA_EXT_GEMM_ORDER / DELORA_EXT_MERGE_KERNEL).
//   gemm_order   0 base_first: y = x Wᵀ (+ bias), then y += (u⊙s) Bᵀ (beta = 1); dx = g W, then dx += G A'.
//                1 seeded:     y = (u⊙s) Bᵀ (+ bias) first, then the base GEMM accumulates onto it (beta = 1),
//                              so the low-rank term is read once in the big GEMM's epilogue instead of a
//                              read-modify-write pass over y; the same for dx.
//   merge_kernel 0 rows:  the CUDA merge kernel with R re-read from L2 for every kMergeRows rows.
//                1 tiled: R's column strip staged in shared memory once per block of many rows (CUDA only).
//   small_n      0 off
//                1 on: CUDA forwards of at most kSmallN rows use small_n_forward_cuda (2 launches after the base
//                  GEMM instead of prep, a split-K u GEMM and the low-rank GEMM).
//                2 overlap: as on, with the u launch on a side stream, concurrent with linear_fwd's base GEMM
//                  (joined before the update launch; the fork and join are events, so graph capture records
//                  them as two parallel branches).
struct Tuning {
  std::atomic<int> gemm_order{0};
  std::atomic<int> merge_kernel{0};
  std::atomic<int> small_n{0};
};
constexpr int kSmallN = 16;
Tuning& tuning();

// Where the small-N CUDA forward can run (Tuning::small_n aside): fp32 adapters (16 fp64 accumulators do not fit
// a 1024-thread block's 64 registers a thread), x not fp64 (fp32 accumulation would round its output),
// 1..kSmallN rows, no empty size, and v (N×r fp32) within the update kernel's 48 KiB of shared memory.
inline bool small_n_fits(int64_t N, int64_t r, int64_t in, int64_t out, at::ScalarType adapter_dtype,
                         at::ScalarType x_dtype) {
  return adapter_dtype == at::kFloat && x_dtype != at::kDouble && N >= 1 && N <= kSmallN && r >= 1 && in >= 1 &&
         out >= 1 && N * r * 4 <= 48 * 1024;
}

// ---- per-device launchers ---------------------------------------------------------------------------
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
void prep_cpu(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, PrepOutputs& o);

// M = gᵀu (out×r) and Q (r×in, undefined when dA is not wanted), both in the input dtype. Q is s-scaled:
// Q = (g·(B⊙s))ᵀ x_d, with qscale undefined (= 1); with the split scale (fp16) the caller has the unscaled
// Q = (g·B)ᵀ x_d instead and passes qscale = s (r, opmath).
//   gs_k = Σ_o M[o,k] B[o,k]
//   dA   = qscale_k Q[k,j] w_j − (gs_k s_k / a_k²) A[k,j]   (norm term where a_raw ≥ eps)
//   dB   = M[o,k] s_k − (gs_k s_k / b_k²) B[o,k]            (norm term where b_raw ≥ eps)
//   dλ   = Σ_k gs_k / (r a_k b_k)
// dA, dB, dlam are written when defined (opmath dtype).
void finalize_cpu(const Tensor& M, const Tensor& Q, const Tensor& qscale, const Tensor& A, const Tensor& B,
                  const Tensor& w, const Tensor& s, const Tensor& a_raw, const Tensor& b_raw, Tensor& dA,
                  Tensor& dB, Tensor& dlam);

// dst = src ⊙ keep(seed, i) / (1 − p) over the flattened index i of a contiguous src (dst may alias src).
void dropout_cpu(const Tensor& src, Tensor& dst, const Tensor& seed, double p);

#ifdef DELORA_WITH_CUDA
void prep_cuda(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, PrepOutputs& o);
void finalize_cuda(const Tensor& M, const Tensor& Q, const Tensor& qscale, const Tensor& A, const Tensor& B,
                   const Tensor& w, const Tensor& s, const Tensor& a_raw, const Tensor& b_raw, Tensor& dA,
                   Tensor& dB, Tensor& dlam);
void dropout_cuda(const Tensor& src, Tensor& dst, const Tensor& seed, double p);
// weight += Bs·Af in one pass (fp32/fp64 accumulation, one rounding); false when weight has no unit stride.
bool merge_cuda(Tensor& weight, const Tensor& Bs, const Tensor& Af);
// Small-N forward (Tuning::small_n) in two launches: u = x_d (A⊙w)ᵀ (x's dtype), s, a_raw, b_raw as prep
// writes them, and y (N×out, contiguous, x's dtype) = [y +] (u⊙s) Bᵀ with u⊙s and B in opmath, one rounding.
// x_d (N×in) contiguous in x's dtype; A, B, lam, w contiguous fp32. False (nothing launched) outside small_n_fits.
// y comes from base() (on the current stream; x Wᵀ + bias, or an empty tensor when accumulate is false), issued
// before the u launch, or concurrently with it on a side stream when overlap is true.
bool small_n_forward_cuda(const Tensor& x_d, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
                          const std::function<Tensor()>& base, bool overlap, Tensor& y, bool accumulate, Tensor& u,
                          Tensor& s, Tensor& a_raw, Tensor& b_raw);
#endif

}  // namespace delora_ext
