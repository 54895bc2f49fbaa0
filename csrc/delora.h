// The delora_ext ops' host entry points and the process-wide kernel-variant switches.
//
// The entry points (delora_ops.cpp) are written once for every device: GEMMs go through ATen (MKL/oneDNN on CPU,
// cuBLAS on CUDA) and the DeLoRA-specific passes go through the device's kernel table (kernels.h), which
// delora_cpu.cpp and delora_cuda.cu fill.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>

namespace delora_ext {

using Tensor = at::Tensor;

// ---- op entry points (schemas and their math: registration.cpp; registered per device there) ------
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
// regenerate from `seed` (used by the differentiable create_graph backward in autograd.cpp).
Tensor dropout_scale(const Tensor& x2, const Tensor& seed, double p, at::ScalarType dt);

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
//                1 on: CUDA forwards of at most kSmallN rows use the small-N kernels (2 launches after the base
//                  GEMM instead of prep, a split-K u GEMM and the low-rank GEMM).
//                2 overlap: as on, with the u launch on a side stream, concurrent with linear_fwd's base GEMM
//                  (joined before the update launch; the fork and join are events, so graph capture records
//                  them as two parallel branches).
//   cpu_fused    1 on (default): CPU calls of small shapes (kernels.h: cpu_fused_fits) compute the adapter part
//                  of a forward or a backward in one fused pass after the base GEMM, instead of prep, two or four
//                  skinny GEMMs and finalize, each a dispatcher call costing more than its arithmetic there.
//                0 off.
//                2 always: the fused pass at any size (tests; benchmarks of the crossover).
struct Tuning {
  std::atomic<int> gemm_order{0};
  std::atomic<int> merge_kernel{0};
  std::atomic<int> small_n{0};
  std::atomic<int> cpu_fused{1};
};
constexpr int kSmallN = 16;
Tuning& tuning();

}  // namespace delora_ext
