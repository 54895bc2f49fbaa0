// CUDA kernels for the DeLoRA-specific passes: the CUDA kernel table (kernels.h).
//
// Grid layout: prep and finalize launch one block per rank direction k (r is small, 1..256): the block
// reduces over the row A[k,:] and the column B[:,k] with a fixed-order block reduction (deterministic),
// then writes the k-th row/column of the outputs. The GEMMs around them are cuBLAS through ATen.
// No launcher synchronises with the host: λ and the dropout seed are read from device memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include <cub/block/block_reduce.cuh>

#include <mutex>

#include "delora_math.h"
#include "kernels.h"

namespace delora_ext {
namespace {

constexpr int kThreads = 256;
// prep and finalize run one block per rank direction k (r blocks only), so each block is made wide: with 1024
// threads a 4096-long row or column is 4 loads per thread instead of 16 dependent-latency iterations.
constexpr int kRowThreads = 1024;
// small-N forward: the update kernel's block (out / 128 blocks: 32 for out = 4096).
constexpr int kSmallUpdateThreads = 128;

// This thread's share of ‖B[:,k]‖² (B out×r row-major), in double, for a kRowThreads-wide block reduction. prep
// and the small-N kernel both use it, so their norms are the same bits.
template <typename T>
__device__ __forceinline__ double column_sq_partial(const T* __restrict__ B, int64_t k, int64_t r, int64_t out) {
  double sq = 0;
#pragma unroll 4
  for (int64_t o = threadIdx.x; o < out; o += kRowThreads) {
    const double v = B[o * r + k];
    sq += v * v;
  }
  return sq;
}

// One block per k: the norms of row A[k,:] and column B[:,k], then s_k, and the folded operands row k of Af / Ad
// and column k of Bd (PrepParams in kernels.h, null for an output not wanted). T is the opmath type, D the GEMM
// dtype of Ad and Bd. The pointers are kernel parameters rather than members of one argument struct on purpose:
// __restrict__ on a kernel's pointer parameters is what lets nvcc load the inputs through the read-only cache and
// reorder those loads across the output stores; members of a struct argument get neither (so finalize_kernel
// takes its pointers the same way).
template <typename T, typename D>
__global__ void __launch_bounds__(kRowThreads)
    prep_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ lam, const T* __restrict__ w,
                T* __restrict__ Af, D* __restrict__ Ad, D* __restrict__ Bd, T* __restrict__ s, T* __restrict__ a_raw,
                T* __restrict__ b_raw, T* __restrict__ sa_out, ScaleMode mode, T bd_alpha, int64_t r, int64_t in,
                int64_t out) {
  // Sums of squares in double, as the CPU kernel: the norms (and s) are then the same function on both
  // devices up to summation order, correctly rounded in practice, and squares cannot overflow/underflow.
  using Reduce = cub::BlockReduce<double, kRowThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T sa_shared, bcoef_shared;
  const int64_t k = blockIdx.x;
  const T* row = A + k * in;
  double sq_a = 0;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < in; j += kRowThreads) {
    const T v = row[j];
    sq_a += double(v) * double(v);
    if (Af != nullptr) Af[k * in + j] = v * w[j];
  }
  const double a2 = Reduce(tmp).Sum(sq_a);
  __syncthreads();
  const double b2 = Reduce(tmp).Sum(column_sq_partial(B, k, r, out));
  if (threadIdx.x == 0) {
    const T a = static_cast<T>(sqrt(a2)), b = static_cast<T>(sqrt(b2));
    const T sk = scale_of<T>(lam[0], a, b, r), sak = a_side_factor<T>(mode, lam[0], a, r);
    a_raw[k] = a;
    b_raw[k] = b;
    s[k] = sk;
    if (sa_out != nullptr) sa_out[k] = sak;
    sa_shared = sak;
    bcoef_shared = b_side_factor<T>(mode, lam[0], b, sk, bd_alpha, r);
  }
  __syncthreads();
  if (Ad != nullptr) {
    if (ad_scaled(mode)) {
      const T f = sa_shared;
      for (int64_t j = threadIdx.x; j < in; j += kRowThreads) Ad[k * in + j] = static_cast<D>(row[j] * w[j] * f);
    } else {
      for (int64_t j = threadIdx.x; j < in; j += kRowThreads) Ad[k * in + j] = static_cast<D>(row[j] * w[j]);
    }
  }
  if (Bd != nullptr) {
    const T f = bcoef_shared;
    for (int64_t o = threadIdx.x; o < out; o += kRowThreads) Bd[o * r + k] = static_cast<D>(B[o * r + k] * f);
  }
}

