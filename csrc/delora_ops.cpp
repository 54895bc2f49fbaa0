// Device-independent host entry points: argument checks, GEMMs through ATen, and calls into the device's kernel
// table (kernels.h) for the DeLoRA-specific passes. See registration.cpp for each op's math.
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>

#include "delora.h"
#include "delora_math.h"
#include "kernels.h"

namespace delora_ext {

Tuning& tuning() {
  static Tuning t;
  return t;
}

namespace {

// One table per device type, indexed by it; written at load time only (registration.cpp), so reads need no lock.
using KernelTables = std::array<DeviceKernels, static_cast<size_t>(c10::COMPILE_TIME_MAX_DEVICE_TYPES)>;

KernelTables& kernel_tables() {
  static KernelTables tables;
  return tables;
}

}  // namespace

void set_device_kernels(c10::DeviceType device, const DeviceKernels& kernels) {
  kernel_tables()[static_cast<size_t>(device)] = kernels;
}

bool has_device_kernels(c10::DeviceType device) { return kernel_tables()[static_cast<size_t>(device)].prep != nullptr; }

const DeviceKernels& device_kernels(c10::Device device) {
  TORCH_CHECK(has_device_kernels(device.type()), "delora_ext: this build has no kernels for ", device.type(),
              " tensors (the CUDA kernels are built when a CUDA toolkit is found, see README: Build)");
  return kernel_tables()[static_cast<size_t>(device.type())];
}

namespace {

at::ScalarType opmath_of(const Tensor& A) {
  return A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_floating_point(), "delora_ext::", op, ": `", name,
              "` must be a floating-point tensor, got dtype ", t.scalar_type());
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "delora_ext::", op, ": `", name, "` is on ", t.device(),
              " but the other tensors are on ", ref.device());
}

struct Dims {
  int64_t r, in, out;
};

// A (r×in), B (out×r), lam (1,), w (in,), all floating point and on one device.
Dims check_adapter(const char* op, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w) {
  check_float(op, "A", A);
  check_float(op, "B", B);
  check_float(op, "lam", lam);
  check_float(op, "w", w);
  TORCH_CHECK(A.dim() == 2, "delora_ext::", op, ": `A` must be 2-D (r, in_features), got shape ",
              A.sizes());
  const int64_t r = A.size(0), in = A.size(1);
  TORCH_CHECK(r > 0, "delora_ext::", op, ": `A` must have r > 0 rows, got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(1) == r, "delora_ext::", op,
              ": `B` must be 2-D (out_features, r) with r = ", r, ", got shape ", B.sizes());
  TORCH_CHECK(lam.numel() == 1, "delora_ext::", op, ": `lam` must hold exactly one element, got shape ",
              lam.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == in, "delora_ext::", op, ": `w` must have shape (", in,
              ",) (in_features, the columns of `A`, whose shape is ", A.sizes(), "), got ", w.sizes());
  check_same_device(op, "B", B, A);
  check_same_device(op, "lam", lam, A);
  check_same_device(op, "w", w, A);
  return {r, in, B.size(0)};
}

void check_input(const char* op, const Tensor& x, const Tensor& A, const Dims& d) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "delora_ext::", op,
              ": `x` must have dtype float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d.in, "delora_ext::", op,
              ": `x` must have last dimension in_features = ", d.in, " (the columns of `A`, whose shape is ",
              A.sizes(), "), got shape ", x.sizes());
  check_same_device(op, "x", x, A);
}

// The base weight (out×in), both sizes read off the adapter: out from B's rows, in from A's columns.
void check_weight_shape(const char* op, const Tensor& weight, const Dims& d, const Tensor& A, const Tensor& B) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == d.out && weight.size(1) == d.in, "delora_ext::", op,
              ": `weight` must have shape (", d.out, ", ", d.in, ") (the rows of `B`, shape ", B.sizes(),
              ", and the columns of `A`, shape ", A.sizes(), "), got ", weight.sizes());
}

void check_dropout(const char* op, double p, const std::optional<Tensor>& seed, const Tensor& x) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "delora_ext::", op, ": `dropout_p` must be in [0, 1), got ", p);
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined(), "delora_ext::", op,
                ": `seed` is required when dropout_p > 0");
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, "delora_ext::", op,
                ": `seed` must be an int64 tensor with one element, got dtype ", seed->scalar_type(),
                " and shape ", seed->sizes());
    check_same_device(op, "seed", *seed, x);
  }
}

