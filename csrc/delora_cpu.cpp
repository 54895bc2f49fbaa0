// CPU kernels for the DeLoRA-specific passes: the CPU kernel table (kernels.h).
//
// Work split: prep and finalize parallelise over the r rank directions for the r×in parts and over blocks
// of output rows for the out×r parts; every reduction accumulates in opmath (float or double) in a fixed
// order, so results are bit-identical run to run whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "cpu_clones.h"
#include "delora_math.h"
#include "kernels.h"

namespace delora_ext {
namespace {

// Grain sizes for at::parallel_for: enough work per task to amortise the thread hand-off.
constexpr int64_t kRowGrain = 1;
constexpr int64_t kElemGrain = 1 << 14;

// Column sums over B (out×r, row-major) of f(o, k), in opmath, fixed order: per-block partials combined
// in block order.
template <typename T, typename F>
void column_sums(int64_t out, int64_t r, F&& f, T* result) {
  constexpr int64_t kBlock = 1024;
  const int64_t nblocks = (out + kBlock - 1) / kBlock;
  std::vector<T> partial(static_cast<size_t>(std::max<int64_t>(nblocks, 1) * r), T(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      T* acc = partial.data() + blk * r;
      const int64_t o_end = std::min(out, (blk + 1) * kBlock);
      for (int64_t o = blk * kBlock; o < o_end; ++o)
        for (int64_t k = 0; k < r; ++k) acc[k] += f(o, k);
    }
  });
  for (int64_t k = 0; k < r; ++k) result[k] = T(0);
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int64_t k = 0; k < r; ++k) result[k] += partial[blk * r + k];
}

void prep_cpu(const PrepParams& p) {
  const int64_t r = p.A.size(0), in = p.A.size(1), out = p.B.size(0);
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "delora_prep_cpu", [&] {
    using opmath_t = scalar_t;
    const opmath_t* pA = p.A.const_data_ptr<opmath_t>();
    const opmath_t* pB = p.B.const_data_ptr<opmath_t>();
    const opmath_t* pw = p.w.const_data_ptr<opmath_t>();
    const opmath_t lam_v = p.lam.const_data_ptr<opmath_t>()[0];
    opmath_t* pAf = data_or_null<opmath_t>(p.Af);
    opmath_t* psa = data_or_null<opmath_t>(p.sa);
    opmath_t* ps = p.s.mutable_data_ptr<opmath_t>();
    opmath_t* pa = p.a_raw.mutable_data_ptr<opmath_t>();
    opmath_t* pb = p.b_raw.mutable_data_ptr<opmath_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.gemm_dtype(), "delora_prep_cpu_gemm", [&] {
      scalar_t* pAd = data_or_null<scalar_t>(p.Ad);
      scalar_t* pBd = data_or_null<scalar_t>(p.Bd);

      // Sums of squares in double whatever the opmath: a sequential fp32 sum over in = 16384 terms is off by
      // ~3e-6 relative, double makes the norm correctly rounded for any realistic size, at r·(in+out) cost.
      std::vector<double> bsq(static_cast<size_t>(r));
      column_sums<double>(out, r, [&](int64_t o_, int64_t k) { return double(pB[o_ * r + k]) * pB[o_ * r + k]; },
                          bsq.data());
      std::vector<opmath_t> bcoef(static_cast<size_t>(r));
      at::parallel_for(0, r, kRowGrain, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const opmath_t* row = pA + k * in;
          double sq = 0;
          for (int64_t j = 0; j < in; ++j) sq += double(row[j]) * row[j];
          pa[k] = static_cast<opmath_t>(std::sqrt(sq));
          pb[k] = static_cast<opmath_t>(std::sqrt(bsq[k]));
          ps[k] = scale_of<opmath_t>(lam_v, pa[k], pb[k], r);
          const opmath_t sa = a_side_factor<opmath_t>(p.mode, lam_v, pa[k], r);
          if (psa) psa[k] = sa;
          bcoef[k] = b_side_factor<opmath_t>(p.mode, lam_v, pb[k], ps[k], opmath_t(p.bd_alpha), r);
          if (pAf)
            for (int64_t j = 0; j < in; ++j) pAf[k * in + j] = row[j] * pw[j];
          if (pAd) {
            scalar_t* drow = pAd + k * in;
            if (ad_scaled(p.mode)) {
              for (int64_t j = 0; j < in; ++j) drow[j] = static_cast<scalar_t>(row[j] * pw[j] * sa);
            } else {
              for (int64_t j = 0; j < in; ++j) drow[j] = static_cast<scalar_t>(row[j] * pw[j]);
            }
          }
        }
      });
      if (pBd) {
        at::parallel_for(0, out, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(r, 1)), [&](int64_t o0, int64_t o1) {
          for (int64_t o_ = o0; o_ < o1; ++o_)
            for (int64_t k = 0; k < r; ++k) pBd[o_ * r + k] = static_cast<scalar_t>(pB[o_ * r + k] * bcoef[k]);
        });
      }
    });
  });
}