// One block per k: gs_k = Σ_o M[o,k] B[o,k], then column k of dB, row k of dA, and k's share of dλ.
template <typename T, typename in_t>
__global__ void __launch_bounds__(kRowThreads) finalize_kernel(const in_t* __restrict__ M, const in_t* __restrict__ Q,
                                const T* __restrict__ qscale, const T* __restrict__ A,
                                const T* __restrict__ B, const T* __restrict__ w, const T* __restrict__ s,
                                const T* __restrict__ a_raw, const T* __restrict__ b_raw, T* __restrict__ dA,
                                T* __restrict__ dB, T* __restrict__ dlam_parts, int64_t r, int64_t in,
                                int64_t out) {
  using Reduce = cub::BlockReduce<T, kRowThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T gs_shared;
  const int64_t k = blockIdx.x;
  T part = 0;
#pragma unroll 4
  for (int64_t o = threadIdx.x; o < out; o += kRowThreads) part += T(M[o * r + k]) * B[o * r + k];
  const T total = Reduce(tmp).Sum(part);
  if (threadIdx.x == 0) gs_shared = total;
  __syncthreads();
  const T gs = gs_shared, sk = s[k];
  if (dlam_parts != nullptr && threadIdx.x == 0)
    dlam_parts[k] = gs / (T(r) * clamp_norm(a_raw[k]) * clamp_norm(b_raw[k]));
  if (dB != nullptr) {
    const T c = norm_grad_coef(gs, sk, b_raw[k]);
    for (int64_t o = threadIdx.x; o < out; o += kRowThreads) dB[o * r + k] = T(M[o * r + k]) * sk + c * B[o * r + k];
  }
  if (dA != nullptr) {
    const T c = norm_grad_coef(gs, sk, a_raw[k]);
    if (qscale != nullptr) {
      const T qk = qscale[k];
      for (int64_t j = threadIdx.x; j < in; j += kRowThreads)
        dA[k * in + j] = qk * T(Q[k * in + j]) * w[j] + c * A[k * in + j];
    } else {
      for (int64_t j = threadIdx.x; j < in; j += kRowThreads) dA[k * in + j] = T(Q[k * in + j]) * w[j] + c * A[k * in + j];
    }
  }
}

// C (rows×cols, row stride ldc, unit column stride) += L (rows×r) · R (r×cols), L and R contiguous in acc_t.
// One block of 256 threads per kMergeRows-row × (256·V)-column tile; each thread owns V consecutive columns of
// those rows (V = 16 bytes of C: 8 bf16/fp16, 4 fp32, 2 fp64), so C moves in 16-byte vectors and each R vector
// is reused over the rows. Every C element is read once, accumulated in acc_t over all r in order k = 0..r-1,
// added to C and rounded once. L is staged through shared memory in chunks of kMergeK ranks (broadcast reads).
// `vec` (host-checked alignment of C and R) selects the vector loads; the scalar path handles everything else.
constexpr int kMergeThreads = 256;
constexpr int kMergeK = 32;

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename scalar_t>
constexpr int merge_vec() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Rows per thread: 32 accumulators a thread whatever the width (4 rows of 8 bf16, 8 of 4 fp32, 16 of 2 fp64),
// which keeps the kernel at about 100 registers without spills (2 blocks an SM).
template <typename scalar_t>
constexpr int merge_rows() {
  return 32 / merge_vec<scalar_t>();
}

