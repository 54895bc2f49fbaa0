// The Autograd kernels (dispatch_keys.h), registered at the Autograd key in C++, not torch.library.register_autograd
// in Python, whose wrapper adds host time to every layer of every training step (on a GPU, time the device waits for
// its next launch). Saved for backward: x (by reference), the parameters (referenced, not copied), u (N×r) and the
// r-sized s, a, b; nothing tokens×in is created for backward.
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <type_traits>

#include "delora.h"
#include "delora_math.h"
#include "dispatch_keys.h"

namespace delora_ext {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

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

// The backward node of linear_fwd and adapter_fwd, written as ATen's generated nodes are (a Node with its saved
// tensors as members) rather than as a torch::autograd::Function, whose AutogradContext, per-call output
// bookkeeping and demangled type name cost several microseconds of host time per layer and step. Its next edges are
// the op's tensor inputs in schema order: (x, weight, bias, A, B, lam, w) for linear_fwd, (x, A, B, lam, w) for
// adapter_fwd; an absent bias keeps its (empty) edge so the indices do not move. w is a buffer: no gradient.
struct DeloraBackward : public torch::autograd::TraceableFunction {
  explicit DeloraBackward(bool linear) : linear_(linear) {}
  std::string name() const override { return linear_ ? "DeloraLinearBackward0" : "DeloraAdapterBackward0"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&x_, &weight_, &A_, &B_, &lam_, &w_, &u_, &s_, &a_, &b_, &seed_}) v->reset_data();
  }
  variable_list apply(variable_list&& grads) override;

  SavedVariable x_, weight_, A_, B_, lam_, w_, u_, s_, a_, b_, seed_;
  double p_ = 0.0;
  const bool linear_;
};

variable_list DeloraBackward::apply(variable_list&& grads) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Edge indices: linear (x 0, weight 1, bias 2, A 3, B 4, lam 5, w 6); adapter (x 0, A 1, B 2, lam 3, w 4).
  const size_t eA = linear_ ? 3 : 1;
  variable_list result(num_outputs());
  const Tensor& gy = grads[0];
  if (!gy.defined()) return result;  // y unused: nothing flows back (no zero-filled gradients made)
  const bool nx = task_should_compute_output(0), nA = task_should_compute_output(eA),
             nB = task_should_compute_output(eA + 1), nlam = task_should_compute_output(eA + 2);
  const bool nW = linear_ && task_should_compute_output(1), nb = linear_ && task_should_compute_output(2);
  const Tensor x = x_.unpack(), A = A_.unpack(), B = B_.unpack(), lam = lam_.unpack(), w = w_.unpack(),
               u = u_.unpack();
  const Tensor seed_t = seed_.unpack();
  const std::optional<Tensor> seed = seed_t.defined() ? std::optional<Tensor>(seed_t) : std::nullopt;
  const Tensor weight = linear_ ? weight_.unpack() : Tensor();
  const int64_t n = u.size(0);  // rows; reshape(-1, features) is ambiguous when features = 0
  if ((nx || nA || nB || nlam) && at::GradMode::is_enabled()) {
    auto g = adapter_vjp_differentiable(gy, x, A, B, lam, w, p_, seed, {nx, nA, nB, nlam});
    if (nx) result[0] = linear_ ? g[0].add(at::mm(gy.reshape({n, gy.size(-1)}), weight).view(x.sizes())) : g[0];
    if (nA) result[eA] = g[1];
    if (nB) result[eA + 1] = g[2];
    if (nlam) result[eA + 2] = g[3];
  } else if (nx || nA || nB || nlam) {
    static auto bwd = typed_op<decltype(delora_ext::linear_bwd)>("delora_ext::linear_bwd");
    // Straight to the device kernel: linear_bwd has no Autograd kernel, and the dispatcher's not-implemented
    // fallback there boxes all 14 arguments on every call (grad mode is off: nothing to record).
    at::AutoDispatchBelowADInplaceOrView below;
    auto [gx, gA, gB, glam] = bwd.call(gy, x, linear_ ? std::optional<Tensor>(weight) : std::nullopt, A, B, lam,
                                       w, u, s_.unpack(), a_.unpack(), b_.unpack(), p_, seed, {nx, nA, nB, nlam});
    if (nx) result[0] = std::move(gx);
    if (nA) result[eA] = std::move(gA);
    if (nB) result[eA + 1] = std::move(gB);
    if (nlam) result[eA + 2] = std::move(glam);
  }
  if (nW || nb) {
    const Tensor g2 = gy.reshape({n, gy.size(-1)});
    if (nW) result[1] = at::mm(g2.t(), x.reshape({n, x.size(-1)})).to(weight.scalar_type());
    if (nb) result[2] = g2.sum(0);
  }
  return result;
}

