"""Property tests (hypothesis) for every native op against the fp64 oracle ``delora_ext.reference``.

test_ops.py checks hand-picked examples; here hypothesis sweeps the spaces: leading shapes of x with 0, 1, odd
sizes and a large prime (257, 1031); in/out features 1, odd, prime; r from 1 to 33, also r > in and r > out;
x contiguous, transposed, sliced (every other column) or expanded (stride 0 in a leading or the last dimension);
fp64/fp32 x with fp64/fp32 adapters, bf16/fp16 x with fp32 or same-dtype adapters; λ negative, 0, positive,
from 1e-6 to 1e4 in size; A rows and B columns with norms below the 1e-4 clamp (3e-5, 1e-9, 0), just above it
(3e-4) or normal; dropout p in [0, 0.9] with seeds over the whole int64 range; fp16 x near overflow.
Ops: linear_fwd / adapter_fwd and their autograd (dx, dW, db, dA, dB, dλ), linear_bwd called directly with a
random output_mask, prep, delta_weight, merge_ and merge_many_ (in place, on contiguous, transposed and sliced
weights).

Determinism: by default every run replays the same examples (``derandomize=True``), so CI cannot flake and a
failure reproduces by rerunning. ``HYPOTHESIS_PROFILE=random`` draws fresh examples each run (hypothesis prints
the seed of a failing run; replay it with ``--hypothesis-seed=<seed>``); ``HYPOTHESIS_PROFILE=explore`` is
random with 10x the examples. No example database is kept, and a failing example is
always printed with its reproduction blob (``print_blob=True``). Examples per run: the ``_settings(n)`` numbers,
2,570 in all.

Tolerances (errors are Frobenius norms against the fp64 reference of the very same input values):
- fp64 / fp32 (the less precise of x's dtype and the adapter's opmath decides): ``TOL`` from conftest relative to
  the reference result, with a floor of c·u·‖mag‖ (u the unit roundoff, c from ``_floor_c``) where mag is the
  same computation with every factor replaced by its absolute value (``_mags``): the textbook scale of
  floating-point error, |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ·Σ|aᵢbᵢ|. It only matters where the exact result cancels far
  below its terms, e.g. dA with in = 1 and dB with out = 1, which are exactly 0 (the output does not depend on the
  length of an unclamped A row or B column) and where no relative tolerance can hold.
- bf16 / fp16: 2x PyTorch's own error running the reference with every float input cast to that dtype (as
  test_low_precision_within_2x_of_torch), floored at LP_FLOOR_C·u·‖mag‖ for outputs where PyTorch's error is ~0
  by chance (a scalar dλ, a single row) or PyTorch's own result is not finite.
- merge_ / merge_many_: element-wise, one rounding to the weight's dtype plus the opmath error of W + ΔW
  (see _check_merge).
- fp16 near overflow: element-wise forward-error bound where no stored intermediate overflows, inf beyond the
  range (see test_fp16_near_overflow).
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from delora_ext import ops
from delora_ext import reference as ref

from helpers import TOL, requires_native

pytestmark = requires_native
OPS = torch.ops.delora_ext if ops.NATIVE else None

# "random" and "explore" switch to fresh examples; anything else (unset, "ci", a profile name meant for another
# suite) keeps the derandomized default
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
_BASE = settings(deadline=None, database=None, print_blob=True, derandomize=_PROFILE not in ("random", "explore"))


def _settings(n: int) -> settings:
    return settings(_BASE, max_examples=n * (10 if _PROFILE == "explore" else 1))


EPS = ref.NORM_EPS
# Floor coefficients (times u·‖mag‖, see the module docstring): a chain of roundings on one path is at most ~8
# long. Full precision adds 2·√max(in, out) (_floor_c): the norms a_k, b_k are opmath sums of up to max(in, out)
# squares whose relative error grows like √n·u for fp32/fp64 parameters (up to ~50u seen at n = 1031), and they
# scale whole rank-1 terms, so that error survives a cancelling sum over k. In four HYPOTHESIS_PROFILE=explore
# runs (~70k full-precision and ~29k low-precision outputs) the largest error was 0.37 of its floor (full
# precision, forward/backward) and 0.71 (bf16/fp16).
FLOOR_C = 8.0
LP_FLOOR_C = 4.0


def _floor_c(in_f: int, out: int) -> float:
    return FLOOR_C + 2.0 * math.sqrt(max(in_f, out, 1))


def _u(dtype) -> float:
    """Unit roundoff (half an ulp at 1)."""
    return torch.finfo(dtype).eps / 2


# ---- strategies -----------------------------------------------------------------------------------------
FEATURES = [1, 2, 3, 7, 8, 13, 16, 31, 64]
LEAD = [1, 2, 3, 5, 0, 7]
PRIMES = [257, 1031]
RANKS = [1, 2, 3, 4, 5, 8, 17, 33]
LAYOUTS = ["contiguous", "transposed", "sliced", "expand_lead", "expand_last"]
# target norm of an A row / B column: None keeps the random one (~1); the others sit away from the clamp
# boundary (1e-4) so that fp32 and fp64 norms cannot fall on different sides of it
NORMS = {"normal": None, "near": 3e-4, "below": 3e-5, "tiny": 1e-9, "zero": 0.0}
NORM_KIND = st.sampled_from(["normal", "normal", "normal", "near", "below", "tiny", "zero"])
LAMBDAS = st.one_of(
    st.sampled_from([15.0, 0.0, -1.0]),
    st.builds(lambda sign, e: sign * 10.0 ** e, st.sampled_from([1.0, -1.0]), st.floats(-6.0, 4.0)),
)
SEEDS = st.integers(-2**63, 2**63 - 1)


@dataclasses.dataclass(frozen=True)
class Case:
    lead: tuple
    in_f: int
    out: int
    r: int
    layout: str
    x_dtype: torch.dtype
    p_dtype: torch.dtype
    base: str  # "linear", "linear_nobias" or "adapter"
    a_kinds: tuple
    b_kinds: tuple
    lam: float
    dropout_p: float
    dropout_seed: int
    data_seed: int
    x_scale: float
    g_scale: float
    grads: tuple  # which of x, W, b, A, B, lam require grad


@st.composite
def dims(draw, big=True):
    lead = draw(st.lists(st.sampled_from(LEAD), max_size=3))
    in_f, out, r = draw(st.sampled_from(FEATURES)), draw(st.sampled_from(FEATURES)), draw(st.sampled_from(RANKS))
    where = draw(st.sampled_from([None, None, None, "N", "in", "out"])) if big else None
    if where is not None:
        p = draw(st.sampled_from(PRIMES))
        if where == "N":
            lead = [p] + lead[:1]
        elif where == "in":
            in_f = p
        else:
            out = p
    return tuple(lead), in_f, out, r


def kinds(r):
    """Per-row (A) or per-column (B) norm kinds; one draw in five is all zero (B = 0 is PEFT's init)."""
    return st.integers(0, 4).flatmap(
        lambda i: st.just(("zero",) * r) if i == 4 else st.lists(NORM_KIND, min_size=r, max_size=r).map(tuple))


@st.composite
def cases(draw, dtypes, lambdas=LAMBDAS, x_scales=(1.0, 1e-3, 1e3), g_scales=(1.0,), big=True, bases=None):
    lead, in_f, out, r = draw(dims(big))
    x_dtype, p_dtype = draw(st.sampled_from(dtypes))
    base = draw(st.sampled_from(bases or ["linear", "linear_nobias", "adapter"]))
    p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]))
    names = ["x", "A", "B", "lam"] + (["W"] if base != "adapter" else []) + (["b"] if base == "linear" else [])
    grads = draw(st.one_of(st.just(tuple(names)), st.sets(st.sampled_from(names), min_size=1).map(
        lambda s: tuple(n for n in names if n in s))))
    return Case(lead=lead, in_f=in_f, out=out, r=r, layout=draw(st.sampled_from(LAYOUTS)), x_dtype=x_dtype,
                p_dtype=p_dtype, base=base, a_kinds=draw(kinds(r)), b_kinds=draw(kinds(r)), lam=draw(lambdas),
                dropout_p=p, dropout_seed=draw(SEEDS) if p > 0 else 0, data_seed=draw(st.integers(0, 2**32 - 1)),
                x_scale=draw(st.sampled_from(x_scales)), g_scale=draw(st.sampled_from(g_scales)), grads=grads)


