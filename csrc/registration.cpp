// Every delora_ext op schema, with its math, the kernels registered for it at each dispatch key, and the pybind11
// module delora_ext._C.
//
// Notation: x is (..., in) flattened to N×in rows; A (r×in), B (out×r), λ (1,), w (in,) are the adapter;
// a_k = ‖A[k,:]‖₂, b_k = ‖B[:,k]‖₂ (raw), s_k = λ / (r·max(a_k,1e-4)·max(b_k,1e-4)); A' = A⊙w;
// x_d = x ⊙ keep(seed)/(1−p) when dropout_p > 0, else x. Norms, s and reductions run in fp32 (fp64 for
// fp64 adapters); GEMMs in x's dtype with fp32 accumulation.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "delora.h"
#include "dispatch_keys.h"
#include "kernels.h"
#include "segmented.h"

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
  // Mixed batches (segmented.cpp): y[n] += ((x[n] A_kᵀ) ⊙ sa_k) Bt_k for k = rows_adapter[n] ≥ 0 (−1: nothing),
  // A_k (r_k×in), Bt_k (r_k×out), sa_k (r_k) or None, all in opmath; one pass, one rounding into y.
  m.def("segmented_adapter_(Tensor(a!) y, Tensor x, Tensor rows_adapter, Tensor[] A, Tensor[] Bt, Tensor?[] sa) "
        "-> ()");
}

namespace delora_ext {
namespace {

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
  m.impl("segmented_adapter_", &segmented_adapter_);
}

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

namespace {

// Direct entry points for eager calls from Python (ops.linear, ops.adapter): the op called through its typed
// dispatcher handle, y alone returned. The generic torch.ops call builds a boxed argument stack from the schema,
// releases and retakes the GIL and wraps all five outputs as Python tensors; this does none of that. Dispatch is the
// same (Autograd, Autocast and Python keys included); ops.py uses it only where no __torch_function__ override or
// mode applies and nothing is being traced.
Tensor linear_entry(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A,
                    const Tensor& B, const Tensor& lam, const Tensor& w, double dropout_p,
                    const std::optional<Tensor>& seed) {
  static auto op = typed_op<decltype(linear_fwd)>("delora_ext::linear_fwd");
  return std::get<0>(op.call(x, weight, bias, A, B, lam, w, dropout_p, seed));
}

Tensor adapter_entry(const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w,
                     double dropout_p, const std::optional<Tensor>& seed) {
  static auto op = typed_op<decltype(adapter_fwd)>("delora_ext::adapter_fwd");
  return std::get<0>(op.call(x, A, B, lam, w, dropout_p, seed));
}

}  // namespace

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
  m.def("linear", torch::wrap_pybind_function(&delora_ext::linear_entry),
        "y of delora_ext::linear_fwd, called directly (eager only: see ops.linear)");
  m.def("adapter", torch::wrap_pybind_function(&delora_ext::adapter_entry),
        "delta of delora_ext::adapter_fwd, called directly (eager only: see ops.adapter)");
  // Kernel-variant switches (delora.h, Tuning), for A/B benchmarks in one process.
  m.def("set_tuning", [](const std::string& name, int value) {
    auto& t = delora_ext::tuning();
    std::atomic<int>* slot = name == "gemm_order"     ? &t.gemm_order
                             : name == "merge_kernel" ? &t.merge_kernel
                             : name == "small_n"      ? &t.small_n
                             : name == "cpu_fused"    ? &t.cpu_fused
                                                      : nullptr;
    if (slot == nullptr)
      throw pybind11::value_error(
          "set_tuning: `name` must be 'gemm_order', 'merge_kernel', 'small_n' or 'cpu_fused', got '" + name + "'");
    const int max_value = slot == &t.small_n || slot == &t.cpu_fused ? 2 : 1;  // off, on, overlap / always
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
    d["cpu_fused"] = delora_ext::tuning().cpu_fused.load();
    return d;
  });
}
