// CUDA kernel of the segmented mixed-batch op (segmented.h): one block per row.
//
// Block n reads k = rows_adapter[n] (−1: the row keeps its base output, the block exits), then
//   u_j = Σ_i x[n,i] A_k[j,i] (⊙ sa_k[j])   kSegRanks ranks per pass: each thread accumulates its strided share of
//                                           i, warps reduce by shuffles, the warps' sums are added in warp order
//                                           (fixed, so deterministic); u stays in shared memory, in opmath
//   y[n,o] = round(y[n,o] + Σ_j u_j Bt_k[j,o])  one thread per output column, j in order, coalesced reads of Bt.
// The adapters' pointers travel in the kernel parameters (kSegMaxAdapters per launch; more adapters take more
// launches, each handling the rows of its own adapters). Launched on the current stream; no host synchronisation.
// An index outside [-1, K) is a device-side assertion (as for index_select): checking it on the host would cost a
// synchronisation per call.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <limits>

#include "delora_math.h"
#include "segmented.h"

namespace delora_ext {
namespace {

constexpr int kSegThreads = 256;
constexpr int kSegRanks = 8;
constexpr int kSegMaxAdapters = 48;  // 48 × 32 bytes of pointers and ranks, well inside the 4 KiB of parameters

template <typename T>
struct SegAdapter {
  const T* A;   // r × in
  const T* Bt;  // r × out
  const T* sa;  // r, or null
  int64_t r;
};

template <typename T>
struct SegTable {
  SegAdapter<T> a[kSegMaxAdapters];
  int64_t first;  // the adapter index of a[0]
  int64_t count;  // entries used
  int64_t total;  // K, for the index check
};

template <typename T, typename D>
__global__ void __launch_bounds__(kSegThreads)
    segmented_kernel(D* __restrict__ y, const D* __restrict__ x, const int64_t* __restrict__ rows,
                     const SegTable<T> table, int64_t in, int64_t out) {
  extern __shared__ __align__(16) unsigned char seg_smem[];
  T* u = reinterpret_cast<T*>(seg_smem);  // r_max
  constexpr int kWarps = kSegThreads / 32;
  __shared__ T part[kSegRanks][kWarps];
  const int64_t n = blockIdx.x;
  const int64_t k = rows[n];
  CUDA_KERNEL_ASSERT_MSG(k >= -1 && k < table.total, "delora_ext::segmented_adapter_: rows_adapter out of range");
  if (k < table.first || k >= table.first + table.count) return;  // the whole block: k is the same for all threads
  const SegAdapter<T> ad = table.a[k - table.first];
  const D* xr = x + n * in;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t j0 = 0; j0 < ad.r; j0 += kSegRanks) {
    const int jn = static_cast<int>(ad.r - j0 < kSegRanks ? ad.r - j0 : kSegRanks);
    T acc[kSegRanks];
#pragma unroll
    for (int jj = 0; jj < kSegRanks; ++jj) acc[jj] = T(0);
    const T* a = ad.A + j0 * in;
    for (int64_t i = threadIdx.x; i < in; i += kSegThreads) {
      const T xv = static_cast<T>(xr[i]);
#pragma unroll
      for (int jj = 0; jj < kSegRanks; ++jj)
        if (jj < jn) acc[jj] += xv * a[jj * in + i];
    }
#pragma unroll
    for (int jj = 0; jj < kSegRanks; ++jj) {
      if (jj < jn) {
        const T t = warp_sum(acc[jj]);
        if (lane == 0) part[jj][warp] = t;
      }
    }
    __syncthreads();
    if (threadIdx.x < jn) {
      const int jj = threadIdx.x;
      T s = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += part[jj][w];
      u[j0 + jj] = ad.sa != nullptr ? s * ad.sa[j0 + jj] : s;
    }
    __syncthreads();  // u complete; part free for the next pass
  }
  D* yr = y + n * out;
  for (int64_t o = threadIdx.x; o < out; o += kSegThreads) {
    T acc = 0;
    for (int64_t j = 0; j < ad.r; ++j) acc += u[j] * ad.Bt[j * out + o];
    yr[o] = static_cast<D>(static_cast<T>(yr[o]) + acc);
  }
}

}  // namespace

void segmented_cuda(const SegmentedParams& p) {
  const int64_t N = p.x.size(0), in = p.x.size(1), out = p.y.size(1), K = static_cast<int64_t>(p.A.size());
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max(), "delora_ext::segmented_adapter_: `x` has ", N,
              " rows, more than the CUDA kernel's grid allows (2^31 - 1)");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "delora_segmented_cuda", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = static_cast<size_t>(p.r_max) * sizeof(opmath_t);
    TORCH_CHECK(smem <= 48 * 1024, "delora_ext::segmented_adapter_: adapters of rank up to ", p.r_max,
                " need more than the CUDA kernel's 48 KiB of shared memory for u (the largest rank it takes is ",
                48 * 1024 / sizeof(opmath_t), ")");
    for (int64_t first = 0; first < K; first += kSegMaxAdapters) {
      SegTable<opmath_t> table{};
      table.first = first;
      table.count = std::min<int64_t>(kSegMaxAdapters, K - first);
      table.total = K;
      for (int64_t i = 0; i < table.count; ++i) {
        const auto k = static_cast<size_t>(first + i);
        table.a[i] = {p.A[k].const_data_ptr<opmath_t>(), p.Bt[k].const_data_ptr<opmath_t>(),
                      p.sa[k].defined() ? p.sa[k].const_data_ptr<opmath_t>() : nullptr, p.A[k].size(0)};
      }
      segmented_kernel<opmath_t, scalar_t><<<static_cast<unsigned>(N), kSegThreads, smem, stream>>>(
          p.y.mutable_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(), p.rows.const_data_ptr<int64_t>(), table,
          in, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace delora_ext