# ---- building the tensors -------------------------------------------------------------------------------
def _set_norms(t: torch.Tensor, kinds_, dim: int) -> torch.Tensor:
    """Scale each row (dim=1) / column (dim=0) of fp64 ``t`` to the target norm of its kind."""
    t = t.clone()
    for k, kind in enumerate(kinds_):
        target = NORMS[kind]
        if target is None:
            continue
        sl = t[k] if dim == 1 else t[:, k]
        sl.mul_(target / sl.norm().clamp_min(1e-300))
    return t


def _layout(values: torch.Tensor, layout: str, dtype) -> torch.Tensor:
    """x of ``values``' shape (*lead, in) in ``dtype``, laid out as ``layout``; the expanded layouts broadcast
    part of ``values`` (a row, or one value per row) with stride 0."""
    nd, shape = values.dim(), values.shape
    if layout == "contiguous":
        return values.to(dtype)
    if layout == "transposed":  # stored (in, *lead): the feature dimension has the largest stride
        return values.permute(nd - 1, *range(nd - 1)).contiguous().to(dtype).permute(*range(1, nd), 0)
    if layout == "sliced":  # every other column of a tensor twice as wide
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
        wide[..., ::2] = values.to(dtype)
        return wide[..., ::2]
    if layout == "expand_lead":  # one row broadcast over every leading dimension
        row = values.reshape(-1, shape[-1])[:1] if values.numel() else torch.ones(1, shape[-1], dtype=values.dtype)
        return row.to(dtype).reshape(*(1,) * (nd - 1), shape[-1]).expand(shape)
    if layout == "expand_last":  # one value per row broadcast over the features
        return values[..., :1].to(dtype).expand(shape)
    raise ValueError(layout)