// C[row0 + i, col .. col+V) = round(C + acc[i]) for the rows below `rend`: from the prefetched 16-byte vectors
// when `whole`, else element by element within `cols`.
template <typename scalar_t, typename acc_t, int V, int RM>
__device__ __forceinline__ void store_rows(scalar_t* C, int64_t ldc, int64_t row0, int64_t rend, int64_t col,
                                           int64_t cols, bool whole, const uint4 (&craw)[RM],
                                           const acc_t (&acc)[RM][V]) {
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    if (row0 + i >= rend) break;
    scalar_t* p = C + (row0 + i) * ldc + col;
    if (whole) {
      Vec<scalar_t, V> c;
      memcpy(&c, &craw[i], sizeof(c));
#pragma unroll
      for (int v = 0; v < V; ++v) c.v[v] = scalar_t(acc_t(c.v[v]) + acc[i][v]);
      *reinterpret_cast<Vec<scalar_t, V>*>(p) = c;
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (col + v < cols) p[v] = scalar_t(acc_t(p[v]) + acc[i][v]);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(scalar_t* __restrict__ C, int64_t ldc, const acc_t* __restrict__ L, const acc_t* __restrict__ R,
                 int64_t rows, int64_t cols, int64_t r, bool vec) {
  constexpr int V = merge_vec<scalar_t>();
  constexpr int kMergeRows = merge_rows<scalar_t>();
  __shared__ acc_t Ls[kMergeRows][kMergeK];
  const int64_t row0 = int64_t(blockIdx.y) * kMergeRows;
  const int64_t col = (int64_t(blockIdx.x) * kMergeThreads + threadIdx.x) * V;
  const bool whole = vec && col + V <= cols;  // this thread's V columns exist and are vector-aligned
  acc_t acc[kMergeRows][V];
#pragma unroll
  for (int i = 0; i < kMergeRows; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[i][v] = acc_t(0);
  // C's 16 bytes per row are fetched first, so their DRAM latency overlaps the rank loop (raw, 4 registers a row).
  static_assert(sizeof(Vec<scalar_t, V>) == sizeof(uint4), "one 16-byte vector per row");
  uint4 craw[kMergeRows];
  if (whole) {
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i)
      if (row0 + i < rows) craw[i] = *reinterpret_cast<const uint4*>(C + (row0 + i) * ldc + col);
  }
  for (int64_t k0 = 0; k0 < r; k0 += kMergeK) {
    const int kc = static_cast<int>(r - k0 < kMergeK ? r - k0 : kMergeK);
    for (int t = threadIdx.x; t < kMergeRows * kMergeK; t += kMergeThreads) {
      const int i = t / kMergeK, k = t % kMergeK;
      Ls[i][k] = (row0 + i < rows && k < kc) ? L[(row0 + i) * r + k0 + k] : acc_t(0);
    }
    __syncthreads();
    if (col < cols) {
#pragma unroll 4
      for (int k = 0; k < kc; ++k) {
        const acc_t* rp = R + (k0 + k) * cols + col;
        acc_t rv[V];
        if (whole) {
          const Vec<acc_t, V> x = *reinterpret_cast<const Vec<acc_t, V>*>(rp);
#pragma unroll
          for (int v = 0; v < V; ++v) rv[v] = x.v[v];
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) rv[v] = col + v < cols ? rp[v] : acc_t(0);
        }
#pragma unroll
        for (int i = 0; i < kMergeRows; ++i) {
          const acc_t lv = Ls[i][k];
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i][v] += lv * rv[v];
        }
      }
    }
    __syncthreads();
  }
  if (col >= cols) return;
  store_rows<scalar_t, acc_t, V, kMergeRows>(C, ldc, row0, rows, col, cols, whole, craw, acc);
}

// Tiled variant (Tuning::merge_kernel = 1). merge_kernel above re-reads its 256·V-column slice of R from L2 for
// every kMergeRows rows, so R's L2 traffic is r·4/(kMergeRows·2) times C's (8× for bf16 at r = 32) and bounds it.
// Here a block owns a strip of 32·V columns (one warp's width of 16-byte C vectors) for `rows_per_block` rows:
// the strip of R (kc ranks, ≤ 96 KiB) is staged in shared memory once and reused by every row of the block;
// each pass of the block covers 8 warps × kMergeRows rows, with that pass's rows of L staged k-major beside it.
// A thread owns V columns × kMergeRows rows (the same 32 accumulators and the same k = 0..r-1 order as above,
// so both kernels give bit-identical results). r > kc: R is staged chunk by chunk in every pass.
template <typename T, int N>
__device__ __forceinline__ void load_vec(T (&dst)[N], const T* src) {
  const Vec<T, N> x = *reinterpret_cast<const Vec<T, N>*>(src);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = x.v[i];
}