// Adapter-sized operands in opmath, contiguous (no copy when they already are, the usual case).
struct Folded {
  Tensor A, B, lam, w;  // opmath copies/views of the parameters
  Tensor Af, s, a, b;   // A⊙w (opmath), scale, raw norms
  Tensor Bs;            // alpha·(B⊙s) in opmath (fold(..., with_bs = true) only)
};

// t in dtype `dt`, contiguous: t itself when it already is (checked here, not by a dispatcher call per operand).
Tensor as_dense(const Tensor& t, at::ScalarType dt) {
  return t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous();
}

Folded opmath_params(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w) {
  const auto opmath = opmath_of(A);
  Folded f;
  f.A = as_dense(A, opmath);
  f.B = as_dense(B, opmath);
  f.lam = as_dense(lam.dim() == 1 ? lam : lam.reshape({1}), opmath);
  f.w = as_dense(w, opmath);
  return f;
}

// prep's arguments for f with the required outputs (s and the raw norms) allocated.
PrepParams prep_params(const Folded& f) {
  const int64_t r = f.A.size(0);
  return {.A = f.A,
          .B = f.B,
          .lam = f.lam,
          .w = f.w,
          .s = at::empty({r}, f.A.options()),
          .a_raw = at::empty({r}, f.A.options()),
          .b_raw = at::empty({r}, f.A.options())};
}

// Opmath A⊙w, s and the norms (the prep op); with `with_bs`, also Bs = alpha·(B⊙s) in opmath from the same
// launch (merges and ΔW).
Folded fold(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, bool with_bs = false,
            double alpha = 1.0) {
  Folded f = opmath_params(A, B, lam, w);
  PrepParams p = prep_params(f);
  p.Af = at::empty_like(f.A);
  if (with_bs) {
    p.Bd = at::empty_like(f.B);
    p.bd_alpha = alpha;
  }
  device_kernels(f.A.device()).prep(p);
  f.Af = p.Af;
  f.s = p.s;
  f.a = p.a_raw;
  f.b = p.b_raw;
  f.Bs = p.Bd;
  return f;
}

// The GEMM operands in x's dtype, written by the one prep launch (no separate cast or scale kernels), in the
// full scale (fp32, fp64, bf16) or, for fp16, the split scale (ScaleMode):
//   forward    y += ((x_d Adᵀ) ⊙ sa) Bdᵀ
//   backward   dx += ((g Bd) ⊙ 1/b̂) Ad, Q = (g Bd)ᵀ x_d
//     (g·B unnormalised keeps Q = (gB)ᵀx_d as small as B is: with g·(B/b̂), Q overflowed fp16 where dA is finite)
// The split keeps every fp16 factor bounded by the data it scales (see low_rank below); bf16 has fp32's
// range, so B⊙s cannot overflow there and bf16 takes the full scale (no N×r scaling pass).
struct GemmOperands {
  Tensor Ad, Bd, s, a, b, sa;
  bool split = false;
};

bool split_scale_dtype(at::ScalarType dt) { return dt == at::kHalf; }

GemmOperands gemm_operands(const Folded& f, at::ScalarType dt, bool backward) {
  PrepParams p = prep_params(f);
  const bool split = split_scale_dtype(dt);
  p.Ad = at::empty(f.A.sizes(), f.A.options().dtype(dt));
  p.Bd = at::empty(f.B.sizes(), f.B.options().dtype(dt));
  p.mode = !split ? ScaleMode::kFull : backward ? ScaleMode::kSplitBackward : ScaleMode::kSplitForward;
  if (split) p.sa = at::empty({f.A.size(0)}, f.A.options());
  device_kernels(f.A.device()).prep(p);
  return {p.Ad, p.Bd, p.s, p.a_raw, p.b_raw, p.sa, split};
}

// N for x seen as (N, features): the product of the leading dimensions (1 for a 1-D x). From the shape, not
// numel / features, which divides by zero (SIGFPE) when features = 0.
int64_t leading_rows(const Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) n *= t.size(i);
  return n;
}

