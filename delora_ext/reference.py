"""Pure-PyTorch DeLoRA, written for clarity: the test oracle and the fallback where no native kernel exists.

Semantics are Hugging Face PEFT's ``DeloraLinear`` (peft.tuners.delora):

    a_k = max(‖A[k,:]‖₂, 1e-4)      b_k = max(‖B[:,k]‖₂, 1e-4)      s_k = λ / (r · a_k · b_k)
    y   = x Wᵀ + bias + (((dropout(x) ⊙ w) Aᵀ) ⊙ s) Bᵀ
    ΔW  = B · diag(s) · A · diag(w)

Shapes: x (..., in), W (out, in), A (r, in), B (out, r), λ (1,), w (in,).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-4


def norms_ref(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw row norms of A and column norms of B (before the clamp)."""
    return A.norm(dim=1), B.norm(dim=0)


def scale_ref(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """s_k = λ / (r · max(‖A_k‖, eps) · max(‖B_:,k‖, eps)), shape (r,)."""
    r = A.shape[0]
    a, b = norms_ref(A, B)
    return (lam / r) / (torch.clamp(a, min=NORM_EPS) * torch.clamp(b, min=NORM_EPS))


def prep_ref(A, B, lam, w):
    """(A ⊙ w, s, raw ‖A_k‖, raw ‖B_:,k‖): what the native ``prep`` op returns."""
    a, b = norms_ref(A, B)
    return A * w, scale_ref(A, B, lam), a, b


def dropout_keep_ref(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The keep mask the native ops derive from ``seed`` for a contiguous tensor of ``shape``.

    Element i (flattened index) is kept iff fmix32(lo32(i)·0x9e3779b1 ^ key) >> 8 ≥ p·2²⁴, with
    key = fmix32(lo32(seed) ^ fmix32(hi32(i) ^ hi32(seed))) — see csrc/delora_math.h. Integer arithmetic
    here is done in int64 and masked to 32 bits.
    """
    m32 = 0xFFFFFFFF

    def fmix32(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & m32
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & m32
        return h ^ (h >> 16)

    n = 1
    for d in shape:
        n *= int(d)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    seed_lo, seed_hi = seed & m32, seed >> 32
    idx = torch.arange(n, dtype=torch.int64, device=device)
    idx_lo, idx_hi = idx & m32, idx >> 32
    key = fmix32(seed_lo ^ fmix32(idx_hi ^ seed_hi))
    h = fmix32(((idx_lo * 0x9E3779B1) & m32) ^ key)
    threshold = int(p * 16777216.0)
    return ((h >> 8) >= threshold).reshape(tuple(shape))


def adapter_ref(x, A, B, lam, w, dropout_mask=None, dropout_p: float = 0.0):
    """The DeLoRA term alone, PEFT's order of operations: ((x_d ⊙ w) Aᵀ ⊙ s) Bᵀ, in x's shape (..., out).

    ``dropout_mask`` (bool, x's shape) applies inverted dropout with probability ``dropout_p``.
    """
    x_d = x if dropout_mask is None else x * dropout_mask / (1.0 - dropout_p)
    h = F.linear(x_d * w, A)
    h = h * scale_ref(A, B, lam)
    return F.linear(h, B)


def linear_ref(x, weight, bias, A, B, lam, w, dropout_mask=None, dropout_p: float = 0.0):
    """y = x Wᵀ + bias + adapter_ref(x, ...), computed as PEFT does (base output plus the DeLoRA term)."""
    base = F.linear(x, weight, bias)
    return base + adapter_ref(x, A, B, lam, w, dropout_mask, dropout_p).to(base.dtype)


def delta_weight_ref(A, B, lam, w):
    """ΔW = B diag(s) A diag(w), shape (out, in)."""
    return (B @ torch.diag_embed(scale_ref(A, B, lam)) @ A) * w.unsqueeze(0)


def merge_ref(weight, A, B, lam, w, alpha: float = 1.0):
    """weight + alpha · ΔW, as a new tensor in weight's dtype."""
    return (weight.to(torch.float64) + alpha * delta_weight_ref(A, B, lam, w).to(torch.float64)).to(weight.dtype)


def column_norms_ref(weight: torch.Tensor) -> torch.Tensor:
    """w_j = ‖W[:, j]‖₂ in fp32 (PEFT computes it in the weight's dtype, which costs ~2e-3 in bf16)."""
    return torch.linalg.vector_norm(weight.detach().to(torch.float32), dim=0)