template <typename scalar_t, typename acc_t>
constexpr int tile_piece() {  // acc_t elements per shared-memory vector: 16 bytes, or V when that is less
  return (16 / static_cast<int>(sizeof(acc_t))) < merge_vec<scalar_t>() ? 16 / static_cast<int>(sizeof(acc_t))
                                                                           : merge_vec<scalar_t>();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_tiled_kernel(scalar_t* __restrict__ C, int64_t ldc, const acc_t* __restrict__ L,
                       const acc_t* __restrict__ R, int64_t rows, int64_t cols, int64_t r, int kc,
                       int64_t rows_per_block, bool vec) {
  constexpr int V = merge_vec<scalar_t>();
  constexpr int RM = merge_rows<scalar_t>();
  constexpr int E = tile_piece<scalar_t, acc_t>();     // a thread's V columns are V/E pieces of E
  constexpr int EL = E < RM ? E : RM;                   // a thread's RM rows of L are RM/EL pieces of EL
  constexpr int SW = 32 * V;                            // strip width (columns)
  constexpr int P = (kMergeThreads / 32) * RM;          // rows per pass
  static_assert(V % E == 0 && RM % EL == 0, "vector pieces must tile a thread's columns and rows");
  extern __shared__ __align__(16) unsigned char merge_smem[];
  acc_t* Rs = reinterpret_cast<acc_t*>(merge_smem);  // [kc][V/E][32 lanes][E]: conflict-free 16-byte reads
  acc_t* Ls = Rs + int64_t(kc) * SW;                  // [kc][P]: a warp's RM rows read as broadcasts
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c0 = int64_t(blockIdx.x) * SW;
  const int64_t col = c0 + int64_t(lane) * V;
  const int64_t rbeg = int64_t(blockIdx.y) * rows_per_block;
  const int64_t rend = rbeg + rows_per_block < rows ? rbeg + rows_per_block : rows;
  const bool whole = vec && col + V <= cols;
  const bool single = kc >= r;  // all of R's strip fits: staged once for the whole block

  auto stage_R = [&](int64_t k0, int kn) {
    constexpr int pieces = SW / E;
    for (int t = threadIdx.x; t < kn * pieces; t += kMergeThreads) {
      const int k = t / pieces, j0 = (t % pieces) * E;
      const int64_t c = c0 + j0;
      const acc_t* src = R + (k0 + k) * cols + c;
      Vec<acc_t, E> piece;
      if (vec && c + E <= cols) {
        piece = *reinterpret_cast<const Vec<acc_t, E>*>(src);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) piece.v[e] = c + e < cols ? src[e] : acc_t(0);
      }
      *reinterpret_cast<Vec<acc_t, E>*>(Rs + int64_t(k) * SW + ((j0 % V) / E) * (32 * E) + (j0 / V) * E) = piece;
    }
  };

  if (single) stage_R(0, static_cast<int>(r));
  static_assert(sizeof(Vec<scalar_t, V>) == sizeof(uint4), "one 16-byte vector per row");
  for (int64_t p0 = rbeg; p0 < rend; p0 += P) {
    const int64_t row0 = p0 + int64_t(warp) * RM;  // this thread's first row
    uint4 craw[RM];
    if (whole) {
#pragma unroll
      for (int i = 0; i < RM; ++i)
        if (row0 + i < rend) craw[i] = *reinterpret_cast<const uint4*>(C + (row0 + i) * ldc + col);
    }
    acc_t acc[RM][V];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[i][v] = acc_t(0);
    for (int64_t k0 = 0; k0 < r; k0 += kc) {
      const int kn = static_cast<int>(r - k0 < kc ? r - k0 : kc);
      __syncthreads();  // the previous pass/chunk is done reading Ls (and Rs)
      if (!single) stage_R(k0, kn);
      for (int t = threadIdx.x; t < kn * P; t += kMergeThreads) {
        const int k = t / P, i = t % P;
        Ls[int64_t(k) * P + i] = p0 + i < rend ? L[(p0 + i) * r + k0 + k] : acc_t(0);
      }
      __syncthreads();
      if (col < cols) {
#pragma unroll 4
        for (int k = 0; k < kn; ++k) {
          acc_t rv[V], lv[RM];
          const acc_t* rp = Rs + int64_t(k) * SW + lane * E;
#pragma unroll
          for (int q = 0; q < V / E; ++q) {
            acc_t piece[E];
            load_vec<acc_t, E>(piece, rp + q * (32 * E));
#pragma unroll
            for (int e = 0; e < E; ++e) rv[q * E + e] = piece[e];
          }
          const acc_t* lp = Ls + int64_t(k) * P + warp * RM;
#pragma unroll
          for (int q = 0; q < RM / EL; ++q) {
            acc_t piece[EL];
            load_vec<acc_t, EL>(piece, lp + q * EL);
#pragma unroll
            for (int e = 0; e < EL; ++e) lv[q * EL + e] = piece[e];
          }
#pragma unroll
          for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int v = 0; v < V; ++v) acc[i][v] += lv[i] * rv[v];
        }
      }
    }
    if (col < cols) store_rows<scalar_t, acc_t, V, RM>(C, ldc, row0, rend, col, cols, whole, craw, acc);
  }
}

