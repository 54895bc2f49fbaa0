// The segmented mixed-batch op: host entry point (argument checks) and the CPU kernel.
//
// y (N×out) += for each row n with k = rows_adapter[n] ≥ 0: ((x[n] · A_kᵀ) ⊙ sa_k) · Bt_k, accumulated in the
// opmath type (float; double for fp64) and rounded once into y. One call covers every adapter of the batch: no
// per-adapter GEMM calls, no gathered copy of x, no scatter of the products.
//
// CPU work split: rows are ordered by adapter (a counting sort of rows_adapter, on the host) and cut into tiles of
// up to kTileRows rows of one adapter, so each load of a factor row serves every row of the tile; tiles run in
// parallel. A row's arithmetic is the same whatever tile it is in and whichever thread runs it (its own
// accumulators, a fixed summation order), so results are bit-identical run to run and for any thread count.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <vector>

#include "cpu_clones.h"
#include "segmented.h"

namespace delora_ext {

using Tensor = at::Tensor;

namespace {

constexpr const char* kOp = "segmented_adapter_";

at::ScalarType opmath_for(at::ScalarType x_dtype) { return x_dtype == at::kDouble ? at::kDouble : at::kFloat; }

// ---- CPU kernel ----------------------------------------------------------------------------------------------
constexpr int kTileRows = 4;
// Multiply-adds per parallel task at least (below it the thread hand-off costs more than the work).
constexpr int64_t kTaskWork = int64_t(1) << 16;

// u[t, j] = Σ_i x_t[i] A[j, i] (⊙ sa[j]) for the NR rows x_t of a tile. Each dot runs in L lanes (two 512-bit
// vectors' worth) folded in halves, then the tail: the order is fixed at compile time.
template <typename T, int NR>
DELORA_ALWAYS_INLINE void tile_u(const T* const* xr, const T* A, const T* sa, int64_t r, int64_t in, T* u) {
  constexpr int L = 128 / sizeof(T);
  for (int64_t j = 0; j < r; ++j) {
    const T* a = A + j * in;
    T acc[NR][L] = {};
    int64_t i = 0;
    for (; i + L <= in; i += L)
      for (int t = 0; t < NR; ++t)
        for (int l = 0; l < L; ++l) acc[t][l] += xr[t][i + l] * a[i + l];
    for (int t = 0; t < NR; ++t) {
      // lanes folded in halves (a fixed tree, vectorised), then the tail in order
      for (int w = L / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) acc[t][l] += acc[t][l + w];
      T s = acc[t][0];
      for (int64_t ii = i; ii < in; ++ii) s += xr[t][ii] * a[ii];
      u[t * r + j] = sa != nullptr ? s * sa[j] : s;
    }
  }
}

// dst_t[o] += Σ_j u[t, j] Bt[j, o] for the NR rows of a tile, C output columns at a time, j in order.
template <typename T, int NR>
DELORA_ALWAYS_INLINE void tile_y(const T* u, const T* Bt, int64_t r, int64_t out, T* const* dst) {
  constexpr int C = 128 / sizeof(T);
  int64_t o0 = 0;
  for (; o0 + C <= out; o0 += C) {
    T acc[NR][C] = {};
    for (int64_t j = 0; j < r; ++j) {
      const T* b = Bt + j * out + o0;
      for (int t = 0; t < NR; ++t) {
        const T uj = u[t * r + j];
        for (int c = 0; c < C; ++c) acc[t][c] += uj * b[c];
      }
    }
    for (int t = 0; t < NR; ++t)
      for (int c = 0; c < C; ++c) dst[t][o0 + c] += acc[t][c];
  }
  for (int64_t o = o0; o < out; ++o) {
    T acc[NR] = {};
    for (int64_t j = 0; j < r; ++j)
      for (int t = 0; t < NR; ++t) acc[t] += u[t * r + j] * Bt[j * out + o];
    for (int t = 0; t < NR; ++t) dst[t][o] += acc[t];
  }
}

template <typename T, int NR>
DELORA_ALWAYS_INLINE void tile(const T* const* xr, T* const* dst, const T* A, const T* Bt, const T* sa, int64_t r,
                            int64_t in, int64_t out, T* u) {
  tile_u<T, NR>(xr, A, sa, r, in, u);
  tile_y<T, NR>(u, Bt, r, out, dst);
}

// One tile of nr (1..kTileRows) rows. On x86-64 (GCC, clang) compiled for AVX-512, AVX2+FMA and the baseline,
// picked once at load time for the machine (an ifunc): the same machine always runs the same code.
#define DELORA_SEG_CLONES DELORA_TARGET_CLONES("arch=x86-64-v4", "arch=x86-64-v3", "default")

#define DELORA_SEG_TILE_FN(NAME, T)                                                                               \
  DELORA_SEG_CLONES void NAME(const T* const* xr, T* const* dst, int nr, const T* A, const T* Bt, const T* sa,    \
                              int64_t r, int64_t in, int64_t out, T* u) {                                         \
    switch (nr) {                                                                                                 \
      case 1:                                                                                                     \
        tile<T, 1>(xr, dst, A, Bt, sa, r, in, out, u);                                                            \
        break;                                                                                                    \
      case 2:                                                                                                     \
        tile<T, 2>(xr, dst, A, Bt, sa, r, in, out, u);                                                            \
        break;                                                                                                    \
      case 3:                                                                                                     \
        tile<T, 3>(xr, dst, A, Bt, sa, r, in, out, u);                                                            \
        break;                                                                                                    \
      default:                                                                                                    \
        tile<T, 4>(xr, dst, A, Bt, sa, r, in, out, u);                                                            \
    }                                                                                                             \
  }
DELORA_SEG_TILE_FN(tile_float, float)
DELORA_SEG_TILE_FN(tile_double, double)

void run_tile(const float* const* xr, float* const* dst, int nr, const float* A, const float* Bt, const float* sa,
              int64_t r, int64_t in, int64_t out, float* u) {
  tile_float(xr, dst, nr, A, Bt, sa, r, in, out, u);
}
void run_tile(const double* const* xr, double* const* dst, int nr, const double* A, const double* Bt,
              const double* sa, int64_t r, int64_t in, int64_t out, double* u) {
  tile_double(xr, dst, nr, A, Bt, sa, r, in, out, u);
}

struct Tile {
  int64_t k, first, rows;  // adapter, offset into the adapter-ordered row list, row count
};

}  // namespace

void segmented_cpu(const SegmentedParams& p) {
  const int64_t N = p.x.size(0), in = p.x.size(1), out = p.y.size(1), K = static_cast<int64_t>(p.A.size());
  const int64_t* idx = p.rows.const_data_ptr<int64_t>();
  // Rows ordered by adapter (stable), range-checked before anything is written.
  std::vector<int64_t> start(static_cast<size_t>(K + 1), 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = idx[n];
    TORCH_CHECK(k >= -1 && k < K, "delora_ext::", kOp, ": `rows_adapter` must hold adapter indices in [-1, ", K,
                ") (-1: no adapter), got ", k, " at row ", n);
    if (k >= 0) ++start[k + 1];
  }
  for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k];
  std::vector<int64_t> order(static_cast<size_t>(start[K]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n)
      if (idx[n] >= 0) order[fill[idx[n]]++] = n;
  }
  std::vector<Tile> tiles;
  int64_t work = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t f = start[k]; f < start[k + 1]; f += kTileRows)
      tiles.push_back({k, f, std::min<int64_t>(kTileRows, start[k + 1] - f)});
    work += (start[k + 1] - start[k]) * p.A[k].size(0) * (in + out);
  }
  if (tiles.empty()) return;
  const int64_t per_tile = std::max<int64_t>(1, work / static_cast<int64_t>(tiles.size()));
  const int64_t grain = std::max<int64_t>(1, kTaskWork / per_tile);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.x.scalar_type(), "delora_segmented_cpu", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr bool kWide = std::is_same_v<scalar_t, opmath_t>;  // x and y are read and written in place
    const scalar_t* px = p.x.const_data_ptr<scalar_t>();
    scalar_t* py = p.y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t t0, int64_t t1) {
      std::vector<opmath_t> u(static_cast<size_t>(kTileRows * p.r_max));
      // bf16/fp16: the tile's rows of x widened, and y's rows widened, updated and rounded once
      std::vector<opmath_t> xw(kWide ? 0 : static_cast<size_t>(kTileRows * in));
      std::vector<opmath_t> yw(kWide ? 0 : static_cast<size_t>(kTileRows * out));
      const opmath_t* xr[kTileRows];
      opmath_t* dst[kTileRows];
      for (int64_t ti = t0; ti < t1; ++ti) {
        const Tile& tl = tiles[static_cast<size_t>(ti)];
        const int nr = static_cast<int>(tl.rows);
        for (int t = 0; t < nr; ++t) {
          const int64_t n = order[static_cast<size_t>(tl.first + t)];
          if constexpr (kWide) {
            xr[t] = reinterpret_cast<const opmath_t*>(px + n * in);
            dst[t] = reinterpret_cast<opmath_t*>(py + n * out);
          } else {
            opmath_t* xt = xw.data() + t * in;
            opmath_t* yt = yw.data() + t * out;
            for (int64_t i = 0; i < in; ++i) xt[i] = static_cast<opmath_t>(px[n * in + i]);
            for (int64_t o = 0; o < out; ++o) yt[o] = static_cast<opmath_t>(py[n * out + o]);
            xr[t] = xt;
            dst[t] = yt;
          }
        }
        const auto k = static_cast<size_t>(tl.k);
        const Tensor& sa = p.sa[k];
        run_tile(xr, dst, nr, p.A[k].const_data_ptr<opmath_t>(), p.Bt[k].const_data_ptr<opmath_t>(),
                 sa.defined() ? sa.const_data_ptr<opmath_t>() : nullptr, p.A[k].size(0), in, out, u.data());
        if constexpr (!kWide) {
          for (int t = 0; t < nr; ++t) {
            const int64_t n = order[static_cast<size_t>(tl.first + t)];
            for (int64_t o = 0; o < out; ++o) py[n * out + o] = static_cast<scalar_t>(dst[t][o]);
          }
        }
      }
    });
  });
}

