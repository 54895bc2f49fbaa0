"""The DeLoRA computation every adapted layer shares, written once.

A DeLoRA adapter is the tuple ``(A, B, λ, w)``: A (r, in), B (out, r), λ (1,), w (in,). A layer's output is

    y = base(x) + Σ_terms ((dropout(x) ⊙ w) Aᵀ ⊙ s) Bᵀ,      s_k = λ / (r · max(‖A_k‖, ε) · max(‖B_:,k‖, ε))

where the terms are its active adapters (a paper-init adapter adds its frozen initial update with −λ₀). Both
``DeLoRALinear`` and the PEFT-layer backend (``delora_ext.peft``) call these functions with their own containers;
the native ops (or the reference, where no kernel exists) are chosen by ``delora_ext.ops``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import ops, quant

# (A, B, λ, w) and the dropout probability on the adapter's input (0 in eval and for frozen terms)
Term = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]

# rows of W whose squares are summed at a time for w: bounds the fp32 copy of a large (or quantised) weight
NORM_CHUNK_ROWS = 1024


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 family): y = x W + b with W stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


# nn.Module's global hook registries (register_module_forward_hook and the like), mutated in place, never rebound
_GLOBAL_HOOKS = tuple(getattr(_nn_module, k) for k in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                       "_global_backward_hooks", "_global_backward_pre_hooks"))


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its forward: its own forward or backward hooks, global module
    hooks, or an instance-level forward (accelerate's offload/device-map hooks replace ``module.forward``)."""
    g0, g1, g2, g3 = _GLOBAL_HOOKS
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or g0 or g1 or g2 or g3 or "forward" in module.__dict__)


def plain_forward(module: nn.Module) -> bool:
    """Whether the base layer computes exactly x Wᵀ + b, so the fused native op can replace its forward. Not when
    calling it runs more than its forward (``_hooked``); then the layer calls it, as PEFT's does, and adds the
    adapter term. Nor when the weight is a quantised tensor subclass (torchao's quantize_ keeps the nn.Linear and
    swaps its weight)."""
    if _hooked(module):
        return False
    if isinstance(module, nn.Linear):
        W = module._parameters.get("weight")  # not module.weight: nn.Module.__getattr__ is a Python call a forward
        return type(module).forward is nn.Linear.forward and not quant.is_quantized_weight(
            W if W is not None else module.weight)
    return is_conv1d(module) and type(module).__module__.startswith("transformers.")