// ---- small-N forward (Tuning::small_n): N ≤ kSmallN rows, e.g. decoding ------------------------------
// Two launches instead of prep + the u GEMM (split-K + reduce) + the low-rank GEMM:
//   small_u_kernel, one block per k: the norms a_k, b_k and s_k exactly as prep_kernel computes them (same
//     thread count, loop and block reduction, so the same bits), and u[n,k] = Σ_j x_d[n,j] A[k,j] w[j] for all
//     n at once (fp32 accumulation; each block reads x once), written as u (x's dtype, saved for backward) and
//     v = u ⊙ s (opmath; no fp16 rounding of the scaled term, so no split scale is needed).
//   small_update_kernel, one thread per output column o: y[n,o] = round(y[n,o] + Σ_k v[n,k] B[o,k]) (or without
//     y's old value), B in opmath, v staged in shared memory.
template <typename T, typename D>
__global__ void __launch_bounds__(kRowThreads)
    small_u_kernel(const D* __restrict__ x, const T* __restrict__ A, const T* __restrict__ B,
                   const T* __restrict__ lam, const T* __restrict__ w, T* __restrict__ v, D* __restrict__ u_out,
                   T* __restrict__ s, T* __restrict__ a_raw, T* __restrict__ b_raw, int n_rows, int64_t r,
                   int64_t in, int64_t out) {
  using Reduce = cub::BlockReduce<double, kRowThreads>;
  constexpr int kWarps = kRowThreads / 32;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ T part[kSmallN][kWarps];
  __shared__ T s_shared;
  const int64_t k = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const T* row = A + k * in;
  T acc[kSmallN];
#pragma unroll
  for (int n = 0; n < kSmallN; ++n) acc[n] = T(0);
  double sq_a = 0;
#pragma unroll 4
  for (int64_t j = threadIdx.x; j < in; j += kRowThreads) {
    const T av = row[j];
    sq_a += double(av) * double(av);
    const T aw = av * w[j];
#pragma unroll
    for (int n = 0; n < kSmallN; ++n)
      if (n < n_rows) acc[n] += T(x[n * in + j]) * aw;
  }
  const double a2 = Reduce(tmp).Sum(sq_a);
  __syncthreads();
  const double b2 = Reduce(tmp).Sum(column_sq_partial(B, k, r, out));
  // u[n,k]: each warp's sum, then thread n adds the warps' sums for row n in warp order (deterministic).
#pragma unroll
  for (int n = 0; n < kSmallN; ++n) {
    if (n < n_rows) {
      const T t = warp_sum(acc[n]);
      if (lane == 0) part[n][warp] = t;
    }
  }
  if (threadIdx.x == 0) {
    const T a = static_cast<T>(sqrt(a2)), b = static_cast<T>(sqrt(b2));
    const T sk = scale_of<T>(lam[0], a, b, r);
    a_raw[k] = a;
    b_raw[k] = b;
    s[k] = sk;
    s_shared = sk;
  }
  __syncthreads();
  if (threadIdx.x < n_rows) {
    const int n = threadIdx.x;
    T u = 0;
    for (int i = 0; i < kWarps; ++i) u += part[n][i];
    u_out[n * r + k] = static_cast<D>(u);
    v[n * r + k] = u * s_shared;
  }
}

