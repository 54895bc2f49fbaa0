"""Every native op against delora_ext.reference (fp64 oracle), over dtypes and odd shapes; gradcheck; opcheck."""
from __future__ import annotations

import pytest
import torch

from delora_ext import ops
from delora_ext import reference as ref

from helpers import (
    TOL,
    assert_close,
    low_precision_budget,
    make_adapter,
    make_base,
    make_x,
    rel_err,
    requires_native,
    tuned,
)

pytestmark = requires_native
OPS = torch.ops.delora_ext if ops.NATIVE else None

# (leading shape of x, in, out, r)
SHAPES = [
    ((4,), 7, 5, 1),
    ((3, 5), 16, 4097, 3),
    ((0,), 8, 6, 2),
    ((2, 3, 4), 33, 17, 4),
    ((37,), 64, 48, 16),
    ((), 12, 10, 2),  # 1-D x
]
KINDS = ["random", "zeroB", "clamped"]


def _to64(*ts):
    return [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in ts]


def _grads(y, inputs, seed=3):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], g, allow_unused=False)
    return grads


@pytest.mark.parametrize("shape,in_f,out,r", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_forward_backward_matches_reference(shape, in_f, out, r, kind, layout, dtype, adapter_path):
    A, B, lam, w = make_adapter(r, in_f, out, kind, dtype)
    W, b = make_base(in_f, out, dtype)
    x = make_x(shape, in_f, dtype, layout=layout).requires_grad_()
    for t in (A, B, lam):
        t.requires_grad_()
    y = ops.linear(x, W, b, A, B, lam, w)
    assert y.shape == (*shape, out) and y.dtype == dtype

    x64, W64, b64, A64, B64, lam64, w64 = _to64(x, W, b, A, B, lam, w)
    y64 = ref.linear_ref(x64, W64, b64, A64, B64, lam64, w64)
    assert_close(y, y64, TOL[dtype], "y")

    g_nat = _grads(y, [x, A, B, lam])
    g_ref = _grads(y64, [x64, A64, B64, lam64])
    for name, gn, gr in zip(["dx", "dA", "dB", "dlam"], g_nat, g_ref):
        assert gn.dtype == dtype
        assert_close(gn, gr, TOL[dtype], name)


@pytest.mark.parametrize("shape,in_f,out,r", SHAPES[:4])
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_forward_backward_matches_reference(shape, in_f, out, r, kind, adapter_path):
    A, B, lam, w = make_adapter(r, in_f, out, kind, torch.float64)
    x = make_x(shape, in_f, torch.float64).requires_grad_()
    for t in (A, B, lam):
        t.requires_grad_()
    y = ops.adapter(x, A, B, lam, w)
    y_ref = ref.adapter_ref(x, A, B, lam, w)
    assert_close(y, y_ref, TOL[torch.float64], "delta")
    for name, gn, gr in zip(["dx", "dA", "dB", "dlam"], _grads(y, [x, A, B, lam]), _grads(y_ref, [x, A, B, lam])):
        assert_close(gn, gr, TOL[torch.float64], name)


def test_zero_B_init_is_exactly_base_and_gives_large_dB(adapter_path):
    """PEFT's init: the DeLoRA term is exactly 0, s ~ 1e4 through the clamp, and dB is large (not 'fixed')."""
    A, B, lam, w = make_adapter(4, 32, 16, "zeroB")
    W, b = make_base(32, 16)
    x = make_x((8,), 32)
    B.requires_grad_()
    y = ops.linear(x, W, b, A, B, lam, w)
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
    _, s, _, b_norm = ops.prep(A, B, lam, w)
    assert torch.all(b_norm == 0) and torch.all(s > 1e3)
    (gB,) = torch.autograd.grad(y, B, torch.ones_like(y))
    B64 = B.detach().double().requires_grad_()
    (gB_ref,) = torch.autograd.grad(ref.linear_ref(x.double(), W.double(), b.double(), A.double(), B64,
                                                   lam.double(), w.double()).sum(), B64)
    assert_close(gB, gB_ref, TOL[torch.float32], "dB at B=0")
    assert gB.abs().max() > 100


@pytest.mark.parametrize("kind", KINDS + ["tiny"])
def test_prep_matches_reference(kind):
    A, B, lam, w = make_adapter(5, 19, 23, kind, torch.float64)
    for got, exp, name in zip(ops.prep(A, B, lam, w), ref.prep_ref(A, B, lam, w), ["A_folded", "s", "a", "b"]):
        assert_close(got, exp, TOL[torch.float64], name)


@pytest.mark.parametrize("lam_value", [15.0, 0.0, -3.5])
def test_lambda_zero_and_negative(lam_value):
    A, B, lam, w = make_adapter(3, 10, 9, "random", torch.float64, lam=lam_value)
    W, b = make_base(10, 9, torch.float64)
    x = make_x((6,), 10, torch.float64).requires_grad_()
    lam.requires_grad_()
    y = ops.linear(x, W, b, A, B, lam, w)
    y_ref = ref.linear_ref(x, W, b, A, B, lam, w)
    assert_close(y, y_ref, TOL[torch.float64], "y")
    g = torch.autograd.grad(y.sum(), [x, lam])
    g_ref = torch.autograd.grad(y_ref.sum(), [x, lam])
    for gn, gr in zip(g, g_ref):
        assert torch.isfinite(gn).all()
        assert_close(gn, gr, TOL[torch.float64], "grad")


@pytest.mark.parametrize("out,in_f,r", [(5, 7, 1), (4097, 7, 3), (64, 96, 16)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_merge_and_delta_weight(out, in_f, r, wdtype):
    A, B, lam, w = make_adapter(r, in_f, out, "random", torch.float32)
    W, _ = make_base(in_f, out, torch.float32)
    W = W.to(wdtype)
    expected = ref.merge_ref(W, A.double(), B.double(), lam.double(), w.double())
    merged = W.clone()
    ops.merge_(merged, A, B, lam, w, 1.0)
    if wdtype in (torch.float32, torch.float64):
        assert_close(merged, expected, TOL[torch.float32], "merged")
    else:
        # one rounding of the fp32-accumulated sum: at most half an ulp per element away from the fp64 result
        exact = W.double() + ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
        ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
        assert ((merged.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()
    assert_close(ops.delta_weight(A, B, lam, w), ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double()),
                 TOL[torch.float32], "delta_weight")
    ops.merge_(merged, A, B, lam, w, -1.0)
    if wdtype == torch.float32:
        assert_close(merged, W, 1e-6, "unmerged")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_merge_many_is_one_pass_with_one_rounding(wdtype, layout):
    """Three adapters of different ranks (one subtracted) in one pass: within half an ulp of the exact sum,
    where three merge_ calls would round three times."""
    out, in_f = 33, 70
    adapters = [make_adapter(r, in_f, out, "random", torch.float32, seed=r, lam=5.0 * r) for r in (1, 4, 7)]
    alphas = [1.0, -0.5, 2.0]
    W, _ = make_base(in_f, out, torch.float32)
    W = W.to(wdtype)
    merged = W.clone() if layout == "contiguous" else W.t().contiguous().t()
    ops.merge_many_(merged, adapters, alphas)
    exact = W.double() + sum(al * ref.delta_weight_ref(*[t.double() for t in ad]) for ad, al in zip(adapters, alphas))
    if wdtype in (torch.float32, torch.float64):
        assert_close(merged, exact, TOL[torch.float32], "merged")
    else:
        ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
        assert ((merged.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()
    # one adapter through merge_many_ is merge_ exactly
    one_a, one_b = W.clone(), W.clone()
    ops.merge_many_(one_a, adapters[1:2], [0.75])
    ops.merge_(one_b, *adapters[1], 0.75)
    assert torch.equal(one_a, one_b)


def test_merge_many_errors_name_the_argument():
    A, B, lam, w = make_adapter(3, 10, 6)
    A2, B2, lam2, w2 = make_adapter(2, 10, 5)
    W, _ = make_base(10, 6)
    with pytest.raises(RuntimeError, match=r"`A` must hold at least one adapter"):
        OPS.merge_many_(W, [], [], [], [], [])
    with pytest.raises(RuntimeError, match=r"must have the same length, got 1, 1, 1, 1, 2"):
        OPS.merge_many_(W, [A], [B], [lam], [w], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"adapter 1 is \(out, in\) = \(5, 10\) but adapter 0 is \(6, 10\)"):
        OPS.merge_many_(W, [A, A2], [B, B2], [lam, lam2], [w, w2], [1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"all adapters must compute in the same precision"):
        OPS.merge_many_(W, [A, A.double()], [B, B.double()], [lam, lam.double()], [w, w.double()], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"one entry per adapter"):
        ops.merge_many_(W, [(A, B, lam, w)], [1.0, 2.0])
    W0 = W.clone()
    with pytest.raises(RuntimeError, match=r"`weight` must have shape \(6, 10\)"):
        OPS.merge_many_(W[:4], [A], [B], [lam], [w], [1.0])
    assert torch.equal(W, W0)


def test_merge_is_in_place_on_views():
    A, B, lam, w = make_adapter(2, 8, 6)
    W, _ = make_base(8, 6)
    big = torch.zeros(6, 16)
    view = big[:, ::2]
    view.copy_(W)
    OPS.merge_(view, A, B, lam, w, 1.0)
    assert_close(big[:, ::2], ref.merge_ref(W, A, B, lam, w), TOL[torch.float32], "strided merge")
    assert torch.all(big[:, 1::2] == 0)


# ---- low precision: within 2x of PyTorch's own error in that dtype ------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", "fp32"])
def test_low_precision_within_2x_of_torch(dtype, param_dtype, adapter_path):
    """Mean relative error over several upstream gradients (one sample of a scalar such as dλ is noise)."""
    in_f, out, r = 96, 80, 8
    A, B, lam, w = make_adapter(r, in_f, out, "random", torch.float64)
    W, b = make_base(in_f, out, torch.float64)
    x = make_x((64,), in_f, torch.float64)

    def run(fn, x, W, b, A, B, lam, w, g):
        x, A, B, lam = [t.detach().clone().requires_grad_() for t in (x, A, B, lam)]
        y = fn(x, W, b, A, B, lam, w)
        grads = torch.autograd.grad(y, [x, A, B, lam], g.to(y.dtype))
        return [y, *grads]

    pd = dtype if param_dtype == "same" else torch.float32
    ours, torchs = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    seeds = range(8)
    for seed in seeds:
        g = torch.randn(64, out, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        args64 = (x, W, b, A, B, lam, w, g)
        torchs += torch.tensor(low_precision_budget(lambda *a: run(ref.linear_ref, *a), args64, dtype))
        exp = run(ref.linear_ref, *args64)
        got = run(ops.linear, x.to(dtype), W.to(dtype), b.to(dtype), A.to(pd), B.to(pd), lam.to(pd), w.to(pd),
                  g.to(dtype))
        ours += torch.tensor([rel_err(gt, e) for gt, e in zip(got, exp)])
    ours, torchs = ours / len(seeds), torchs / len(seeds)
    for name, err, bud in zip(["y", "dx", "dA", "dB", "dlam"], ours.tolist(), torchs.tolist()):
        assert err <= 2 * bud, f"{name}: mean error {err:.3e} vs torch's own {bud:.3e} in {dtype}"


@pytest.mark.parametrize("r", [1, 4, 8])
def test_fp16_zero_B_init_is_exact_not_nan(r, adapter_path):
    """B = 0 gives s ~ 1e4·λ/r through the clamp; u ⊙ s rounded to fp16 would be inf and inf·0 = NaN.
    PEFT (fp32 scaling) returns exactly the base output, and so must we, in forward and backward."""
    A, B, lam, w = make_adapter(r, 64, 32, "zeroB", torch.float32)
    W, b = make_base(64, 32)
    x = (4 * make_x((16,), 64)).half().requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = ops.linear(x, W.half(), b.half(), A, B, lam, w)
    assert torch.equal(y, torch.nn.functional.linear(x, W.half(), b.half()))
    gx, gA, gB = torch.autograd.grad(y.float().sum(), [x, A, B])
    assert torch.isfinite(gx).all() and torch.isfinite(gA).all() and torch.isfinite(gB).all()


def test_fp16_clamped_row_does_not_overflow(adapter_path):
    """An A row below the clamp gives s ~ |λ|/(r·eps·b); B ⊙ s would overflow fp16 — PEFT scales u in fp32."""
    A, B, lam, w = make_adapter(1, 16, 8, "random", torch.float32, lam=15.0)
    A.mul_(1e-6)  # ‖A‖ < eps: s = 15 / (1e-4 · ‖B‖) ~ 1e5
    W, b = make_base(16, 8)
    x = make_x((4,), 16)
    y = ops.linear(x.half(), W.half(), b.half(), A, B, lam, w)
    y_ref = ref.linear_ref(x.double(), W.double(), b.double(), A.double(), B.double(), lam.double(), w.double())
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < 5e-3


# ---- dropout: the mask is regenerated from the seed, identical to the reference's --------------------
def test_dropout_matches_reference_mask(adapter_path):
    in_f, out, r, p = 24, 10, 3, 0.3
    A, B, lam, w = make_adapter(r, in_f, out, "random", torch.float64)
    W, b = make_base(in_f, out, torch.float64)
    x = make_x((5, 7), in_f, torch.float64).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    seed = torch.tensor([123456789012345], dtype=torch.int64)
    y, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, p, seed)
    keep = ref.dropout_keep_ref(123456789012345, x.shape, p)
    y_ref = ref.linear_ref(x, W, b, A, B, lam, w, dropout_mask=keep, dropout_p=p)
    assert_close(y, y_ref, TOL[torch.float64], "y with dropout")
    for name, gn, gr in zip(["dx", "dA", "dB"], _grads(y, [x, A, B]), _grads(y_ref, [x, A, B])):
        assert_close(gn, gr, TOL[torch.float64], name)


def test_dropout_rate_and_seed_dependence():
    keep1 = ref.dropout_keep_ref(1, (1000, 100), 0.25)
    keep2 = ref.dropout_keep_ref(2, (1000, 100), 0.25)
    assert abs(keep1.float().mean().item() - 0.75) < 0.01
    assert (keep1 != keep2).float().mean() > 0.3
    # the native path drops the same fraction: a zero-base layer with A=identity-like exposes x_d's mean
    x = torch.ones(200, 50)
    A, B, lam, w = make_adapter(2, 50, 3)
    d1 = ops.adapter(x, A, B, lam, w, dropout_p=0.5)
    d2 = ops.adapter(x, A, B, lam, w, dropout_p=0.5)
    assert not torch.equal(d1, d2)  # fresh seed per call


# ---- gradcheck (fp64) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["random", "clamped"])
def test_gradcheck_linear(kind, adapter_path):
    A, B, lam, w = make_adapter(3, 6, 5, kind, torch.float64)
    W, b = make_base(6, 5, torch.float64)
    x = make_x((2, 4), 6, torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, W, b, A, B, lam)]

    def f(x, W, b, A, B, lam):
        return ops.linear(x, W, b, A, B, lam, w)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_adapter_with_dropout(adapter_path):
    A, B, lam, w = make_adapter(2, 5, 4, "random", torch.float64)
    x = make_x((6,), 5, torch.float64)
    seed = torch.tensor([7], dtype=torch.int64)
    inputs = [t.clone().requires_grad_() for t in (x, A, B, lam)]

    def f(x, A, B, lam):
        return OPS.adapter_fwd(x, A, B, lam, w, 0.4, seed)[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_backward_op_matches_autograd_of_reference(adapter_path):
    """linear_bwd called directly, each output only when asked for."""
    A, B, lam, w = make_adapter(4, 9, 7, "clamped", torch.float64)
    W, b = make_base(9, 7, torch.float64)
    x = make_x((3, 2), 9, torch.float64)
    g = torch.randn(3, 2, 7, dtype=torch.float64)
    _, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
    y_ref = ref.linear_ref(leaves[0], W, b, leaves[1], leaves[2], leaves[3], w)
    expected = torch.autograd.grad(y_ref, leaves, g)
    for i in range(4):
        mask = [j == i for j in range(4)]
        outs = OPS.linear_bwd(g, x, W, A, B, lam, w, u, s, a, bn, 0.0, None, mask)
        assert_close(outs[i], expected[i], TOL[torch.float64], f"output {i}")
        for j in range(4):
            if j != i:
                assert outs[j].numel() == 0


def test_backward_op_checks_its_saved_tensors():
    """linear_bwd called directly with a wrong weight dtype or non-float saved tensors: an error naming them."""
    A, B, lam, w = make_adapter(4, 9, 7, "random", torch.float32)
    W, b = make_base(9, 7, torch.float32)
    x = make_x((3,), 9, torch.float32)
    g = torch.randn(3, 7)
    _, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None)
    mask = [True] * 4
    with pytest.raises(RuntimeError, match=r"`x` has dtype Float but `weight` has dtype Double"):
        OPS.linear_bwd(g, x, W.double(), A, B, lam, w, u, s, a, bn, 0.0, None, mask)
    with pytest.raises(RuntimeError, match=r"`u` must be a floating-point tensor, got dtype Long"):
        OPS.linear_bwd(g, x, W, A, B, lam, w, u.long(), s, a, bn, 0.0, None, mask)
    with pytest.raises(RuntimeError, match=r"`b_norm` must be a floating-point tensor, got dtype Int"):
        OPS.linear_bwd(g, x, W, A, B, lam, w, u, s, a, bn.int(), 0.0, None, mask)


# ---- opcheck -------------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_all_ops(dtype, adapter_path):
    A, B, lam, w = make_adapter(3, 10, 6, "random", dtype)
    W, b = make_base(10, 6, dtype)
    x = make_x((2, 5), 10, dtype)
    seed = torch.tensor([11], dtype=torch.int64)
    grad_leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
    xg, Ag, Bg, lamg = grad_leaves
    _opcheck(OPS.linear_fwd.default, (xg, W, b, Ag, Bg, lamg, w, 0.0, None))
    _opcheck(OPS.linear_fwd.default, (xg, W, None, Ag, Bg, lamg, w, 0.25, seed))
    _opcheck(OPS.adapter_fwd.default, (xg, Ag, Bg, lamg, w, 0.0, None))
    _opcheck(OPS.adapter_fwd.default, (xg, Ag, Bg, lamg, w, 0.5, seed))
    _opcheck(OPS.prep.default, (A, B, lam, w))
    _opcheck(OPS.delta_weight.default, (A, B, lam, w))
    _opcheck(OPS.merge_.default, (W.clone(), A, B, lam, w, 1.0))
    _opcheck(OPS.merge_many_.default, (W.clone(), [A, A * 2], [B, B], [lam, lam], [w, w], [1.0, -0.5]))
    _, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None)
    g = torch.randn(2, 5, 6, dtype=dtype)
    _opcheck(OPS.linear_bwd.default, (g, x, W, A, B, lam, w, u, s, a, bn, 0.0, None, [True, True, True, True]))
    _opcheck(OPS.linear_bwd.default, (g, x, None, A, B, lam, w, u, s, a, bn, 0.0, None, [False, True, False, True]))


# ---- autocast -------------------------------------------------------------------------------------------
def test_autocast_cpu_bf16_keeps_adapter_fp32():
    A, B, lam, w = make_adapter(4, 32, 24)
    W, b = make_base(32, 24)
    x = make_x((16,), 32).requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    lam.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, W, b, A, B, lam, w)
    assert y.dtype == torch.bfloat16
    gx, gA, gB, glam = torch.autograd.grad(y.float().sum(), [x, A, B, lam])
    assert gx.dtype == torch.float32 and gA.dtype == torch.float32 and gB.dtype == torch.float32
    assert glam.dtype == torch.float32
    y32 = ref.linear_ref(x, W, b, A, B, lam, w)
    e = torch.autograd.grad(y32.sum(), [x, A, B, lam])
    assert rel_err(y, y32) < 2e-2
    for name, got, exp in zip(["dx", "dA", "dB", "dlam"], [gx, gA, gB, glam], e):
        assert rel_err(got, exp) < 3e-2, name


# ---- argument checks -------------------------------------------------------------------------------------
def test_op_errors_name_the_argument():
    A, B, lam, w = make_adapter(3, 10, 6)
    W, b = make_base(10, 6)
    x = make_x((4,), 10)
    with pytest.raises(RuntimeError, match=r"`x` must have last dimension in_features = 10"):
        OPS.linear_fwd(make_x((4,), 9), W, b, A, B, lam, w, 0.0, None)
    with pytest.raises(RuntimeError, match=r"`weight` must have shape \(6, 10\)"):
        OPS.linear_fwd(x, W.t(), b, A, B, lam, w, 0.0, None)
    with pytest.raises(RuntimeError, match=r"`x` has dtype Double but `weight` has dtype Float"):
        OPS.linear_fwd(x.double(), W, b, A, B, lam, w, 0.0, None)
    with pytest.raises(RuntimeError, match=r"`B` must be 2-D \(out_features, r\) with r = 3"):
        OPS.linear_fwd(x, W, b, A, B[:, :2], lam, w, 0.0, None)
    with pytest.raises(RuntimeError, match=r"`w` must have shape \(10,\)"):
        OPS.prep(A, B, lam, w[:5])
    with pytest.raises(RuntimeError, match=r"`dropout_p` must be in \[0, 1\)"):
        OPS.adapter_fwd(x, A, B, lam, w, 1.0, torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"`seed` is required"):
        OPS.adapter_fwd(x, A, B, lam, w, 0.5, None)
    with pytest.raises(RuntimeError, match=r"`A` must be a floating-point tensor"):
        OPS.prep(A.long(), B, lam, w)
    with pytest.raises(RuntimeError, match=r"`weight` must have shape"):
        OPS.merge_(W[:3].clone(), A, B, lam, w, 1.0)


def test_prep_norms_are_accurate_for_long_rows():
    """‖A_k‖ and ‖B_:,k‖ are summed in double: correctly rounded fp32 even for in = out = 16384 (a sequential
    fp32 sum is off by ~3e-6 there, ~6e-5 for fp16-subnormal-sized values)."""
    g = torch.Generator().manual_seed(0)
    A = (torch.rand(3, 16384, generator=g, dtype=torch.float64) * 6e-5).float()
    B = (torch.rand(16384, 3, generator=g, dtype=torch.float64) * 6e-5).float()
    lam, w = torch.tensor([15.0]), torch.ones(16384)
    _, _, a, b = OPS.prep(A, B, lam, w)
    for got, exact in ((a, A.double().norm(dim=1)), (b, B.double().norm(dim=0))):
        assert ((got.double() - exact).abs() / exact).max().item() <= 2 ** -24


def test_set_tuning_validates_and_round_trips():
    """Kernel-variant switches: unknown names and values are refused naming them; set values read back."""
    before = ops.tuning()
    assert set(before) == {"gemm_order", "merge_kernel", "small_n", "cpu_fused"}
    with pytest.raises(ValueError, match=r"unknown switch 'gemm'"):
        ops.set_tuning(gemm="seeded")
    with pytest.raises(ValueError, match=r"`merge_kernel` must be one of \('rows', 'tiled'\), got 'fast'"):
        ops.set_tuning(merge_kernel="fast")
    with pytest.raises(ValueError, match=r"`small_n` must be one of"):
        ops.set_tuning(gemm_order="seeded", small_n="maybe")
    assert ops.tuning() == before, "a refused call set nothing"
    with pytest.raises(ValueError, match=r"`value` for 'small_n' must be 0..2, got 3"):
        ops._C.set_tuning("small_n", 3)
    with pytest.raises(ValueError, match=r"`value` for 'gemm_order' must be 0..1, got 2"):
        ops._C.set_tuning("gemm_order", 2)
    with pytest.raises(ValueError, match=r"`value` for 'merge_kernel' must be 0..1, got -1"):
        ops._C.set_tuning("merge_kernel", -1)
    assert ops.tuning() == before, "a refused call set nothing"
    try:
        ops.set_tuning(gemm_order="seeded", merge_kernel="tiled", small_n="on", cpu_fused="off")
        assert ops.tuning() == {"gemm_order": "seeded", "merge_kernel": "tiled", "small_n": "on", "cpu_fused": "off"}
        assert ops.build_info()["tuning"] == ops.tuning()
        ops.set_tuning(small_n="overlap")
        assert ops.tuning()["small_n"] == "overlap" and ops._C.tuning()["small_n"] == 2
    finally:
        ops.set_tuning(**before)
    assert ops.tuning() == before


def test_tuning_env_vars():
    """DELORA_EXT_GEMM_ORDER / _MERGE_KERNEL / _SMALL_N / _CPU_FUSED at import: names or indices; a bad value fails the import
    naming the variable."""
    import os
    import subprocess
    import sys
    code = "from delora_ext import ops; print(sorted(ops.tuning().items()))"
    env = {**os.environ, "DELORA_EXT_GEMM_ORDER": "seeded", "DELORA_EXT_SMALL_N": "1", "DELORA_EXT_MERGE_KERNEL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[('cpu_fused', 'on'), ('gemm_order', 'seeded'), ('merge_kernel', 'rows'), ('small_n', 'on')]" in out.stdout
    env["DELORA_EXT_CPU_FUSED"] = "off"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "('cpu_fused', 'off')" in out.stdout, out.stderr
    del env["DELORA_EXT_CPU_FUSED"]
    env["DELORA_EXT_SMALL_N"] = "2"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "('small_n', 'overlap')" in out.stdout, out.stderr
    env["DELORA_EXT_GEMM_ORDER"] = "2"  # gemm_order has two values: index 2 is refused
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DELORA_EXT_GEMM_ORDER" in bad.stderr and "got '2'" in bad.stderr
    env["DELORA_EXT_GEMM_ORDER"] = "seeded"
    env["DELORA_EXT_SMALL_N"] = "yes"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "DELORA_EXT_SMALL_N" in bad.stderr and "got 'yes'" in bad.stderr


def _gemm_calls(fn) -> int:
    from torch.profiler import profile
    with profile() as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm", "aten::addmm_") for e in prof.events())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_cpu_shapes_take_the_fused_pass_and_large_ones_the_gemms(dtype):
    """The default size rule: a training step of a small layer runs only the two base GEMMs (forward and dx), the
    adapter parts being fused; a large one (N·r·(in + out) above the rule) runs the adapter's skinny GEMMs too. Both
    agree with the fp64 reference."""
    for (N, in_f, out, r), fused in (((4, 64, 64, 8), True), ((64, 256, 256, 16), False)):
        A, B, lam, w = make_adapter(r, in_f, out, "random", dtype)
        W, b = make_base(in_f, out, dtype)
        x = make_x((N,), in_f, dtype)
        leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]

        def step(leaves=leaves, W=W, b=b, w=w):
            y = ops.linear(leaves[0], W, b, leaves[1], leaves[2], leaves[3], w)
            return y, _grads(y, leaves)

        with tuned(cpu_fused="on", gemm_order="base_first"):  # the defaults
            calls = _gemm_calls(step)
            y, grads = step()
        assert (calls == 2) == fused, f"{(N, in_f, out, r)}: {calls} GEMM calls"
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y_ref = ref.linear_ref(ref_leaves[0], W.double(), b.double(), *ref_leaves[1:], w.double())
        assert_close(y, y_ref, TOL[dtype], "y")
        for name, gn, gr in zip(["dx", "dA", "dB", "dlam"], grads, _grads(y_ref, ref_leaves)):
            assert_close(gn, gr, TOL[dtype], name)