def _materialize(c: Case):
    g = torch.Generator().manual_seed(c.data_seed)
    f64 = torch.float64
    A = torch.randn(c.r, c.in_f, generator=g, dtype=f64) / math.sqrt(c.in_f)
    B = torch.randn(c.out, c.r, generator=g, dtype=f64) / math.sqrt(c.r)
    A, B = _set_norms(A, c.a_kinds, 1), _set_norms(B, c.b_kinds, 0)
    w = torch.rand(c.in_f, generator=g, dtype=f64) + 0.5
    lam = torch.tensor([c.lam], dtype=f64)
    W = torch.randn(c.out, c.in_f, generator=g, dtype=f64) / math.sqrt(c.in_f)
    b = torch.randn(c.out, generator=g, dtype=f64)
    top = torch.finfo(c.x_dtype).max  # fp16 with large scales: saturate instead of becoming inf
    x_vals = (torch.randn(*c.lead, c.in_f, generator=g, dtype=f64) * c.x_scale).clamp(-top, top)
    gy = (torch.randn(*c.lead, c.out, generator=g, dtype=f64) * c.g_scale).clamp(-top, top)
    x = _layout(x_vals, c.layout, c.x_dtype)
    t = dict(x=x, W=W.to(c.x_dtype), b=b.to(c.x_dtype), A=A.to(c.p_dtype), B=B.to(c.p_dtype),
             lam=lam.to(c.p_dtype), w=w.to(c.p_dtype), g=gy.to(c.x_dtype))
    if c.base != "linear":
        t["b"] = None
    if c.base == "adapter":
        t["W"] = None
    return t


# ---- oracle, error scale and comparison -----------------------------------------------------------------
def _keep(c: Case, x: torch.Tensor):
    return ref.dropout_keep_ref(c.dropout_seed, x.shape, c.dropout_p) if c.dropout_p > 0 else None


def _run_ref(c: Case, t: dict, dtype=torch.float64) -> dict:
    """The reference's y and autograd gradients for ``c.grads``, every float input cast to ``dtype`` (fp64: the
    oracle; bf16/fp16: PyTorch's own error budget)."""
    L = {n: None if v is None else v.detach().to(dtype).contiguous() for n, v in t.items()}
    for n in c.grads:
        L[n].requires_grad_()
    keep = _keep(c, t["x"])
    if c.base == "adapter":
        y = ref.adapter_ref(L["x"], L["A"], L["B"], L["lam"], L["w"], keep, c.dropout_p)
    else:
        y = ref.linear_ref(L["x"], L["W"], L["b"], L["A"], L["B"], L["lam"], L["w"], keep, c.dropout_p)
    grads = torch.autograd.grad(y, [L[n] for n in c.grads], L["g"])
    return dict(y=y.detach(), **dict(zip(c.grads, grads)))


def _run_ours(c: Case, t: dict) -> dict:
    """The native op's y and gradients (facade when there is no dropout, the raw op with an explicit seed else)."""
    T = {n: None if v is None else (v.detach().requires_grad_() if n in c.grads else v) for n, v in t.items()}
    x, W, b, A, B, lam, w = (T[n] for n in ("x", "W", "b", "A", "B", "lam", "w"))
    if c.dropout_p == 0.0:
        y = ops.adapter(x, A, B, lam, w) if c.base == "adapter" else ops.linear(x, W, b, A, B, lam, w)
    else:
        seed = torch.tensor([c.dropout_seed], dtype=torch.int64)
        y = (OPS.adapter_fwd(x, A, B, lam, w, c.dropout_p, seed) if c.base == "adapter"
             else OPS.linear_fwd(x, W, b, A, B, lam, w, c.dropout_p, seed))[0]
    grads = torch.autograd.grad(y, [T[n] for n in c.grads], t["g"])
    return dict(y=y.detach(), **dict(zip(c.grads, grads)))