template <typename T, typename D>
__global__ void __launch_bounds__(kSmallUpdateThreads)
    small_update_kernel(D* __restrict__ y, const T* __restrict__ v, const T* __restrict__ B, int n_rows,
                        int64_t r, int64_t out, bool accumulate) {
  extern __shared__ __align__(16) unsigned char small_smem[];
  T* vs = reinterpret_cast<T*>(small_smem);  // n_rows × r
  for (int64_t i = threadIdx.x; i < n_rows * r; i += kSmallUpdateThreads) vs[i] = v[i];
  __syncthreads();
  const int64_t o = int64_t(blockIdx.x) * kSmallUpdateThreads + threadIdx.x;
  if (o >= out) return;
  T acc[kSmallN];
#pragma unroll
  for (int n = 0; n < kSmallN; ++n) acc[n] = T(0);
  const T* brow = B + o * r;
  for (int64_t k = 0; k < r; ++k) {
    const T bv = brow[k];
#pragma unroll
    for (int n = 0; n < kSmallN; ++n)
      if (n < n_rows) acc[n] += vs[n * r + k] * bv;
  }
#pragma unroll
  for (int n = 0; n < kSmallN; ++n) {
    if (n < n_rows) {
      D* p = y + n * out + o;
      *p = static_cast<D>(accumulate ? T(*p) + acc[n] : acc[n]);
    }
  }
}

template <typename scalar_t>
__global__ void dropout_kernel(const scalar_t* src, scalar_t* dst,  // may alias (in-place use in backward)
                               const int64_t* __restrict__ seed,
                               uint32_t threshold, at::opmath_type<scalar_t> scale, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const uint64_t seed_v = static_cast<uint64_t>(seed[0]);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x)
    dst[i] = dropout_keep(seed_v, static_cast<uint64_t>(i), threshold) ? scalar_t(opmath_t(src[i]) * scale)
                                                                      : scalar_t(0);
}