void finalize_cpu(const FinalizeParams& p) {
  const int64_t r = p.A.size(0), in = p.A.size(1), out = p.B.size(0);
  AT_DISPATCH_FLOATING_TYPES(p.A.scalar_type(), "delora_finalize_cpu", [&] {
    using opmath_t = scalar_t;
    const opmath_t* pA = p.A.const_data_ptr<opmath_t>();
    const opmath_t* pB = p.B.const_data_ptr<opmath_t>();
    const opmath_t* pw = p.w.const_data_ptr<opmath_t>();
    const opmath_t* ps = p.s.const_data_ptr<opmath_t>();
    const opmath_t* pa = p.a_raw.const_data_ptr<opmath_t>();
    const opmath_t* pb = p.b_raw.const_data_ptr<opmath_t>();
    const opmath_t* pq = const_data_or_null<opmath_t>(p.qscale);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.M.scalar_type(), "delora_finalize_cpu_in", [&] {
      const scalar_t* pM = p.M.const_data_ptr<scalar_t>();
      std::vector<opmath_t> gs(static_cast<size_t>(r));
      column_sums<opmath_t>(
          out, r, [&](int64_t o, int64_t k) { return opmath_t(pM[o * r + k]) * pB[o * r + k]; }, gs.data());

      if (p.dlam.defined()) {
        opmath_t acc = 0;
        for (int64_t k = 0; k < r; ++k)
          acc += gs[k] / (opmath_t(r) * clamp_norm(pa[k]) * clamp_norm(pb[k]));
        p.dlam.mutable_data_ptr<opmath_t>()[0] = acc;
      }
      if (p.dB.defined()) {
        std::vector<opmath_t> coef(static_cast<size_t>(r));
        for (int64_t k = 0; k < r; ++k) coef[k] = norm_grad_coef(gs[k], ps[k], pb[k]);
        opmath_t* pdB = p.dB.mutable_data_ptr<opmath_t>();
        at::parallel_for(0, out, std::max<int64_t>(1, kElemGrain / r), [&](int64_t o0, int64_t o1) {
          for (int64_t o = o0; o < o1; ++o)
            for (int64_t k = 0; k < r; ++k)
              pdB[o * r + k] = opmath_t(pM[o * r + k]) * ps[k] + coef[k] * pB[o * r + k];
        });
      }
      if (p.dA.defined()) {
        const scalar_t* pQ = p.Q.const_data_ptr<scalar_t>();
        opmath_t* pdA = p.dA.mutable_data_ptr<opmath_t>();
        at::parallel_for(0, r, kRowGrain, [&](int64_t k0, int64_t k1) {
          for (int64_t k = k0; k < k1; ++k) {
            const opmath_t c = norm_grad_coef(gs[k], ps[k], pa[k]);
            if (pq) {
              const opmath_t qk = pq[k];
              for (int64_t j = 0; j < in; ++j)
                pdA[k * in + j] = qk * opmath_t(pQ[k * in + j]) * pw[j] + c * pA[k * in + j];
            } else {
              for (int64_t j = 0; j < in; ++j) pdA[k * in + j] = opmath_t(pQ[k * in + j]) * pw[j] + c * pA[k * in + j];
            }
          }
        });
      }
    });
  });
}

