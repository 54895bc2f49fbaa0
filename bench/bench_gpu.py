#!/usr/bin/env python
"""GPU benchmark of delora_ext's ``DeLoRALinear`` against a frozen ``F.linear``, PEFT's ``DeloraLinear``, PEFT's
LoRA of the same rank and the pure-PyTorch reference (``delora_ext.reference.linear_ref``).

    python bench/bench_gpu.py [--device cuda|cpu] [--quick] [--out FILE] [--sections ...]

One process; bf16 x, W and bias with fp32 adapter parameters (A, B, λ, w; PEFT's defaults give the same);
in = out = 4096; x is (N, in) and requires grad (a layer inside a network); our layer is built with
``init_weights=False`` (B random) and PEFT DeLoRA and the reference share its A, B, λ, w.

Sections (all by default):
  steps     forward, backward (of a fixed random dL/dy) and full step, r = 32 at N ∈ {16, 2048, 8192} and
            r ∈ {16, 64} at N = 8192. CUDA events around each phase; variants interleaved in a shuffled
            round-robin; L2 flushed (a 256 MiB memset) before every timed step; medians over the rounds.
            Two timing modes, interleaved within every round: "queued" (device-bound, as
            triton.testing.do_bench: the memset is only enqueued, so the host enqueues the step while the GPU
            is still busy and its launch time is hidden wherever the GPU is the bottleneck) and "host-synced"
            (a synchronize after the memset: single-call latency including the host's launch time).
            Also: agreement of every DeLoRA variant's output and gradients with an fp32 reference, and the
            forward's TFLOP/s for the frozen layer (the GEMM ceiling actually reached).
  launches  CUDA kernels (and memcpy/memset) per forward and per backward, counted with torch.profiler,
            at N = 16 and N = 8192 (r = 32), plus each step's peak extra device memory.
  graphs    N = 16 no-grad forward (decode), eager and captured in a torch.cuda.CUDAGraph, per layer over a
            chain of 8 independent layers (8 × 32 MiB of weights, more than the 60 MB L2).
  merge     ``layer.merge()`` on a bf16 and an fp32 4096×4096 weight (and the ``ops.merge_`` op alone, and
            PEFT's merge) against a device-to-device copy of the same weight in the same run, L2 flushed
            before each, in both timing modes; GB/s counts the weight read once and written once for all of them.
  profile   device time per kernel (torch.profiler) of frozen and our forward/backward at N = 8192, the N = 16
            no-grad forward and the merge op, then each GEMM of the side path alone against the bytes it must
            move and a copy's bandwidth (where a custom kernel could win), then the kernel variants.
  variants  A/B of each delora_ext.ops.set_tuning switch against the default in the same process.

Targets (N = 8192, r = 32): step ≤ 1.20× frozen step; ≥ 1.3× faster than PEFT DeLoRA; ≤ 1.05× PEFT LoRA;
merge ≥ 80 % of copy bandwidth (bf16 and fp32); N = 16 graphed forward ≤ 1.5× the graphed frozen forward.
The step and merge targets are evaluated on the queued timings (the report shows the host-synced value beside).

``--device cpu --quick`` runs every code path with tiny shapes on the CPU (wall-clock timers; CUDA graphs,
CUDA kernel counts and device memory are skipped with a note): a smoke test, not a measurement.
``--device cuda --quick`` is the same tiny run on a GPU (graphs included).

Writes FILE.md and FILE.json (``--out``; default bench/out/gpu/bench_gpu) and prints the markdown.
"""
from __future__ import annotations

import datetime as _dt
import gc
import glob
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback

# The benchmark measures the native CUDA kernels: route DeLoRALinear's CUDA tensors through them unless the
# caller says otherwise (ops.py keeps the reference on CUDA by default until a GPU run validates the kernels).
os.environ.setdefault("DELORA_EXT_NATIVE_CUDA", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/variants.py
import common  # noqa: E402

from variants import RefDeLoRA, build_ours, build_peft_delora, build_peft_lora, build_peft_native, build_ref, frozen  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("frozen", "ours", "peft_delora", "peft_native", "peft_lora", "ref")
LABELS = {"frozen": "frozen F.linear", "ours": "delora_ext", "peft_delora": "PEFT DeLoRA",
          "peft_native": "PEFT DeLoRA on delora_ext",
          "peft_lora": "PEFT LoRA", "ref": "reference"}
PHASES = ("fwd", "bwd", "step")
# Timing modes (see L2Flush). JSON: host-synced summaries under the original keys (row[v][phase], row[k] of a
# merge row), queued ones under row[v]["queued"][phase] and row[k]["queued"].
MODES = ("queued", "synced")
MODE_LABELS = {"queued": "queued (device-bound)", "synced": "host-synced (latency incl. host launch time)"}
TARGETS = {
    "step_vs_frozen": 1.20,          # ours step / frozen step ≤
    "speedup_vs_peft_delora": 1.30,  # PEFT DeLoRA step / ours step ≥
    "step_vs_peft_lora": 1.05,       # ours step / PEFT LoRA step ≤
    "merge_bw_fraction": 0.80,       # merge GB/s / copy GB/s ≥
    "graph_fwd_vs_frozen": 1.50,     # ours graphed N=16 forward / frozen graphed forward ≤
    "native_peft_vs_ours": 1.05,     # PEFT DeLoRA on delora_ext step / ours step ≤
}


class Config:
    def __init__(self, quick: bool, device: torch.device, scale: float):
        self.quick = quick
        if quick:
            self.in_f = self.out_f = 128
            self.groups = [(4, (8,)), (64, (4, 8, 16))]
            self.head = {"N": 64, "r": 8}
            self.small_n = 4
            self.launch_ns = (4, 64)
            self.merge_shape = (128, 128)
            self.chain = 3
            rounds = {4: 4, 64: 4}
            self.warmup = 1
            self.graph_rounds, self.merge_rounds = 4, 4
        else:
            self.in_f = self.out_f = 4096
            self.groups = [(16, (32,)), (2048, (32,)), (8192, (16, 32, 64))]
            self.head = {"N": 8192, "r": 32}
            self.small_n = 16
            self.launch_ns = (16, 8192)
            self.merge_shape = (4096, 4096)
            self.chain = 8
            # Time per round (one step of each variant in each of the two timing modes, plus a 256 MiB flush
            # before each, synchronised in host-synced mode): N=16 is launch-bound (~0.2-1 ms per step), N=8192
            # ~0.7-2 ms per step and 13 variants, so the steps section takes several seconds; imports, layer
            # set-up and the profiler dominate the run.
            rounds = {16: 100, 2048: 80, 8192: 80}
            self.warmup = 5
            self.graph_rounds, self.merge_rounds = 100, 50
        self.rounds = {n: max(2, int(round(k * scale))) for n, k in rounds.items()}
        self.graph_rounds = max(2, int(round(self.graph_rounds * scale)))
        self.merge_rounds = max(2, int(round(self.merge_rounds * scale)))
        self.r_small = 32 if not quick else 8  # rank of the launch-count and graph sections
        self.dtype = torch.bfloat16
        self.device = device


# ---------------------------------------------------------------------------------------------------------
# timing
class Clock:
    """CUDA events on a GPU (recorded in stream order, read after a synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pool: list = []
        self._next = 0

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        if self._next == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        e = self._pool[self._next]
        self._next += 1
        e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self):
        """Events may be reused once their times were read (after sync)."""
        self._next = 0


class L2Flush:
    """Before each timed region: zero a 256 MiB buffer (4x the H200's L2) so the region starts with a cold
    cache. ``sync=True`` (host-synced mode) then synchronises so the device is idle when the start event is
    recorded: the region's time includes the host's launch time (single-call latency; launch-bound regions such
    as N=16 eager cannot hide their host overhead). ``sync=False`` (queued mode, as triton.testing.do_bench)
    only enqueues the memset: the host enqueues the region while the device is still zeroing, so host overhead
    is hidden wherever the device is the bottleneck, as in a training step that enqueues many layers ahead."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, sync: bool = True):
        if self.buf is not None:
            self.buf.zero_()
            if sync:
                torch.cuda.synchronize()


def _median(v):
    return statistics.median(v) if v else float("nan")


def _iqr(v):
    if len(v) < 4:
        return float("nan")
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


def _summary(v: list[float]) -> dict:
    return {"median_ms": _median(v), "iqr_ms": _iqr(v), "min_ms": min(v) if v else float("nan"), "n": len(v),
            "samples_ms": [round(t, 5) for t in v]}


def _timing(d: dict, mode: str) -> dict:
    """The summaries of one timing mode in a steps variant or merge item (host-synced ones are at top level)."""
    return d if mode == "synced" else d["queued"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    d = b.norm().item()
    return (a - b).norm().item() / d if d else (a - b).norm().item()


# ---------------------------------------------------------------------------------------------------------
# the variants
def build_all(template: nn.Linear, r: int) -> dict:
    ours = build_ours(template, r)
    return {"frozen": frozen(template), "ours": ours,
            "peft_delora": build_peft_delora(template, r, ours, fp32_adapters=True)[0],
            "peft_native": build_peft_native(template, r, ours, fp32_adapters=True)[0],
            "peft_lora": build_peft_lora(template, r, fp32_adapters=True)[0], "ref": build_ref(template, ours)}


def trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def _param_dtypes(layer: nn.Module) -> dict:
    return {n: str(p.dtype).replace("torch.", "") for n, p in layer.named_parameters() if p.requires_grad}


def _delora_params(layer: nn.Module):
    """(A, B, λ) of a DeLoRA variant, whatever its container layout."""
    if isinstance(layer, RefDeLoRA):
        return layer.delora_A, layer.delora_B, layer.delora_lambda
    return layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]


# ---------------------------------------------------------------------------------------------------------
# 1. forward / backward / step
def agreement(layers: dict, x: torch.Tensor, g: torch.Tensor,
              variants=("ours", "peft_delora", "peft_native", "ref"),
              before_each=None) -> dict:
    """Relative errors (Frobenius) of y and of dx, dA, dB, dλ against an fp32 reference, per DeLoRA variant
    (``layers[v]`` for v in ``variants``; ``before_each(v)`` runs first, e.g. to select kernel switches)."""
    from delora_ext.reference import linear_ref
    ours = layers["ours"] if "ours" in layers else layers[variants[0]]
    W, b = ours.base_layer.weight, ours.base_layer.bias
    A, B, lam = [t.detach().clone().requires_grad_() for t in _delora_params(ours)]
    w = ours.delora_w_norm["default"]
    x32 = x.detach().float().requires_grad_()
    y32 = linear_ref(x32, W.float(), None if b is None else b.float(), A, B, lam, w)
    exp = [y32.detach(), *torch.autograd.grad(y32, [x32, A, B, lam], g.float())]
    del y32
    out = {}
    for v in variants:
        if before_each is not None:
            before_each(v)
        layer = layers[v]
        xv = x.detach().clone().requires_grad_()
        params = list(_delora_params(layer))
        y = layer(xv)
        got = [y.detach(), *torch.autograd.grad(y, [xv, *params], g)]
        out[v] = {name: rel_err(a, e) for name, a, e in zip(("y", "dx", "dA", "dB", "dlam"), got, exp)}
        del y, got
    return out


def time_training(layers: dict, x: torch.Tensor, g: torch.Tensor, rounds: int, warmup: int, clock: Clock,
                  flush: L2Flush, rng: random.Random, tunings: dict | None = None) -> dict:
    """{mode: {key: {fwd, bwd, step: summary}}} for mode in MODES and key in layers; one forward+backward per
    variant per mode per round (modes in shuffled order within the round, variants shuffled within each mode).
    ``tunings``: {key: kernel switches (delora_ext.ops.set_tuning)} set before that key's forward+backward."""
    from delora_ext import ops
    keys = list(layers)
    params = {k: trainable(layers[k]) for k in keys}
    samples = {m: {k: {p: [] for p in PHASES} for k in keys} for m in MODES}
    for rnd in range(warmup + rounds):
        modes = list(MODES)
        rng.shuffle(modes)
        marks = []
        for m in modes:
            order = list(keys)
            rng.shuffle(order)
            for k in order:
                for p in params[k]:
                    p.grad = None
                x.grad = None
                if tunings and k in tunings:
                    ops.set_tuning(**tunings[k])
                flush(sync=m == "synced")
                t0 = clock.now()
                y = layers[k](x)
                t1 = clock.now()
                y.backward(g)
                t2 = clock.now()
                del y
                marks.append((m, k, t0, t1, t2))
        clock.sync()
        if rnd >= warmup:
            for m, k, t0, t1, t2 in marks:
                samples[m][k]["fwd"].append(clock.ms(t0, t1))
                samples[m][k]["bwd"].append(clock.ms(t1, t2))
                samples[m][k]["step"].append(clock.ms(t0, t2))
        clock.reset()
    x.grad = None
    return {m: {k: {p: _summary(samples[m][k][p]) for p in PHASES} for k in keys} for m in MODES}


def section_steps(cfg: Config, template: nn.Linear, clock: Clock, flush: L2Flush, seed: int, log) -> list[dict]:
    rows = []
    dev, dt = cfg.device, cfg.dtype
    for N, ranks in cfg.groups:
        t_group = time.perf_counter()
        gen = torch.Generator(device=dev).manual_seed(seed + N)
        x = torch.randn(N, cfg.in_f, device=dev, dtype=dt, generator=gen).requires_grad_()
        g = torch.randn(N, cfg.out_f, device=dev, dtype=dt, generator=gen)
        layers = {("frozen", None): frozen(template)}
        agree, dtypes = {}, {}
        for r in ranks:
            torch.manual_seed(seed + 1000 * r + N)
            built = build_all(template, r)
            for v in VARIANTS[1:]:
                layers[(v, r)] = built[v]
                dtypes[(v, r)] = _param_dtypes(built[v])
            agree[r] = agreement(built, x, g)
        timed = time_training(layers, x, g, cfg.rounds[N], cfg.warmup, clock, flush, random.Random(seed + N))
        for r in ranks:
            row = {"N": N, "in": cfg.in_f, "out": cfg.out_f, "r": r, "agreement": agree[r]}
            for v in VARIANTS:
                key = (v, None if v == "frozen" else r)
                row[v] = {**timed["synced"][key], "param_dtypes": dtypes.get(key, {}), "queued": timed["queued"][key]}
                for m in MODES:
                    for p in PHASES:
                        d = _timing(row[v], m)[p]
                        d["ratio_to_frozen"] = d["median_ms"] / timed[m][("frozen", None)][p]["median_ms"]
            for m, name in (("synced", "frozen_fwd_tflops"), ("queued", "frozen_fwd_tflops_queued")):
                fwd_ms = timed[m][("frozen", None)]["fwd"]["median_ms"]
                row[name] = 2.0 * N * cfg.in_f * cfg.out_f / (fwd_ms * 1e-3) / 1e12
            rows.append(row)
        log(f"  steps N={N} r={list(ranks)}: {len(layers)} variants x {len(MODES)} modes x {cfg.warmup}+"
            f"{cfg.rounds[N]} rounds in {time.perf_counter() - t_group:.1f} s")
        del layers, x, g
        _free(dev)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 2. kernel launches
_OP_PREFIXES = ("aten::", "delora_ext::")


def _is_outermost_op(e) -> bool:
    """An ATen/delora_ext op not called from inside another such op (CPU smoke mode's stand-in for a kernel)."""
    if not e.name.startswith(_OP_PREFIXES):
        return False
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(_OP_PREFIXES):
            return False
        p = p.cpu_parent
    return True


def _device_event_names(prof, cuda: bool) -> list[str]:
    from torch.autograd import DeviceType
    names = []
    for e in prof.events():
        if cuda:
            if e.device_type == DeviceType.CUDA:
                names.append(e.name)
        elif e.device_type == DeviceType.CPU and _is_outermost_op(e):
            names.append(e.name)
    if cuda and not names:  # older/newer profilers: read the raw kineto events
        try:
            for e in prof.profiler.kineto_results.events():
                if e.device_type() == DeviceType.CUDA:
                    names.append(e.name())
        except Exception:
            pass
    return names


def count_launches(fn, clock: Clock) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    clock.sync()
    with profile(activities=acts) as prof:
        fn()
        clock.sync()
    names = _device_event_names(prof, clock.cuda)
    mem = [n for n in names if n.startswith(("Memcpy", "Memset", "memcpy", "memset"))]
    kernels = [n for n in names if n not in mem]
    return {"kernels": len(kernels), "memcpy_memset": len(mem), "names": kernels + mem}


def section_launches(cfg: Config, template: nn.Linear, clock: Clock, seed: int, log) -> list[dict]:
    out = []
    dev, dt = cfg.device, cfg.dtype
    r = cfg.r_small
    for N in cfg.launch_ns:
        torch.manual_seed(seed + N)
        layers = build_all(template, r)
        x = torch.randn(N, cfg.in_f, device=dev, dtype=dt).requires_grad_()
        g = torch.randn(N, cfg.out_f, device=dev, dtype=dt)
        for v, layer in layers.items():
            for _ in range(3):  # warm-up: cuBLAS handles, workspace, lazy module loading
                layer(x).backward(g)
            for p in trainable(layer):
                p.grad = None
            x.grad = None
            fwd = count_launches(lambda: layer(x), clock)
            y = layer(x)
            bwd = count_launches(lambda: y.backward(g), clock)
            del y
            for p in trainable(layer):
                p.grad = None
            x.grad = None
            peak = None
            if clock.cuda:
                clock.sync()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                layer(x).backward(g)
                clock.sync()
                peak = torch.cuda.max_memory_allocated() - base
                for p in trainable(layer):
                    p.grad = None
                x.grad = None
            out.append({"N": N, "r": r, "variant": v, "fwd": fwd, "bwd": bwd, "step_peak_extra_bytes": peak})
        log(f"  launches N={N}: " + ", ".join(f"{o['variant']} {o['fwd']['kernels']}+{o['bwd']['kernels']}"
                                              for o in out if o["N"] == N))
        layers = x = g = y = None  # free before the next N (closures above read these names)
        _free(dev)
    return out


def kernel_times(fn, clock: Clock, iters: int) -> dict:
    """Device time per kernel name over ``iters`` calls of fn under torch.profiler (CUDA only): per iteration
    {"kernels": [(name, calls, µs)], sorted by time}, "busy_us" (the sum) and "span_us" (first kernel start to
    last kernel end: the gaps between are launch latency and host-side waits)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    clock.sync()
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        clock.sync()
    agg, starts, ends = {}, [], []
    for e in prof.events():
        # CPU smoke mode: top-level ATen/delora_ext ops stand in for kernels (as in the launch counts)
        if (e.device_type != DeviceType.CUDA) if clock.cuda else not (e.device_type == DeviceType.CPU
                                                                        and _is_outermost_op(e)):
            continue
        t = e.time_range
        calls, us = agg.get(e.name, (0, 0.0))
        agg[e.name] = (calls + 1, us + t.elapsed_us())
        starts.append(t.start)
        ends.append(t.end)
    rows = sorted(((n, c / iters, us / iters) for n, (c, us) in agg.items()), key=lambda x: -x[2])
    return {"kernels": rows, "busy_us": sum(x[2] for x in rows),
            "span_us": (max(ends) - min(starts)) / iters if starts else None}


def section_profile(cfg: Config, template: nn.Linear, clock: Clock, seed: int, log) -> dict:
    """Where the device time goes: per-kernel times of frozen and our layer's forward and backward at the head
    shape, of the N=small no-grad forward, and of ops.merge_; the default kernels first, then each variant of
    delora_ext.ops.set_tuning (seeded GEMM order, small_n on, tiled merge). A failure is recorded and ends the
    section with what it measured (a CUDA error may leave the context unusable for the rest)."""
    from delora_ext import ops
    dev, dt = cfg.device, cfg.dtype
    default = ops.tuning()
    iters = 10 if clock.cuda else 2
    N, r, n = cfg.head["N"], cfg.head["r"], cfg.small_n
    res = {"default": default, "regions": {}, "N": N}
    torch.manual_seed(seed + N)
    ours, fz = build_ours(template, r), frozen(template)
    x = torch.randn(N, cfg.in_f, device=dev, dtype=dt).requires_grad_()
    g = torch.randn(N, cfg.out_f, device=dev, dtype=dt)
    xs = torch.randn(n, cfg.in_f, device=dev, dtype=dt)
    out_f, in_f = cfg.merge_shape
    torch.manual_seed(seed)
    mlayer = build_ours(nn.Linear(in_f, out_f, bias=False, device=dev, dtype=torch.bfloat16), r)
    mA, mB, mlam = [t.detach() for t in _delora_params(mlayer)]
    mw, mW = mlayer.delora_w_norm["default"], mlayer.base_layer.weight.detach()

    def train_regions(label, layer):
        for _ in range(3):
            layer(x).backward(g)
        ys = []

        def fwd():
            ys.append(layer(x))

        def bwd():  # grads start as None each time (as in training): no accumulation kernels
            x.grad = None
            for p in trainable(layer):
                p.grad = None
            ys.pop().backward(g)

        res["regions"][f"{label} fwd N={N}"] = kernel_times(fwd, clock, iters)
        res["regions"][f"{label} bwd N={N}"] = kernel_times(bwd, clock, iters)  # one per forward above
        x.grad = None
        for p in trainable(layer):
            p.grad = None

    def nograd_region(label, layer):
        layer.eval()
        with torch.no_grad():
            res["regions"][f"{label} no-grad fwd N={n}"] = kernel_times(lambda: layer(xs), clock, iters)
        layer.train()

    def merge_region(label):
        with torch.no_grad():
            res["regions"][f"ops.merge_ bf16 {out_f}x{in_f}{label}"] = kernel_times(
                lambda: (ops.merge_(mW, mA, mB, mlam, mw, 1.0), ops.merge_(mW, mA, mB, mlam, mw, -1.0)), clock, iters)

    def gemm_regions():
        res["gemms"] = adapter_gemms(cfg, clock, seed, iters)

    d = " [defaults]" if default else ""  # the switches in force: res["default"]
    jobs = [({}, lambda: train_regions("frozen", fz)), ({}, lambda: train_regions("ours" + d, ours)),
            ({}, lambda: nograd_region("frozen", fz)), ({}, lambda: nograd_region("ours" + d, ours)),
            ({}, lambda: merge_region(d)), ({}, gemm_regions)]
    if default:
        jobs += [({"gemm_order": "seeded"}, lambda: train_regions("ours [gemm_order=seeded]", ours)),
                 ({"small_n": "on"}, lambda: nograd_region("ours [small_n=on]", ours)),
                 ({"small_n": "overlap"}, lambda: nograd_region("ours [small_n=overlap]", ours)),
                 ({"merge_kernel": "tiled"}, lambda: merge_region(" [merge_kernel=tiled]"))]
    try:
        for tun, job in jobs:
            if default:
                ops.set_tuning(**{**default, **tun})
            job()
    except Exception:
        res["error"] = traceback.format_exc()
        log(f"  profile FAILED after {len(res['regions'])} regions:\n{res['error']}")
    finally:
        if default:
            ops.set_tuning(**default)
        ours = fz = x = g = xs = mlayer = mW = None
        _free(dev)
    log("  profile: " + ", ".join(f"{k} {v['busy_us']:.0f}/{v['span_us'] or 0:.0f} us busy/span"
                                  for k, v in res["regions"].items()))
    return res


def adapter_gemms(cfg: Config, clock: Clock, seed: int, iters: int) -> list[dict]:
    """Each GEMM of the DeLoRA side path alone, at the head shape, as linear_fwd/linear_bwd issue it (ATen, so
    cuBLAS on CUDA), with the bytes it must move at least (operands read once, outputs written once; an
    in-place accumulation reads and writes its output) and the bandwidth that implies, against a copy of an
    N×out tensor timed the same way. The step's extra time over frozen is these plus prep/finalize: a row far
    below the copy's bandwidth is where a custom kernel can win; the sum of the floors bounds what any
    unfused (ATen-GEMM) design reaches. The two base GEMMs (y = x Wᵀ with beta = 0 and beta = 1) show what
    the seeded order's epilogue read of C costs."""
    dev, dt = cfg.device, cfg.dtype
    N, r, fin, fout = cfg.head["N"], cfg.head["r"], cfg.in_f, cfg.out_f
    torch.manual_seed(seed + 7)
    x = torch.randn(N, fin, device=dev, dtype=dt)
    g = torch.randn(N, fout, device=dev, dtype=dt)
    W = torch.randn(fout, fin, device=dev, dtype=dt) * fin ** -0.5
    bias = torch.randn(fout, device=dev, dtype=dt)
    Ad = torch.randn(r, fin, device=dev, dtype=dt) * fin ** -0.5
    Bd = torch.randn(fout, r, device=dev, dtype=dt) * r ** -0.5
    u = torch.randn(N, r, device=dev, dtype=dt)
    G = torch.randn(N, r, device=dev, dtype=dt)
    y = torch.empty(N, fout, device=dev, dtype=dt)
    dx = torch.empty(N, fin, device=dev, dtype=dt)
    e = x.element_size()
    # name, call, bytes at least (bf16 operands), FLOPs
    rows = [
        ("copy N×out (bandwidth reference)", lambda: y.copy_(g), 2 * N * fout * e, 0),
        ("fwd: u = x_d·Adᵀ", lambda: torch.mm(x, Ad.t()), (N * fin + r * fin + N * r) * e, 2 * N * fin * r),
        ("fwd: y += v·Bdᵀ (base first, in place)", lambda: y.addmm_(u, Bd.t()), (2 * N * fout + N * r + fout * r) * e,
         2 * N * fout * r),
        ("fwd: y = v·Bdᵀ + bias (seeded, written)", lambda: torch.addmm(bias, u, Bd.t()),
         (N * fout + N * r + fout * r) * e, 2 * N * fout * r),
        ("bwd: G = g·Bd", lambda: torch.mm(g, Bd), (N * fout + fout * r + N * r) * e, 2 * N * fout * r),
        ("bwd: M = gᵀ·u", lambda: torch.mm(g.t(), u), (N * fout + N * r + fout * r) * e, 2 * N * fout * r),
        ("bwd: dx += G·Ad (base first, in place)", lambda: dx.addmm_(G, Ad), (2 * N * fin + N * r + r * fin) * e,
         2 * N * fin * r),
        ("bwd: t = G·Ad (seeded, written)", lambda: torch.mm(G, Ad), (N * fin + N * r + r * fin) * e, 2 * N * fin * r),
        ("bwd: Q = Gᵀ·x_d", lambda: torch.mm(G.t(), x), (N * fin + N * r + r * fin) * e, 2 * N * fin * r),
        ("base: y = x·Wᵀ (beta = 0)", lambda: torch.mm(x, W.t(), out=y), (N * fin + fout * fin + N * fout) * e,
         2 * N * fin * fout),
        ("base: y += x·Wᵀ (beta = 1, seeded)", lambda: y.addmm_(x, W.t()), (N * fin + fout * fin + 2 * N * fout) * e,
         2 * N * fin * fout),
    ]
    out = []
    for name, fn, nbytes, flops in rows:
        t = kernel_times(fn, clock, iters)
        us = t["busy_us"]
        out.append({"op": name, "us": us, "bytes": nbytes, "flops": flops,
                    "gbs": nbytes / us / 1e3 if us else None, "tflops": flops / us / 1e6 if us and flops else None,
                    "kernels": [k[0][:60] for k in t["kernels"][:3]]})
    copy = out[0]["gbs"]
    for o in out:
        o["of_copy"] = o["gbs"] / copy if copy and o["gbs"] else None
    return out


def render_gemms(rows: list[dict] | None, N: int) -> list[str]:
    if not rows:
        return []
    L = [f"### The side path's GEMMs alone (N={N}, head shape; device µs per call, floor = bytes it must move)", "",
         "| op | µs | floor MiB | GB/s | of copy | TFLOP/s | kernels |", "|---|---|---|---|---|---|---|"]
    for o in rows:
        L.append(f"| {o['op']} | {o['us']:.1f} | {o['bytes'] / 2**20:.1f} | "
                 f"{o['gbs'] or 0:.0f} | {(o['of_copy'] or 0) * 100:.0f}% | "
                 f"{format(o['tflops'], '.0f') if o['tflops'] else '–'} | {'; '.join(o['kernels'])} |")
    L.append("")
    return L


def render_profile(p: dict | None) -> list[str]:
    if not p:
        return []
    L = ["## Device time per kernel (torch.profiler, mean per call of the region)", ""]
    if p.get("error"):
        L += [f"**Stopped by an error** after {len(p['regions'])} regions: {p['error'].strip().splitlines()[-1]}", ""]
    L.append("busy = sum of kernel times; span = first kernel start to last kernel end (the difference is idle "
             "device time between kernels). merge rows time a merge and an unmerge (two ops).")
    L.append("")
    L.append("| region | busy µs | span µs | kernels (calls × mean µs) |")
    L.append("|---|---|---|---|")
    for k, v in p["regions"].items():
        ks = "; ".join(f"{n[:70]} ({c:g} × {us / c:.1f})" for n, c, us in v["kernels"][:8])
        L.append(f"| {k} | {v['busy_us']:.1f} | {v['span_us'] or 0:.1f} | {ks} |")
    L.append("")
    L.extend(render_gemms(p.get("gemms"), p.get("N", 0)))
    return L


# ---------------------------------------------------------------------------------------------------------
# 3. N=16 forward, eager and CUDA graph
def capture_graph(fn):
    """(torch.cuda.CUDAGraph of fn after 3 warm-up calls on a side stream, None) or (None, why it failed)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            fn()
        return gr, None
    except Exception as e:  # a capture failure is a finding, not a crash
        torch.cuda.synchronize()
        return None, f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def section_graphs(cfg: Config, template: nn.Linear, clock: Clock, flush: L2Flush, seed: int, log) -> dict:
    dev, dt, N, r, K = cfg.device, cfg.dtype, cfg.small_n, cfg.r_small, cfg.chain
    torch.manual_seed(seed)
    x = torch.randn(N, cfg.in_f, device=dev, dtype=dt)
    chains = {}
    for _ in range(K):
        for v, layer in build_all(template, r).items():
            chains.setdefault(v, []).append(layer.eval())

    def make_fn(chain):
        def fn():
            for layer in chain:
                layer(x)
        return fn

    fns = {v: make_fn(c) for v, c in chains.items()}
    graphs, notes = {}, {}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        if clock.cuda:
            for v, fn in fns.items():
                graphs[v], err = capture_graph(fn)
                if err:
                    notes[v] = err
                    del graphs[v]
        else:
            notes["all"] = "CUDA graphs need a CUDA device: graph timings skipped (CPU smoke mode)"

        items = [(v, "eager", fns[v]) for v in fns] + [(v, "graph", gr.replay) for v, gr in graphs.items()]
        samples = {(v, m): [] for v, m, _ in items}
        rng = random.Random(seed)
        for rnd in range(cfg.warmup + cfg.graph_rounds):
            rng.shuffle(items)
            marks = []
            for v, m, fn in items:
                flush()
                t0 = clock.now()
                fn()
                t1 = clock.now()
                marks.append((v, m, t0, t1))
            clock.sync()
            if rnd >= cfg.warmup:
                for v, m, t0, t1 in marks:
                    samples[(v, m)].append(clock.ms(t0, t1) / K)
            clock.reset()
    res = {"N": N, "r": r, "chain": K, "per_layer": {}, "notes": notes}
    for v in fns:
        res["per_layer"][v] = {m: (_summary(samples[(v, m)]) if (v, m) in samples else None)
                               for m in ("eager", "graph")}
    for m in ("eager", "graph"):
        f = res["per_layer"]["frozen"][m]
        for v in fns:
            d = res["per_layer"][v][m]
            if d is not None and f is not None:
                d["ratio_to_frozen"] = d["median_ms"] / f["median_ms"]
    log(f"  graphs N={N}: " + ", ".join(
        f"{v} eager {res['per_layer'][v]['eager']['median_ms'] * 1e3:.1f} us"
        + (f" graph {res['per_layer'][v]['graph']['median_ms'] * 1e3:.1f} us" if res['per_layer'][v]['graph'] else "")
        for v in fns))
    chains = fns = graphs = items = None
    _free(dev)
    return res


# ---------------------------------------------------------------------------------------------------------
# 4. merge
def time_against_copy(items: list, nbytes: int, cfg: Config, clock: Clock, flush: L2Flush,
                      rng: random.Random) -> dict:
    """{key: host-synced summary + "queued" summary} for items [(key, fn, undo or None)], one of them "copy":
    each fn (and its undo, timed separately) once per mode per round, items shuffled; GB/s from ``nbytes``."""
    import warnings
    items = list(items)
    samples = {m: {k: [] for k, _, _ in items} for m in MODES}
    undo_samples = {m: {k: [] for k, _, u in items if u is not None} for m in MODES}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(cfg.warmup + cfg.merge_rounds):
            modes = list(MODES)
            rng.shuffle(modes)
            marks = []
            for m in modes:
                rng.shuffle(items)
                for k, fn, undo in items:
                    flush(sync=m == "synced")
                    t0 = clock.now()
                    fn()
                    t1 = clock.now()
                    if undo is not None:
                        flush(sync=m == "synced")
                        t2 = clock.now()
                        undo()
                        t3 = clock.now()
                        marks.append((m, k, t0, t1, t2, t3))
                    else:
                        marks.append((m, k, t0, t1, None, None))
            clock.sync()
            if rnd >= cfg.warmup:
                for m, k, t0, t1, t2, t3 in marks:
                    samples[m][k].append(clock.ms(t0, t1))
                    if t2 is not None:
                        undo_samples[m][k].append(clock.ms(t2, t3))
            clock.reset()
    summaries = {}
    for m in MODES:
        copy_ms = _median(samples[m]["copy"])
        for k, _, _ in items:
            s = _summary(samples[m][k])
            s["GB_per_s"] = nbytes / (s["median_ms"] * 1e-3) / 1e9
            s["fraction_of_copy"] = copy_ms / s["median_ms"]
            if k in undo_samples[m]:
                s["undo"] = _summary(undo_samples[m][k])
            summaries[(m, k)] = s
    return {k: {**summaries[("synced", k)], "queued": summaries[("queued", k)]} for k, _, _ in items}


def section_merge(cfg: Config, clock: Clock, flush: L2Flush, seed: int, log) -> list[dict]:
    from delora_ext import ops
    dev = cfg.device
    out_f, in_f = cfg.merge_shape
    r = cfg.r_small
    res = []
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(seed)
        template = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dtype)
        ours = build_ours(template, r)
        peft_layer, _peft_model = build_peft_delora(template, r, ours, fp32_adapters=True)
        W = ours.base_layer.weight
        A, B, lam = _delora_params(ours)
        w = ours.delora_w_norm["default"]
        W0 = W.detach().clone()
        dst = torch.empty_like(W0)
        with torch.no_grad():
            from delora_ext.reference import delta_weight_ref
            exact = W0.double() + delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
            ours.merge()
            merged_err = rel_err(W, exact)
            floor_err = rel_err(exact.to(dtype), exact)  # one rounding of the exact sum: the best possible
            ours.unmerge()
            unmerge_err = rel_err(W, W0)
            del exact

        def ours_layer():
            ours.merge()

        def ours_layer_undo():
            ours.unmerge()

        def ours_op():
            ops.merge_(W, A, B, lam, w, 1.0)

        def ours_op_undo():
            ops.merge_(W, A, B, lam, w, -1.0)

        def peft_merge():
            peft_layer.merge()

        def peft_undo():
            peft_layer.unmerge()

        def d2d_copy():
            dst.copy_(W0)

        items = [("copy", d2d_copy, None), ("ours_layer", ours_layer, ours_layer_undo), ("ours_op", ours_op, ours_op_undo),
                 ("peft_delora", peft_merge, peft_undo)]
        nbytes = 2 * W0.numel() * W0.element_size()  # read once + write once
        row = {"dtype": str(dtype).replace("torch.", ""), "out": out_f, "in": in_f, "r": r, "bytes_moved": nbytes,
               "ours_merged_rel_err": merged_err, "one_rounding_rel_err": floor_err,
               "ours_unmerge_rel_err": unmerge_err, "ours_path": "native" if ops.has_kernel(dev) else "reference"}
        row.update(time_against_copy(items, nbytes, cfg, clock, flush, random.Random(seed)))
        res.append(row)
        log(f"  merge {row['dtype']} {out_f}x{in_f} (GB/s queued / host-synced): " + ", ".join(
            f"{name} {row[k]['queued']['GB_per_s']:.0f} / {row[k]['GB_per_s']:.0f}" for k, name in
            (("copy", "copy"), ("ours_layer", "layer.merge"), ("ours_op", "op"), ("peft_delora", "PEFT"))))
        items = template = None  # the next dtype rebinds ours, peft_layer, W0, dst
        _free(dev)
    return res


# ---------------------------------------------------------------------------------------------------------
# 5. kernel variants (A/B of delora_ext.ops.set_tuning switches, side by side in this process)
def graphs_small_n(cfg: Config, template: nn.Linear, clock: Clock, flush: L2Flush, seed: int, default: dict) -> dict:
    """The N=small no-grad forward of a chain of layers captured in a CUDA graph: frozen, and ours captured with
    small_n off, on and overlap (the switch is read when the kernels are enqueued, i.e. at capture)."""
    from delora_ext import ops
    dev, dt, N, r, K = cfg.device, cfg.dtype, cfg.small_n, cfg.r_small, cfg.chain
    torch.manual_seed(seed)
    x = torch.randn(N, cfg.in_f, device=dev, dtype=dt)
    frozen_chain = [frozen(template).eval() for _ in range(K)]
    ours_chain = [build_ours(template, r).eval() for _ in range(K)]

    def chain_fn(chain):
        def fn():
            for layer in chain:
                layer(x)
        return fn

    graphs, notes, outs = {}, {}, {}
    with torch.no_grad():
        for key, chain, mode in (("frozen", frozen_chain, None), ("small_n=off", ours_chain, "off"),
                                 ("small_n=on", ours_chain, "on"), ("small_n=overlap", ours_chain, "overlap")):
            if mode is not None:
                ops.set_tuning(**{**default, "small_n": mode})
            graphs[key], err = capture_graph(chain_fn(chain))
            if err:
                notes[key] = err
            else:
                outs[key] = ours_chain[0](x) if mode else None
        ops.set_tuning(**default)
        items = [(k, g.replay) for k, g in graphs.items() if g is not None]
        samples = {k: [] for k, _ in items}
        rng = random.Random(seed)
        for rnd in range(cfg.warmup + cfg.graph_rounds):
            rng.shuffle(items)
            marks = []
            for k, fn in items:
                flush()
                t0 = clock.now()
                fn()
                t1 = clock.now()
                marks.append((k, t0, t1))
            clock.sync()
            if rnd >= cfg.warmup:
                for k, t0, t1 in marks:
                    samples[k].append(clock.ms(t0, t1) / K)
            clock.reset()
    per_layer = {k: (_summary(samples[k]) if k in samples else None) for k in graphs}
    f = per_layer.get("frozen")
    for d in per_layer.values():
        if d is not None and f is not None:
            d["ratio_to_frozen"] = d["median_ms"] / f["median_ms"]
    agree = overlap_same = None
    if outs.get("small_n=off") is not None and outs.get("small_n=on") is not None:
        agree = rel_err(outs["small_n=on"], outs["small_n=off"])
    if outs.get("small_n=on") is not None and outs.get("small_n=overlap") is not None:
        overlap_same = bool(torch.equal(outs["small_n=on"], outs["small_n=overlap"]))
    return {"N": N, "r": r, "chain": K, "per_layer": per_layer, "notes": notes, "on_vs_off_rel_err": agree,
            "overlap_equals_on": overlap_same}


def section_variants(cfg: Config, template: nn.Linear, clock: Clock, flush: L2Flush, seed: int, log) -> dict:
    """Each gemm_order: our layer's fwd/bwd/step at the head shape against frozen, and its agreement with an fp32
    reference; each merge_kernel: ops.merge_ on a bf16 and an fp32 weight against a copy, and whether the
    kernels' results are bit-identical. The switches in force elsewhere in the run are restored after."""
    from delora_ext import ops
    from delora_ext.reference import delta_weight_ref
    dev, dt = cfg.device, cfg.dtype
    if not ops.has_kernel(dev) or not ops.tuning():
        return {"skipped": "the native ops are not in use on this device"}
    default = ops.tuning()
    res = {"default": default, "steps": {}, "merge": []}
    try:
        N, r = cfg.head["N"], cfg.head["r"]
        gen = torch.Generator(device=dev).manual_seed(seed + N)
        x = torch.randn(N, cfg.in_f, device=dev, dtype=dt, generator=gen).requires_grad_()
        g = torch.randn(N, cfg.out_f, device=dev, dtype=dt, generator=gen)
        torch.manual_seed(seed + 1000 * r + N)
        ours = build_ours(template, r)
        orders = ("base_first", "seeded")
        layers = {"frozen": frozen(template), **{o: ours for o in orders}}
        tunings = {o: {**default, "gemm_order": o} for o in orders}
        agree = agreement(layers, x, g, orders, before_each=lambda o: ops.set_tuning(**tunings[o]))
        timed = time_training(layers, x, g, cfg.rounds[N], cfg.warmup, clock, flush, random.Random(seed + 7),
                              tunings=tunings)
        for o in orders:
            row = {"agreement": agree[o]}
            for m in MODES:
                row[m] = {p: {**timed[m][o][p], "ratio_to_frozen": timed[m][o][p]["median_ms"]
                              / timed[m]["frozen"][p]["median_ms"]} for p in PHASES}
            res["steps"][o] = row
        res["steps_shape"] = {"N": N, "r": r}
        log("  variants: gemm_order step/frozen (queued) " + ", ".join(
            f"{o} {res['steps'][o]['queued']['step']['ratio_to_frozen']:.3f}" for o in orders))
        del layers, ours, x, g
        _free(dev)

        if clock.cuda:  # its own failure must not lose the merge A/B below
            try:
                res["graphs"] = graphs_small_n(cfg, template, clock, flush, seed, default)
                log(f"  variants: N={cfg.small_n} graphed forward per layer " + ", ".join(
                    f"{k} {v['median_ms'] * 1e3:.1f} us" for k, v in res["graphs"]["per_layer"].items() if v))
            except Exception:
                res["graphs_error"] = traceback.format_exc()
                log(f"  variants: small_n graphs FAILED:\n{res['graphs_error']}")
                torch.cuda.synchronize()
                ops.set_tuning(**default)

        out_f, in_f = cfg.merge_shape
        kernels = ("rows", "tiled")
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(seed)
            lin = nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dtype)
            layer = build_ours(lin, cfg.r_small)
            A, B, lam = [t.detach() for t in _delora_params(layer)]
            w = layer.delora_w_norm["default"]
            W0 = layer.base_layer.weight.detach().clone()
            W, dst = W0.clone(), torch.empty_like(W0)
            merged = {}
            with torch.no_grad():
                for kern in kernels:
                    ops.set_tuning(**{**default, "merge_kernel": kern})
                    merged[kern] = W0.clone()
                    ops.merge_(merged[kern], A, B, lam, w, 1.0)
                exact = W0.double() + delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
                errs = {kern: rel_err(merged[kern], exact) for kern in kernels}
                del exact

            def op_fn(kern, alpha):
                def fn():
                    ops.set_tuning(**{**default, "merge_kernel": kern})
                    ops.merge_(W, A, B, lam, w, alpha)
                return fn

            items = [("copy", lambda: dst.copy_(W0), None)] + [
                (kern, op_fn(kern, 1.0), op_fn(kern, -1.0)) for kern in kernels]
            nbytes = 2 * W0.numel() * W0.element_size()
            row = {"dtype": str(dtype).replace("torch.", ""), "out": out_f, "in": in_f, "r": cfg.r_small,
                   "bit_identical": bool(torch.equal(merged["rows"], merged["tiled"])), "rel_err": errs}
            row.update(time_against_copy(items, nbytes, cfg, clock, flush, random.Random(seed + 11)))
            res["merge"].append(row)
            log(f"  variants: merge {row['dtype']} op GB/s queued " + ", ".join(
                f"{k} {row[k]['queued']['GB_per_s']:.0f}" for k in ("copy", *kernels))
                + f"; bit-identical {row['bit_identical']}")
            layer = lin = W = W0 = dst = merged = items = None  # the next dtype rebinds them
            _free(dev)
    except Exception:  # keep what was measured; a CUDA error may leave the context unusable
        res["error"] = traceback.format_exc()
        log(f"  variants FAILED:\n{res['error']}")
    finally:
        ops.set_tuning(**default)
    return res


# ---------------------------------------------------------------------------------------------------------
# environment, targets, report
def _free(dev: torch.device):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def source_digest() -> str:
    """sha256 over the sources that make the measured code (works where .git did not travel)."""
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "*")) + glob.glob(os.path.join(ROOT, "delora_ext", "*.py"))
                   + [os.path.join(ROOT, "setup.py"), os.path.abspath(__file__)])
    for f in files:
        if os.path.isfile(f):
            h.update(os.path.relpath(f, ROOT).encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(args, cfg: Config) -> dict:
    import delora_ext
    from delora_ext import ops
    try:
        import peft
        peft_version = peft.__version__
    except Exception as e:  # pragma: no cover
        peft_version = f"unavailable ({e})"
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(cfg.device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "peft": peft_version,
        "delora_ext": getattr(delora_ext, "__version__", "?"),
        "build_info": delora_ext.build_info(),
        "ours_path": "native" if ops.has_kernel(cfg.device) else "reference",
        "DELORA_EXT_NATIVE_CUDA": os.environ.get("DELORA_EXT_NATIVE_CUDA"),
        "commit": args.commit or os.environ.get("DELORA_COMMIT") or _git_commit() or "unknown",
        "source_digest": source_digest(),
        "command": " ".join(["bench/bench_gpu.py"] + list(args.argv)),
        "mode": "quick" if cfg.quick else "full",
        "cpu_count": os.cpu_count(),
    }
    if cfg.device.type == "cuda":
        p = torch.cuda.get_device_properties(cfg.device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   l2_bytes=getattr(p, "L2_cache_size", None), capability=f"{p.major}.{p.minor}",
                   allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   allow_bf16_reduced_precision_reduction=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,"
                                            "clocks.mem,power.draw,temperature.gpu", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    return env


def _find_row(rows, N, r):
    return next((x for x in rows if x["N"] == N and x["r"] == r), None)


def evaluate_targets(res: dict, cfg: Config) -> list[dict]:
    out = []
    h = _find_row(res.get("steps") or [], cfg.head["N"], cfg.head["r"])
    if h is not None:  # evaluated on the queued timings; the host-synced ratio is shown beside
        keys = ("ours", "frozen", "peft_delora", "peft_lora")
        o, fz, pd, pl = (_timing(h[k], "queued")["step"]["median_ms"] for k in keys)
        so, sfz, spd, spl = (h[k]["step"]["median_ms"] for k in keys)
        out.append({"target": f"step ≤ {TARGETS['step_vs_frozen']:.2f}× frozen base step",
                    "value": f"{o / fz:.3f}×  ({o * 1e3:.0f} vs {fz * 1e3:.0f} µs); host-synced {so / sfz:.3f}×",
                    "met": o / fz <= TARGETS["step_vs_frozen"]})
        out.append({"target": f"≥ {TARGETS['speedup_vs_peft_delora']:.2f}× faster than PEFT DeLoRA (step)",
                    "value": f"{pd / o:.3f}×  ({pd * 1e3:.0f} vs {o * 1e3:.0f} µs); host-synced {spd / so:.3f}×",
                    "met": pd / o >= TARGETS["speedup_vs_peft_delora"]})
        out.append({"target": f"step ≤ {TARGETS['step_vs_peft_lora']:.2f}× PEFT LoRA (within 5 %)",
                    "value": f"{o / pl:.3f}×  ({o * 1e3:.0f} vs {pl * 1e3:.0f} µs); host-synced {so / spl:.3f}×",
                    "met": o / pl <= TARGETS["step_vs_peft_lora"]})
        n, sn = _timing(h["peft_native"], "queued")["step"]["median_ms"], h["peft_native"]["step"]["median_ms"]
        out.append({"target": f"PEFT DeLoRA on delora_ext: step ≤ {TARGETS['native_peft_vs_ours']:.2f}× delora_ext",
                    "value": f"{n / o:.3f}×  ({n * 1e3:.0f} vs {o * 1e3:.0f} µs); host-synced {sn / so:.3f}×; "
                             f"{pd / n:.2f}× faster than PEFT DeLoRA",
                    "met": n / o <= TARGETS["native_peft_vs_ours"]})
    for m in res.get("merge") or []:
        q = {k: _timing(m[k], "queued") for k in ("copy", "ours_layer", "ours_op")}
        frac = q["ours_layer"]["fraction_of_copy"]
        out.append({"target": f"{m['dtype']} layer.merge ≥ {TARGETS['merge_bw_fraction']:.0%} of copy bandwidth",
                    "value": f"{frac:.0%}  ({q['ours_layer']['GB_per_s']:.0f} vs {q['copy']['GB_per_s']:.0f} GB/s; "
                             f"op alone {q['ours_op']['fraction_of_copy']:.0%}); host-synced "
                             f"{m['ours_layer']['fraction_of_copy']:.0%} "
                             f"(op alone {m['ours_op']['fraction_of_copy']:.0%})",
                    "met": frac >= TARGETS["merge_bw_fraction"]})
    gr = res.get("graphs")
    if gr:
        o, f = gr["per_layer"]["ours"]["graph"], gr["per_layer"]["frozen"]["graph"]
        name = f"N={gr['N']} graphed forward ≤ {TARGETS['graph_fwd_vs_frozen']:.1f}× frozen graphed forward"
        if o is None or f is None:
            out.append({"target": name, "value": "not measured: " + "; ".join(f"{k}: {v}" for k, v in gr["notes"].items()),
                        "met": False})
        else:
            ratio = o["median_ms"] / f["median_ms"]
            out.append({"target": name, "value": f"{ratio:.3f}×  ({o['median_ms'] * 1e3:.1f} vs {f['median_ms'] * 1e3:.1f} µs)",
                        "met": ratio <= TARGETS["graph_fwd_vs_frozen"]})
    return out


def _us(ms) -> str:
    return "–" if ms is None or (isinstance(ms, float) and math.isnan(ms)) else f"{ms * 1e3:.1f}"


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= k:
            return f"{b / k:.1f} {unit}"
    return f"{int(b)} B"


def suggest_defaults(v: dict) -> list[str]:
    """Which variant of each switch was faster in this run (queued medians; ≥ 2 % to count), for the person
    deciding the defaults; correctness is tests/test_cuda.py's job, not this."""
    out = []
    st = v.get("steps") or {}
    if "base_first" in st and "seeded" in st:
        a, b = (st[o]["queued"]["step"]["median_ms"] for o in ("base_first", "seeded"))
        out.append(f"gemm_order: {'seeded' if b < 0.98 * a else 'base_first'} (step {b * 1e3:.0f} vs "
                   f"{a * 1e3:.0f} µs, seeded vs base_first)")
    gr = (v.get("graphs") or {}).get("per_layer") or {}
    if gr.get("small_n=off") and (gr.get("small_n=on") or gr.get("small_n=overlap")):
        t = {m: gr[f"small_n={m}"]["median_ms"] for m in ("off", "on", "overlap") if gr.get(f"small_n={m}")}
        best = min(t, key=t.get)
        pick = best if t[best] < 0.98 * t["off"] else "off"
        out.append(f"small_n: {pick} (graphed µs per layer: " + ", ".join(f"{m} {ms * 1e3:.1f}" for m, ms in t.items())
                   + ")")
    ms = v.get("merge") or []
    if ms and all("rows" in m and "tiled" in m for m in ms):
        faster = all(m["tiled"]["queued"]["median_ms"] < 0.98 * m["rows"]["queued"]["median_ms"] for m in ms)
        same = all(m["bit_identical"] for m in ms)
        out.append(f"merge_kernel: {'tiled' if faster and same else 'rows'} (" + "; ".join(
            f"{m['dtype']} {m['tiled']['queued']['median_ms'] * 1e3:.0f} vs {m['rows']['queued']['median_ms'] * 1e3:.0f} µs"
            for m in ms) + f", tiled vs rows; bit-identical: {same})")
    return out


def render_variants(v: dict | None) -> list[str]:
    """The kernel-variant A/B tables (section 5), placed after the targets."""
    if not v:
        return []
    L = ["## Kernel variants (A/B in this run; the rest of the report uses " + ", ".join(
        f"{k}={val}" for k, val in (v.get("default") or {}).items()) + ")", ""]
    if v.get("skipped"):
        return L + [f"Skipped: {v['skipped']}", ""]
    if v.get("error"):
        L += [f"**Stopped by an error**: {v['error'].strip().splitlines()[-1]}", ""]
    sug = suggest_defaults(v)
    if sug:
        L += ["Faster in this run (queued medians, ≥ 2 % margin): " + "; ".join(sug), ""]
    sh = v.get("steps_shape", {})
    if v.get("steps"):
        L.append(f"gemm_order, N={sh.get('N')} r={sh.get('r')}: median µs, queued (ratio to frozen) / host-synced "
                 f"(ratio); agreement with an fp32 reference (y / dx / dA / dB / dλ)")
        L.append("")
        L.append("| gemm_order | fwd | bwd | step | agreement |")
        L.append("|---|---|---|---|---|")
        for o, row in v["steps"].items():
            cells = [f"{_us(row['queued'][p]['median_ms'])} ({row['queued'][p]['ratio_to_frozen']:.3f}) / "
                     f"{_us(row['synced'][p]['median_ms'])} ({row['synced'][p]['ratio_to_frozen']:.3f})" for p in PHASES]
            a = row["agreement"]
            L.append(f"| {o} | " + " | ".join(cells) + " | " + " / ".join(f"{a[k]:.1e}" for k in
                                                                         ("y", "dx", "dA", "dB", "dlam")) + " |")
        L.append("")
    if v.get("graphs_error"):
        L += [f"small_n graphed forward: failed: {v['graphs_error'].strip().splitlines()[-1]}", ""]
    gr = v.get("graphs")
    if gr:
        L.append(f"small_n, N={gr['N']} r={gr['r']} no-grad forward captured in a CUDA graph (chain of {gr['chain']}): "
                 f"µs per layer (ratio to frozen); on vs off output rel. err {gr.get('on_vs_off_rel_err')}; "
                 f"overlap bit-identical to on: {gr.get('overlap_equals_on')}")
        L.append("")
        L.append("| variant | graphed µs per layer |")
        L.append("|---|---|")
        for k, d in gr["per_layer"].items():
            L.append(f"| {k} | " + (f"{_us(d['median_ms'])} ({d.get('ratio_to_frozen', float('nan')):.2f})" if d
                                    else gr["notes"].get(k, "–")) + " |")
        L.append("")
    if v.get("merge"):
        L.append("merge_kernel, ops.merge_ alone: median µs and fraction of a device-to-device copy, queued / host-synced")
        L.append("")
        L.append("| dtype | out×in | copy | rows | tiled | bit-identical | rel. err rows / tiled |")
        L.append("|---|---|---|---|---|---|---|")
        for m in v["merge"]:
            def c(k):
                q, h = m[k]["queued"], m[k]
                return (f"{_us(q['median_ms'])} ({q['fraction_of_copy']:.0%}) / "
                        f"{_us(h['median_ms'])} ({h['fraction_of_copy']:.0%})")
            L.append(f"| {m['dtype']} | {m['out']}×{m['in']} | {c('copy')} | {c('rows')} | {c('tiled')} | "
                     f"{m['bit_identical']} | {m['rel_err']['rows']:.1e} / {m['rel_err']['tiled']:.1e} |")
        L.append("")
    return L


def render_markdown(res: dict, cfg: Config) -> str:
    env = res["environment"]
    L = [f"# delora_ext GPU benchmark ({env['mode']}, {env['device']})", ""]
    if cfg.device.type == "cuda":
        L.append(f"- device: {env.get('gpu')} (sm_{env.get('capability', '?').replace('.', '')}, {env.get('sm_count')} SMs, "
                 f"{env.get('gpu_memory_gib')} GiB, L2 {_fmt_bytes(env.get('l2_bytes'))}); nvidia-smi "
                 f"(driver, SM clock, max SM clock, mem clock, power, temp): {env.get('driver')}")
    else:
        L.append("- device: CPU — **smoke run, not a measurement** (wall-clock timers; no CUDA graphs, kernel counts "
                 "or device memory)")
    L.append(f"- date {env['date']}; commit `{env['commit']}`; source digest `{env['source_digest']}`")
    L.append(f"- torch {env['torch']} (CUDA {env['torch_cuda']}), peft {env['peft']}, python {env['python']}; "
             f"delora_ext path for our layer: **{env['ours_path']}**; build_info `{json.dumps(env['build_info'])}`")
    L.append(f"- command `{env['command']}`; wall time {res['wall_s']:.0f} s")
    L.append(f"- bf16 x, W, bias; fp32 adapters; in = out = {cfg.in_f}; x (N, in) requires grad; ours with "
             f"init_weights=False, PEFT DeLoRA and the reference share its A, B, λ, w; LoRA: lora_alpha = r, "
             f"init_lora_weights=False. CUDA events, variants shuffled each round, L2 flushed before each timed "
             f"region, medians; warm-up {cfg.warmup} rounds, timed rounds {res.get('rounds')}; two timing modes "
             f"interleaved in every round: queued (device-bound: the flush's memset is only enqueued, so the host "
             f"enqueues the region while the GPU is busy, as triton.testing.do_bench) and host-synced (a "
             f"synchronize after the memset: single-call latency including the host's launch time)")
    if res.get("errors"):
        L.append("")
        L.append("**Sections that failed:** " + "; ".join(f"{k}: {v.splitlines()[-1]}" for k, v in res["errors"].items()))
    L.append("")
    L.append(f"## Targets (N={cfg.head['N']}, r={cfg.head['r']})")
    L.append("")
    L.append("The step and merge targets are evaluated on the queued (device-bound) timings, with the host-synced "
             "value beside, because a training step of a real model enqueues many layers ahead of the GPU, so the "
             "per-layer device cost is what the ratios target; host overhead shows in the host-synced tables and in "
             f"the N={cfg.small_n} eager rows (the CUDA-graph target is unaffected by the mode).")
    L.append("")
    L.append("| target | value | met |")
    L.append("|---|---|---|")
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {'met' if t['met'] else '**not met**'} |")
    L.append("")
    L.extend(render_variants(res.get("variants")))
    L.extend(render_profile(res.get("profile")))
    if res.get("steps"):
        for mode in MODES:
            L.append(f"## Training, {MODE_LABELS[mode]}: median µs (ratio to frozen)")
            L.append("")
            L.append("| N | r | phase | " + " | ".join(LABELS[v] for v in VARIANTS) + " | ours / PEFT DeLoRA | "
                     "ours / LoRA |")
            L.append("|---|---|---|" + "---|" * len(VARIANTS) + "---|---|")
            for row in res["steps"]:
                t = {v: _timing(row[v], mode) for v in VARIANTS}
                for p in PHASES:
                    cells = [_us(t["frozen"][p]["median_ms"])]
                    for v in VARIANTS[1:]:
                        cells.append(f"{_us(t[v][p]['median_ms'])} ({t[v][p]['ratio_to_frozen']:.2f})")
                    o = t["ours"][p]["median_ms"]
                    cells.append(f"{o / t['peft_delora'][p]['median_ms']:.2f}")
                    cells.append(f"{o / t['peft_lora'][p]['median_ms']:.2f}")
                    L.append(f"| {row['N']} | {row['r']} | {p} | " + " | ".join(cells) + " |")
            L.append("")
        L.append("Frozen forward GEMM rate (queued / host-synced): " + ", ".join(
            f"N={row['N']}: {row['frozen_fwd_tflops_queued']:.3g} / {row['frozen_fwd_tflops']:.3g} TFLOP/s"
            for row in res["steps"] if row["r"] == cfg.head["r"]))
        L.append("")
        L.append("### Agreement with an fp32 reference (relative Frobenius error: y / dx / dA / dB / dλ)")
        L.append("")
        L.append("| N | r | delora_ext | PEFT DeLoRA | PEFT DeLoRA on delora_ext | reference (bf16) |")
        L.append("|---|---|---|---|---|---|")
        for row in res["steps"]:
            cells = []
            for v in ("ours", "peft_delora", "peft_native", "ref"):
                a = row["agreement"][v]
                cells.append(" / ".join(f"{a[k]:.1e}" for k in ("y", "dx", "dA", "dB", "dlam")))
            L.append(f"| {row['N']} | {row['r']} | " + " | ".join(cells) + " |")
        L.append("")
    if res.get("launches"):
        L.append(f"## Launches per forward / backward (r={cfg.r_small}), peak extra memory of one step")
        L.append("")
        note = "CUDA kernels (+ memcpy/memset)" if cfg.device.type == "cuda" else \
            "CPU smoke mode: top-level ATen ops, not kernels"
        L.append(f"Counted with torch.profiler: {note}.")
        L.append("")
        L.append("| N | variant | fwd kernels | bwd kernels | fwd memcpy/memset | bwd memcpy/memset | step peak extra |")
        L.append("|---|---|---|---|---|---|---|")
        for o in res["launches"]:
            L.append(f"| {o['N']} | {LABELS[o['variant']]} | {o['fwd']['kernels']} | {o['bwd']['kernels']} | "
                     f"{o['fwd']['memcpy_memset']} | {o['bwd']['memcpy_memset']} | {_fmt_bytes(o['step_peak_extra_bytes'])} |")
        L.append("")
        ours_fwd = next((o for o in res["launches"] if o["variant"] == "ours"), None)
        if ours_fwd:
            L.append(f"delora_ext forward at N={ours_fwd['N']}: `{', '.join(ours_fwd['fwd']['names'])}`")
            L.append("")
    gr = res.get("graphs")
    if gr:
        L.append(f"## N={gr['N']} no-grad forward: µs per layer (chain of {gr['chain']} layers), ratio to frozen")
        L.append("")
        L.append("| variant | eager | CUDA graph |")
        L.append("|---|---|---|")
        for v, d in gr["per_layer"].items():
            cells = []
            for m in ("eager", "graph"):
                s = d[m]
                cells.append("–" if s is None else f"{_us(s['median_ms'])} ({s.get('ratio_to_frozen', float('nan')):.2f})")
            L.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
        for k, v in gr["notes"].items():
            L.append(f"\n- {k}: {v}")
        L.append("")
    if res.get("merge"):
        for mode in MODES:
            L.append(f"## Merge, {MODE_LABELS[mode]}: vs a device-to-device copy of the same weight "
                     f"(GB/s = 2 × weight bytes / time)")
            L.append("")
            L.append("| dtype | out×in | copy | layer.merge | ops.merge_ | PEFT merge | layer.unmerge | "
                     "merged W rel. err (one rounding) |")
            L.append("|---|---|---|---|---|---|---|---|")
            for m in res["merge"]:
                t = {k: _timing(m[k], mode) for k in ("copy", "ours_layer", "ours_op", "peft_delora")}

                def c(k):
                    return f"{_us(t[k]['median_ms'])} µs, {t[k]['GB_per_s']:.0f} GB/s ({t[k]['fraction_of_copy']:.0%})"
                L.append(f"| {m['dtype']} | {m['out']}×{m['in']} | {c('copy')} | {c('ours_layer')} | {c('ours_op')} | "
                         f"{c('peft_delora')} | {_us(t['ours_layer']['undo']['median_ms'])} µs | "
                         f"{m['ours_merged_rel_err']:.1e} ({m['one_rounding_rel_err']:.1e}) |")
            L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = common.parser("bench_gpu.py", __doc__)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test of every code path)")
    ap.add_argument("--out", default=None, help="FILE.md and FILE.json are written (a .md/.json suffix is "
                                                "stripped); default bench/out/gpu/bench_gpu[-quick]")
    ap.add_argument("--sections", default="steps,launches,graphs,merge,profile,variants",
                    help="comma-separated subset of steps,launches,graphs,merge,profile,variants (the default "
                         "order puts the kernel variants last: a CUDA error there cannot lose the rest)")
    ap.add_argument("--rounds-scale", type=float, default=1.0, help="multiply every round count")
    ap.add_argument("--commit", default=None, help="commit to record (default: $DELORA_COMMIT, else git)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is not met")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.argv = argv
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"steps", "launches", "graphs", "merge", "variants", "profile"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: --device cuda but no CUDA device is visible (use --device cpu --quick for a smoke run)",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.quick:
        print("bench_gpu.py: --device cpu runs only with --quick (a smoke test; 4096-wide layers on a CPU would take "
              "hours)", file=sys.stderr)
        return 2
    cfg = Config(args.quick, device, args.rounds_scale)

    import warnings
    warnings.filterwarnings("ignore", message=".*Already unmerged.*")
    warnings.filterwarnings("ignore", message=".*no native kernel.*")
    import peft  # noqa: F401

    import delora_ext  # noqa: F401  (fail early, before any timing)

    t_start = time.perf_counter()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    env = environment(args, cfg)
    log(f"delora_ext GPU benchmark ({env['mode']}, {device}{', ' + env['gpu'] if 'gpu' in env else ''}): torch "
        f"{env['torch']}, our layer's path: {env['ours_path']}, commit {env['commit']}, digest {env['source_digest']}")
    if device.type == "cuda" and env["ours_path"] != "native":
        log("WARNING: delora_ext's native CUDA kernels are not in use (see build_info); 'delora_ext' below is the "
            "PyTorch reference")

    if args.out:
        base = args.out
        for suf in (".md", ".json"):
            if base.endswith(suf):
                base = base[: -len(suf)]
    else:
        base = os.path.join(ROOT, "bench", "out", "gpu", "bench_gpu" + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)

    torch.manual_seed(args.seed)
    template = nn.Linear(cfg.in_f, cfg.out_f, device=device, dtype=cfg.dtype)
    clock, flush = Clock(device), L2Flush(device)
    res = {"environment": env, "targets_spec": TARGETS, "head": cfg.head, "rounds": cfg.rounds,
           "warmup": cfg.warmup, "graph_rounds": cfg.graph_rounds, "merge_rounds": cfg.merge_rounds, "errors": {}}

    def write(final: bool):
        res["wall_s"] = time.perf_counter() - t_start
        try:
            res["targets"] = evaluate_targets(res, cfg)
            md = render_markdown(res, cfg)
        except Exception:  # still write the JSON
            res["errors"]["report"] = traceback.format_exc()
            res.setdefault("targets", [])
            md = "# delora_ext GPU benchmark: rendering the report failed\n\n```\n" + res["errors"]["report"] + "```"
        with open(base + ".md", "w") as f:
            f.write(md + "\n")
        with open(base + ".json", "w") as f:
            json.dump(common.json_safe({**res, "markdown": md, "complete": final}), f, indent=1, default=str)
        return md

    runners = {
        "steps": lambda: section_steps(cfg, template, clock, flush, args.seed, log),
        "launches": lambda: section_launches(cfg, template, clock, args.seed, log),
        "graphs": lambda: section_graphs(cfg, template, clock, flush, args.seed, log),
        "merge": lambda: section_merge(cfg, clock, flush, args.seed, log),
        "variants": lambda: section_variants(cfg, template, clock, flush, args.seed, log),
        "profile": lambda: section_profile(cfg, template, clock, args.seed, log),
    }
    for name in sections:
        t0 = time.perf_counter()
        try:
            res[name] = runners[name]()
        except Exception:  # one broken section must not lose the others
            res["errors"][name] = traceback.format_exc()
            log(f"  section {name} FAILED:\n{res['errors'][name]}")
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception:
                    pass
            _free(device)
        log(f"  section {name}: {time.perf_counter() - t0:.1f} s")
        write(final=False)  # partial results survive a later crash or timeout

    md = write(final=True)
    print(md)
    log(f"wrote {base}.md and {base}.json ({res['wall_s']:.0f} s)")
    if res["errors"]:
        return 1
    met = all(t["met"] for t in res["targets"])
    return 0 if (met or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