def _mags(c: Case, t: dict, tiny: float = 0.0) -> dict:
    """Error scale of every output: the computation redone in fp64 with each factor in absolute value, so each
    sum is a sum of absolute terms (|fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ Σ|aᵢbᵢ|). For bf16/fp16 every quantity the native op
    rounds to that dtype (x's dtype: A', u, u⊙λ/(r·â), B/b̂, g·B, M = gᵀu, Q = (gB)ᵀx_d) also counts at least the
    smallest normal number ``tiny``, which turns the absolute error of underflow into a relative one."""
    f = {n: None if v is None else v.detach().double() for n, v in t.items()}
    in_f, r = c.in_f, c.r
    N = math.prod(c.lead)
    X = f["x"].reshape(N, in_f).abs()
    G = f["g"].reshape(N, c.out).abs()
    keep = _keep(c, t["x"])
    drop = 1.0 if keep is None else keep.reshape(N, in_f).double() / (1.0 - c.dropout_p)
    Xd = X * drop
    A, B, w = f["A"], f["B"], f["w"].abs()
    a, bn = A.norm(dim=1), B.norm(dim=0)
    ah, bh = a.clamp_min(EPS), bn.clamp_min(EPS)
    s_a = f["lam"].abs() / (r * ah)
    s = s_a / bh
    Af = A.abs() * w
    U = Xd @ (Af + tiny).T + tiny
    m = {"y": (U * s_a + tiny) @ (B.abs() / bh + tiny).T}
    GB = G @ (B.abs() + tiny) + tiny
    m["x"] = ((GB / bh + tiny) @ (Af * s_a[:, None] + tiny)) * drop
    if f["W"] is not None:
        m["y"] = m["y"] + X @ f["W"].abs().T
        m["x"] = m["x"] + G @ f["W"].abs()
        m["W"] = G.T @ X
    if f["b"] is not None:
        m["y"] = m["y"] + f["b"].abs()
        m["b"] = G.sum(0)
    M = G.T @ U + tiny
    gs = (M * B.abs()).sum(0)
    Q = GB.T @ Xd + tiny
    zero = torch.zeros((), dtype=torch.float64)
    m["A"] = s[:, None] * Q * w + torch.where(a >= EPS, gs * s / a**2, zero)[:, None] * A.abs()
    m["B"] = M * s + B.abs() * torch.where(bn >= EPS, gs * s / bn**2, zero)
    m["lam"] = (gs / (r * ah * bh)).sum().reshape(1)
    m["y"], m["x"] = m["y"].reshape(*c.lead, c.out), m["x"].reshape(*c.lead, in_f)
    return m


def _err(got: torch.Tensor, exp: torch.Tensor) -> float:
    assert got.shape == exp.shape, f"shape {tuple(got.shape)} != {tuple(exp.shape)}"
    return (got.detach().double() - exp.double()).norm().item()


def _check_full(name, got, exp, mag, tol, u, c_floor):
    """‖got − exp‖ ≤ max(tol·‖exp‖, c_floor·u·‖mag‖); NaN or inf fails."""
    err, scale, floor = _err(got, exp), exp.norm().item(), c_floor * u * mag.norm().item()
    note(f"{name}: err {err:.3e}  |exp| {scale:.3e}  floor {floor:.3e}")
    assert err <= max(tol * scale, floor), (
        f"{name}: error {err:.3e} > max({tol:.0e} x |exp| {scale:.3e}, floor {floor:.3e})")


def _check_low(name, got, exp, torch_out, mag, u):
    """‖got − exp‖ ≤ max(2·‖torch_out − exp‖, LP_FLOOR_C·u·‖mag‖); PyTorch's error counts 0 when not finite.
    A result returned in bf16/fp16 (y, dx; dA, dB, dλ of same-dtype adapters) whose exact value is beyond the
    dtype's range must be inf of that sign (fp16: dB at B = 0 is ~1e5); the rest is compared as above, and values
    within 1 % of the threshold are left out."""
    if got.dtype in (torch.float16, torch.bfloat16):
        top = torch.finfo(got.dtype).max
        over = exp.abs() >= top * 1.01
        assert torch.equal(got[over].double(), exp[over].sign() * math.inf), f"{name}: overflow is not inf"
        inside = exp.abs() <= top * 0.99
        got, exp, torch_out, mag = got[inside], exp[inside], torch_out[inside], mag[inside]
    err, terr = _err(got, exp), _err(torch_out, exp)
    terr = terr if math.isfinite(terr) else 0.0
    floor = LP_FLOOR_C * u * mag.norm().item()
    note(f"{name}: err {err:.3e}  torch {terr:.3e}  |exp| {exp.norm().item():.3e}  floor {floor:.3e}")
    assert err <= max(2 * terr, floor), (
        f"{name}: error {err:.3e} > max(2 x torch's own {terr:.3e}, floor {floor:.3e}) (|exp| {exp.norm():.3e})")


def _check_dtypes(c: Case, t: dict, ours: dict):
    assert ours["y"].shape == (*c.lead, c.out) and ours["y"].dtype == c.x_dtype
    for n in c.grads:
        assert ours[n].shape == t[n].shape and ours[n].dtype == t[n].dtype, n


FULL = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float64),
        (torch.float64, torch.float32)]
LOW = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
       (torch.float16, torch.float16)]


def _full_tol(c: Case):
    """(relative tolerance, unit roundoff, floor coefficient) for fp32/fp64: the less precise dtype decides."""
    dt = torch.float32 if torch.float32 in (c.x_dtype, c.p_dtype) else torch.float64
    return TOL[dt], _u(dt), _floor_c(c.in_f, c.out)


# ---- forward and backward -------------------------------------------------------------------------------
@_settings(600)
@given(c=cases(FULL))
def test_forward_backward_full_precision(c):
    t = _materialize(c)
    ours, exp, mag = _run_ours(c, t), _run_ref(c, t), _mags(c, t)
    _check_dtypes(c, t, ours)
    tol, u, cf = _full_tol(c)
    for n in ("y", *c.grads):
        _check_full(n, ours[n], exp[n], mag[n], tol, u, cf)


