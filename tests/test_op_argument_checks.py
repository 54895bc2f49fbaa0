"""The fake (meta) kernels refuse the arguments the real kernels refuse, naming the same argument; merging into a
weight whose elements share memory names `weight`."""
from __future__ import annotations

import re

import pytest
import torch

import delora_ext

from helpers import requires_native


def _lin():
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(3, 8, generator=g), weight=torch.randn(6, 8, generator=g), bias=torch.randn(6, generator=g),
                A=torch.randn(4, 8, generator=g), B=torch.randn(6, 4, generator=g), lam=torch.ones(1),
                w=torch.rand(8, generator=g) + 0.5, dropout_p=0.0, seed=None)


def _bwd():
    d = _lin()
    return dict(grad_y=torch.randn(3, 6), x=d["x"], weight=d["weight"], **_adapter(d), u=torch.randn(3, 4),
                s=torch.rand(4), a_norm=torch.rand(4), b_norm=torch.rand(4), dropout_p=0.0, seed=None,
                output_mask=[True, True, True, True])


def _adapter(d):
    return {k: d[k] for k in ("A", "B", "lam", "w")}


F64, I32, I64, F8 = torch.float64, torch.int32, torch.int64, torch.float8_e4m3fn
SEED32 = torch.zeros(1, dtype=I32)
# op -> (base arguments in schema order, [(what, changes)]): each change the real kernel refuses
CASES = {
    "linear_fwd": (lambda: _lin(), [
        ("weight in 9", dict(weight=torch.randn(6, 9))), ("weight out 5", dict(weight=torch.randn(5, 8))),
        ("x in 7", dict(x=torch.randn(3, 7))), ("x 0-d", dict(x=torch.tensor(1.0))),
        ("x int", dict(x=torch.ones(3, 8, dtype=I32))), ("x float8", dict(x=torch.randn(3, 8).to(F8))),
        ("A 1-d", dict(A=torch.randn(8))),
        ("A no rows", dict(A=torch.randn(0, 8))), ("B r 3", dict(B=torch.randn(6, 3))),
        ("lam 2", dict(lam=torch.ones(2))), ("w 7", dict(w=torch.ones(7))), ("w int", dict(w=torch.ones(8, dtype=I64))),
        ("bias 5", dict(bias=torch.randn(5))), ("weight f64", dict(weight=torch.randn(6, 8, dtype=F64))),
        ("bias f64", dict(bias=torch.randn(6, dtype=F64))), ("p 1", dict(dropout_p=1.0)),
        ("p without seed", dict(dropout_p=0.5)), ("seed int32", dict(dropout_p=0.5, seed=SEED32)),
        ("the example: x (3,8), W (6,9), A (4,7)", dict(weight=torch.randn(6, 9), A=torch.randn(4, 7),
                                                        w=torch.ones(7)))]),
    "adapter_fwd": (lambda: {k: v for k, v in _lin().items() if k not in ("weight", "bias")}, [
        ("x in 7", dict(x=torch.randn(3, 7))), ("x float8", dict(x=torch.randn(3, 8).to(F8))),
        ("B r 5", dict(B=torch.randn(6, 5))), ("w 2-d", dict(w=torch.ones(1, 8))),
        ("p -0.1", dict(dropout_p=-0.1)), ("p without seed", dict(dropout_p=0.25))]),
    "linear_bwd": (_bwd, [
        ("grad_y out 5", dict(grad_y=torch.randn(3, 5))), ("grad_y rows 2", dict(grad_y=torch.randn(2, 6))),
        ("grad_y f64", dict(grad_y=torch.randn(3, 6, dtype=F64))), ("u r 3", dict(u=torch.randn(3, 3))),
        ("u rows 4", dict(u=torch.randn(4, 4))), ("s 3", dict(s=torch.rand(3))), ("a_norm 5", dict(a_norm=torch.rand(5))),
        ("b_norm int", dict(b_norm=torch.ones(4, dtype=I64))), ("weight in 9", dict(weight=torch.randn(6, 9))),
        ("x in 9", dict(x=torch.randn(3, 9)))]),
    "merge_": (lambda: dict(weight=torch.randn(6, 8), **_adapter(_lin()), alpha=1.0), [
        ("weight in 9", dict(weight=torch.randn(6, 9))), ("weight out 5", dict(weight=torch.randn(5, 8))),
        ("weight int", dict(weight=torch.ones(6, 8, dtype=I32))), ("A in 9", dict(A=torch.randn(4, 9)))]),
    "merge_many_": (lambda: dict(weight=torch.randn(6, 8), **{k: [v, v.clone()] for k, v in _adapter(_lin()).items()},
                                 alpha=[1.0, -1.0]), [
        ("empty", dict(A=[], B=[], lam=[], w=[], alpha=[])), ("lengths", dict(alpha=[1.0])),
        ("adapter 1 out 5", dict(B=[torch.randn(6, 4), torch.randn(5, 4)])),
        ("adapter 1 fp64", dict(A=[torch.randn(4, 8), torch.randn(4, 8, dtype=F64)])),
        ("weight in 9", dict(weight=torch.randn(6, 9)))]),
    "delta_weight": (lambda: _adapter(_lin()), [("A 3-d", dict(A=torch.randn(1, 4, 8))), ("B r 2", dict(B=torch.randn(6, 2)))]),
    "prep": (lambda: _adapter(_lin()), [("lam 0", dict(lam=torch.ones(0))), ("w 9", dict(w=torch.ones(9)))]),
}
ALL = [(op, what, change) for op, (_, changes) in CASES.items() for what, change in changes]