// Node pointers are std::shared_ptr<Node> up to torch 2.12 and c10::intrusive_ptr<Node> after; Node::getptr()
// returns whichever this torch uses.
using NodePtr = decltype(std::declval<torch::autograd::Node&>().getptr());

// (Both template parameters keep the branch not taken uninstantiated: make_intrusive of a Node that is not an
// intrusive_ptr_target would not compile.)
template <class Ptr = NodePtr, class N = DeloraBackward>
Ptr new_backward_node(bool linear) {
  if constexpr (std::is_same_v<Ptr, std::shared_ptr<torch::autograd::Node>>) {
    return Ptr(new N(linear));
  } else {
    return Ptr(c10::make_intrusive<N>(linear));
  }
}

// Attach the backward node to y (the op's only differentiable output) and save what backward needs. u, s and the
// norms are outputs that never require grad.
void record(const NodePtr& node, const std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>& out, const Tensor& x,
            const Tensor* weight, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, double p,
            const std::optional<Tensor>& seed) {
  auto* n = static_cast<DeloraBackward*>(node.get());
  n->x_ = SavedVariable(x, false);
  if (weight != nullptr) n->weight_ = SavedVariable(*weight, false);
  n->A_ = SavedVariable(A, false);
  n->B_ = SavedVariable(B, false);
  n->lam_ = SavedVariable(lam, false);
  n->w_ = SavedVariable(w, false);
  n->u_ = SavedVariable(std::get<1>(out), false);
  n->s_ = SavedVariable(std::get<2>(out), false);
  n->a_ = SavedVariable(std::get<3>(out), false);
  n->b_ = SavedVariable(std::get<4>(out), false);
  if (seed.has_value() && seed->defined()) n->seed_ = SavedVariable(*seed, false);
  n->p_ = p;
  torch::autograd::set_history(std::get<0>(out), node);
}

// w (the base weight's column norms) is a constant of the forward ops: their node gives it no gradient, so a w that
// asks for one is refused rather than left silently without it.
void check_w_constant(const Tensor& w, const char* op) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && w.requires_grad()), "delora_ext::", op,
              ": `w` requires grad, but w (the column norms of the base weight, a buffer) is a constant of this op ",
              "and gets no gradient; pass w.detach()");
}

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
  static auto op = typed_op<decltype(delora_ext::linear_fwd)>("delora_ext::linear_fwd");
  check_w_constant(w, "linear_fwd");
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(x, weight, bias, A, B, lam, w, p, seed);
  }
  if (torch::autograd::compute_requires_grad(x, weight, bias, A, B, lam, w)) {
    NodePtr node = new_backward_node(/*linear=*/true);
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias, A, B, lam, w));
    record(node, out, x, &weight, A, B, lam, w, p, seed);
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd_autograd(const Tensor& x, const Tensor& A,
                                                                        const Tensor& B, const Tensor& lam,
                                                                        const Tensor& w, double p,
                                                                        const std::optional<Tensor>& seed) {
  static auto op = typed_op<decltype(delora_ext::adapter_fwd)>("delora_ext::adapter_fwd");
  check_w_constant(w, "adapter_fwd");
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = op.call(x, A, B, lam, w, p, seed);
  }
  if (torch::autograd::compute_requires_grad(x, A, B, lam, w)) {
    NodePtr node = new_backward_node(/*linear=*/false);
    node->set_next_edges(torch::autograd::collect_next_edges(x, A, B, lam, w));
    record(node, out, x, nullptr, A, B, lam, w, p, seed);
  }
  return out;
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