@_settings(300)
@given(c=cases(FULL, bases=["linear", "adapter"]), mask=st.lists(st.booleans(), min_size=4, max_size=4))
def test_linear_bwd_op_output_mask(c, mask):
    """linear_bwd called directly (weight given or None): each output only when asked for, else an empty tensor."""
    c = dataclasses.replace(c, grads=("x", "A", "B", "lam"))
    t = _materialize(c)
    x, W, A, B, lam, w, g = (t[n] for n in ("x", "W", "A", "B", "lam", "w", "g"))
    seed = torch.tensor([c.dropout_seed], dtype=torch.int64) if c.dropout_p > 0 else None
    if c.base == "adapter":
        _, u, s, a, bn = OPS.adapter_fwd(x, A, B, lam, w, c.dropout_p, seed)
    else:
        _, u, s, a, bn = OPS.linear_fwd(x, W, t["b"], A, B, lam, w, c.dropout_p, seed)
    outs = OPS.linear_bwd(g, x, W, A, B, lam, w, u, s, a, bn, c.dropout_p, seed, mask)
    exp, mag = _run_ref(c, t), _mags(c, t)
    tol, u_, cf = _full_tol(c)
    for want, name, got in zip(mask, ("x", "A", "B", "lam"), outs):
        if not want:
            assert got.numel() == 0, f"d{name} was not asked for but has shape {tuple(got.shape)}"
            continue
        assert got.dtype == t[name].dtype and got.shape == t[name].shape, name
        _check_full("d" + name, got, exp[name], mag[name], tol, u_, cf)
        if name == "x" and c.base == "adapter" and c.dropout_p > 0:
            # without a base term dx = (G A') ⊙ keep/(1−p): exactly 0 wherever the mask dropped x
            dropped = ~_keep(c, x)
            assert torch.all(got[dropped] == 0), "dx is not 0 where dropout_keep_ref dropped the input"


# ---- prep and delta_weight ------------------------------------------------------------------------------
@st.composite
def adapters(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16), lambdas=LAMBDAS,
             in_out=None):
    _, in_f, out, r = draw(dims())
    in_f, out = in_out or (in_f, out)
    return dict(in_f=in_f, out=out, r=r, dtype=draw(st.sampled_from(dtypes)), a_kinds=draw(kinds(r)),
                b_kinds=draw(kinds(r)), lam=draw(lambdas), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2**32 - 1)))


def _adapter(d):
    """A, B, lam, w in d['dtype'] (A and B stored transposed when d['transposed']: non-contiguous)."""
    g = torch.Generator().manual_seed(d["seed"])
    f64 = torch.float64
    A = _set_norms(torch.randn(d["r"], d["in_f"], generator=g, dtype=f64) / math.sqrt(d["in_f"]), d["a_kinds"], 1)
    B = _set_norms(torch.randn(d["out"], d["r"], generator=g, dtype=f64) / math.sqrt(d["r"]), d["b_kinds"], 0)
    w = torch.rand(d["in_f"], generator=g, dtype=f64) + 0.5
    A, B = A.to(d["dtype"]), B.to(d["dtype"])
    if d["transposed"]:
        A, B = A.t().contiguous().t(), B.t().contiguous().t()
    return A, B, torch.tensor([d["lam"]], dtype=d["dtype"]), w.to(d["dtype"])