def _to_meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, list):
        return [_to_meta(t) for t in v]
    return v


def _refusal(op, args):
    try:
        getattr(torch.ops.delora_ext, op)(*args.values())
    except RuntimeError as e:
        return str(e)
    return None


def _named(msg):
    """(op, the argument the message names first: `x`, `A[1]`, or "adapter 1")."""
    m = re.search(r"delora_ext::(\w+): (?:adapter (\d+)|.*?`([^`]+)`)", msg or "")
    return (m.group(1), f"adapter {m.group(2)}" if m.group(2) else m.group(3)) if m else None


@requires_native
@pytest.mark.parametrize("op,what,change", ALL, ids=[f"{op}-{what}" for op, what, _ in ALL])
def test_the_fake_kernels_refuse_what_the_real_kernels_refuse(op, what, change):
    args = CASES[op][0]()
    args.update(change)
    real = _refusal(op, args)
    assert real is not None, f"test bug: the CPU kernel accepts {what}"
    assert _named(real) is not None, f"test bug: the CPU kernel's message names no argument: {real}"
    fake = _refusal(op, {k: _to_meta(v) for k, v in args.items()})
    assert fake is not None, f"the meta kernel accepts {what}, which the CPU kernel refuses: {real}"
    assert _named(fake) == _named(real), f"real: {real!r}; meta: {fake!r}"


@requires_native
@pytest.mark.parametrize("op", list(CASES))
def test_the_fake_kernels_accept_what_the_real_kernels_accept(op):
    args = CASES[op][0]()
    assert _refusal(op, args) is None
    assert _refusal(op, {k: _to_meta(v) for k, v in args.items()}) is None


@pytest.mark.parametrize("entry", ["merge_", "merge_many_"])
def test_merging_into_a_weight_whose_elements_share_memory_names_weight(entry):
    d = _lin()
    W = torch.randn(1, 8).expand(6, 8)  # every row is the same memory
    before = W.clone()
    with pytest.raises(ValueError, match=rf"delora_ext::{entry}: `weight` has elements that share memory"):
        if entry == "merge_":
            delora_ext.ops.merge_(W, d["A"], d["B"], d["lam"], d["w"])
        else:
            delora_ext.ops.merge_many_(W, [tuple(_adapter(d).values())], [1.0])
    assert torch.equal(W, before)


@requires_native
def test_the_raw_merge_op_names_a_weight_whose_elements_share_memory():
    """torch.ops.delora_ext.merge_ itself (not only the Python wrapper) names `weight`, not torch's generic
    internal-overlap error."""
    d = _lin()
    W = torch.randn(1, 8).expand(6, 8)
    with pytest.raises(RuntimeError, match=r"delora_ext::merge_: `weight` has elements that share memory"):
        torch.ops.delora_ext.merge_(W, d["A"], d["B"], d["lam"], d["w"], 1.0)


@requires_native
@pytest.mark.parametrize("entry", ["linear", "adapter"])
def test_a_w_that_requires_grad_is_refused_not_left_without_a_gradient(entry):
    """w is a constant of the forward ops (their node has no gradient for it): asking for one is an error, not a
    gradient that silently stays None."""
    d = _lin()
    w = d["w"].clone().requires_grad_()
    args = ((d["x"], d["weight"], d["bias"]) if entry == "linear" else (d["x"],)) + (d["A"], d["B"], d["lam"])
    with pytest.raises(RuntimeError, match=r"`w` requires grad, but w .* gets no gradient; pass w\.detach\(\)"):
        getattr(delora_ext.ops, entry)(*args, w)
    with torch.no_grad():  # no graph recorded: nothing to refuse
        getattr(delora_ext.ops, entry)(*args, w)
    getattr(delora_ext.ops, entry)(*args, w.detach())


def test_the_merge_fallback_refuses_factors_on_another_device_like_the_native_op():
    d = _lin()
    W = torch.empty(6, 8, device="meta")
    with pytest.raises(RuntimeError, match=r"delora_ext::merge_: `A` is on cpu but `weight` is on meta"):
        delora_ext.ops.merge_(W, d["A"], d["B"], d["lam"], d["w"])


@requires_native
def test_a_shape_mismatch_names_both_sides():
    """in_features and out_features are read off A and B: a mismatch message shows their shapes too, so a wrong A
    is not mistaken for a wrong w or weight."""
    d = _lin()
    with pytest.raises(RuntimeError, match=r"`w` must have shape \(9,\) \(in_features, the columns of `A`, whose "
                                           r"shape is \[4, 9\]\)"):
        torch.ops.delora_ext.prep(torch.randn(4, 9), d["B"], d["lam"], d["w"])
    with pytest.raises(RuntimeError, match=r"`weight` must have shape \(7, 8\) \(the rows of `B`, shape \[7, 4\]"):
        torch.ops.delora_ext.merge_(d["weight"], d["A"], torch.randn(7, 4), d["lam"], d["w"], 1.0)
