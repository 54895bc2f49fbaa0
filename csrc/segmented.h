// The segmented mixed-batch op (segmented.cpp; schema in registration.cpp): every row of a batch gets the low-rank
// term of its own adapter in one pass, y[n] += ((x[n] A_kᵀ) ⊙ sa_k) Bt_k with k = rows_adapter[n] (−1: none).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <optional>
#include <vector>

namespace delora_ext {

// The entry point (registered at the CPU and CUDA keys): argument checks, then the device's kernel.
void segmented_adapter_(at::Tensor& y, const at::Tensor& x, const at::Tensor& rows_adapter, at::TensorList A,
                        at::TensorList Bt, const c10::List<std::optional<at::Tensor>>& sa);

// What the entry point hands a device kernel, everything checked and contiguous. x, y: (N×in), (N×out) in x's
// dtype; rows: (N) int64 in [-1, K); per adapter k: A[k] (r_k×in), Bt[k] (r_k×out) and sa[k] (r_k, or undefined
// for none), all in the opmath dtype (float; double for fp64 x).
struct SegmentedParams {
  at::Tensor y, x, rows;
  std::vector<at::Tensor> A, Bt, sa;
  int64_t r_max = 0;
};

void segmented_cpu(const SegmentedParams& p);   // segmented.cpp
void segmented_cuda(const SegmentedParams& p);  // segmented_cuda.cu, in builds with the CUDA kernels

}  // namespace delora_ext
