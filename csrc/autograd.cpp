// The Autograd kernels (dispatch_keys.h): C++ autograd.Functions registered at the Autograd key, not
// torch.library.register_autograd in Python, whose wrapper adds host time to every layer of every training step
// (on a GPU, time the device waits for its next launch). Saved for backward: x (by reference), the parameters
// (referenced, not copied), u (N×r) and the r-sized s, a, b; nothing tokens×in is created for backward.
#include <torch/autograd.h>

#include "delora.h"
#include "delora_math.h"
#include "dispatch_keys.h"

namespace delora_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Edge index of each differentiable input: an absent optional (bias, seed) has no edge.
struct EdgeIndex {
  int64_t next = 0;
  int64_t take(bool present = true) { return present ? next++ : -1; }
};

bool wants(AutogradContext* ctx, int64_t edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

struct ComposedPrep {
  Tensor Af, s, a, b;
};
// DeLoRA's folded factor A⊙w, s and the raw norms from differentiable ATen ops, in opmath (fp64 for fp64
// adapters): the create_graph backward and the Autograd kernels of prep / delta_weight.
ComposedPrep prep_composite(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w) {
  const auto om = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor Ao = A.to(om), Bo = B.to(om), lamo = lam.to(om).reshape({1}), wo = w.to(om);
  const Tensor a = at::linalg_vector_norm(Ao, 2, {1}), b = at::linalg_vector_norm(Bo, 2, {0});
  const Tensor s = lamo / (static_cast<double>(Ao.size(0)) * a.clamp_min(delora_ext::kNormEps) *
                           b.clamp_min(delora_ext::kNormEps));
  return {Ao * wo, s, a, b};
}

// Backward with create_graph (grad mode on inside backward): linear_bwd has no derivative of its own, so the
// adapter term is recomputed from differentiable ATen ops (opmath, same math as the kernels) and its
// vector-Jacobian product taken with create_graph, which makes second derivatives exact. Returns the gradients
// of (x, A, B, lam) that are asked for (undefined otherwise), each in its input's dtype and shape.
std::array<Tensor, 4> adapter_vjp_differentiable(const Tensor& gy, const Tensor& x, const Tensor& A, const Tensor& B,
                                                 const Tensor& lam, const Tensor& w, double p,
                                                 const std::optional<Tensor>& seed, std::array<bool, 4> need) {
  const ComposedPrep c = prep_composite(A, B, lam, w);
  const auto om = c.s.scalar_type();
  const int64_t in = A.size(1), out = B.size(0);
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) n *= x.size(i);
  Tensor x2 = x.reshape({n, in}).to(om);
  if (p > 0.0) x2 = x2 * delora_ext::dropout_scale(x2.contiguous(), *seed, p, om);
  const Tensor y = at::mm(at::mm(x2, c.Af.t()) * c.s, B.to(om).t());
  const Tensor* leaves[4] = {&x, &A, &B, &lam};
  std::vector<Tensor> inputs;
  for (int i = 0; i < 4; ++i)
    if (need[i]) inputs.push_back(*leaves[i]);
  std::array<Tensor, 4> result;
  if (inputs.empty()) return result;
  auto grads = torch::autograd::grad({y}, inputs, {gy.reshape({n, out}).to(om)}, /*retain_graph=*/true,
                                     /*create_graph=*/true, /*allow_unused=*/true);
  size_t j = 0;
  for (int i = 0; i < 4; ++i) {
    if (!need[i]) continue;
    Tensor g = grads[j++];
    result[i] = g.defined() ? g : at::zeros_like(*leaves[i]);
  }
  return result;
}

struct LinearFwdFn : public torch::autograd::Function<LinearFwdFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const std::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                               const Tensor& lam, const Tensor& w, double p, const std::optional<Tensor>& seed) {
    static auto op = typed_op<decltype(delora_ext::linear_fwd)>("delora_ext::linear_fwd");
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op.call(x, weight, bias, A, B, lam, w, p, seed);
    }
    auto& [y, u, s, a, b] = out;
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["p"] = p;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["has_seed"] = seed.has_value() && seed->defined();
    ctx->save_for_backward({x, weight, A, B, lam, w, u, s, a, b, seed.value_or(Tensor())});
    ctx->mark_non_differentiable({u, s, a, b});
    ctx->set_materialize_grads(false);  // no zero-filled N×r gradient for u
    return {y, u, s, a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(9);  // x, weight, bias, A, B, lam, w, dropout_p, seed
    const Tensor& gy = grads[0];
    if (!gy.defined()) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &A = saved[2], &B = saved[3], &lam = saved[4],
                 &w = saved[5], &u = saved[6], &s = saved[7], &a = saved[8], &b = saved[9];
    const Tensor& seed_t = saved[10];
    const std::optional<Tensor> seed = seed_t.defined() ? std::optional<Tensor>(seed_t) : std::nullopt;
    const double p = ctx->saved_data["p"].toDouble();
    EdgeIndex e;
    const int64_t ex = e.take(), eW = e.take(), eb = e.take(ctx->saved_data["has_bias"].toBool()), eA = e.take(),
                  eB = e.take(), elam = e.take();
    const bool nx = wants(ctx, ex), nW = wants(ctx, eW), nb = wants(ctx, eb), nA = wants(ctx, eA),
               nB = wants(ctx, eB), nlam = wants(ctx, elam);
    if ((nx || nA || nB || nlam) && at::GradMode::is_enabled()) {
      auto g = adapter_vjp_differentiable(gy, x, A, B, lam, w, p, seed, {nx, nA, nB, nlam});
      if (nx) result[0] = g[0].add(at::mm(gy.reshape({u.size(0), gy.size(-1)}), weight).view(x.sizes()));
      if (nA) result[3] = g[1];
      if (nB) result[4] = g[2];
      if (nlam) result[5] = g[3];
    } else if (nx || nA || nB || nlam) {
      static auto bwd = typed_op<decltype(delora_ext::linear_bwd)>("delora_ext::linear_bwd");
      // Straight to the device kernel: linear_bwd has no Autograd kernel, and the dispatcher's not-implemented
      // fallback there boxes all 14 arguments on every call (grad mode is off: nothing to record).
      at::AutoDispatchBelowADInplaceOrView below;
      auto [gx, gA, gB, glam] = bwd.call(gy, x, weight, A, B, lam, w, u, s, a, b, p, seed, {nx, nA, nB, nlam});
      if (nx) result[0] = gx;
      if (nA) result[3] = gA;
      if (nB) result[4] = gB;
      if (nlam) result[5] = glam;
    }
    if (nW || nb) {
      const int64_t n = u.size(0);  // rows; reshape(-1, features) is ambiguous when features = 0
      const Tensor g2 = gy.reshape({n, gy.size(-1)});
      if (nW) result[1] = at::mm(g2.t(), x.reshape({n, x.size(-1)})).to(weight.scalar_type());
      if (nb) result[2] = g2.sum(0);
    }
    return result;
  }
};