void dropout_cpu(const Tensor& src, Tensor& dst, const Tensor& seed, double p) {
  TORCH_CHECK(src.is_contiguous() && dst.is_contiguous(), "delora_ext: dropout needs contiguous tensors");
  const uint64_t seed_v = static_cast<uint64_t>(seed.cpu().item<int64_t>());
  const uint32_t threshold = dropout_threshold(p);
  const int64_t n = src.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "delora_dropout_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t scale = opmath_t(1.0 / (1.0 - p));
    const scalar_t* ps = src.const_data_ptr<scalar_t>();
    scalar_t* pd = dst.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kElemGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        pd[i] = dropout_keep(seed_v, static_cast<uint64_t>(i), threshold)
                    ? scalar_t(opmath_t(ps[i]) * scale)
                    : scalar_t(0);
    });
  });
}

// ---- the fused small-shape path (kernels.h: FusedFwdParams, FusedBwdParams) --------------------------------------
// Single-threaded (cpu_fused_fits keeps the work to a few thousand multiply-adds, below a thread hand-off), every
// sum in a fixed order. Dot products run in 8 independent lanes (vectorisable without reassociating a sum), lane
// totals added in lane order; outer products accumulate into a row and are added to the output once, as a GEMM
// with beta = 1 does.
//
// Each entry point is compiled for AVX2 and for the baseline (cpu_clones.h). The two give the same bits: the loops
// are elementwise or keep their lanes, and the AVX2 target brings no fused multiply-add (FMA is a target feature of
// its own), so no product is contracted into a sum differently.
#define DELORA_FUSED_CLONES DELORA_TARGET_CLONES("avx2", "default")

template <typename T>
DELORA_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t n) {
  T lane[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] += a[j + l] * b[j + l];
  for (int l = 0; j < n; ++j, ++l) lane[l] += a[j] * b[j];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

template <typename T>
DELORA_ALWAYS_INLINE void axpy(T a, const T* x, T* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// The raw norms and s (as prep: sums of squares in double, each in index order) and the folded rows Af = A⊙w
// (r×in), Bt = (B⊙s)ᵀ (r×out). The r sums advance together, one term each per step: the same order per sum as a
// loop over one sum at a time, without its chain of dependent additions.
template <typename T>
DELORA_ALWAYS_INLINE void fold_rows(const T* A, const T* B, const T* w, T lam, int64_t r, int64_t in, int64_t out,
                             T* a_raw, T* b_raw, T* s, T* Af, T* Bt) {
  std::vector<double> asq(static_cast<size_t>(r), 0.0), bsq(static_cast<size_t>(r), 0.0);
  for (int64_t j = 0; j < in; ++j)
    for (int64_t k = 0; k < r; ++k) asq[k] += double(A[k * in + j]) * A[k * in + j];
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k) bsq[k] += double(B[o * r + k]) * B[o * r + k];
  for (int64_t k = 0; k < r; ++k) {
    a_raw[k] = static_cast<T>(std::sqrt(asq[k]));
    b_raw[k] = static_cast<T>(std::sqrt(bsq[k]));
    s[k] = scale_of<T>(lam, a_raw[k], b_raw[k], r);
    for (int64_t j = 0; j < in; ++j) Af[k * in + j] = A[k * in + j] * w[j];
  }
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k) Bt[k * out + o] = B[o * r + k] * s[k];
}