// x reshaped to (N, in), contiguous (GEMMs and the dropout pass want a dense row-major operand); a 2-D contiguous x
// as it is.
Tensor rows_of(const Tensor& x, int64_t in) {
  if (x.dim() == 2 && x.is_contiguous()) return x;
  return x.reshape({leading_rows(x), in}).contiguous();
}

// y2 (N×out) viewed with x's leading dimensions.
Tensor as_out_shape(const Tensor& y2, const Tensor& x) {
  if (x.dim() == 2) return y2;
  auto shape = x.sizes().vec();
  shape.back() = y2.size(1);
  return y2.view(shape);
}

// The fused small-shape path applies (kernels.h: cpu_fused_fits): the device has it, the switch is on, the adapter
// is already in its opmath dtype (no conversions to make) and the sizes fit.
bool fused_applies(const Tensor& x, int64_t N, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
                   int64_t out) {
  const DeviceKernels& k = device_kernels(x.device());
  const int mode = tuning().cpu_fused.load(std::memory_order_relaxed);
  if (k.fused_forward == nullptr || mode == 0) return false;
  const auto dt = A.scalar_type();
  return B.scalar_type() == dt && lam.scalar_type() == dt && w.scalar_type() == dt &&
         cpu_fused_fits(N, A.size(0), A.size(1), out, dt, x.scalar_type(), /*any_size=*/mode == 2);
}

// The forward's adapter part by the fused pass: y2 (N×out, the base product) += (x_d Afᵀ) Bsᵀ; returns u, s, a, b.
std::tuple<Tensor, Tensor, Tensor, Tensor> fused_forward(const Tensor& x_d, Tensor& y2, const Tensor& A,
                                                         const Tensor& B, const Tensor& lam, const Tensor& w) {
  const Folded f = opmath_params(A, B, lam, w);
  const int64_t r = f.A.size(0);
  FusedFwdParams p{.x_d = x_d, .A = f.A, .B = f.B, .lam = f.lam, .w = f.w, .y = y2};
  p.u = at::empty({x_d.size(0), r}, x_d.options());
  p.s = at::empty({r}, f.A.options());
  p.a_raw = at::empty({r}, f.A.options());
  p.b_raw = at::empty({r}, f.A.options());
  device_kernels(x_d.device()).fused_forward(p);
  return {p.u, p.s, p.a_raw, p.b_raw};
}

Tensor dropped(const Tensor& x2, double p, const std::optional<Tensor>& seed) {
  if (p <= 0.0) return x2;
  Tensor out = at::empty_like(x2);
  device_kernels(x2.device()).dropout(x2, out, *seed, p);
  return out;
}

// s_k = 1/â_k · λ/(r·b̂_k) split into two factors that are each bounded by the data they scale (fp16 only):
// ‖u_k‖/â_k ≤ ‖x⊙w‖ and ‖B_k‖·|λ|/(r·b̂_k) ≤ |λ|/r (â, b̂ the clamped norms). Applying s whole to u or to B
// instead overflows fp16 when a norm sits below the clamp (B = 0 at PEFT's init gives s ~ 1e4·λ/r), which turns
// the exact 0 of the DeLoRA term into inf·0 = NaN; so did λ on the u side for a large λ (B = 0 keeps
// B⊙λ/(r·b̂) exactly 0 for any finite λ).
//
// Returns u = x_d Adᵀ (x's dtype, saved for backward) and the low-rank product to add: (u or u⊙sa) Bdᵀ is
// accumulated into y2 when y2 is defined (beta = 1), else returned as a new tensor (plus `bias` when given).
std::pair<Tensor, Tensor> low_rank(Tensor y2, const Tensor& x_d, const GemmOperands& g,
                                   const Tensor* bias = nullptr) {
  Tensor u = at::mm(x_d, g.Ad.t());
  Tensor v = g.split ? (u.to(g.sa.scalar_type()) * g.sa).to(u.scalar_type()) : u;
  if (y2.defined()) {
    y2.addmm_(v, g.Bd.t());
  } else {
    y2 = bias != nullptr ? at::addmm(*bias, v, g.Bd.t()) : at::mm(v, g.Bd.t());
  }
  return {u, y2};
}

