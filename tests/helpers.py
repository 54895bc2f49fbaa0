"""Shared test helpers: adapter factories, error metrics, the per-dtype tolerance table and skip markers."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import delora_ext

CUDA = torch.cuda.is_available()
NATIVE = delora_ext.ops.NATIVE

requires_native = pytest.mark.skipif(not NATIVE, reason=f"native extension not loaded: {delora_ext.ops.native_error}")
requires_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device visible")

# Relative (Frobenius-norm) error allowed against an fp64 reference, for results computed in full precision.
# Low-precision dtypes are instead held to 2x PyTorch's own error in that dtype (see low_precision_budget).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@contextlib.contextmanager
def tuned(**switches):
    """Run with the given kernel variants (delora_ext.ops.set_tuning), restoring the previous ones after."""
    before = delora_ext.ops.tuning()
    delora_ext.ops.set_tuning(**switches)
    try:
        yield
    finally:
        delora_ext.ops.set_tuning(**{k: before[k] for k in switches if k in before})


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    denom = e.norm().item()
    diff = (a - e).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_adapter(r, in_f, out, kind="random", dtype=torch.float32, device="cpu", seed=0, lam=15.0):
    """A (r, in), B (out, r), lam (1,), w (in,) of the given kind:
    random: A, B ~ N(0, 1/fan); zeroB: B = 0 (PEFT init); clamped: one A row and one B column are 0 so
    their norms sit below the 1e-4 clamp; tiny: every norm below the clamp."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64) / math.sqrt(max(in_f, 1))
    B = torch.randn(out, r, generator=g, dtype=torch.float64) / math.sqrt(r)
    w = torch.rand(in_f, generator=g, dtype=torch.float64) + 0.5
    if kind == "zeroB":
        B.zero_()
    elif kind == "clamped":
        A[0].zero_()
        B[:, -1] = 1e-6
    elif kind == "tiny":
        A *= 1e-7
        B *= 1e-7
    elif kind != "random":
        raise ValueError(kind)
    lam_t = torch.tensor([lam], dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (A, B, lam_t, w)]


def make_base(in_f, out, dtype=torch.float32, device="cpu", seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, in_f, generator=g, dtype=torch.float64) / math.sqrt(max(in_f, 1))
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    return W.to(dtype=dtype, device=device), (b.to(dtype=dtype, device=device) if bias else None)


def make_x(shape, in_f, dtype=torch.float32, device="cpu", seed=2, layout="contiguous"):
    """x of shape (*shape, in): contiguous, or a non-contiguous view with the same values ('strided')."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(*shape, in_f, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    # every other column of a wider tensor: non-contiguous in the last dimension
    wide = torch.randn(*shape, 2 * in_f, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    x = wide[..., ::2]
    assert not x.is_contiguous() or x.numel() <= 1
    return x


def low_precision_budget(fn, args64, dtype):
    """Error PyTorch itself makes running ``fn`` with its float inputs cast to ``dtype`` vs fp64 (per output).

    Returns a list of relative errors; the native op in ``dtype`` must be within 2x of each.
    """
    exp = fn(*args64)
    low = fn(*[a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64])
    exp = exp if isinstance(exp, (tuple, list)) else [exp]
    low = low if isinstance(low, (tuple, list)) else [low]
    return [rel_err(lo, e) for lo, e in zip(low, exp)]


def saved_activation_bytes(layer, x) -> int:
    """Bytes autograd saves for one forward of ``layer`` on ``x``, not counting x, parameters and buffers
    (tensors are told apart by their storage); runs the backward too so nothing is left pending."""
    exclude = {t.untyped_storage().data_ptr() for t in [x, *layer.parameters(), *layer.buffers()]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(saved)