// ---- entry point -----------------------------------------------------------------------------------------------
void segmented_adapter_(Tensor& y, const Tensor& x, const Tensor& rows_adapter, at::TensorList A, at::TensorList Bt,
                        const c10::List<std::optional<Tensor>>& sa) {
  TORCH_CHECK(x.is_floating_point(), "delora_ext::", kOp, ": `x` must be a floating-point tensor, got dtype ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "delora_ext::", kOp, ": `x` must be 2-D (N, in_features), got shape ", x.sizes());
  const int64_t N = x.size(0), in = x.size(1);
  const auto om = opmath_for(x.scalar_type());
  const int64_t K = static_cast<int64_t>(A.size());
  TORCH_CHECK(K >= 1, "delora_ext::", kOp, ": `A` must hold at least one adapter, got an empty list");
  TORCH_CHECK(static_cast<int64_t>(Bt.size()) == K && static_cast<int64_t>(sa.size()) == K, "delora_ext::", kOp,
              ": `A`, `Bt` and `sa` must have the same length, got ", K, ", ", Bt.size(), ", ", sa.size());
  TORCH_CHECK(y.dim() == 2, "delora_ext::", kOp, ": `y` must be 2-D (N, out_features), got shape ", y.sizes());
  const int64_t out = y.size(1);
  TORCH_CHECK(y.size(0) == N, "delora_ext::", kOp, ": `y` must have as many rows as `x` (", N, "), got shape ",
              y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "delora_ext::", kOp, ": `y` has dtype ", y.scalar_type(),
              " but `x` has dtype ", x.scalar_type(), " (they must match)");
  TORCH_CHECK(y.is_contiguous(), "delora_ext::", kOp, ": `y` must be contiguous (it is updated in place), got strides ",
              y.strides());
  TORCH_CHECK(y.device() == x.device(), "delora_ext::", kOp, ": `y` is on ", y.device(), " but `x` is on ",
              x.device());
  TORCH_CHECK(rows_adapter.scalar_type() == at::kLong && rows_adapter.dim() == 1 && rows_adapter.size(0) == N,
              "delora_ext::", kOp, ": `rows_adapter` must be an int64 tensor of shape (", N,
              ",) (one adapter index per row of `x`), got dtype ", rows_adapter.scalar_type(), " and shape ",
              rows_adapter.sizes());
  TORCH_CHECK(rows_adapter.device() == x.device(), "delora_ext::", kOp, ": `rows_adapter` is on ",
              rows_adapter.device(), " but `x` is on ", x.device());
  // y (contiguous, checked above) is written row by row while everything else is read: it may share memory with
  // none of them. get_overlap_status answers TooHard for any operand that is not dense (a strided view) before it
  // looks at storages: such an operand is apart from y unless the two share a storage.
  auto check_apart = [&](const Tensor& t, const char* name, int64_t k) {
    const at::MemOverlapStatus status = at::get_overlap_status(y, t);
    const bool apart = status == at::MemOverlapStatus::No ||
                       (status == at::MemOverlapStatus::TooHard && !y.storage().is_alias_of(t.storage()));
    TORCH_CHECK(apart, "delora_ext::", kOp, ": `y` shares memory with `", name,
                k >= 0 ? "[" + std::to_string(k) + "]" : std::string(), "`; the update needs an output of its own");
  };
  check_apart(x, "x", -1);
  check_apart(rows_adapter, "rows_adapter", -1);
  SegmentedParams p;
  for (int64_t k = 0; k < K; ++k) {
    const Tensor& a = A[k];
    const Tensor& b = Bt[k];
    TORCH_CHECK(a.scalar_type() == om, "delora_ext::", kOp, ": `A[", k, "]` must have dtype ", om,
                " (the opmath dtype of x's ", x.scalar_type(), "), got ", a.scalar_type());
    TORCH_CHECK(a.dim() == 2 && a.size(0) >= 1 && a.size(1) == in, "delora_ext::", kOp, ": `A[", k,
                "]` must be 2-D (r, in_features) with r > 0 and in_features = ", in, ", got shape ", a.sizes());
    const int64_t r = a.size(0);
    TORCH_CHECK(b.scalar_type() == om, "delora_ext::", kOp, ": `Bt[", k, "]` must have dtype ", om, ", got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 2 && b.size(0) == r && b.size(1) == out, "delora_ext::", kOp, ": `Bt[", k,
                "]` must have shape (", r, ", ", out, ") (r of A[", k, "], out_features of y), got ", b.sizes());
    TORCH_CHECK(a.device() == x.device(), "delora_ext::", kOp, ": `A[", k, "]` is on ", a.device(), " but `x` is on ",
                x.device());
    TORCH_CHECK(b.device() == x.device(), "delora_ext::", kOp, ": `Bt[", k, "]` is on ", b.device(),
                " but `x` is on ", x.device());
    check_apart(a, "A", k);
    check_apart(b, "Bt", k);
    const std::optional<Tensor> s = sa.get(k);
    if (s.has_value() && s->defined()) {
      TORCH_CHECK(s->scalar_type() == om && s->dim() == 1 && s->size(0) == r, "delora_ext::", kOp, ": `sa[", k,
                  "]` must be a ", om, " tensor of shape (", r, ",), got dtype ", s->scalar_type(), " and shape ",
                  s->sizes());
      TORCH_CHECK(s->device() == x.device(), "delora_ext::", kOp, ": `sa[", k, "]` is on ", s->device(),
                  " but `x` is on ", x.device());
      check_apart(*s, "sa", k);
      p.sa.push_back(s->contiguous());
    } else {
      p.sa.emplace_back();
    }
    p.A.push_back(a.contiguous());
    p.Bt.push_back(b.contiguous());
    p.r_max = std::max(p.r_max, r);
  }
  if (N == 0 || out == 0) return;
  c10::OptionalDeviceGuard guard(x.device());
  p.y = y;
  p.x = x.contiguous();
  p.rows = rows_adapter.contiguous();
  if (x.is_cpu()) {
    segmented_cpu(p);
    return;
  }
#ifdef DELORA_WITH_CUDA
  if (x.is_cuda()) {
    segmented_cuda(p);
    return;
  }
#endif
  TORCH_CHECK(false, "delora_ext::", kOp, ": no kernel for ", x.device(), " tensors in this build");
}

}  // namespace delora_ext