def linear_operands(module: nn.Module) -> tuple | None:
    """(W, bias) of a base that ``plain_forward`` accepts, as ``weight_and_bias`` reads them; None when its forward
    is wrapped or it is not a plain linear. A dense nn.Linear (the usual base) is decided from its type and its
    instance dicts alone: this runs on every forward."""
    if type(module) is nn.Linear:
        if _hooked(module):
            return None
        p = module._parameters
        W = p["weight"] if "weight" in p else module.weight
        cls = type(W)
        if not (cls is nn.Parameter or cls is torch.Tensor) and quant.is_quantized_weight(W):
            return None
        return W, (p["bias"] if "bias" in p else module.bias)
    return weight_and_bias(module) if plain_forward(module) else None


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The base weight as (out, in): a transposed view for Conv1D, whose weight is stored (in, out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t() if is_conv1d(module) else module.weight


def weight_and_bias(module: nn.Module) -> tuple:
    """(``weight_oi(module)``, bias) of a plain linear base, read from its parameter dict when they are there: each
    nn.Module.__getattr__ is a Python call, a measurable part of a small layer's forward. (A parametrized weight or
    bias is a property, not in the dict.)"""
    p = module._parameters
    W = p["weight"] if "weight" in p and isinstance(module, nn.Linear) else weight_oi(module)
    return W, (p["bias"] if "bias" in p else module.bias)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """w_j = ‖W[:, j]‖₂ of an (out, in) weight, in fp32, accumulated over chunks of rows so that no full fp32
    copy of a large weight exists at once (PEFT takes the norm in the weight's dtype: ~2e-3 off in bf16)."""
    W = weight.detach()
    if W.shape[0] <= NORM_CHUNK_ROWS:
        return torch.linalg.vector_norm(W.to(torch.float32), dim=0)
    sq = torch.zeros(W.shape[1], dtype=torch.float32, device=W.device)
    for rows in W.split(NORM_CHUNK_ROWS, dim=0):
        sq += rows.to(torch.float32).square().sum(0)
    return sq.sqrt()


def forward(base_layer: nn.Module, x: torch.Tensor, terms: Sequence[Term], *args, **kwargs) -> torch.Tensor:
    """The adapted layer's output: base_layer(x) plus every term's DeLoRA update.

    When the base layer is a plain linear (``plain_forward``) and gets no extra arguments, the first term is fused
    with the base GEMM (one native op, which saves only x and the N×r projection for backward); otherwise the base
    layer runs as it is and each term is added by the adapter-only op.
    """
    if not terms:
        return base_layer(x, *args, **kwargs)
    operands = None if args or kwargs else linear_operands(base_layer)
    if operands is not None and operands[0].is_floating_point():
        return fused_forward(base_layer, x, terms, operands)
    y = base_layer(x, *args, **kwargs)
    for A, B, lam, w, p in terms:
        y = y + ops.adapter(x, A, B, lam, w, p).to(y.dtype)
    return y


def fused_forward(base_layer: nn.Module, x: torch.Tensor, terms: Sequence[Term], operands: tuple | None = None
                  ) -> torch.Tensor:
    """``forward`` for a base layer already known to be a plain linear with a floating-point weight: the first term
    fused with the base GEMM, one op call per layer and direction; further terms added by the adapter-only op.
    ``operands``: its (W, bias) when the caller has read them (``linear_operands``)."""
    A, B, lam, w, p = terms[0]
    W, bias = operands if operands is not None else weight_and_bias(base_layer)
    y = ops.linear(x, W, bias, A, B, lam, w, p)
    for A, B, lam, w, p in terms[1:]:
        y = y + ops.adapter(x, A, B, lam, w, p).to(y.dtype)
    return y


def apply_delta(weight: torch.Tensor, adapters: Sequence[tuple], alphas: Sequence[float]) -> None:
    """weight += Σ alpha_i · ΔW_i in place for the (out, in) view ``weight``, in one pass (one rounding per
    element). ``adapters``: (A, B, λ, w) tuples. fp64 adapters (after ``model.double()``) mixed with fp32 ones
    are all computed in fp64."""
    adapters = [tuple(t.to(weight.device) for t in a[:4]) for a in adapters]
    if len({a[0].dtype == torch.float64 for a in adapters}) > 1:
        adapters = [tuple(t.detach().to(torch.float64) for t in a) for a in adapters]
    ops.merge_many_(weight, adapters, alphas)


def delta_weight(adapters: Sequence[tuple], alphas: Sequence[float] | None = None,
                 grad: bool = False) -> torch.Tensor:
    """Σ alpha_i · ΔW_i, (out, in), fp32 (fp64 for fp64 adapters); alphas default to 1. ``grad=True`` keeps the
    autograd graph where grad mode is on (PEFT's ``get_delta_weight`` is differentiable)."""
    alphas = [1.0] * len(adapters) if alphas is None else alphas
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        d = None
        for a, alpha in zip(adapters, alphas):
            t = ops.delta_weight(*a[:4])
            t = t if alpha == 1.0 else t * alpha
            d = t if d is None else d + t
        return d


def folded(adapters: Sequence[tuple], alphas: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA factors of Σ alpha_i · ΔW_i: (A' = [A_i ⊙ w_i] stacked, (Σr, in); B' = [alpha_i · B_i ⊙ s_i]
    side by side, (out, Σr)), fp32, so that B' A' = Σ alpha_i ΔW_i."""
    alphas = [1.0] * len(adapters) if alphas is None else alphas
    As, Bs = [], []
    with torch.no_grad():
        for a, alpha in zip(adapters, alphas):
            Af, s, _, _ = ops.prep(*a[:4])
            As.append(Af.float())
            Bs.append((a[1].float() * s.float()) * alpha)
    return torch.cat(As, 0), torch.cat(Bs, 1)