struct AdapterFwdFn : public torch::autograd::Function<AdapterFwdFn> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& A, const Tensor& B,
                               const Tensor& lam, const Tensor& w, double p, const std::optional<Tensor>& seed) {
    static auto op = typed_op<decltype(delora_ext::adapter_fwd)>("delora_ext::adapter_fwd");
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = op.call(x, A, B, lam, w, p, seed);
    }
    auto& [y, u, s, a, b] = out;
    ctx->saved_data["p"] = p;
    ctx->save_for_backward({x, A, B, lam, w, u, s, a, b, seed.value_or(Tensor())});
    ctx->mark_non_differentiable({u, s, a, b});
    ctx->set_materialize_grads(false);
    return {y, u, s, a, b};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(7);  // x, A, B, lam, w, dropout_p, seed
    const Tensor& gy = grads[0];
    if (!gy.defined()) return result;
    const bool nx = ctx->needs_input_grad(0), nA = ctx->needs_input_grad(1), nB = ctx->needs_input_grad(2),
               nlam = ctx->needs_input_grad(3);
    if (!(nx || nA || nB || nlam)) return result;
    const auto saved = ctx->get_saved_variables();
    const Tensor& seed_t = saved[9];
    const std::optional<Tensor> seed = seed_t.defined() ? std::optional<Tensor>(seed_t) : std::nullopt;
    if (at::GradMode::is_enabled()) {
      auto g = adapter_vjp_differentiable(gy, saved[0], saved[1], saved[2], saved[3], saved[4],
                                          ctx->saved_data["p"].toDouble(), seed, {nx, nA, nB, nlam});
      for (int i = 0; i < 4; ++i) result[i] = g[i];
      return result;
    }
    static auto bwd = typed_op<decltype(delora_ext::linear_bwd)>("delora_ext::linear_bwd");
    at::AutoDispatchBelowADInplaceOrView below;  // as in LinearFwdFn::backward
    auto [gx, gA, gB, glam] = bwd.call(gy, saved[0], std::nullopt, saved[1], saved[2], saved[3], saved[4],
                                       saved[5], saved[6], saved[7], saved[8], ctx->saved_data["p"].toDouble(),
                                       seed, {nx, nA, nB, nlam});
    if (nx) result[0] = gx;
    if (nA) result[1] = gA;
    if (nB) result[2] = gB;
    if (nlam) result[3] = glam;
    return result;
  }
};

bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  return false;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd_autograd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
    const Tensor& lam, const Tensor& w, double p, const std::optional<Tensor>& seed) {
  auto o = LinearFwdFn::apply(x, weight, bias, A, B, lam, w, p, seed);
  return {o[0], o[1], o[2], o[3], o[4]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd_autograd(const Tensor& x, const Tensor& A,
                                                                        const Tensor& B, const Tensor& lam,
                                                                        const Tensor& w, double p,
                                                                        const std::optional<Tensor>& seed) {
  auto o = AdapterFwdFn::apply(x, A, B, lam, w, p, seed);
  return {o[0], o[1], o[2], o[3], o[4]};
}

// prep and delta_weight at the Autograd key: the native kernel when no gradient is wanted (merges, ΔW reports run
// under no_grad), else the same math in differentiable ATen ops (opmath), so a gradient through them is exact
// instead of silently missing (the not-implemented autograd fallback only warns at backward).
std::tuple<Tensor, Tensor, Tensor, Tensor> prep_autograd(const Tensor& A, const Tensor& B, const Tensor& lam,
                                                         const Tensor& w) {
  static auto op = typed_op<decltype(delora_ext::prep)>("delora_ext::prep");
  const bool grad = any_requires_grad({&A, &B, &lam, &w});
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(A, B, lam, w);  // also the op's argument checks for the composite path
  }
  if (!grad) return out;
  auto c = prep_composite(A, B, lam, w);
  return {c.Af, c.s, c.a, c.b};
}

Tensor delta_weight_autograd(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w) {
  static auto op = typed_op<decltype(delora_ext::delta_weight)>("delora_ext::delta_weight");
  if (!any_requires_grad({&A, &B, &lam, &w})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op.call(A, B, lam, w);
  }
  static auto checks = typed_op<decltype(delora_ext::prep)>("delora_ext::prep");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    checks.call(A, B, lam, w);  // the op's argument checks (r-sized work) before the composite
  }
  auto c = prep_composite(A, B, lam, w);
  return at::mm(B.to(c.s.scalar_type()) * c.s, c.Af);
}

}  // namespace delora_ext