// The small-N forward applies: the device has one (CUDA), Tuning::small_n on, and small_n_fits (kernels.h).
bool small_n_applies(const Tensor& x2, const Tensor& A, int64_t out) {
  return device_kernels(x2.device()).small_n_forward != nullptr &&
         tuning().small_n.load(std::memory_order_relaxed) >= 1 &&
         small_n_fits(x2.size(0), A.size(0), A.size(1), out, opmath_of(A), x2.scalar_type());
}

// y2 = base() (N×out, contiguous) [+]= (u⊙s) Bᵀ through the device's small_n_forward; returns y2 and u, s, a, b
// as the forward op does. With small_n = overlap and a base GEMM to hide behind (accumulate), the u launch runs on
// a side stream concurrently with base().
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> small_n_forward(const Tensor& x_d, const Tensor& A,
                                                                   const Tensor& B, const Tensor& lam,
                                                                   const Tensor& w,
                                                                   const std::function<Tensor()>& base,
                                                                   bool accumulate) {
  const Folded f = opmath_params(A, B, lam, w);
  const int64_t r = f.A.size(0);
  SmallNParams p{.x_d = x_d,
                 .A = f.A,
                 .B = f.B,
                 .lam = f.lam,
                 .w = f.w,
                 .base = base,
                 .overlap = accumulate && tuning().small_n.load(std::memory_order_relaxed) == 2,
                 .accumulate = accumulate};
  p.s = at::empty({r}, f.A.options());
  p.a_raw = at::empty({r}, f.A.options());
  p.b_raw = at::empty({r}, f.A.options());
  p.u = at::empty({x_d.size(0), r}, x_d.options());
  const bool ok = device_kernels(x_d.device()).small_n_forward(p);
  TORCH_INTERNAL_ASSERT(ok, "delora_ext: small-N forward launched outside its conditions");
  return {p.y, p.u, p.s, p.a_raw, p.b_raw};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> prep(const Tensor& A, const Tensor& B, const Tensor& lam,
                                                const Tensor& w) {
  check_adapter("prep", A, B, lam, w);
  c10::OptionalDeviceGuard guard(A.device());
  Folded f = fold(A, B, lam, w);
  return {f.Af, f.s, f.a, f.b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight,
                                                              const std::optional<Tensor>& bias,
                                                              const Tensor& A, const Tensor& B,
                                                              const Tensor& lam, const Tensor& w,
                                                              double dropout_p,
                                                              const std::optional<Tensor>& seed) {
  const char* op = "linear_fwd";
  const Dims d = check_adapter(op, A, B, lam, w);
  check_input(op, x, A, d);
  check_weight_shape(op, weight, d, A, B);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "delora_ext::", op, ": `x` has dtype ",
              x.scalar_type(), " but `weight` has dtype ", weight.scalar_type(),
              " (they must match, as for nn.Linear)");
  check_same_device(op, "weight", weight, x);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == d.out, "delora_ext::", op,
                ": `bias` must have shape (", d.out, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "delora_ext::", op, ": `bias` has dtype ",
                bias->scalar_type(), " but `x` has dtype ", x.scalar_type());
    check_same_device(op, "bias", *bias, x);
  }
  check_dropout(op, dropout_p, seed, x);
  c10::OptionalDeviceGuard guard(x.device());

  const bool has_bias = bias.has_value() && bias->defined();
  Tensor x2 = rows_of(x, d.in);
  if (fused_applies(x2, x2.size(0), A, B, lam, w, d.out)) {
    Tensor y2 = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
    auto [u, s, a, b] = fused_forward(dropped(x2, dropout_p, seed), y2, A, B, lam, w);
    return {as_out_shape(y2, x), u, s, a, b};
  }
  if (small_n_applies(x2, A, d.out)) {
    auto base = [&] { return has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t()); };
    auto [y2, u, s, a, b] = small_n_forward(dropped(x2, dropout_p, seed), A, B, lam, w, base, /*accumulate=*/true);
    return {as_out_shape(y2, x), u, s, a, b};
  }
  if (tuning().gemm_order.load(std::memory_order_relaxed) == 1) {
    // Seeded: y = (u⊙s) Bᵀ + bias first, then the base GEMM accumulates x Wᵀ onto it (beta = 1).
    const GemmOperands g = gemm_operands(opmath_params(A, B, lam, w), x.scalar_type(), /*backward=*/false);
    auto [u, y2] = low_rank(Tensor(), dropped(x2, dropout_p, seed), g, has_bias ? &*bias : nullptr);
    y2.addmm_(x2, weight.t());
    return {as_out_shape(y2, x), u, g.s, g.a, g.b};
  }
  // Base first: the GPU starts on the big GEMM while the host prepares the rest.
  Tensor y2 = has_bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const GemmOperands g = gemm_operands(opmath_params(A, B, lam, w), x.scalar_type(), /*backward=*/false);
  Tensor u = low_rank(y2, dropped(x2, dropout_p, seed), g).first;
  return {as_out_shape(y2, x), u, g.s, g.a, g.b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd(const Tensor& x, const Tensor& A,
                                                               const Tensor& B, const Tensor& lam,
                                                               const Tensor& w, double dropout_p,
                                                               const std::optional<Tensor>& seed) {
  const char* op = "adapter_fwd";
  const Dims d = check_adapter(op, A, B, lam, w);
  check_input(op, x, A, d);
  check_dropout(op, dropout_p, seed, x);
  c10::OptionalDeviceGuard guard(x.device());

  Tensor x2 = rows_of(x, d.in);
  if (fused_applies(x2, x2.size(0), A, B, lam, w, d.out)) {
    Tensor y2 = at::zeros({x2.size(0), d.out}, x.options());
    auto [u, s, a, b] = fused_forward(dropped(x2, dropout_p, seed), y2, A, B, lam, w);
    return {as_out_shape(y2, x), u, s, a, b};
  }
  if (small_n_applies(x2, A, d.out)) {
    auto base = [&] { return at::empty({x2.size(0), d.out}, x.options()); };
    auto [y2, u, s, a, b] = small_n_forward(dropped(x2, dropout_p, seed), A, B, lam, w, base, /*accumulate=*/false);
    return {as_out_shape(y2, x), u, s, a, b};
  }
  const GemmOperands g = gemm_operands(opmath_params(A, B, lam, w), x.scalar_type(), /*backward=*/false);
  auto [u, y2] = low_rank(Tensor(), dropped(x2, dropout_p, seed), g);
  return {as_out_shape(y2, x), u, g.s, g.a, g.b};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_bwd(
    const Tensor& grad_y, const Tensor& x, const std::optional<Tensor>& weight, const Tensor& A,
    const Tensor& B, const Tensor& lam, const Tensor& w, const Tensor& u, const Tensor& s,
    const Tensor& a_norm, const Tensor& b_norm, double dropout_p, const std::optional<Tensor>& seed,
    std::array<bool, 4> output_mask) {
  const char* op = "linear_bwd";
  const Dims d = check_adapter(op, A, B, lam, w);
  check_input(op, x, A, d);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == d.out &&
                  leading_rows(grad_y) == leading_rows(x),
              "delora_ext::", op, ": `grad_y` must have shape (..., ", d.out, ") with as many rows as `x`, got ",
              grad_y.sizes(), " for x of shape ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "delora_ext::", op, ": `grad_y` has dtype ",
              grad_y.scalar_type(), " but `x` has dtype ", x.scalar_type());
  check_same_device(op, "grad_y", grad_y, x);
  const int64_t N = leading_rows(x);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == N && u.size(1) == d.r, "delora_ext::", op,
              ": `u` must have shape (", N, ", ", d.r, "), got ", u.sizes());
  check_float(op, "u", u);
  check_same_device(op, "u", u, x);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"s", s}, {"a_norm", a_norm},
                                {"b_norm", b_norm}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == d.r, "delora_ext::", op, ": `", name, "` must have shape (",
                d.r, ",), got ", t.sizes());
    check_float(op, name, t);
    check_same_device(op, name, t, x);
  }
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == d.out && weight->size(1) == d.in,
                "delora_ext::", op, ": `weight` must have shape (", d.out, ", ", d.in, "), got ",
                weight->sizes());
    TORCH_CHECK(weight->scalar_type() == x.scalar_type(), "delora_ext::", op, ": `x` has dtype ",
                x.scalar_type(), " but `weight` has dtype ", weight->scalar_type(),
                " (they must match, as for nn.Linear)");
    check_same_device(op, "weight", *weight, x);
  }
  check_dropout(op, dropout_p, seed, x);
  c10::OptionalDeviceGuard guard(x.device());

  const auto dt = x.scalar_type();
  const auto opmath = opmath_of(A);
  const bool want_x = output_mask[0], want_A = output_mask[1], want_B = output_mask[2],
             want_lam = output_mask[3];
  const bool want_param = want_A || want_B || want_lam;

  Tensor g2 = grad_y.dim() == 2 && grad_y.is_contiguous() ? grad_y : grad_y.reshape({N, d.out}).contiguous();
  Tensor grad_x, grad_A, grad_B, grad_lam;
  // Outputs that were not asked for come back as empty tensors (a custom op cannot return None).
  auto or_empty = [&](Tensor& t, const Tensor& like) {
    if (!t.defined()) t = at::empty({0}, like.options());
  };
  if (fused_applies(x, N, A, B, lam, w, d.out) && u.scalar_type() == opmath && s.scalar_type() == opmath &&
      a_norm.scalar_type() == opmath && b_norm.scalar_type() == opmath) {
    FusedBwdParams p{.g = g2, .u = u.contiguous(), .A = A.contiguous(), .B = B.contiguous(), .w = w.contiguous(),
                     .s = s.contiguous(), .a_raw = a_norm.contiguous(), .b_raw = b_norm.contiguous()};
    if (want_A) p.x_d = dropped(rows_of(x, d.in), dropout_p, seed);
    if (want_x) {
      p.dx = has_weight ? at::mm(g2, *weight) : at::zeros({N, d.in}, x.options());
      p.dropout_p = dropout_p;
      if (dropout_p > 0.0) p.seed = static_cast<uint64_t>(seed->cpu().item<int64_t>());
    }
    if (want_A) p.dA = at::empty_like(p.A);
    if (want_B) p.dB = at::empty_like(p.B);
    if (want_lam) p.dlam = at::empty(lam.sizes(), p.A.options());
    device_kernels(x.device()).fused_backward(p);
    grad_x = want_x ? (x.dim() == 2 ? p.dx : p.dx.view(x.sizes())) : Tensor();
    grad_A = p.dA;
    grad_B = p.dB;
    grad_lam = p.dlam;
    or_empty(grad_x, x);
    or_empty(grad_A, A);
    or_empty(grad_B, B);
    or_empty(grad_lam, lam);
    return {grad_x, grad_A, grad_B, grad_lam};
  }
  // Base first (gemm_order 0, no dropout): the base dx GEMM is issued first and the adapter part accumulated
  // into it. Seeded (gemm_order 1) or with dropout: the adapter part first, the base GEMM accumulating onto it.
  const bool seeded = dropout_p > 0.0 || tuning().gemm_order.load(std::memory_order_relaxed) == 1;
  if (want_x && has_weight && !seeded) grad_x = at::mm(g2, *weight);

  const Folded f = opmath_params(A, B, lam, w);
  const Tensor &A_op = f.A, &B_op = f.B, &w_op = f.w;
  Tensor s_op = as_dense(s, opmath), a_op = as_dense(a_norm, opmath), b_op = as_dense(b_norm, opmath);
  // Ad, Bd in x's dtype from one prep launch (its own s, a, b equal the saved ones: same kernel, same inputs).
  const GemmOperands op_g = gemm_operands(f, dt, /*backward=*/true);

  Tensor x_d;
  if (want_A) x_d = dropped(rows_of(x, d.in), dropout_p, seed);
  // G = g Bd (N×r): g·(B⊙s), or g·B with the split scale. For r ≤ 8 on CPU, Bd goes in as the transpose of an
  // r×out matrix: MKL's g·B with a row-major narrow B can be slower (docs/native.md, bench/cpu_gemm_layouts.py).
  Tensor G;
  if (want_x || want_A) {
    Tensor Bd = op_g.Bd;
    if (d.r <= 8 && g2.is_cpu()) Bd = Bd.t().contiguous().t();
    G = at::mm(g2, Bd);
  }

  if (want_x) {
    // dx_adapter = G Ad: (g·(B⊙s))(A⊙w), or ((g·B) ⊙ 1/b̂)(A⊙w⊙λ/(r·â)) with the split scale (factors bounded;
    // λ on A's side, so an all-zero A row gives 0, where (g·B)⊙λ/(r·b̂) could overflow fp16 and make it NaN).
    Tensor Gx = G;
    if (op_g.split) {
      // 1/b̂, times λ/r when |λ/r| < 1 (then λ is not on A's side: small_lambda in delora_math.h)
      const Tensor inv_b = b_op.clamp_min(kNormEps).reciprocal(), lam_r = f.lam / static_cast<double>(d.r);
      Gx = (G.to(opmath) * at::where(lam_r.abs() < 1.0, lam_r * inv_b, inv_b)).to(dt);
    }
    if (seeded) {
      Tensor t = at::mm(Gx, op_g.Ad);
      if (dropout_p > 0.0) device_kernels(t.device()).dropout(t, t, *seed, dropout_p);
      grad_x = has_weight ? t.addmm_(g2, *weight) : t;
    } else {
      grad_x = has_weight ? grad_x.addmm_(Gx, op_g.Ad) : at::mm(Gx, op_g.Ad);
    }
    grad_x = grad_x.view(x.sizes());
  }
  if (want_param) {
    // M = gᵀu (out×r). For narrow u (r ≤ 8) MKL is several times slower on gᵀ·u than on (uᵀ·g)ᵀ
    // (docs/native.md); the transpose copy is only r×out. CPU only: the gap is MKL's, and on a GPU the copy would
    // be one more launch.
    Tensor M = (d.r <= 8 && g2.is_cpu()) ? at::mm(u.to(dt).t(), g2).t() : at::mm(g2.t(), u.to(dt));
    // Q = Gᵀ x_d: s-scaled (full scale), or (g·B)ᵀ x_d with finalize's qscale = s (split scale).
    Tensor Q = want_A ? at::mm(G.t(), x_d) : Tensor();
    Tensor dA = want_A ? at::empty_like(A_op) : Tensor();
    Tensor dB = want_B ? at::empty_like(B_op) : Tensor();
    Tensor dlam = want_lam ? at::empty({1}, A_op.options()) : Tensor();
    device_kernels(A_op.device())
        .finalize({.M = M.contiguous(),
                   .Q = Q,
                   .qscale = op_g.split ? s_op : Tensor(),
                   .A = A_op,
                   .B = B_op,
                   .w = w_op,
                   .s = s_op,
                   .a_raw = a_op,
                   .b_raw = b_op,
                   .dA = dA,
                   .dB = dB,
                   .dlam = dlam});
    if (want_A) grad_A = dA.to(A.scalar_type());
    if (want_B) grad_B = dB.to(B.scalar_type());
    if (want_lam) grad_lam = dlam.to(lam.scalar_type()).view(lam.sizes());
  }
  or_empty(grad_x, x);
  or_empty(grad_A, A);
  or_empty(grad_B, B);
  or_empty(grad_lam, lam);
  return {grad_x, grad_A, grad_B, grad_lam};
}

