// Every delora_ext op schema, with its math, and the pybind11 module delora_ext._C.
//
// Notation: x is (..., in) flattened to N×in rows; A (r×in), B (out×r), λ (1,), w (in,) are the adapter;
// a_k = ‖A[k,:]‖₂, b_k = ‖B[:,k]‖₂ (raw), s_k = λ / (r·max(a_k,1e-4)·max(b_k,1e-4)); A' = A⊙w;
// x_d = x ⊙ keep(seed)/(1−p) when dropout_p > 0, else x. Norms, s and reductions run in fp32 (fp64 for
// fp64 adapters); GEMMs in x's dtype with fp32 accumulation.
#include <ATen/autocast_mode.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "delora.h"
#include "delora_math.h"
#include "kernels.h"

#ifndef DELORA_TORCH_VERSION
#define DELORA_TORCH_VERSION "unknown"
#endif
#ifndef DELORA_CUDA_ARCHS
#define DELORA_CUDA_ARCHS ""
#endif
#ifndef DELORA_CUDA_TOOLKIT
#define DELORA_CUDA_TOOLKIT ""
#endif

TORCH_LIBRARY(delora_ext, m) {
  // (A' = A⊙w, s, a, b): everything the GEMMs need, in one pass over A and B.
  m.def("prep(Tensor A, Tensor B, Tensor lam, Tensor w) -> (Tensor A_folded, Tensor s, Tensor a_norm, "
        "Tensor b_norm)");
  // y = x Wᵀ + bias + ((x_d A'ᵀ) ⊙ s) Bᵀ ; also returns u = x_d A'ᵀ (N×r, x's dtype), s, a, b for backward.
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor lam, Tensor w, "
        "float dropout_p, Tensor? seed) -> (Tensor y, Tensor u, Tensor s, Tensor a_norm, Tensor b_norm)");
  // delta = ((x_d A'ᵀ) ⊙ s) Bᵀ alone, for bases that are not a plain linear layer; same extra outputs.
  m.def("adapter_fwd(Tensor x, Tensor A, Tensor B, Tensor lam, Tensor w, float dropout_p, Tensor? seed) "
        "-> (Tensor delta, Tensor u, Tensor s, Tensor a_norm, Tensor b_norm)");
  // With g = grad_y, GB = g B, G = GB ⊙ s, M = gᵀu, gs_k = Σ_o M[o,k] B[o,k]:
  //   dx = g W (if weight given) + ((G A') ⊙ keep/(1−p))
  //   dA = (Gᵀ x_d) ⊙ w − (gs·s/a²) ⊙ A        (second term only where a_k ≥ 1e-4, as autograd of clamp_min)
  //   dB = M ⊙ s − B ⊙ (gs·s/b²)               (second term only where b_k ≥ 1e-4)
  //   dλ = Σ_k gs_k / (r·max(a_k,eps)·max(b_k,eps))
  // output_mask selects (dx, dA, dB, dλ); an unselected output is an empty tensor.
  m.def("linear_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor A, Tensor B, Tensor lam, Tensor w, "
        "Tensor u, Tensor s, Tensor a_norm, Tensor b_norm, float dropout_p, Tensor? seed, bool[4] output_mask) "
        "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_lam)");
  // weight += alpha · (B ⊙ s)(A ⊙ w) in place, one pass, no out×in temporary (alpha = 1 merges, −1 unmerges).
  // bf16/fp16 weights: accumulated in fp32, rounded once per element; fp32/fp64 weights: one GEMM into W in
  // max(weight, adapter) precision.
  m.def("merge_(Tensor(a!) weight, Tensor A, Tensor B, Tensor lam, Tensor w, float alpha) -> ()");
  // weight += Σ_i alpha_i · (B_i ⊙ s_i)(A_i ⊙ w_i) in the same single pass (several adapters, or an adapter and
  // the frozen initial term of paper init): one rank-Σr update, as merge_.
  m.def("merge_many_(Tensor(a!) weight, Tensor[] A, Tensor[] B, Tensor[] lam, Tensor[] w, float[] alpha) -> ()");
  // ΔW = (B ⊙ s)(A ⊙ w), out×in, in fp32 (fp64 for fp64 adapters).
  m.def("delta_weight(Tensor A, Tensor B, Tensor lam, Tensor w) -> Tensor");
}