// The fp32 or fp64 clone of a fused entry point, by the adapter's dtype.
template <class Params>
void by_opmath(const Params& p, void (*f32)(const Params&), void (*f64)(const Params&)) {
  switch (p.A.scalar_type()) {
    case at::kFloat:
      return f32(p);
    case at::kDouble:
      return f64(p);
    default:
      TORCH_CHECK(false, "delora_ext: the fused CPU pass takes fp32 or fp64 adapters, got ", p.A.scalar_type());
  }
}

template <typename T>
DELORA_ALWAYS_INLINE void fused_forward_body(const FusedFwdParams& p) {
  const int64_t N = p.x_d.size(0), r = p.A.size(0), in = p.A.size(1), out = p.B.size(0);
  std::unique_ptr<T[]> scratch(new T[r * in + r * out + out]);  // Af, Bt and a row accumulator, each written first
  T *Af = scratch.get(), *Bt = Af + r * in, *acc = Bt + r * out;
  fold_rows<T>(p.A.const_data_ptr<T>(), p.B.const_data_ptr<T>(), p.w.const_data_ptr<T>(),
               p.lam.const_data_ptr<T>()[0], r, in, out, p.a_raw.mutable_data_ptr<T>(),
               p.b_raw.mutable_data_ptr<T>(), p.s.mutable_data_ptr<T>(), Af, Bt);
  const T* x = p.x_d.const_data_ptr<T>();
  T* u = p.u.mutable_data_ptr<T>();
  T* y = p.y.mutable_data_ptr<T>();
  for (int64_t n = 0; n < N; ++n) {
    std::fill(acc, acc + out, T(0));
    for (int64_t k = 0; k < r; ++k) {
      u[n * r + k] = dot(x + n * in, Af + k * in, in);
      axpy(u[n * r + k], Bt + k * out, acc, out);
    }
    for (int64_t o = 0; o < out; ++o) y[n * out + o] += acc[o];
  }
}

DELORA_FUSED_CLONES void fused_forward_f32(const FusedFwdParams& p) { fused_forward_body<float>(p); }
DELORA_FUSED_CLONES void fused_forward_f64(const FusedFwdParams& p) { fused_forward_body<double>(p); }

void fused_forward_cpu(const FusedFwdParams& p) { by_opmath(p, fused_forward_f32, fused_forward_f64); }