void prep_cuda(const PrepParams& p) {
  const int64_t r = p.A.size(0);
  if (r == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "delora_prep_cuda", [&] {
    using opmath_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.gemm_dtype(), "delora_prep_cuda_gemm", [&] {
      prep_kernel<opmath_t, scalar_t><<<r, kRowThreads, 0, stream>>>(
          p.A.const_data_ptr<opmath_t>(), p.B.const_data_ptr<opmath_t>(), p.lam.const_data_ptr<opmath_t>(),
          p.w.const_data_ptr<opmath_t>(), data_or_null<opmath_t>(p.Af), data_or_null<scalar_t>(p.Ad),
          data_or_null<scalar_t>(p.Bd), p.s.mutable_data_ptr<opmath_t>(), p.a_raw.mutable_data_ptr<opmath_t>(),
          p.b_raw.mutable_data_ptr<opmath_t>(), data_or_null<opmath_t>(p.sa), p.mode, static_cast<opmath_t>(p.bd_alpha),
          r, p.A.size(1), p.B.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void finalize_cuda(const FinalizeParams& p) {
  const int64_t r = p.A.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  Tensor parts = p.dlam.defined() ? at::empty({r}, p.A.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "delora_finalize_cuda", [&] {
    using opmath_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.M.scalar_type(), "delora_finalize_cuda_in", [&] {
      finalize_kernel<opmath_t, scalar_t><<<r, kRowThreads, 0, stream>>>(
          p.M.const_data_ptr<scalar_t>(), const_data_or_null<scalar_t>(p.Q), const_data_or_null<opmath_t>(p.qscale),
          p.A.const_data_ptr<opmath_t>(), p.B.const_data_ptr<opmath_t>(), p.w.const_data_ptr<opmath_t>(),
          p.s.const_data_ptr<opmath_t>(), p.a_raw.const_data_ptr<opmath_t>(), p.b_raw.const_data_ptr<opmath_t>(),
          data_or_null<opmath_t>(p.dA), data_or_null<opmath_t>(p.dB), data_or_null<opmath_t>(parts), r, p.A.size(1),
          p.B.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // r partial sums, added in a fixed order by a deterministic ATen reduction.
  if (parts.defined()) {
    Tensor dlam = p.dlam;
    at::sum_out(dlam, parts, {0}, /*keepdim=*/true);
  }
}

// Lets merge_tiled_kernel<scalar_t, acc_t> use up to `bytes` (the same cap on every call) of dynamic shared
// memory on `device`: set once per instantiation and device, so later launches, also those captured in a CUDA
// graph, make no attribute call.
template <typename scalar_t, typename acc_t>
void allow_tiled_smem(int device, int64_t bytes) {
  constexpr int kMaxDevices = 64;
  static std::once_flag done[kMaxDevices];
  auto set = [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(merge_tiled_kernel<scalar_t, acc_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  };
  if (device >= 0 && device < kMaxDevices) {
    std::call_once(done[device], set);
  } else {
    set();
  }
}

bool merge_cuda(Tensor& weight, const Tensor& Bs, const Tensor& Af) {
  // weight (out×in) += Bs (out×r) · Af (r×in). A transposed weight (Conv1D's (in, out) storage seen as
  // (out, in)) is handled as Wᵀ += Afᵀ Bsᵀ so the unit stride stays on the fast axis.
  Tensor C = weight, L = Bs, R = Af;
  if (weight.stride(1) != 1 || weight.size(1) == 1) {
    if (weight.stride(0) != 1) return false;  // neither axis has unit stride: caller falls back
    C = weight.t();
    L = Af.t().contiguous();
    R = Bs.t().contiguous();
  }
  const int64_t rows = C.size(0), cols = C.size(1), r = L.size(1);
  if (rows == 0 || cols == 0) return true;
  auto stream = at::cuda::getCurrentCUDAStream();
  bool launched = false;
  auto aligned = [](const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
  const bool tiled = tuning().merge_kernel.load(std::memory_order_relaxed) == 1;
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "delora_merge_cuda_acc", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, C.scalar_type(), "delora_merge_cuda", [&] {
      constexpr int V = merge_vec<scalar_t>();
      constexpr int kMergeRows = merge_rows<scalar_t>();
      if (tiled) {
        constexpr int SW = 32 * V, P = (kMergeThreads / 32) * kMergeRows;
        constexpr int E = tile_piece<scalar_t, acc_t>();
        const bool vec = C.stride(0) % V == 0 && cols % V == 0 && aligned(C.const_data_ptr(), 16) &&
                         aligned(R.const_data_ptr(), sizeof(acc_t) * E);
        // Blocks of several passes (fewer re-reads of R) while keeping ~4 blocks per SM to spread the work.
        const int64_t strips = (cols + SW - 1) / SW, pass_count = (rows + P - 1) / P;
        const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
        int64_t passes = std::max<int64_t>(1, std::min<int64_t>(16, strips * pass_count / (4 * sms)));
        passes = std::max<int64_t>(passes, (pass_count + 65534) / 65535);  // gridDim.y limit
        const int64_t rows_per_block = passes * P;
        // Shared memory: kc ranks of the R strip plus kc×P of L, at most 96 KiB (two blocks an SM on sm_90) and
        // never more than the device allows a block.
        const int64_t per_k = int64_t(SW + P) * sizeof(acc_t);
        const int64_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
        const int64_t cap = std::min<int64_t>(96 * 1024, optin);
        const int kc = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(r, cap / per_k)));
        const size_t smem = static_cast<size_t>(kc * per_k);
        if (smem > 48 * 1024) allow_tiled_smem<scalar_t, acc_t>(weight.get_device(), cap);
        const dim3 grid(static_cast<unsigned>(strips),
                        static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block));
        merge_tiled_kernel<scalar_t, acc_t><<<grid, kMergeThreads, smem, stream>>>(
            C.mutable_data_ptr<scalar_t>(), C.stride(0), L.const_data_ptr<acc_t>(), R.const_data_ptr<acc_t>(),
            rows, cols, r, kc, rows_per_block, vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        launched = true;
        return;
      }
      if ((rows + kMergeRows - 1) / kMergeRows > 65535) return;  // gridDim.y limit: the caller's ATen path
      // Vector loads need every row of C and of R to start on a V-element boundary.
      const bool vec = C.stride(0) % V == 0 && cols % V == 0 && aligned(C.const_data_ptr(), 16) &&
                       aligned(R.const_data_ptr(), sizeof(acc_t) * V);
      const int64_t cols_per_block = int64_t(kMergeThreads) * V;
      const dim3 grid(static_cast<unsigned>((cols + cols_per_block - 1) / cols_per_block),
                      static_cast<unsigned>((rows + kMergeRows - 1) / kMergeRows));
      merge_kernel<scalar_t, acc_t><<<grid, kMergeThreads, 0, stream>>>(
          C.mutable_data_ptr<scalar_t>(), C.stride(0), L.const_data_ptr<acc_t>(), R.const_data_ptr<acc_t>(), rows,
          cols, r, vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    });
  });
  return launched;
}

bool small_n_forward_cuda(SmallNParams& p) {
  const int64_t n_rows = p.x_d.size(0), r = p.A.size(0), in = p.A.size(1), out = p.B.size(0);
  if (!small_n_fits(n_rows, r, in, out, p.A.scalar_type(), p.x_d.scalar_type())) return false;
  const size_t smem = static_cast<size_t>(n_rows * r) * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  // Every tensor below is allocated on `stream` before the fork, and the side stream's work is joined back into
  // `stream` before this function returns, so the caching allocator's per-stream reuse stays safe.
  Tensor v = at::empty({n_rows, r}, p.A.options());
  {
    using opmath_t = float;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x_d.scalar_type(), "delora_small_n_cuda_x", [&] {
      auto launch_u = [&](cudaStream_t st) {
        small_u_kernel<opmath_t, scalar_t><<<r, kRowThreads, 0, st>>>(
            p.x_d.const_data_ptr<scalar_t>(), p.A.const_data_ptr<opmath_t>(), p.B.const_data_ptr<opmath_t>(),
            p.lam.const_data_ptr<opmath_t>(), p.w.const_data_ptr<opmath_t>(), v.mutable_data_ptr<opmath_t>(),
            p.u.mutable_data_ptr<scalar_t>(), p.s.mutable_data_ptr<opmath_t>(), p.a_raw.mutable_data_ptr<opmath_t>(),
            p.b_raw.mutable_data_ptr<opmath_t>(), static_cast<int>(n_rows), r, in, out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (p.overlap) {
        // fork: the side stream starts after everything already on `stream` (x_d, the adapter tensors);
        // join: `stream` waits for the u launch before the update reads v.
        c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, p.x_d.device().index());
        at::cuda::CUDAEvent forked, joined;
        forked.record(stream);
        forked.block(side);
        launch_u(side.stream());
        try {
          p.y = p.base();  // on `stream`, concurrent with the u launch
        } catch (...) {
          // Join before the tensors the u launch writes can be freed and reused on `stream`.
          joined.record(side);
          joined.block(stream);
          throw;
        }
        joined.record(side);
        joined.block(stream);
      } else {
        p.y = p.base();
        launch_u(stream.stream());
      }
      const Tensor& y = p.y;
      TORCH_CHECK(
          y.is_contiguous() && y.size(0) == n_rows && y.size(1) == out && y.scalar_type() == p.x_d.scalar_type(),
          "delora_ext: small-N forward: the base output must be a contiguous (N, out) tensor in x's dtype");
      const unsigned blocks = static_cast<unsigned>((out + kSmallUpdateThreads - 1) / kSmallUpdateThreads);
      small_update_kernel<opmath_t, scalar_t><<<blocks, kSmallUpdateThreads, smem, stream>>>(
          y.mutable_data_ptr<scalar_t>(), v.const_data_ptr<opmath_t>(), p.B.const_data_ptr<opmath_t>(),
          static_cast<int>(n_rows), r, out, p.accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return true;
}

void dropout_cuda(const Tensor& src, Tensor& dst, const Tensor& seed, double p) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "delora_ext: dropout needs contiguous tensors");
  const int64_t n = src.numel();
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "delora_dropout_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), seed.const_data_ptr<int64_t>(),
        dropout_threshold(p), opmath_t(1.0 / (1.0 - p)), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

DeviceKernels cuda_kernels() {
  return {.prep = &prep_cuda,
          .finalize = &finalize_cuda,
          .dropout = &dropout_cuda,
          .merge = &merge_cuda,
          .small_n_forward = &small_n_forward_cuda};
}

}  // namespace delora_ext
