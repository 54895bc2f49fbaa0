"""Inference without per-call preparation: cached folded factors, and batches that mix adapters row by row.

**Folded-factor cache.** Whatever x is, an adapter's forward needs the same two skinny matrices, A' = A ⊙ w and
B' = B ⊙ s (s from the norms of A and B and λ). While no gradient is recorded they can be kept: a forward is then
the base GEMM plus ``u = x A'ᵀ`` and ``y += u B'ᵀ``, three ATen calls and no preparation pass. An entry is keyed by
adapter and GEMM dtype and stamped with the storage address and version counter of every tensor it was computed
from (A, B, λ, w and a paper-init adapter's frozen A₀, B₀, λ₀); any in-place update (optimizer steps,
``load_state_dict``, ``copy_`` under ``no_grad``) bumps a version, and a replaced tensor (``.to()``, ``.data =``,
a new Parameter) has another address, since the entry keeps the old storage alive and the address cannot be
reused while it does. Writes through ``.data`` (``p.data.copy_(...)``) are the one change neither autograd nor the
version counter sees: call ``clear_inference_cache`` after those.

The cached forward computes exactly what the native op's GEMM path computes on CPU (same GEMMs on the same
operands, fp16's split scale included), so switching the cache on or off changes no bit there; where the op takes
its fused pass for small fp32/fp64 layers instead (``ops.set_tuning(cpu_fused=...)``), the two agree to rounding.
It is used only when the forward
records no autograd graph (``torch.no_grad()`` / ``torch.inference_mode()``), the layer applies no dropout, no
autocast region is active, the call is not being traced by ``torch.compile`` (the compiled graph calls the op,
and inductor fuses its preparation) and no CUDA graph is being captured (a captured graph would read cached
tensors the cache may later drop; the op recomputes the factors inside the graph instead).

**Mixed batches.** ``mixed_batch(model, adapter_names)`` runs one forward in which row i of the batch (dim 0) uses
adapter ``adapter_names[i]`` (``"__base__"``: none), as PEFT LoRA's ``adapter_names`` argument. Each layer computes
the base output for the whole batch, then adds every row's own adapter term: on CPU by default in one call of the
native segmented op (each row against its adapter's cached factors, no gathered copy, no call per adapter), else
by gathering the rows of every adapter into one sorted copy (one ``index_select``), running each adapter's two
skinny GEMMs on its contiguous segment and adding all of them back with one ``index_add_``, or by the masked
two-GEMM form (see ``mixed_batch``). The grouping is computed once per block, not per layer.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

BASE = "__base__"  # the name of "no adapter" in mixed batches (PEFT's)
_EPS = 1e-4  # the norm clamp (reference.NORM_EPS, kNormEps in the kernels)
_CACHE_ATTR = "_fold_cache"

_is_compiling = torch.compiler.is_compiling
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
if _any_autocast is None:  # pragma: no cover  (older torch)
    def _any_autocast() -> bool:
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def cache_applies(x: torch.Tensor) -> bool:
    """The conditions of the cached forward that do not depend on the layer: no graph recorded, not traced by
    torch.compile, no autocast region, no CUDA graph being captured."""
    if torch.is_grad_enabled() or _is_compiling() or _any_autocast():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


# ---- the folded factors ----------------------------------------------------------------------------------
def _raw_terms(layer: nn.Module, name: str) -> list[tuple]:
    """(A, B, λ, w, negate) of ``name`` and, for paper init, its frozen initial term (added with −λ₀)."""
    m = layer._modules
    w = m["delora_w_norm"]._buffers[name]
    terms = [(m["delora_A"]._parameters[name], m["delora_B"]._parameters[name],
              m["delora_lambda"]._parameters[name], w, False)]
    frozen = m["delora_A0"]._buffers
    if name in frozen:
        terms.append((frozen[name], m["delora_B0"]._buffers[name], m["delora_lambda0"]._buffers[name], w, True))
    return terms


def _fold(A, B, lam, w, negate: bool, dt: torch.dtype) -> tuple:
    """(A'ᵀ, B'ᵀ, sa) in the GEMM dtype ``dt``, as the native forward builds them: A' = A⊙w and B' = B⊙s, or for
    fp16 the split scale: B' = B ⊙ λ/(r·b̂) with sa = 1/â (fp32) applied to u, or for |λ/r| < 1 B' = B/b̂ with
    sa = λ/(r·â) (see csrc/delora_ops.cpp)."""
    if negate:
        lam = -lam
    Af, s, a, b = ops.prep(A, B, lam, w)  # opmath; also the op's argument checks
    om = Af.dtype
    Bo = B.to(om)
    if dt == torch.float16:
        # λ/r goes on u's side when |λ/r| < 1 (B's side would make B' subnormal), else on B's (small_lambda in
        # csrc/delora_math.h)
        lam_o, r = lam.to(om).reshape(1), A.shape[0]
        a_hat, b_hat = a.clamp_min(_EPS), b.clamp_min(_EPS)
        small = lam_o.abs() < r
        sa = torch.where(small, lam_o / (a_hat * r), a_hat.reciprocal())
        Bd = Bo * torch.where(small, b_hat.reciprocal(), lam_o / (b_hat * r))
    else:
        sa = None
        Bd = Bo * s
    return Af.to(dt).t(), Bd.to(dt).t(), sa


def folded(layer: nn.Module, name: str, dt: torch.dtype, cache: bool = True) -> list[tuple] | None:
    """[(A'ᵀ, B'ᵀ, sa)] per term of adapter ``name`` in GEMM dtype ``dt``: from the layer's cache when its stamp
    still matches, else computed (and stored). ``cache=False`` computes them with autograd (nothing stored).
    None when the tensors cannot be stamped (inference tensors have no version counter): use the op."""
    if not cache:
        return [_fold(*t, dt) for t in _raw_terms(layer, name)]
    # The stamp is written out (no loop, no term list): this runs on every cached forward.
    m = layer._modules
    A, B = m["delora_A"]._parameters[name], m["delora_B"]._parameters[name]
    lam, w = m["delora_lambda"]._parameters[name], m["delora_w_norm"]._buffers[name]
    frozen = m["delora_A0"]._buffers
    try:
        stamp = (A.data_ptr(), A._version, B.data_ptr(), B._version, lam.data_ptr(), lam._version, w.data_ptr(),
                 w._version)
        if name in frozen:
            A0, B0, lam0 = frozen[name], m["delora_B0"]._buffers[name], m["delora_lambda0"]._buffers[name]
            stamp += (A0.data_ptr(), A0._version, B0.data_ptr(), B0._version, lam0.data_ptr(), lam0._version)
    except (RuntimeError, NotImplementedError):
        return None
    store = layer.__dict__.get(_CACHE_ATTR)
    key = (name, dt)
    if store is not None:
        entry = store.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[2]
    return _compute_and_store(layer, key, stamp, _raw_terms(layer, name), dt, store)


def _compute_and_store(layer: nn.Module, key: tuple, stamp: tuple, terms: list[tuple], dt: torch.dtype, store):
    with torch.no_grad():
        factors = [_fold(*t, dt) for t in terms]
    # the entry holds the stamped tensors' storages, so none of their addresses can be reused while it exists
    keep = tuple(t.detach() for A, B, lam, w, _ in terms for t in (A, B, lam, w))
    if store is None:
        store = layer.__dict__.setdefault(_CACHE_ATTR, {})
    else:
        # Drop what can no longer hit, so no old storage stays alive: deleted adapters, and this adapter's entries
        # of the same kind whose tensors changed (another dtype after .double(), another device after .to()).
        known = layer._modules["delora_A"]._parameters
        for k, e in list(store.items()):
            if k[0] not in known or (k[0] == key[0] and len(k) == len(key) and e[0] != stamp):
                store.pop(k, None)
    store[key] = (stamp, keep, factors)
    return factors


def frozen_folded(layer: nn.Module, name: str, dt: torch.dtype):
    """(A₀'ᵀ, B₀'ᵀ, sa) of paper-init adapter ``name``'s frozen term alone, cached under its own key: A₀, B₀, λ₀ and w
    do not change while A, B and λ train, so a training step needs no preparation pass for it. None if unstampable."""
    m = layer._modules
    A0, B0 = m["delora_A0"]._buffers[name], m["delora_B0"]._buffers[name]
    lam0, w = m["delora_lambda0"]._buffers[name], m["delora_w_norm"]._buffers[name]
    try:
        stamp = (A0.data_ptr(), A0._version, B0.data_ptr(), B0._version, lam0.data_ptr(), lam0._version,
                 w.data_ptr(), w._version)
    except (RuntimeError, NotImplementedError):
        return None
    store = layer.__dict__.get(_CACHE_ATTR)
    key = (name, dt, "frozen")
    if store is not None:
        entry = store.get(key)
        if entry is not None and entry[0] == stamp:
            return entry[2][0]
    return _compute_and_store(layer, key, stamp, [(A0, B0, lam0, w, True)], dt, store)[0]


def frozen_terms_apply(x: torch.Tensor) -> bool:
    """Whether a training forward may add paper init's frozen terms from cached factors (two plain GEMMs each,
    differentiable in x by autograd) instead of a second native op: not while compiling (the op is traced), under
    autocast (the op casts as nn.Linear does) or for fp16 (the op's backward splits the scale differently)."""
    return not (_is_compiling() or _any_autocast() or x.dtype == torch.float16)


def add_frozen_terms(layer: nn.Module, y: torch.Tensor, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """y plus the frozen term of each paper-init adapter in ``names`` (−λ₀, no dropout, no parameter gradient)."""
    x2 = None
    for name in names:
        f = frozen_folded(layer, name, x.dtype)
        if f is None:
            m = layer._modules
            y = y + ops.adapter(x, m["delora_A0"]._buffers[name], m["delora_B0"]._buffers[name],
                                -m["delora_lambda0"]._buffers[name], m["delora_w_norm"]._buffers[name]).to(y.dtype)
            continue
        if x2 is None:
            x2 = _rows(x)
        AdT, BdT, _ = f
        y = y + torch.mm(torch.mm(x2, AdT), BdT).view(y.shape).to(y.dtype)
    return y


def clear_inference_cache(model: nn.Module) -> None:
    """Drop the cached folded factors of every DeLoRA layer in ``model`` (or of ``model`` itself, a layer).

    Only needed after writing adapter tensors through ``.data`` (invisible to version counters); every other change
    is detected by itself."""
    for m in model.modules():
        m.__dict__.pop(_CACHE_ATTR, None)


def _apply_u(u: torch.Tensor, sa) -> torch.Tensor:
    return u if sa is None else (u.to(sa.dtype) * sa).to(u.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (N, in), contiguous (as the op sees it); N from the shape, not numel // in (in may be 0)."""
    if x.dim() != 2:
        x = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return x.contiguous()


def cached_forward(layer: nn.Module, x: torch.Tensor, names: Sequence[str], operands: tuple | None, args, kwargs):
    """The layer's output from cached factors (``operands``: the (W, bias) of a plain linear base, whose GEMM runs
    here; None: the base is called). None when it does not apply (the op path then runs and reports what is wrong,
    e.g. a dtype mismatch)."""
    dt = x.dtype
    if len(names) == 1:
        factors = folded(layer, names[0], dt)
        if factors is None:
            return None
    else:
        factors = []
        for name in names:
            f = folded(layer, name, dt)
            if f is None:
                return None
            factors += f
    base = layer._modules["base_layer"]
    two_d = x.dim() == 2
    x2 = x.contiguous() if two_d else _rows(x)
    if operands is not None:
        W, bias = operands
        if W.dtype != dt:
            return None
        # the op's order: y = x Wᵀ + b, then u B'ᵀ accumulated into y (first term), then each further term added
        y = F.linear(x2, W, bias)
        AdT, BdT, sa = factors[0]
        y.addmm_(torch.mm(x2, AdT) if sa is None else _apply_u(torch.mm(x2, AdT), sa), BdT)
        if len(factors) > 1:
            for AdT, BdT, sa in factors[1:]:
                y = y + torch.mm(_apply_u(torch.mm(x2, AdT), sa), BdT)
        return y if two_d else y.view(*x.shape[:-1], y.shape[-1])
    y = base(x, *args, **kwargs)
    for AdT, BdT, sa in factors:
        y = y + torch.mm(_apply_u(torch.mm(x2, AdT), sa), BdT).view(y.shape).to(y.dtype)
    return y


# ---- mixed batches -----------------------------------------------------------------------------------------
_PLAN: contextvars.ContextVar = contextvars.ContextVar("delora_ext_mixed_batch", default=None)


class _Plan:
    """The rows of a batch grouped by adapter: computed once per ``mixed_batch`` block, shared by its layers."""

    def __init__(self, names: list[str], strategy: str = "auto", num_beams: int = 1):
        self.n = len(names)
        self.names = names
        self.num_beams = num_beams  # how many copies of each prompt ``names`` holds (for the messages)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):  # bookkeeping on the host, once per block
            rows.setdefault(name, []).append(i)
        self.rows = rows
        self.adapters = [name for name in rows if name != BASE]  # first-appearance order
        self.strategy = strategy
        self._groups: dict[tuple, tuple] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._row_adapters: dict[tuple, torch.Tensor] = {}

    def groups(self, present: tuple, device: torch.device) -> tuple:
        """(perm, sizes) for the adapters in ``present``: perm (int64, on ``device``) lists their rows adapter by
        adapter, ``sizes[i]`` rows of ``present[i]`` each. Shared by every layer with the same adapters."""
        key = (present, device)
        got = self._groups.get(key)
        if got is None:
            perm = [i for name in present for i in self.rows[name]]
            got = (torch.tensor(perm, dtype=torch.int64, device=device), [len(self.rows[n]) for n in present])
            self._groups[key] = got
        return got

    def mask(self, present: tuple, col_block: torch.Tensor) -> torch.Tensor:
        """(n, Σr) bool: row i is False in the columns of its adapter's block (``col_block``: the block of each
        column), True (to be zeroed) elsewhere ("__base__": everywhere)."""
        key = (present, col_block.shape[0], col_block.device)
        m = self._masks.get(key)
        if m is None:
            block = {name: i for i, name in enumerate(present)}
            row_block = torch.tensor([block.get(name, -1) for name in self.names], device=col_block.device)
            m = row_block[:, None] != col_block[None, :]
            self._masks[key] = m
        return m

    def row_adapters(self, present: tuple, device: torch.device, per: int) -> torch.Tensor:
        """(n·per,) int64 on ``device``: each row's index into ``present``, -1 where its adapter is not there
        ("__base__", or an adapter this layer lacks); ``per`` rows per batch element (sequence positions)."""
        key = (present, device, per)
        got = self._row_adapters.get(key)
        if got is None:
            pos = {name: i for i, name in enumerate(present)}
            idx = torch.tensor([pos.get(name, -1) for name in self.names], dtype=torch.int64)
            got = (idx.repeat_interleave(per) if per != 1 else idx).to(device)
            self._row_adapters[key] = got
        return got


def _stacked(layer: nn.Module, present: tuple, factors: list, dt: torch.dtype) -> tuple:
    """(A'ᵀ of every present adapter side by side (in, Σr), B'ᵀ stacked (Σr, out), each column's adapter, whether all
    are finite), kept in the layer's cache and rebuilt only when one of the adapters' cached factor lists was
    replaced (a tensor changed)."""
    store = layer.__dict__.setdefault(_CACHE_ATTR, {})
    key = (BASE, present, dt)  # not an adapter name: dropped at the next miss, rebuilt on use
    got = store.get(key)
    if got is None or any(a is not b for a, b in zip(got[0], factors)):
        terms = [t for f in factors for t in f]
        Ad = torch.cat([t[0].t() for t in terms], 0)  # (Σr, in), as each A' is stored
        Bd = torch.cat([t[1].t() for t in terms], 1)  # (out, Σr)
        widths = [sum(t[0].shape[1] for t in f) for f in factors]
        col_block = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths)).to(Ad.device)
        # one check per rebuild (a host sync on a GPU): a zeroed product is 0 only for finite factors (0·inf = NaN),
        # so a broken adapter would reach every row of the batch; the grouped path keeps it to its own rows
        finite = bool(torch.isfinite(Ad).all()) and bool(torch.isfinite(Bd).all())
        got = (list(factors), Ad.t(), Bd.t(), col_block, finite)
        store[key] = got
    return got[1:]


def active_plan(layer: nn.Module):
    """The mixed-batch plan for ``layer`` in the current thread's context, or None."""
    plans = _PLAN.get()  # {id(layer): plan} for the block's layers
    if plans is None or _is_compiling():
        return None
    return plans.get(id(layer))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives x's GEMMs here, or None where no autocast region applies to x."""
    if not x.is_floating_point() or not _any_autocast():
        return None
    kind = x.device.type
    try:
        on = torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(kind) if on else None


def mixed_forward(layer: nn.Module, plan: _Plan, x: torch.Tensor, operands: tuple | None, args, kwargs
                  ) -> torch.Tensor:
    """The layer's output for a mixed batch, each row with its own adapter (``operands`` as in cached_forward)."""
    if x.dim() == 0 or x.shape[0] != plan.n:
        per = (f"{plan.n // plan.num_beams} names × num_beams={plan.num_beams}" if plan.num_beams > 1
               else f"{plan.n} names (one per batch element)")
        rows = x.shape[0] if x.dim() else 0
        hint = (f"; for generate, which repeats each prompt, pass mixed_batch(..., num_beams={rows // plan.n})"
                if rows > plan.n and rows % plan.n == 0 else "")
        raise ValueError(f"`adapter_names` has {per} but the input of this layer has {rows} rows along dim 0 "
                         f"(shape {tuple(x.shape)}){hint}")
    base = layer._modules["base_layer"]
    ac = _autocast_dtype(x)
    if ac is not None:
        # As the op under autocast: the base as autocast runs it, the adapters' GEMMs on x cast to autocast's dtype
        # with the factors in that dtype (the GEMMs here take explicit dtypes, so autocast is off for them).
        y = base(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return _add_adapters(layer, plan, x.to(ac), y, in_place=False)
    fused = operands is not None and operands[0].dtype == x.dtype
    if fused:
        W, bias = operands
    y = F.linear(x, W, bias) if fused else base(x, *args, **kwargs)
    return _add_adapters(layer, plan, x, y, in_place=fused)


def _add_adapters(layer: nn.Module, plan: _Plan, x: torch.Tensor, y: torch.Tensor, in_place: bool) -> torch.Tensor:
    """y (the base output) plus each row's adapter term; ``in_place``: y is this forward's own tensor (written in
    place when no graph is recorded)."""
    dt, fused = x.dtype, in_place
    known = layer._modules["delora_A"]._parameters
    present = tuple(name for name in plan.adapters if name in known)
    if not present:
        return y
    grad = torch.is_grad_enabled()
    if not grad and _segmented_applies(plan, layer, x, y, present, dt):
        out = _segmented_forward(plan, layer, x, y, present, dt, fused)
        if out is not None:
            return out
    if not grad and _masked_applies(plan, layer, x, present, dt):
        factors = [folded(layer, name, dt) for name in present]
        if all(f is not None for f in factors):
            out = _masked_forward(plan, layer, x, y, present, factors, dt, fused)
            if out is not None:
                return out
    perm, sizes = plan.groups(present, x.device)
    xs = _rows(x.index_select(0, perm))  # the one gather: each adapter's rows contiguous
    per = xs.shape[0] // perm.shape[0]  # rows per batch element (sequence positions)
    if per != 1:
        sizes = [n * per for n in sizes]
    segs = xs.split(sizes) if len(sizes) > 1 else (xs,)
    out_f = y.shape[-1]
    if grad:  # factors with autograd, segments concatenated (out= is not differentiable)
        parts = []
        for name, seg in zip(present, segs):
            d = None
            for AdT, BdT, sa in folded(layer, name, dt, cache=False):
                t = torch.mm(_apply_u(torch.mm(seg, AdT), sa), BdT)
                d = t if d is None else d + t
            parts.append(d)
        delta = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        delta = xs.new_empty(xs.shape[0], out_f)
        outs = delta.split(sizes) if len(sizes) > 1 else (delta,)
        for name, seg, out in zip(present, segs, outs):
            factors = folded(layer, name, dt) or folded(layer, name, dt, cache=False)
            if len(factors) == 1 and factors[0][2] is None:
                AdT, BdT, _ = factors[0]
                torch.mm(torch.mm(seg, AdT), BdT, out=out)
                continue
            d = None
            for AdT, BdT, sa in factors:
                t = torch.mm(_apply_u(torch.mm(seg, AdT), sa), BdT)
                d = t if d is None else d + t
            out.copy_(d)
    delta = delta.view(perm.shape[0], *y.shape[1:]).to(y.dtype)
    if fused and not grad:
        return y.index_add_(0, perm, delta)  # the one scatter
    return y.index_add(0, perm, delta)


# "auto" masks while rows × Σr × (in + out), the extra multiply-adds of the masked GEMMs, stays below this per
# device type; above it the grouped path's per-adapter GEMM calls cost less than the k-fold FLOPs. CPU: the two
# strategies break even near 8e6 on a 2-core x86 machine, at 64×64 (r = 8, 1000 rows) and at 1024×1024
# (r = 16, 32 rows) alike (bench_cpu.py, mixed-batch section). CUDA: not yet measured; a launch (~5 µs) there
# buys far more FLOPs, so its bound is set two orders of magnitude higher.
MASKED_MAX_WORK = {"cpu": 4_000_000, "cuda": 256_000_000}
# Devices where "auto" uses the native segmented op (fp16 aside): CPU, where it beat grouped at every measured size
# (8 adapters; 64×64 r = 8 with 8..1000 rows, 128², 256², 1024×1024 r = 16 with 8..256 rows) and masked wherever
# masked's work, rows × Σr × (in + out), exceeds about 1e6 (1.2-1.8× less adapter time at 1024×1024); below it
# the two are within ~10 % either way (a few µs of call overhead), and auto keeps masked. Not CUDA: its kernel is
# compiled but has not been run or measured.
SEGMENTED_AUTO_DEVICES = frozenset({"cpu"})
MASKED_OVER_SEGMENTED_WORK = 1_000_000


def _masked_applies(plan: _Plan, layer: nn.Module, x: torch.Tensor, present: tuple, dt: torch.dtype) -> bool:
    # fp16: another adapter's u may overflow, and inf·0 = NaN
    if plan.strategy in ("grouped", "segmented") or dt == torch.float16:
        return False
    if plan.strategy == "masked":
        return True
    return _masked_work(layer, x, present) <= MASKED_MAX_WORK.get(x.device.type, MASKED_MAX_WORK["cpu"])


def _masked_work(layer: nn.Module, x: torch.Tensor, present: tuple) -> int:
    """rows × Σr × (in + out): the multiply-adds of the masked path's two GEMMs."""
    frozen = layer._modules["delora_A0"]._buffers
    total_r = sum(layer.r[n] * (2 if n in frozen else 1) for n in present)
    return math.prod(x.shape[:-1]) * total_r * (layer.in_features + layer.out_features)


def _masked_forward(plan, layer, x, y, present, factors, dt, fused) -> torch.Tensor:
    """Every row against every present adapter's A' in one GEMM, u masked to the row's own adapter's columns, then
    one GEMM with every B' stacked: two GEMMs and a masked fill whatever the number of adapters, no gather or
    scatter; the masked-out products are exact zeros, so each row gets its own adapter's term only. None when a
    factor is not finite (its zeroed products would not be 0): the grouped path then runs."""
    AdT, BdT, col_block, finite = _stacked(layer, present, factors, dt)
    if not finite:
        return None
    off = plan.mask(present, col_block)
    x2 = x.contiguous() if x.dim() == 2 else _rows(x)
    u = torch.mm(x2, AdT)
    # masked_fill gives exact zeros even where u is not finite (a multiply by 0 would make inf·0 = NaN)
    if x.dim() == 2:
        u.masked_fill_(off, 0)
    else:
        u.view(plan.n, -1, u.shape[-1]).masked_fill_(off.unsqueeze(1), 0)
    if fused:
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        y2.addmm_(u, BdT)
        return y
    return y + torch.mm(u, BdT).view(y.shape).to(y.dtype)


def _segmented_applies(plan: _Plan, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, present: tuple,
                       dt: torch.dtype) -> bool:
    """Whether the native segmented op applies: asked for (or picked by "auto"), a native kernel for x's device, and
    a base output of x's rows in x's dtype (the op adds in place, in x's dtype; grouped casts the delta instead)."""
    if plan.strategy not in ("segmented", "auto"):
        return False
    if not ops.HAS_SEGMENTED or x.dim() < 2 or not ops.has_kernel(x.device):
        return False
    if y.dtype != dt or y.device != x.device or y.shape[:-1] != x.shape[:-1]:
        return False
    if plan.strategy == "segmented":
        return True
    if x.device.type not in SEGMENTED_AUTO_DEVICES or dt == torch.float16:
        return False
    # little work: masked's three ATen calls cost about what the op's list arguments do (a few µs)
    return _masked_work(layer, x, present) > MASKED_OVER_SEGMENTED_WORK


def _segmented_entry(layer: nn.Module, name: str, factors: list, dt: torch.dtype) -> tuple:
    """(A', B'ᵀ, sa) of adapter ``name`` for the segmented op: its terms' factors (paper init: two) stacked along r,
    contiguous, in opmath (exact: the GEMM-dtype values widened). Kept in the layer's cache beside the folded
    factors and rebuilt when their entry was replaced (a tensor changed)."""
    store = layer.__dict__.setdefault(_CACHE_ATTR, {})
    key = (BASE, "segmented", name, dt)  # not an adapter name: dropped at the next miss, rebuilt on use
    got = store.get(key)
    if got is None or got[0] is not factors:
        om = torch.float64 if dt == torch.float64 else torch.float32
        if len(factors) == 1:
            A, Bt, sa = factors[0][0].t(), factors[0][1], factors[0][2]
        else:
            A = torch.cat([t[0].t() for t in factors])  # (Σr, in)
            Bt = torch.cat([t[1] for t in factors])  # (Σr, out)
            sas = [t[2] for t in factors]
            sa = None if all(v is None for v in sas) else torch.cat(
                [v if v is not None else torch.ones(t[0].shape[1], dtype=om, device=A.device)
                 for v, t in zip(sas, factors)])
        got = (factors, A.to(om).contiguous(), Bt.to(om).contiguous(),
               None if sa is None else sa.to(om).contiguous())
        store[key] = got
    return got[1:]


def _segmented_forward(plan, layer, x, y, present, dt, fused) -> torch.Tensor | None:
    """y plus each row's own adapter term in one native call over the whole batch (no gather, no scatter, no call
    per adapter). A row reads only its own adapter's factors, so a non-finite factor stays in its rows. None when a
    factor cannot be cached (the grouped path then runs)."""
    factors = [folded(layer, name, dt) for name in present]  # all looked up first: a miss drops derived entries
    if None in factors:
        return None
    # the op's three lists for this set of adapters, references to the per-adapter entries (no copies)
    store = layer.__dict__[_CACHE_ATTR]
    key = (BASE, "segmented", present, dt)
    got = store.get(key)
    if got is None or any(a is not b for a, b in zip(got[0], factors)):
        entries = [_segmented_entry(layer, name, f, dt) for name, f in zip(present, factors)]
        got = (factors, *(list(t) for t in zip(*entries)))
        store[key] = got
    _, A, Bt, sa = got
    if not fused or not y.is_contiguous():
        # the base layer's own output may be referenced elsewhere (a hook, a cache): update a copy, as index_add does
        y = y.clone(memory_format=torch.contiguous_format)
    if x.dim() == 2:
        ops.segmented_adapter_(y, x, plan.row_adapters(present, x.device, 1), A, Bt, sa)
        return y
    idx = plan.row_adapters(present, x.device, math.prod(x.shape[1:-1]))
    ops.segmented_adapter_(y.view(-1, y.shape[-1]), _rows(x), idx, A, Bt, sa)
    return y


def _adapter_names_list(adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ValueError(f"`adapter_names` must be a list of adapter names, one per batch element (\"{BASE}\" for "
                         f"the base model), got {type(adapter_names).__name__}")
    bad = [nm for nm in adapter_names if not isinstance(nm, str)]
    if bad:
        raise ValueError(f"`adapter_names` must hold adapter names (str), got {bad[0]!r}")
    if not adapter_names:
        raise ValueError("`adapter_names` is empty; give one adapter name per batch element")
    return list(adapter_names)


def _encoder(model: nn.Module) -> nn.Module | None:
    """An encoder-decoder model's encoder (transformers' ``get_encoder``), None for other models."""
    get = getattr(model, "get_encoder", None)
    encoder = get() if callable(get) else None
    return encoder if isinstance(encoder, nn.Module) and encoder is not model else None


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], strategy: str = "auto", num_beams: int = 1):
    """Run forwards in which batch element i (dim 0 of every DeLoRA layer's input) uses adapter ``adapter_names[i]``
    (``"__base__"``: the base model alone), as PEFT LoRA's ``adapter_names`` forward argument::

        with torch.no_grad(), delora_ext.mixed_batch(model, ["a", "__base__", "b", "a"]):
            out = model(**batch)   # batch of 4

    ``num_beams``: for ``generate``, which repeats each prompt k times (k = ``max(num_beams,
    num_return_sequences)``) before the decoder runs, give one name per prompt and ``num_beams=k``: each name then
    covers its k consecutive rows, as PEFT's ``generate(adapter_names=..., num_beams=k)``; an encoder-decoder model's
    encoder (``get_encoder()``), which runs on the prompts themselves, keeps one name per row::

        with torch.no_grad(), delora_ext.mixed_batch(model, ["a", "b"], num_beams=4):
            out = model.generate(**prompts, num_beams=4)   # 2 prompts

    Every row equals the same row run with its adapter alone (``set_adapter``); a layer that does not have a named
    adapter (``layers_to_transform``, ``rank_pattern``...) leaves that adapter's rows at the base output. Refused with
    a ValueError naming ``adapter_names`` for unknown names; a batch of another size fails at the first layer. The
    model must be in eval mode (as PEFT) with nothing merged and no ``modules_to_save`` copies for the named adapters.
    The active adapters are not changed; the grouping applies to this thread only and ends with the block, also when
    it raises. Runs eagerly (not inside ``torch.compile``).

    ``strategy``: how each layer applies the adapters. "segmented": one call of the native op
    ``delora_ext::segmented_adapter_`` over the whole batch, each row multiplied by its own adapter's cached factors
    and added into the base output (fp32 accumulation, fp64 for fp64, one rounding): no gather, no scatter, no
    call per adapter. It needs the native kernels and runs where no gradient is recorded and the base output is in
    x's dtype; elsewhere grouped runs. For fp16 its intermediates are fp32, so it stays finite where a
    single-adapter fp16 forward's ``x·A'ᵀ`` overflows. "grouped": the rows gathered adapter by adapter (one
    ``index_select``), each adapter's two skinny GEMMs on its segment, added back with one ``index_add_``; its cost
    grows with the number of adapters in the batch. "masked": every row against all the batch's adapters in two
    GEMMs, each row's product masked to its own adapter's block: k-fold skinny-GEMM FLOPs, but three calls whatever
    k, so faster where calls dominate (decoding, small batches). "auto" (default): segmented on the devices in
    ``SEGMENTED_AUTO_DEVICES`` (CPU, where it was measured faster than both others) except for fp16 and at most
    ``MASKED_OVER_SEGMENTED_WORK`` masked multiply-adds (rows × Σr × (in + out)), where masked is as fast; otherwise
    masked while the extra work, rows × Σr × (in + out), is below ``MASKED_MAX_WORK`` for the device, grouped
    above; grouped for fp16 (a masked-out product could overflow fp16, and inf·0 is NaN) and whenever gradients
    are recorded.
    """
    from .layer import DeLoRALinear
    from .model import get_state, unwrap

    names = _adapter_names_list(adapter_names)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"`num_beams` must be a positive int (the copies generate makes of each prompt), got "
                         f"{num_beams!r}")
    if strategy not in ("auto", "grouped", "masked", "segmented"):
        raise ValueError(f"`strategy` must be 'auto', 'grouped', 'masked' or 'segmented', got {strategy!r}")
    inner = unwrap(model)
    layers, known, compiled = [], set(), inner is not model
    for m in inner.modules():
        compiled = compiled or getattr(m, "_compiled_call_impl", None) is not None
        if isinstance(m, DeLoRALinear):
            layers.append(m)
            known.update(m._modules["delora_A"]._parameters)
    if compiled:
        raise ValueError("mixed_batch: pass the model itself, not a torch.compile / DDP wrapper (mixed batches run "
                         "eagerly)")
    if not layers:
        raise ValueError("mixed_batch: `model` has no DeLoRA layers")
    if BASE in known:
        raise ValueError(f"mixed_batch: the model has an adapter named {BASE!r}, which in `adapter_names` means the "
                         f"base model alone; rename that adapter to run it in a mixed batch")
    unknown = sorted({nm for nm in names if nm != BASE and nm not in known})
    if unknown:
        raise ValueError(f"`adapter_names`: unknown adapter(s) {', '.join(map(repr, unknown))}; the model has "
                         f"{sorted(known)} (and \"{BASE}\" for none)")
    if inner.training:
        raise ValueError("mixed_batch: `model` is in training mode; call model.eval() first (mixed batches are for "
                         "inference, as PEFT's `adapter_names`)")
    merged = sorted({n for m in layers for n in m.merged_adapters})
    if merged:
        raise ValueError(f"mixed_batch: adapters {merged} are merged into the base weights; unmerge them first")
    state = get_state(inner)
    if state is not None:
        with_copies = sorted({nm for copies in state.saved_copies.values() for nm in copies if nm in names})
        if with_copies:
            raise ValueError(f"mixed_batch: adapters {with_copies} have modules_to_save copies, which a mixed batch "
                             f"cannot apply row by row; run those adapters with set_adapter")
    plan = _Plan([nm for nm in names for _ in range(num_beams)], strategy, num_beams)
    plans = dict.fromkeys(map(id, layers), plan)
    encoder = _encoder(inner) if num_beams > 1 else None
    if encoder is not None:
        prompts = _Plan(names, strategy)
        plans.update((id(m), prompts) for m in encoder.modules() if id(m) in plans)
    token = _PLAN.set(plans)
    try:
        yield
    finally:
        _PLAN.reset(token)