namespace delora_ext {
namespace {

// Autocast: x, weight and bias follow the autocast dtype like nn.Linear's; the adapter (A, B, λ, w) keeps
// its own dtype (fp32 master weights), and the op computes norms and s in fp32 regardless.
template <c10::DeviceType device, c10::DispatchKey key>
struct Autocast {
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd(
      const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
      const Tensor& B, const Tensor& lam, const Tensor& w, double p, const std::optional<Tensor>& seed) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    const auto dt = at::autocast::get_autocast_dtype(device);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("delora_ext::linear_fwd", "")
                         .typed<decltype(delora_ext::linear_fwd)>();
    return op.call(at::autocast::cached_cast(dt, x, device), at::autocast::cached_cast(dt, weight, device),
                   at::autocast::cached_cast(dt, bias, device), A, B, lam, w, p, seed);
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd(
      const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, double p,
      const std::optional<Tensor>& seed) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
    const auto dt = at::autocast::get_autocast_dtype(device);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("delora_ext::adapter_fwd", "")
                         .typed<decltype(delora_ext::adapter_fwd)>();
    return op.call(at::autocast::cached_cast(dt, x, device), A, B, lam, w, p, seed);
  }
};

// ---- autograd ------------------------------------------------------------------------------------------
// C++ autograd.Functions registered at the Autograd key (not torch.library.register_autograd in Python): the
// Python wrapper cost ~0.15 ms of host time per training step and layer on the CI CPU, which on a GPU is time
// the device waits for its next launch. Saved for backward: x (by reference), the parameters (referenced, not
// copied), u (N×r) and the r-sized s, a, b; nothing tokens×in is created for backward.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

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
bool any_requires_grad(std::initializer_list<const Tensor*> ts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  return false;
}

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

// The device-independent entry points at a backend key, with that device's kernel table.
void impl_device(torch::Library& m, c10::DeviceType device, const DeviceKernels& kernels) {
  set_device_kernels(device, kernels);
  m.impl("prep", &prep);
  m.impl("linear_fwd", &linear_fwd);
  m.impl("adapter_fwd", &adapter_fwd);
  m.impl("linear_bwd", &linear_bwd);
  m.impl("merge_", &merge_);
  m.impl("merge_many_", &merge_many_);
  m.impl("delta_weight", &delta_weight);
}

using AutocastCPU = Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
using AutocastCUDA = Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;

}  // namespace

TORCH_LIBRARY_IMPL(delora_ext, CPU, m) { impl_device(m, c10::DeviceType::CPU, cpu_kernels()); }
#ifdef DELORA_WITH_CUDA
TORCH_LIBRARY_IMPL(delora_ext, CUDA, m) { impl_device(m, c10::DeviceType::CUDA, cuda_kernels()); }
#endif
TORCH_LIBRARY_IMPL(delora_ext, Autograd, m) {
  m.impl("linear_fwd", &linear_fwd_autograd);
  m.impl("adapter_fwd", &adapter_fwd_autograd);
  m.impl("prep", &prep_autograd);
  m.impl("delta_weight", &delta_weight_autograd);
}
TORCH_LIBRARY_IMPL(delora_ext, AutocastCPU, m) {
  m.impl("linear_fwd", &AutocastCPU::linear_fwd);
  m.impl("adapter_fwd", &AutocastCPU::adapter_fwd);
}
TORCH_LIBRARY_IMPL(delora_ext, AutocastCUDA, m) {
  m.impl("linear_fwd", &AutocastCUDA::linear_fwd);
  m.impl("adapter_fwd", &AutocastCUDA::adapter_fwd);
}

}  // namespace delora_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "delora_ext native ops (registered as torch.ops.delora_ext.*) and build information";
  m.def("build_info", [] {
    pybind11::dict d;
    d["torch_version"] = DELORA_TORCH_VERSION;
    d["cuda"] = delora_ext::has_device_kernels(c10::DeviceType::CUDA);
    d["cuda_archs"] = DELORA_CUDA_ARCHS;
    d["cuda_toolkit"] = DELORA_CUDA_TOOLKIT;
    return d;
  });
  // Kernel-variant switches (delora.h, Tuning), for A/B benchmarks in one process.
  m.def("set_tuning", [](const std::string& name, int value) {
    auto& t = delora_ext::tuning();
    std::atomic<int>* slot = name == "gemm_order"     ? &t.gemm_order
                             : name == "merge_kernel" ? &t.merge_kernel
                             : name == "small_n"      ? &t.small_n
                                                      : nullptr;
    if (slot == nullptr)
      throw pybind11::value_error("set_tuning: `name` must be 'gemm_order', 'merge_kernel' or 'small_n', got '" +
                                  name + "'");
    const int max_value = slot == &t.small_n ? 2 : 1;  // small_n: off, on, overlap
    if (value < 0 || value > max_value)
      throw pybind11::value_error("set_tuning: `value` for '" + name + "' must be 0.." + std::to_string(max_value) +
                                  ", got " + std::to_string(value));
    slot->store(value);
  });
  m.def("tuning", [] {
    pybind11::dict d;
    d["gemm_order"] = delora_ext::tuning().gemm_order.load();
    d["merge_kernel"] = delora_ext::tuning().merge_kernel.load();
    d["small_n"] = delora_ext::tuning().small_n.load();
    return d;
  });
}