template <typename T>
DELORA_ALWAYS_INLINE void fused_backward_body(const FusedBwdParams& p) {
  const int64_t N = p.g.size(0), r = p.A.size(0), in = p.A.size(1), out = p.B.size(0);
  const T *A = p.A.const_data_ptr<T>(), *B = p.B.const_data_ptr<T>(), *w = p.w.const_data_ptr<T>();
  const T *s = p.s.const_data_ptr<T>(), *a_raw = p.a_raw.const_data_ptr<T>(), *b_raw = p.b_raw.const_data_ptr<T>();
  const T *g = p.g.const_data_ptr<T>(), *u = p.u.const_data_ptr<T>();
  const bool want_x = p.dx.defined(), want_A = p.dA.defined(), want_B = p.dB.defined(), want_lam = p.dlam.defined();
  // One scratch block, every operand laid out so the inner loops run along out or in: Bᵀ and (B⊙s)ᵀ (r×out),
  // Mt = (gᵀu)ᵀ (r×out, zeroed where it is used), G = g (B⊙s) (N×r), gs (r), A⊙w (r×in) and a row accumulator (in).
  std::unique_ptr<T[]> scratch(new T[3 * r * out + N * r + r + r * in + in]);
  T *BT = scratch.get(), *Bst = BT + r * out, *Mt = Bst + r * out, *G = Mt + r * out, *gs = G + N * r,
    *Af = gs + r, *acc = Af + r * in;
  for (int64_t o = 0; o < out; ++o)
    for (int64_t k = 0; k < r; ++k) BT[k * out + o] = B[o * r + k];
  for (int64_t k = 0; k < r; ++k)
    for (int64_t o = 0; o < out; ++o) Bst[k * out + o] = BT[k * out + o] * s[k];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < r; ++k) G[n * r + k] = dot(g + n * out, Bst + k * out, out);
  if (want_x || want_A)
    for (int64_t k = 0; k < r; ++k)
      for (int64_t j = 0; j < in; ++j) Af[k * in + j] = A[k * in + j] * w[j];
  if (want_x) {
    T* dx = p.dx.mutable_data_ptr<T>();
    const uint32_t threshold = dropout_threshold(p.dropout_p);
    const T keep_scale = T(1.0 / (1.0 - p.dropout_p));
    for (int64_t n = 0; n < N; ++n) {
      std::fill(acc, acc + in, T(0));
      for (int64_t k = 0; k < r; ++k) axpy(G[n * r + k], Af + k * in, acc, in);
      if (p.dropout_p > 0.0) {
        for (int64_t j = 0; j < in; ++j) {
          const uint64_t idx = static_cast<uint64_t>(n * in + j);
          dx[n * in + j] += dropout_keep(p.seed, idx, threshold) ? acc[j] * keep_scale : T(0);
        }
      } else {
        for (int64_t j = 0; j < in; ++j) dx[n * in + j] += acc[j];
      }
    }
  }
  if (!(want_A || want_B || want_lam)) return;
  // Mt[k, :] = Σ_n u[n, k] g[n, :] (n in order) and gs_k = Σ_o M[o,k] B[o,k] (opmath, in dot's lanes)
  std::fill(Mt, Mt + r * out, T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < r; ++k) axpy(u[n * r + k], g + n * out, Mt + k * out, out);
  for (int64_t k = 0; k < r; ++k) gs[k] = dot(Mt + k * out, BT + k * out, out);
  if (want_lam) {
    T total = 0;
    for (int64_t k = 0; k < r; ++k) total += gs[k] / (T(r) * clamp_norm(a_raw[k]) * clamp_norm(b_raw[k]));
    p.dlam.mutable_data_ptr<T>()[0] = total;
  }
  if (want_B) {
    T* dB = p.dB.mutable_data_ptr<T>();
    for (int64_t k = 0; k < r; ++k) {
      const T c = norm_grad_coef(gs[k], s[k], b_raw[k]);
      for (int64_t o = 0; o < out; ++o) dB[o * r + k] = Mt[k * out + o] * s[k] + c * BT[k * out + o];
    }
  }
  if (want_A) {
    // dA = (Gᵀ x_d) ⊙ w + c_k A, the product accumulated in dA itself
    const T* x = p.x_d.const_data_ptr<T>();
    T* dA = p.dA.mutable_data_ptr<T>();
    std::fill(dA, dA + r * in, T(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < r; ++k) axpy(G[n * r + k], x + n * in, dA + k * in, in);
    for (int64_t k = 0; k < r; ++k) {
      const T c = norm_grad_coef(gs[k], s[k], a_raw[k]);
      for (int64_t j = 0; j < in; ++j) dA[k * in + j] = dA[k * in + j] * w[j] + c * A[k * in + j];
    }
  }
}

DELORA_FUSED_CLONES void fused_backward_f32(const FusedBwdParams& p) { fused_backward_body<float>(p); }
DELORA_FUSED_CLONES void fused_backward_f64(const FusedBwdParams& p) { fused_backward_body<double>(p); }

void fused_backward_cpu(const FusedBwdParams& p) { by_opmath(p, fused_backward_f32, fused_backward_f64); }

}  // namespace

// No merge kernel (merges go through ATen's addmm) and no small-N forward; the fused small-shape passes.
DeviceKernels cpu_kernels() {
  return {.prep = &prep_cpu,
          .finalize = &finalize_cpu,
          .dropout = &dropout_cpu,
          .fused_forward = &fused_forward_cpu,
          .fused_backward = &fused_backward_cpu};
}

}  // namespace delora_ext