def _opmath(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@_settings(300)
@given(d=adapters())
def test_prep_and_delta_weight(d):
    A, B, lam, w = _adapter(d)
    A64, B64, lam64, w64 = (v.double() for v in (A, B, lam, w))
    om = _opmath(d["dtype"])
    tol, u = TOL[om], _u(om)
    got = ops.prep(A, B, lam, w)
    exp = ref.prep_ref(A64, B64, lam64, w64)
    # each prep output is a product/quotient or a norm (a sum of squares): no cancellation, its own magnitude
    for name, gv, ev in zip(("A_folded", "s", "a_norm", "b_norm"), got, exp):
        assert gv.dtype == om and gv.shape == ev.shape, name
        _check_full(name, gv, ev, ev.abs(), tol, u, FLOOR_C)
    # ΔW = (B ⊙ s)(A ⊙ w): its error is the GEMM's (r terms and the folds: (r + 8)·u·mag) plus what it inherits
    # from s, itself held to TOL just above; s's error is added to the floor as it is. (The norms are plain
    # opmath sums of squares: with fp16/bf16 parameters, values on a coarse grid, their rounding errors add up
    # coherently, e.g. 70u at in = 1031, so a √n allowance as in _floor_c would not do here.)
    Aw = A64.abs() * w64
    mag = (B64.abs() * exp[1].abs()) @ Aw
    s_err = (B64.abs() * (got[1].double() - exp[1]).abs()) @ Aw
    dw = ops.delta_weight(A, B, lam, w)
    assert dw.dtype == om
    _check_full("delta_weight", dw, ref.delta_weight_ref(A64, B64, lam64, w64), mag, tol, u,
                d["r"] + FLOOR_C + s_err.norm().item() / max(u * mag.norm().item(), 1e-300))


# ---- merge_ and merge_many_ -------------------------------------------------------------------------------
_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (weight dtype, adapter opmath); (fp64, fp32) is a known bug, see test_merge_fp64_weight_fp32_adapter
MERGE_DTYPES = [(_F32, _F32), (_F64, _F64), (_BF16, _F32), (_F16, _F32), (_F32, _F64), (_BF16, _F64), (_F16, _F64)]
# adapter dtypes per opmath: merge_many_ needs one opmath for all its adapters, not one dtype
_PARAM_DTYPES = {_F32: (_F32, _BF16, _F16), _F64: (_F64,)}


@st.composite
def merge_cases(draw, pairs=MERGE_DTYPES, many=False):
    """One adapter for merge_; 1 to 4 of the same (out, in) and opmath for merge_many_ (0: the facade's no-op)."""
    w_dtype, opmath = draw(st.sampled_from(pairs))
    _, in_f, out, _ = draw(dims())
    n = draw(st.integers(0, 4)) if many else 1
    p_dtypes = _PARAM_DTYPES[opmath] if many else (opmath,)
    ads = [draw(adapters(dtypes=p_dtypes, in_out=(in_f, out))) for _ in range(n)]
    alpha = st.one_of(st.sampled_from([1.0, -1.0, 0.0]), st.floats(-3.0, 3.0))
    return dict(in_f=in_f, out=out, opmath=opmath, w_dtype=w_dtype, many=many, adapters=ads,
                alphas=[draw(alpha) for _ in range(n)], layout=draw(st.sampled_from(["contiguous", "transposed",
                                                                                     "sliced"])),
                w_scale=draw(st.sampled_from([1.0, 1e-3, 1e4])), seed=draw(st.integers(0, 2**32 - 1)))


def _weight_view(W0: torch.Tensor, layout: str):
    """(storage, weight view) holding a copy of W0: contiguous, transposed, or every other column of a wider
    tensor filled with 7 elsewhere."""
    if layout == "contiguous":
        storage = W0.clone()
        return storage, storage
    if layout == "transposed":
        storage = W0.t().clone(memory_format=torch.contiguous_format)
        return storage, storage.t()
    storage = torch.full((W0.shape[0], 2 * W0.shape[1]), 7.0, dtype=W0.dtype)
    storage[:, ::2] = W0
    return storage, storage[:, ::2]


def _check_merge(d):
    """weight += Σ alpha_i·ΔW_i in place (merge_: one adapter; merge_many_: all in one pass). Element-wise,
    against the exact fp64 value v = W + Σ alpha_i·ΔW_i, with R = Σ r_i the rank of the stacked update:
        |merged − v| ≤ u_w·|v| + half a subnormal step       (one rounding to W's dtype)
                       + (R + _floor_c)·u_op·Σ|alpha_i|·|B_i ⊙ s_i| |A_i ⊙ w_i|   (ΔW in opmath: s, folds, R terms)
                       + (R + 1)·u_op·|W|   (W.addmm_ adds the R rank-1 terms into W one at a time, rounding
                                             each time, whenever W passes through opmath)
    An fp64 weight with an fp32 adapter must not lose W's precision: there the |W| term is left out
    (test_merge_fp64_weight_fp32_adapter, a known bug). Where |v| is beyond W's dtype's range (fp16 with large W)
    the element must be inf of v's sign; elements within 1 % of the threshold are not checked. A zero update
    (every λ_i or alpha_i 0) leaves W bit-identical; merge_many_ with one adapter is merge_ bit for bit."""
    ads = [_adapter(a) for a in d["adapters"]]
    wdt, om, alphas = d["w_dtype"], d["opmath"], d["alphas"]
    fi = torch.finfo(wdt)
    g = torch.Generator().manual_seed(d["seed"])
    W0 = (torch.randn(d["out"], d["in_f"], generator=g, dtype=_F64) / math.sqrt(d["in_f"]) * d["w_scale"])
    W0 = W0.clamp(-fi.max, fi.max).to(wdt)  # the reference copy: every layout below stores its own copy
    storage, weight = _weight_view(W0, d["layout"])
    before = storage.clone()
    ptr = weight.data_ptr()
    if d["many"]:
        ops.merge_many_(weight, ads, alphas)
    else:
        ops.merge_(weight, *ads[0], alphas[0])
    assert weight.data_ptr() == ptr and weight.dtype == wdt
    if d["layout"] == "sliced":
        assert torch.equal(storage[:, 1::2], before[:, 1::2]), "the merge wrote outside the weight view"
    if all(a["lam"] == 0.0 or al == 0.0 for a, al in zip(d["adapters"], alphas)):
        assert torch.equal(weight, W0), "a zero update changed the weight"
    if d["many"] and len(ads) == 1:
        _, single = _weight_view(W0, d["layout"])  # the same layout: addmm_'s order can depend on it
        ops.merge_(single, *ads[0], alphas[0])
        assert torch.equal(weight, single), "merge_many_ with one adapter differs from merge_"
    v, mag = W0.double(), torch.zeros(d["out"], d["in_f"], dtype=_F64)
    for (A, B, lam, w), al in zip(ads, alphas):
        A64, B64, lam64, w64 = (t.double() for t in (A, B, lam, w))
        assert ref.merge_ref(W0, A64, B64, lam64, w64, al).dtype == wdt
        v = v + al * ref.delta_weight_ref(A64, B64, lam64, w64)
        mag = mag + abs(al) * ((B64.abs() * ref.scale_ref(A64, B64, lam64).abs()) @ (A64.abs() * w64))
    R = sum(a["r"] for a in d["adapters"])
    u_w, u_op = _u(wdt), _u(om)
    wider = fi.bits > torch.finfo(om).bits
    bound = (u_w * v.abs() + fi.tiny * fi.eps / 2 + (R + _floor_c(d["in_f"], d["out"])) * u_op * mag
             + (0.0 if wider else (R + 1) * u_op * W0.double().abs()))
    got = weight.double()
    finite = v.abs() + bound <= fi.max * 0.99
    over = v.abs() - bound >= fi.max * 1.01
    err = (got - v).abs()
    bad = finite & ~(err <= bound)
    note(f"max err/bound {(err / bound)[finite].max().item() if finite.any() else 0.0}")
    assert not bad.any(), (
        f"{int(bad.sum())} elements off, e.g. index {tuple(bad.nonzero()[0].tolist())}: got "
        f"{got[bad][0].item()!r}, exact {v[bad][0].item()!r}, bound {bound[bad][0].item():.3e}")
    assert torch.equal(got[over], v[over].sign() * math.inf), "overflowing elements must be inf of the right sign"


@_settings(400)
@given(d=merge_cases())
def test_merge(d):
    _check_merge(d)


@_settings(200)
@given(d=merge_cases(many=True))
def test_merge_many(d):
    _check_merge(d)


# fp64 weight with fp32 adapter params: the weight is updated in fp64 (it used to be rounded through fp32).
@settings(_settings(20), report_multiple_bugs=False)
@given(d=st.one_of(merge_cases(pairs=[(_F64, _F32)]), merge_cases(pairs=[(_F64, _F32)], many=True)))
def test_merge_fp64_weight_fp32_adapter(d):
    _check_merge(d)


# ---- bf16 / fp16 ----------------------------------------------------------------------------------------
# |λ| ≤ 100 with x ~ N(0, 1): the split scale's factors stay far inside fp16's range (test_fp16_near_overflow
# goes beyond)
LOW_LAMBDAS = st.one_of(
    st.sampled_from([15.0, 0.0, -1.0]),
    st.builds(lambda sign, e: sign * 10.0 ** e, st.sampled_from([1.0, -1.0]), st.floats(-3.0, 2.0)),
)


@_settings(400)
@given(c=cases(LOW, lambdas=LOW_LAMBDAS, x_scales=(1.0,)))
def test_forward_backward_low_precision(c):
    t = _materialize(c)
    ours, exp, torchs = _run_ours(c, t), _run_ref(c, t), _run_ref(c, t, c.x_dtype)
    mag = _mags(c, t, tiny=torch.finfo(c.x_dtype).tiny)
    _check_dtypes(c, t, ours)
    for n in ("y", *c.grads):
        _check_low(n, ours[n], exp[n], torchs[n], mag[n], _u(c.x_dtype))


# ---- fp16 near overflow -----------------------------------------------------------------------------------
def _fp16_path(c: Case, t: dict) -> dict:
    """The quantities the native op stores in x's dtype on the low-precision path, in fp64: base = x Wᵀ + b,
    u = x_d A'ᵀ, v = u ⊙ λ/(r·â), t = v (B/b̂)ᵀ; backward gW = g W, GB = g B, G = GB/b̂, A's = A' ⊙ λ/(r·â),
    t2 = G A's (before and after the dropout scale), M = gᵀu, Q = GBᵀ x_d."""
    f = {n: None if v is None else v.detach().double() for n, v in t.items()}
    N = math.prod(c.lead)
    X = f["x"].reshape(N, c.in_f)
    G = f["g"].reshape(N, c.out)
    keep = _keep(c, t["x"])
    drop = 1.0 if keep is None else keep.reshape(N, c.in_f).double() / (1.0 - c.dropout_p)
    A, B = f["A"], f["B"]
    bh = B.norm(dim=0).clamp_min(EPS)
    s_a = f["lam"] / (c.r * A.norm(dim=1).clamp_min(EPS))
    Af = A * f["w"]
    q = dict(Xd=X * drop)
    q["u"] = q["Xd"] @ Af.T
    q["v"] = q["u"] * s_a
    q["t"] = q["v"] @ (B / bh).T
    q["base"] = X @ f["W"].T if f["W"] is not None else torch.zeros_like(q["t"])
    q["GB"] = G @ B
    q["G"] = q["GB"] / bh
    q["Afs"] = Af * s_a[:, None]
    q["t2"] = q["G"] @ q["Afs"]
    q["t2d"] = q["t2"] * drop
    q["gW"] = G @ f["W"] if f["W"] is not None else torch.zeros_like(q["t2"])
    q["M"] = G.T @ q["u"]
    q["Q"] = q["GB"].T @ q["Xd"]
    return q


def _check_range(name, got, exp, bound, known, top, fits=None):
    """Where ``known`` (no stored intermediate the element depends on overflowed): ours is inf of exp's sign if
    |exp| − bound is 1 % beyond the dtype's range; ours is finite and within ``bound`` of exp if |exp| + bound
    is 1 % inside it and ``fits`` (a partial result that is rounded on its own is inside it too)."""
    got, exp, bound, known = got.double().flatten(), exp.flatten(), bound.flatten(), known.flatten()
    fin = known & (exp.abs() + bound <= 0.99 * top) & (True if fits is None else fits.flatten())
    over = known & (exp.abs() - bound >= 1.01 * top)
    note(f"{name}: {int(fin.sum())} finite and {int(over.sum())} overflowing of {exp.numel()} checked")
    bad = fin & ~((got - exp).abs() <= bound)
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off, e.g. got {got[bad][0].item()!r}, exact "
                           f"{exp[bad][0].item()!r}, bound {bound[bad][0].item():.3e}")
    assert torch.equal(got[over], exp[over].sign() * math.inf), f"{name}: an overflowing element is not inf"