namespace {

// weight (out×in) += Bs (out×R) · Af (R×in), both opmath, in one pass over W. Low-precision W: accumulated in
// opmath and rounded once per element; W in opmath: one GEMM with beta = 1 (BLAS's accumulation order).
void merge_folded(Tensor& weight, const Tensor& Bs, const Tensor& Af) {
  if (weight.scalar_type() == at::kDouble && Af.scalar_type() != at::kDouble) {
    // An fp64 weight (e.g. nn.Linear(dtype=float64) with fp32 adapter parameters) is updated in fp64, never
    // rounded through fp32.
    merge_folded(weight, Bs.to(at::kDouble), Af.to(at::kDouble));
    return;
  }
  const auto opmath = Af.scalar_type();
  const DeviceKernels& kernels = device_kernels(weight.device());
  if (kernels.merge != nullptr && kernels.merge(weight, Bs.contiguous(), Af)) return;
  if (weight.scalar_type() == opmath) {
    // W += B' A' in one pass, accumulating in W's own (opmath) precision; addmm_ writes W in place.
    weight.addmm_(Bs, Af);
    return;
  }
  // Low-precision W: each block of rows is widened to opmath, updated, and rounded once. The block keeps
  // the temporary at ~4 M elements instead of out×in.
  const int64_t out = weight.size(0), in = weight.size(1);
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(in, 1));
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t n = std::min(rows, out - r0);
    Tensor blk = weight.narrow(0, r0, n);
    blk.copy_(at::addmm(blk.to(opmath), Bs.narrow(0, r0, n), Af));
  }
}

