// Per-element DeLoRA math shared by the CPU and CUDA kernels.
//
// Everything here is a pure function of scalars, compiled for host and device, so the CPU tests exercise
// exactly the arithmetic the CUDA kernels run. All of it works in the "opmath" type: float for
// fp32/bf16/fp16 inputs, double for fp64.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DELORA_HD __host__ __device__ __forceinline__
#else
#define DELORA_HD inline
#endif

namespace delora_ext {

// PEFT clamps every row norm of A and column norm of B from below at 1e-4.
constexpr double kNormEps = 1e-4;

template <typename T>
DELORA_HD T clamp_norm(T raw) {
  return raw < T(kNormEps) ? T(kNormEps) : raw;
}

// autograd through clamp_min(x, eps) passes the gradient where x >= eps (derivatives.yaml), so the norm
// term of dA/dB exists exactly there.
template <typename T>
DELORA_HD bool norm_is_live(T raw) {
  return raw >= T(kNormEps);
}

// s_k = λ / (r · max(a_k, eps) · max(b_k, eps)).  λ is read from memory (never a host scalar), may be 0
// or negative.
template <typename T>
DELORA_HD T scale_of(T lam, T a_raw, T b_raw, int64_t r) {
  return lam / (T(r) * clamp_norm(a_raw) * clamp_norm(b_raw));
}

// The fp16 path splits s_k into two factors, each bounded by the data it scales (see delora_ops.cpp). For
// |λ/r| ≥ 1 it puts λ/r on the side whose operand may be exactly 0 so that 0 stays 0 (never inf·0 = NaN):
//   forward   y  += (u ⊙ 1/â) · (B ⊙ λ/(r·b̂))ᵀ      u/â ≤ ‖x⊙w‖; B = 0 (PEFT's init) gives 0 for any finite λ
//   backward  dx += ((g·B) ⊙ 1/b̂) · (A⊙w ⊙ λ/(r·â))  (g·B)/b̂ ≤ ‖g‖; an all-zero A row gives 0 for any λ
// For |λ/r| < 1 it goes on the other side instead: there it only shrinks a bounded factor, while on B's (or A's)
// side it would push the fp16 operand into the subnormal range (λ = 1e-6 left B ⊙ λ/(r·b̂) with ~3 bits).
template <typename T>
DELORA_HD bool small_lambda(T lam, int64_t r) {
  return (lam < T(0) ? -lam : lam) < T(r);
}

// 1 / max(n, eps):
template <typename T>
DELORA_HD T inv_clamped(T raw) {
  return T(1) / clamp_norm(raw);
}

// λ / (r · max(n, eps)):
template <typename T>
DELORA_HD T lam_over_r_clamped(T lam, T raw, int64_t r) {
  return lam / (T(r) * clamp_norm(raw));
}

// What prep writes as the GEMM operands Ad (r×in), Bd (out×r) and the A-side factor sa (r), in the GEMM dtype:
enum class ScaleMode {
  kFull,           // Ad = A⊙w,           Bd = alpha·B⊙s,   sa = 1/â         fp32/fp64/bf16 GEMMs, merges, ΔW
  kSplitForward,   // Ad = A⊙w,           Bd = B⊙λ/(r·b̂),   sa = 1/â         fp16 forward: ((x Adᵀ) ⊙ sa) Bdᵀ
                   //   (|λ/r| < 1: Bd = B/b̂, sa = λ/(r·â); see small_lambda)
  kSplitBackward,  // Ad = A⊙w⊙λ/(r·â),   Bd = B,           sa = λ/(r·â)     fp16 backward
                   //   (|λ/r| < 1: Ad = A⊙w/â, sa = 1/â, and λ/r scales g·B instead)
};

// Whether sa_k scales row k of Ad.
DELORA_HD bool ad_scaled(ScaleMode mode) { return mode == ScaleMode::kSplitBackward; }

// sa_k, the A-side factor of the split scale (a: the raw norm).
template <typename T>
DELORA_HD T a_side_factor(ScaleMode mode, T lam, T a, int64_t r) {
  const bool lam_here = mode == ScaleMode::kSplitForward    ? small_lambda(lam, r)
                        : mode == ScaleMode::kSplitBackward ? !small_lambda(lam, r)
                                                            : false;
  return lam_here ? lam_over_r_clamped<T>(lam, a, r) : inv_clamped(a);
}

// The factor of column k of B in Bd (s_k the full scale, alpha a host scalar: merge's ±1 or a merge weight).
template <typename T>
DELORA_HD T b_side_factor(ScaleMode mode, T lam, T b, T s, T alpha, int64_t r) {
  return mode == ScaleMode::kSplitBackward  ? T(1)
         : mode == ScaleMode::kSplitForward ? (small_lambda(lam, r) ? inv_clamped(b) : lam_over_r_clamped<T>(lam, b, r))
                                            : s * alpha;
}

// ∂s_k/∂a_k · (1/a_k) = −s_k / a_k² where the clamp is not active, else 0. Multiplying this by
// gs_k·A[k, j] gives the norm term of dA (likewise for B with b_k).
template <typename T>
DELORA_HD T norm_grad_coef(T gs, T s, T raw) {
  return norm_is_live(raw) ? -gs * s / (raw * raw) : T(0);
}

// ---- Dropout mask, regenerated from (seed, element index) instead of stored ------------------------
// A counter-based hash (murmur3's 32-bit finaliser, keyed by the seed) so that forward and backward,
// CPU and CUDA, and the pure-PyTorch reference all produce the same mask for the same seed. The keep
// test compares the top 24 bits with p · 2^24.
DELORA_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

DELORA_HD uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 16777216.0);
}

DELORA_HD bool dropout_keep(uint64_t seed, uint64_t idx, uint32_t threshold) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed);
  const uint32_t seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t idx_lo = static_cast<uint32_t>(idx);
  const uint32_t idx_hi = static_cast<uint32_t>(idx >> 32);
  const uint32_t key = fmix32(seed_lo ^ fmix32(idx_hi ^ seed_hi));
  const uint32_t h = fmix32((idx_lo * 0x9e3779b1u) ^ key);
  return (h >> 8) >= threshold;
}

#if defined(__CUDACC__) || defined(__HIPCC__)
// The sum of v over the 32 lanes of a warp, in lane 0 (a fixed shuffle tree: the same bits on every run).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}
#endif

}  // namespace delora_ext
