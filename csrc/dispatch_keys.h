// The kernels at the Autograd and Autocast dispatch keys (autograd.cpp, autocast.cpp, registered in
// registration.cpp). They wrap the backend entry points (delora.h) and re-dispatch to them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

#include "delora.h"

namespace delora_ext {

// The dispatcher's handle of an op (e.g. "delora_ext::linear_fwd"), typed as Sig, for calls that re-dispatch.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// ---- Autograd (autograd.cpp) ---------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd_autograd(const Tensor& x, const Tensor& weight,
                                                                       const std::optional<Tensor>& bias,
                                                                       const Tensor& A, const Tensor& B,
                                                                       const Tensor& lam, const Tensor& w, double p,
                                                                       const std::optional<Tensor>& seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd_autograd(const Tensor& x, const Tensor& A,
                                                                        const Tensor& B, const Tensor& lam,
                                                                        const Tensor& w, double p,
                                                                        const std::optional<Tensor>& seed);
std::tuple<Tensor, Tensor, Tensor, Tensor> prep_autograd(const Tensor& A, const Tensor& B, const Tensor& lam,
                                                         const Tensor& w);
Tensor delta_weight_autograd(const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w);

// ---- Autocast (autocast.cpp) ---------------------------------------------------------------------------
template <c10::DeviceType device, c10::DispatchKey key>
struct Autocast {
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_fwd(const Tensor& x, const Tensor& weight,
                                                                       const std::optional<Tensor>& bias,
                                                                       const Tensor& A, const Tensor& B,
                                                                       const Tensor& lam, const Tensor& w, double p,
                                                                       const std::optional<Tensor>& seed);
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_fwd(const Tensor& x, const Tensor& A,
                                                                        const Tensor& B, const Tensor& lam,
                                                                        const Tensor& w, double p,
                                                                        const std::optional<Tensor>& seed);
};
using AutocastCPU = Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
using AutocastCUDA = Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;
extern template struct Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
extern template struct Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;

}  // namespace delora_ext