void check_merge_weight(const char* op, const Tensor& weight, const Dims& d, const Tensor& A, const Tensor& B) {
  check_float(op, "weight", weight);
  check_weight_shape(op, weight, d, A, B);
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, "delora_ext::", op,
              ": `weight` has elements that share memory (an expanded view, stride 0), so it cannot be written in "
              "place; pass a dense weight (e.g. weight.contiguous())");
  check_same_device(op, "weight", weight, A);
}

}  // namespace

void merge_(Tensor& weight, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
            double alpha) {
  const char* op = "merge_";
  const Dims d = check_adapter(op, A, B, lam, w);
  check_merge_weight(op, weight, d, A, B);
  c10::OptionalDeviceGuard guard(weight.device());
  Folded f = fold(A, B, lam, w, /*with_bs=*/true, alpha);
  merge_folded(weight, f.Bs, f.Af);
}

void merge_many_(Tensor& weight, at::TensorList A, at::TensorList B, at::TensorList lam, at::TensorList w,
                 at::ArrayRef<double> alpha) {
  const char* op = "merge_many_";
  const size_t n = A.size();
  TORCH_CHECK(n >= 1, "delora_ext::", op, ": `A` must hold at least one adapter, got an empty list");
  TORCH_CHECK(B.size() == n && lam.size() == n && w.size() == n && alpha.size() == n, "delora_ext::", op,
              ": `A`, `B`, `lam`, `w` and `alpha` must have the same length, got ", n, ", ", B.size(), ", ",
              lam.size(), ", ", w.size(), ", ", alpha.size());
  std::vector<Dims> dims;
  for (size_t i = 0; i < n; ++i) {
    dims.push_back(check_adapter(op, A[i], B[i], lam[i], w[i]));
    TORCH_CHECK(dims[i].in == dims[0].in && dims[i].out == dims[0].out, "delora_ext::", op, ": adapter ", i,
                " is (out, in) = (", dims[i].out, ", ", dims[i].in, ") but adapter 0 is (", dims[0].out, ", ",
                dims[0].in, ")");
    TORCH_CHECK(opmath_of(A[i]) == opmath_of(A[0]), "delora_ext::", op, ": `A[", i, "]` has dtype ",
                A[i].scalar_type(), " but `A[0]` has dtype ", A[0].scalar_type(),
                " (all adapters must compute in the same precision)");
    check_same_device(op, "A[i]", A[i], A[0]);
  }
  check_merge_weight(op, weight, dims[0], A[0], B[0]);
  c10::OptionalDeviceGuard guard(weight.device());
  // Σ_i alpha_i (B_i ⊙ s_i)(A_i ⊙ w_i) = [alpha_1 B_1 ⊙ s_1 | …] · [A_1 ⊙ w_1; …]: one rank-Σr update.
  std::vector<Tensor> Bs, Af;
  for (size_t i = 0; i < n; ++i) {
    Folded f = fold(A[i], B[i], lam[i], w[i], /*with_bs=*/true, alpha[i]);
    Bs.push_back(f.Bs);
    Af.push_back(f.Af);
  }
  if (n == 1) {
    merge_folded(weight, Bs[0], Af[0]);
  } else {
    merge_folded(weight, at::cat(Bs, 1), at::cat(Af, 0));
  }
}

Tensor dropout_scale(const Tensor& x2, const Tensor& seed, double p, at::ScalarType dt) {
  c10::OptionalDeviceGuard guard(x2.device());
  Tensor m = at::ones(x2.sizes(), x2.options().dtype(dt));
  if (p > 0.0) device_kernels(m.device()).dropout(m, m, seed, p);
  return m;
}

Tensor delta_weight(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w) {
  check_adapter("delta_weight", A, B, lam, w);
  c10::OptionalDeviceGuard guard(A.device());
  Folded f = fold(A, B, lam, w, /*with_bs=*/true);
  return at::mm(f.Bs, f.Af);
}

}  // namespace delora_ext
