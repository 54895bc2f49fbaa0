"""The native segmented mixed-batch path: ``mixed_batch(..., strategy="segmented")`` and the op under it,
``delora_ext::segmented_adapter_``.

Every row must equal that row run with its adapter alone (the single-adapter forward) and the fp64 pure-PyTorch
reference, in fp32, fp64, bf16 and fp16, with "__base__" rows, paper-init adapters, 3-D inputs and adapters a layer
lacks; a layer takes one op call (no gather, scatter or GEMM per adapter); the op refuses bad arguments naming the
argument, its fake (meta) kernel refuses the same ones, and it traces under torch.compile.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from test_mixed_batch import _alone, _batch, _CountOps, _three_adapters
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear, inference
from delora_ext import reference as ref

from helpers import requires_cuda, requires_native
from tiny_models import ARCHS, one_thread  # noqa: F401  (one_thread: autouse fixture)

pytestmark = [requires_native, pytest.mark.skipif(not delora_ext.ops.HAS_SEGMENTED,
                                                  reason="the native build has no segmented op")]
BASE = "__base__"
OP = torch.ops.delora_ext.segmented_adapter_ if delora_ext.ops.HAS_SEGMENTED else None


def _layer(dtype=torch.float32, in_f=70, out_f=45, device="cpu"):
    """Five adapters of ranks 1..6 on one layer (sizes that are not multiples of the kernels' vector widths), 'p1'
    with paper init moved off its frozen copy."""
    torch.manual_seed(0)
    layer = DeLoRALinear(nn.Linear(in_f, out_f), r=4, init_weights=False, adapter_name="a0")
    for name, r in (("a1", 1), ("a2", 6), ("a3", 3)):
        layer.update_layer(name, r, init_weights=False, activate=False)
    layer.update_layer("p1", 2, init_weights="paper", activate=False)
    with torch.no_grad():
        layer.delora_A["p1"].mul_(1.5)
        layer.delora_lambda["p1"].add_(0.3)
    return layer.to(device=device, dtype=dtype).eval()


def _ref_row(layer, x_row, name):
    """fp64 reference output of one input row (…, in) with adapter ``name`` (paper init: minus the frozen term)."""
    d = torch.float64
    base = layer.base_layer
    x = x_row.to(d)
    y = F.linear(x, base.weight.to(d), base.bias.to(d))
    if name == BASE:
        return y
    w = layer.delora_w_norm[name].to(d)
    y = y + ref.adapter_ref(x, layer.delora_A[name].to(d), layer.delora_B[name].to(d),
                            layer.delora_lambda[name].to(d), w)
    if name in layer.delora_A0:
        y = y + ref.adapter_ref(x, layer.delora_A0[name].to(d), layer.delora_B0[name].to(d),
                                -layer.delora_lambda0[name].to(d), w)
    return y


def _alone_row(layer, x_row, name):
    with torch.no_grad():
        if name == BASE:
            return layer.base_layer(x_row)
        layer.set_adapter(name)
        try:
            return layer(x_row)
        finally:
            layer.set_adapter("a0")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


NAMES = ["a2", BASE, "p1", "a0", "a2", "a1", "a3", BASE, "a0", "p1", "a2"]
# relative error of a row against the fp64 reference: fp32/fp64 absolute; bf16/fp16 at most twice the single-
# adapter forward's own error in that dtype (the segmented path keeps u in fp32, so it is usually below it)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("shape", ["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_row_equals_its_adapter_alone_and_the_fp64_reference(dtype, shape):
    layer = _layer(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(NAMES), *((3,) if shape == "3d" else ()), 70, generator=g).to(dtype)
    with torch.no_grad(), delora_ext.mixed_batch(layer, NAMES, strategy="segmented"), _CountOps() as ops:
        y = layer(x)
    assert ops.counts.get("segmented_adapter_") == 1, ops.counts
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 45)
    for i, name in enumerate(NAMES):
        alone = _alone_row(layer, x[i:i + 1], name)[0]
        expected = _ref_row(layer, x[i], name)
        err_ref, err_alone = _rel(y[i], expected), _rel(alone, expected)
        if dtype in TOL:
            assert err_ref <= TOL[dtype], f"row {i} ({name}) vs fp64 reference: {err_ref:.1e}"
            assert _rel(y[i], alone) <= 2 * TOL[dtype] / 10, f"row {i} ({name}) vs alone: {_rel(y[i], alone):.1e}"
        else:
            assert err_ref <= max(2 * err_alone, 1e-3), f"row {i} ({name}): {err_ref:.1e} (alone {err_alone:.1e})"
            if name == BASE:
                assert torch.equal(y[i], alone), f"row {i}: a base row is the base output itself"


def test_rows_whose_adapter_the_layer_lacks_and_base_only_batches_keep_the_base_output():
    model = _three_adapters("llama")  # 'c' only on q_proj / v_proj
    names = ["c", BASE, "c", "a"]
    batch = _batch("llama", len(names))
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, strategy="segmented"):
            mixed = model(**batch).logits
        expected = _alone(model, "llama", batch, names)
        with delora_ext.mixed_batch(model, [BASE] * 4, strategy="segmented"), _CountOps() as ops:
            base_only = model(**batch).logits
        with delora_ext.disable_adapters(model):
            plain = model(**batch).logits
    for i in range(len(names)):
        assert _rel(mixed[i], expected[i]) <= 1e-6, f"row {i} ({names[i]})"
    assert "segmented_adapter_" not in ops.counts and torch.equal(base_only, plain)


@pytest.mark.parametrize("names", [["a3"] * 6, ["a1"]], ids=["all rows one adapter", "one row"])
def test_one_adapter_for_every_row_equals_set_adapter(names):
    layer = _layer()
    x = torch.randn(len(names), 2, 70)
    with torch.no_grad():
        with delora_ext.mixed_batch(layer, names, strategy="segmented"):
            y = layer(x)
        layer.set_adapter(names[0])
        expected = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_a_layer_with_one_adapter_only():
    torch.manual_seed(2)
    layer = DeLoRALinear(nn.Linear(33, 17), r=5, init_weights=False, adapter_name="only").eval()
    names = ["only", BASE, "only"]
    x = torch.randn(3, 33)
    with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy="segmented"):
        y = layer(x)
    for i, name in enumerate(names):
        assert _rel(y[i], _ref_row(layer, x[i], name)) <= 1e-5


def test_adapter_updates_between_batches_are_seen():
    """The op's operands are cached beside the folded factors: an in-place update of an adapter (an optimizer
    step) must reach the next batch."""
    layer = _layer()
    names = ["a1", "p1", "a2"]
    x = torch.randn(3, 70)
    with torch.no_grad():
        with delora_ext.mixed_batch(layer, names, strategy="segmented"):
            before = layer(x)
        layer.delora_B["a2"].mul_(-2.0)
        layer.delora_A["p1"].add_(0.1)
        with delora_ext.mixed_batch(layer, names, strategy="segmented"):
            after = layer(x)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    for i in (1, 2):
        assert not torch.allclose(after[i], before[i])
        assert _rel(after[i], _ref_row(layer, x[i], names[i])) <= 1e-5


def test_non_finite_values_stay_in_their_own_rows():
    layer = _layer()
    names = ["a1", "a2", BASE, "a3", "a2"]
    x = torch.randn(5, 70)
    with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy="segmented"):
        clean = layer(x)
        layer.delora_B["a3"][0, 0] = float("nan")
        x_bad = x.clone()
        x_bad[1, 0] = float("inf")
        y = layer(x_bad)
    for i in (0, 2, 4):
        assert torch.equal(y[i], clean[i]), f"row {i} ({names[i]})"
    assert not torch.isfinite(y[3]).all() and not torch.isfinite(y[1]).all()


def test_results_do_not_depend_on_the_thread_count_or_the_run():
    layer = _layer(in_f=300, out_f=260)
    names = [f"a{i % 4}" for i in range(40)] + ["p1"] * 5
    x = torch.randn(len(names), 300)
    n = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy="segmented"):
                outs.append(layer(x))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_gradients_recorded_fall_back_to_grouped():
    layer = _layer()
    names = ["a1", "a2", "a1"]
    x = torch.randn(3, 70)
    with delora_ext.mixed_batch(layer, names, strategy="segmented"), _CountOps() as ops:
        y = layer(x)
    assert "segmented_adapter_" not in ops.counts and ops.counts.get("index_select") == 1
    y.sum().backward()
    assert layer.delora_B["a1"].grad is not None and layer.delora_B["a0"].grad is None


def _auto_picks(layer, names, x, threads):
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), delora_ext.mixed_batch(layer, names), _CountOps() as ops:
            layer(x)
    finally:
        torch.set_num_threads(n)
    c = ops.counts
    return "segmented" if "segmented_adapter_" in c else "masked" if "masked_fill_" in c else "grouped"


def test_auto_uses_segmented_on_cpu_except_fp16(monkeypatch):
    layer = _layer()
    names = [f"a{i % 4}" for i in range(8)]  # Σr = 14, in + out = 115: 1610 masked multiply-adds a row
    for threads in (1, 2):
        assert _auto_picks(layer, names, torch.randn(8, 1, 70), threads) == "masked"  # 12880 ≤ 1e6
        assert _auto_picks(layer, names, torch.randn(8, 100, 70), threads) == "segmented"  # 1.3e6
        assert _auto_picks(layer, names, torch.randn(8, 512, 70), threads) == "segmented"
    assert _auto_picks(_layer(torch.float16), names, torch.randn(8, 512, 70).half(), threads=2) == "grouped"
    monkeypatch.setattr(inference, "SEGMENTED_AUTO_DEVICES", frozenset())
    assert _auto_picks(layer, names, torch.randn(8, 70), threads=2) == "masked"


# ---- the op itself ------------------------------------------------------------------------------------------------
def _op_args(n=5, in_f=12, out_f=7, ranks=(3, 1, 4), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    om = torch.float64 if dtype == torch.float64 else torch.float32
    A = [torch.randn(r, in_f, generator=g, dtype=om) for r in ranks]
    Bt = [torch.randn(r, out_f, generator=g, dtype=om) for r in ranks]
    sa = [torch.rand(r, generator=g, dtype=om) + 0.5 if k == 1 else None for k, r in enumerate(ranks)]
    rows = torch.tensor([i % (len(ranks) + 1) - 1 for i in range(n)], dtype=torch.int64)
    return dict(y=torch.randn(n, out_f, generator=g).to(dtype), x=torch.randn(n, in_f, generator=g).to(dtype),
                rows_adapter=rows, A=A, Bt=Bt, sa=sa)


def _op_expected(a):
    """fp64: y + ((x A_kᵀ) ⊙ sa_k) Bt_k per row."""
    y = a["y"].double().clone()
    for n, k in enumerate(a["rows_adapter"].tolist()):
        if k < 0:
            continue
        u = a["x"][n].double() @ a["A"][k].double().t()
        if a["sa"][k] is not None:
            u = u * a["sa"][k].double()
        y[n] += u @ a["Bt"][k].double()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_op_against_fp64(dtype):
    a = _op_args(n=9, in_f=40, out_f=37, dtype=dtype)
    y = a["y"].clone()
    OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    exp = _op_expected(a)
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    # one rounding of the exact sum into y's dtype: elementwise within half an ulp plus the fp32 accumulation error
    assert _rel(y, exp) <= tol
    untouched = a["rows_adapter"] < 0
    assert torch.equal(y[untouched], a["y"][untouched])


def test_the_op_with_an_empty_batch_and_empty_features():
    a = _op_args(n=0)
    OP(a["y"], a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    assert a["y"].shape == (0, 7)
    b = _op_args(n=4, in_f=0, ranks=(2,))
    y = b["y"].clone()
    assert b["rows_adapter"].tolist() == [-1, 0, -1, 0]
    OP(y, b["x"], b["rows_adapter"], b["A"], b["Bt"], b["sa"])
    assert torch.equal(y, b["y"])  # u = 0


def _bad(what):
    a = _op_args()
    f32, f64 = torch.float32, torch.float64
    changes = {
        "x int": dict(x=torch.ones(5, 12, dtype=torch.int32)),
        "x 3-d": dict(x=torch.randn(5, 1, 12)),
        "A empty": dict(A=[], Bt=[], sa=[]),
        "lengths": dict(Bt=a["Bt"][:2]),
        "y 1-d": dict(y=torch.randn(7)),
        "y rows": dict(y=torch.randn(4, 7)),
        "y dtype": dict(y=torch.randn(5, 7, dtype=f64)),
        "y strided": dict(y=torch.randn(7, 5).t()),
        "rows int32": dict(rows_adapter=torch.zeros(5, dtype=torch.int32)),
        "rows length": dict(rows_adapter=torch.zeros(4, dtype=torch.int64)),
        "A[1] fp64": dict(A=[a["A"][0], a["A"][1].to(f64), a["A"][2]]),
        "A[2] in 11": dict(A=[a["A"][0], a["A"][1], torch.randn(4, 11)]),
        "A[0] no rows": dict(A=[torch.randn(0, 12), a["A"][1], a["A"][2]]),
        "Bt[0] r 2": dict(Bt=[torch.randn(2, 7), a["Bt"][1], a["Bt"][2]]),
        "Bt[2] out 8": dict(Bt=[a["Bt"][0], a["Bt"][1], torch.randn(4, 8)]),
        "Bt[1] bf16": dict(Bt=[a["Bt"][0], a["Bt"][1].bfloat16(), a["Bt"][2]]),
        "sa[1] r 2": dict(sa=[None, torch.ones(2, dtype=f32), None]),
        "sa[0] fp64": dict(sa=[torch.ones(3, dtype=f64), None, None]),
    }
    a.update(changes[what])
    return a


BAD = {"x int": "x", "x 3-d": "x", "A empty": "A", "lengths": "A", "y 1-d": "y", "y rows": "y", "y dtype": "y",
       "y strided": "y", "rows int32": "rows_adapter", "rows length": "rows_adapter", "A[1] fp64": "A[1]",
       "A[2] in 11": "A[2]", "A[0] no rows": "A[0]", "Bt[0] r 2": "Bt[0]", "Bt[2] out 8": "Bt[2]",
       "Bt[1] bf16": "Bt[1]", "sa[1] r 2": "sa[1]", "sa[0] fp64": "sa[0]"}


def _refusal(args):
    try:
        OP(*args.values())
    except RuntimeError as e:
        return str(e)
    return None


def _named(msg):
    m = re.search(r"delora_ext::segmented_adapter_: .*?`([^`]+)`", msg or "")
    return m.group(1) if m else None


def _meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, list):
        return [_meta(t) for t in v]
    return v


@pytest.mark.parametrize("what", list(BAD))
def test_bad_arguments_are_refused_naming_them_by_the_kernel_and_the_fake_kernel(what):
    args = _bad(what)
    y_before = args["y"].clone() if args["y"].dim() == 2 and args["y"].is_contiguous() else None
    real = _refusal(args)
    assert _named(real) == BAD[what], f"real kernel: {real!r}"
    if y_before is not None:
        assert torch.equal(args["y"], y_before), "a refused call left y as it was"
    fake = _refusal({k: _meta(v) for k, v in args.items()})
    assert _named(fake) == BAD[what], f"fake kernel: {fake!r}; real: {real!r}"


@pytest.mark.parametrize("bad", [3, -2])
def test_an_index_out_of_range_is_refused_before_anything_is_written(bad):
    a = _op_args()
    a["rows_adapter"][3] = bad
    y = a["y"].clone()
    with pytest.raises(RuntimeError, match=r"`rows_adapter` must hold adapter indices in \[-1, 3\).*"
                                           rf"got {bad} at row 3"):
        OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    assert torch.equal(y, a["y"])


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a step of 2 in its last dim (not dense)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("which", ["x", "rows_adapter", "A", "Bt", "sa"])
def test_strided_operands_are_read_as_they_are(which):
    """An operand that is a strided view shares no memory with y: accepted, with the same result."""
    a = _op_args(n=6, ranks=(3, 2, 4))  # sa[1] of 2 elements, so that a view of it can be strided
    exp = _op_expected(a)
    if which in ("x", "rows_adapter"):
        a[which] = _strided(a[which])
    else:
        a[which] = [None if t is None else _strided(t) for t in a[which]]
    assert not (a[which] if which in ("x", "rows_adapter") else a[which][1]).is_contiguous()
    y = a["y"].clone()
    OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    assert _rel(y, exp) <= 1e-6


def test_a_strided_input_batch_takes_the_segmented_path():
    layer, names = _layer(), ["a0", BASE, "a2", "p1", "a0", "a1"]
    x = _strided(torch.randn(len(names), layer.in_features))
    with torch.no_grad():
        with delora_ext.mixed_batch(layer, names, strategy="segmented"), _CountOps() as counts:
            y = layer(x)
        assert counts.counts.get("segmented_adapter_") == 1, counts.counts
        for i, name in enumerate(names):
            assert _rel(y[i], _ref_row(layer, x[i], name)) <= 1e-6, (i, name)


def test_a_strided_factor_in_y_s_own_storage_is_refused():
    a = _op_args()
    buf = torch.zeros(a["y"].numel() + 2 * a["A"][0].numel())
    y = buf[:a["y"].numel()].view_as(a["y"])
    a["A"][0] = buf.as_strided(a["A"][0].shape, (2 * a["A"][0].shape[1], 2), 0)  # strided, over y's memory
    with pytest.raises(RuntimeError, match=r"`y` shares memory with `A\[0\]`"):
        OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])


def test_y_sharing_memory_with_x_is_refused():
    a = _op_args(in_f=7)
    with pytest.raises(RuntimeError, match="`y` shares memory with `x`"):
        OP(a["x"], a["x"], a["rows_adapter"], a["A"], [t[:, :7] for t in a["Bt"]], a["sa"])


@pytest.mark.parametrize("alias", ["A", "Bt", "sa"])
def test_y_sharing_memory_with_a_factor_is_refused_and_nothing_written(alias):
    """y is written while the factors are read: a y that is a view of one of them is refused before any write."""
    a = _op_args()
    k = 1  # the adapter with an sa
    factor = {"A": a["A"], "Bt": a["Bt"], "sa": a["sa"]}[alias]
    buf = torch.cat([factor[k].reshape(-1), torch.zeros(a["y"].numel())])
    y = buf[:a["y"].numel()].view_as(a["y"])  # starts where the factor's memory starts
    factor[k] = buf[:factor[k].numel()].view_as(factor[k])
    before = buf.clone()
    with pytest.raises(RuntimeError, match=rf"`y` shares memory with `{alias}\[{k}\]`"):
        OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    assert torch.equal(buf, before)


def test_the_fake_kernel_accepts_what_the_kernel_accepts_and_traces_under_compile():
    a = _op_args()
    assert _refusal({k: _meta(v) for k, v in a.items()}) is None

    def f(y, x, rows, A0, A1, A2, B0, B1, B2, s1):
        y = y.clone()
        delora_ext.ops.segmented_adapter_(y, x, rows, [A0, A1, A2], [B0, B1, B2], [None, s1, None])
        return y * 2

    args = (a["y"], a["x"], a["rows_adapter"], *a["A"], *a["Bt"], a["sa"][1])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), f(*args), rtol=0, atol=0)


# ---- CUDA (compiled here, run on a GPU machine) ----------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_op_equals_cpu_op(dtype):
    a = _op_args(n=33, in_f=300, out_f=129, ranks=(3, 1, 40), dtype=dtype)
    y = a["y"].clone()
    OP(y, a["x"], a["rows_adapter"], a["A"], a["Bt"], a["sa"])
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t if t is None else t.cuda() for t in v])
         for k, v in a.items()}
    OP(c["y"], c["x"], c["rows_adapter"], c["A"], c["Bt"], c["sa"])
    torch.cuda.synchronize()
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert _rel(c["y"].cpu(), _op_expected(a)) <= tol and _rel(y, _op_expected(a)) <= tol


@requires_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_rows_equal_their_adapter_alone(arch):
    model = _three_adapters(arch).cuda()
    names = ["b", BASE, "a", "c", "a", "b", BASE, "c", "a"]
    batch = {k: v.cuda() for k, v in _batch(arch, len(names)).items()}
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, strategy="segmented"):
            mixed = model(**batch).logits
        expected = _alone(model, arch, batch, names)
    for i in range(len(names)):
        assert _rel(mixed[i], expected[i]) <= 1e-5, f"row {i} ({names[i]})"


@requires_cuda
def test_cuda_more_adapters_than_one_launch_takes():
    """More adapters than one launch's pointer table (48): the rows of each are still their adapter's."""
    a = _op_args(n=120, in_f=64, out_f=48, ranks=tuple(1 + i % 5 for i in range(100)))
    a["sa"] = [None] * 100
    a["rows_adapter"] = torch.arange(120, dtype=torch.int64) % 101 - 1
    c = {k: (v.cuda() if isinstance(v, torch.Tensor) else [t if t is None else t.cuda() for t in v])
         for k, v in a.items()}
    OP(c["y"], c["x"], c["rows_adapter"], c["A"], c["Bt"], c["sa"])
    assert _rel(c["y"].cpu(), _op_expected(a)) <= 1e-6
