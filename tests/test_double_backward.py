"""Regression tests from the C++ review: double backward of the autograd ops, and autograd of prep/delta_weight."""
from __future__ import annotations

import warnings

import pytest
import torch

from delora_ext import ops
from delora_ext import reference as ref

from conftest import make_adapter, make_base, make_x, requires_native

pytestmark = requires_native
OPS = torch.ops.delora_ext if ops.NATIVE else None


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("kind", ["random", "tiny"])  # "clamped" has an all-zero A row: NaN second derivative in autograd of norm itself
def test_gradgradcheck_linear(p, kind, gemm_order):
    A, B, lam, w = make_adapter(3, 6, 5, kind, torch.float64)
    W, b = make_base(6, 5, torch.float64)
    x = make_x((2, 4), 6, torch.float64)
    seed = torch.tensor([5], dtype=torch.int64) if p else None
    inputs = [t.clone().requires_grad_() for t in (x, W, b, A, B, lam)]

    def f(x, W, b, A, B, lam):
        return OPS.linear_fwd(x, W, b, A, B, lam, w, p, seed)[0]

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_gradgradcheck_adapter():
    A, B, lam, w = make_adapter(2, 5, 4, "random", torch.float64)
    x = make_x((6,), 5, torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, A, B, lam)]

    def f(x, A, B, lam):
        return OPS.adapter_fwd(x, A, B, lam, w, 0.0, None)[0]

    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_double_backward_matches_reference_gradient_penalty():
    """A gradient penalty ‖∂y/∂x‖² differentiated w.r.t. A and λ, native vs reference."""
    A, B, lam, w = make_adapter(3, 6, 5, "random", torch.float64)
    W, b = make_base(6, 5, torch.float64)
    x = make_x((4,), 6, torch.float64)

    def penalty(fn):
        xs, As, lams = (t.clone().requires_grad_() for t in (x, A, lam))
        y = fn(xs, W, b, As, B, lams, w)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [As, lams])

    got = penalty(ops.linear)
    exp = penalty(ref.linear_ref)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["random", "tiny"])
def test_delta_weight_and_prep_are_differentiable(kind):
    """ops.delta_weight / ops.prep on parameters that require grad: gradients equal the reference's (before, the
    outputs had a 'not implemented' grad_fn and backward gave no gradient with only a warning)."""
    A, B, lam, w = make_adapter(3, 6, 5, kind, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (A, B, lam)]
    gout = torch.randn(5, 6, dtype=torch.float64)
    got = torch.autograd.grad(ops.delta_weight(*leaves, w), leaves, gout)
    exp = torch.autograd.grad(ref.delta_weight_ref(*leaves, w), leaves, gout)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    outs = ops.prep(*leaves, w)
    ref_outs = ref.prep_ref(*leaves, w)
    gs = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, leaves, gs)
    exp = torch.autograd.grad(ref_outs, leaves, gs)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    torch.library.opcheck(OPS.delta_weight.default, tuple(leaves) + (w,))
    torch.library.opcheck(OPS.prep.default, tuple(leaves) + (w,))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_first_order_backward_stays_native(compiled):
    """Only create_graph takes the differentiable composite: an ordinary backward, eager or through
    torch.compile's traced backward graph, still runs the native linear_bwd (and no norm recomputation)."""
    A, B, lam, w = make_adapter(4, 16, 8, "random", torch.float32)
    W, b = make_base(16, 8, torch.float32)
    x = make_x((5,), 16, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]

    def f(x, A, B, lam):
        return ops.linear(x, W, b, A, B, lam, w)

    fn = torch.compile(f, fullgraph=True, backend="aot_eager") if compiled else f
    y = fn(*leaves)
    with torch.profiler.profile() as prof:
        y.sum().backward()
    names = {e.name for e in prof.events()}
    assert "delora_ext::linear_bwd" in names, sorted(names)
    assert not any("vector_norm" in n for n in names), sorted(n for n in names if "norm" in n)