@_settings(300)
@given(c=cases([(_F16, _F32), (_F16, _F16)], lambdas=st.one_of(st.sampled_from([1e-3, -1e-2]), LAMBDAS),
               x_scales=(6e4, 3e4, 8e3, 1e3), g_scales=(1.0, 1e3, 3e4), big=False))
def test_fp16_near_overflow(c):
    """fp16 x with entries ~1e3–6e4 (and λ up to 1e4, clamped A rows and B columns): the native op keeps x Wᵀ,
    u, u ⊙ λ/(r·â), the adapter term, g B and friends in fp16, so a result can only be expected finite where
    none of those overflows. The property, element by element: where every fp64 intermediate the element
    depends on is within half of fp16's range, (a) if the exact result is inside the range, ours is finite and
    within the forward-error bound 8·u·mag (each of the ≤ 8 roundings on the path costs at most u times the
    magnitude it acts on; mag from _mags, underflow included); (b) if the exact result is beyond the range, ours
    is inf of its sign. Elements whose intermediates overflow are not checked (PyTorch overflows there too)."""
    c = dataclasses.replace(c, grads=tuple(n for n in c.grads if n in ("x", "A", "B", "lam")) or ("x",))
    t = _materialize(c)
    ours, exp, q = _run_ours(c, t), _run_ref(c, t), _fp16_path(c, t)
    mag = _mags(c, t, tiny=torch.finfo(_F16).tiny)
    u, top = _u(_F16), torch.finfo(_F16).max
    L = top / 2
    ok = {k: v.abs() <= L for k, v in q.items()}
    rows_f = ok["Xd"].all(1) & ok["u"].all(1) & ok["v"].all(1)
    # y = fl(fl(base) + t): base is rounded on its own (it may be inf while y is not), t is not
    fits = q["base"].abs() <= 0.99 * top
    _check_range("y", ours["y"], exp["y"], 8 * u * mag["y"], rows_f[:, None] & ok["t"], top, fits)
    if "x" in c.grads:
        known_x = (ok["GB"].all(1) & ok["G"].all(1))[:, None] & ok["Afs"].all(0)[None, :] & ok["t2"] & ok["t2d"]
        fits = q["gW"].abs() <= 0.99 * top  # without dropout g W is rounded on its own
        _check_range("dx", ours["x"], exp["x"], 8 * u * mag["x"], known_x, top, fits)
    if all(ok[k].all() for k in ("Xd", "u", "GB", "M", "Q")):
        for n in ("A", "B", "lam"):
            if n in c.grads:
                known = torch.ones_like(exp[n], dtype=torch.bool)
                _check_range("d" + n, ours[n], exp[n], 8 * u * mag[n], known, torch.finfo(ours[n].dtype).max)


# ---- in_features = 0 or out_features = 0 ------------------------------------------------------------------
@st.composite
def zero_feature_cases(draw):
    c = draw(cases(FULL, big=False))
    which = draw(st.sampled_from(["in", "out", "both"]))
    return dataclasses.replace(c, in_f=0 if which != "out" else c.in_f, out=0 if which != "in" else c.out)


# in_features = 0 / out_features = 0 (N from the leading dims: numel / features once divided by zero, SIGFPE).
@_settings(50)
@given(c=zero_feature_cases())
def test_zero_features(c):
    test_forward_backward_full_precision.hypothesis.inner_test(c)
