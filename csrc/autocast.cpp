// The Autocast kernels of linear_fwd and adapter_fwd (dispatch_keys.h): x, weight and bias follow the autocast
// dtype like nn.Linear's; the adapter (A, B, λ, w) keeps its own dtype (fp32 master weights), and the op computes
// norms and s in fp32 regardless.
#include <ATen/autocast_mode.h>

#include "dispatch_keys.h"

namespace delora_ext {

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> Autocast<device, key>::linear_fwd(
    const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& A, const Tensor& B,
    const Tensor& lam, const Tensor& w, double p, const std::optional<Tensor>& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dt = at::autocast::get_autocast_dtype(device);
  static auto op = typed_op<decltype(delora_ext::linear_fwd)>("delora_ext::linear_fwd");
  return op.call(at::autocast::cached_cast(dt, x, device), at::autocast::cached_cast(dt, weight, device),
                 at::autocast::cached_cast(dt, bias, device), A, B, lam, w, p, seed);
}

template <c10::DeviceType device, c10::DispatchKey key>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> Autocast<device, key>::adapter_fwd(
    const Tensor& x, const Tensor& A, const Tensor& B, const Tensor& lam, const Tensor& w, double p,
    const std::optional<Tensor>& seed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(key);
  const auto dt = at::autocast::get_autocast_dtype(device);
  static auto op = typed_op<decltype(delora_ext::adapter_fwd)>("delora_ext::adapter_fwd");
  return op.call(at::autocast::cached_cast(dt, x, device), A, B, lam, w, p, seed);
}

template struct Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
template struct Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;

}  // namespace delora_ext
