#!/usr/bin/env python
"""CPU benchmark of delora_ext's ``DeLoRALinear`` against a frozen ``nn.Linear``, PEFT's ``DeloraLinear``,
PEFT's ``DeloraLinear`` accelerated by ``delora_ext.peft``, PEFT's LoRA of the same rank and the pure-PyTorch
reference (``delora_ext.reference.linear_ref``).

    python bench/bench_cpu.py [--quick] [--out FILE]

Everything runs in one process. Measured, fp32, for N ∈ {512, 4096} tokens, (in, out) ∈ {(1024, 1024),
(1024, 4096), (4096, 1024)}, r ∈ {8, 16, 32}:

1. Training-step time: forward plus backward of a fixed random output gradient, with every trainable
   parameter's ``.grad`` reset to None before each step (as ``optimizer.zero_grad()``). Two input modes:
   ``x_grad`` (x requires grad, as for a layer inside a network) and ``x_nograd`` (x does not, as for the
   first adapted layer). The frozen ``nn.Linear`` has nothing to differentiate in ``x_nograd``, so its
   ``x_nograd`` step is the forward alone. Variants are interleaved round-robin (random order each round,
   fixed seed) after warm-up rounds; medians and ratios to the frozen ``nn.Linear`` of the same mode.
2. Saved-activation bytes: the storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during one
   forward, each storage counted once, excluding the layer's parameters and buffers and x itself (matched
   by ``untyped_storage().data_ptr()``).
3. Merge: wall time of ``layer.merge()`` (ours vs PEFT's, fp32 weight, unmerged again between repeats) and
   the peak extra memory during one merge, from the torch profiler's allocation events
   (``profile_memory=True``): every allocation and free made through c10's CPU allocator, summed in time
   order. Allocations made by MKL/oneDNN internally (GEMM packing buffers) bypass that allocator and are not
   seen; neither is Python's heap.

4. Quantised base: peak training memory and step time of a small Llama (transformers, built from a config)
   with DeLoRA on every decoder linear, its base in fp32, bf16 and bitsandbytes 4-bit (nf4, double
   quantisation, fp32 and bf16 compute dtype), ratios to the fp32 model. Peak memory = the model's resident
   tensors (parameters, buffers, bitsandbytes' quantisation state) plus the AdamW state plus the peak of the
   running sum of allocations during one training step (forward, backward, optimizer step), from the same
   profiler events as 3. Skipped, with the reason recorded, without bitsandbytes or transformers;
   ``--quantized-only`` runs just this section, ``--no-quantized`` leaves it out.

5. Host overhead and mixed batches (bench/host_overhead.py): per-call time of a 64×64 layer at 4 rows, one
   thread (eval forward vs nn.Linear, the raw op, training step vs the frozen step, PEFT DeLoRA and LoRA), and
   ``delora_ext.mixed_batch`` with 8 adapters on 32 rows vs a loop of single-adapter calls.

``--quick`` runs only the headline configuration (N=4096, 1024×1024, r=16) with fewer repeats (CI smoke);
``--only host`` runs section 5 alone, ``--quantized-only`` section 4. ``main(argv)`` is the entry point, so
``python -m delora_ext bench`` can call it.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/variants.py
import common  # noqa: E402

import host_overhead  # noqa: E402
from variants import build_ours, build_peft_delora, build_peft_lora, build_peft_native, build_ref, frozen  # noqa: E402

HEADLINE = {"N": 4096, "in": 1024, "out": 1024, "r": 16}
FULL_NS = (512, 4096)
FULL_SHAPES = ((1024, 1024), (1024, 4096), (4096, 1024))
FULL_RANKS = (8, 16, 32)
SEQ = 512  # x is (N // SEQ, SEQ, in): batches of 512-token sequences, as inside a transformer
VARIANTS = ("frozen", "ours", "peft_delora", "peft_native", "peft_lora", "ref")
LABELS = {
    "frozen": "frozen nn.Linear",
    "ours": "delora_ext",
    "peft_delora": "PEFT DeLoRA",
    "peft_native": "PEFT DeLoRA on delora_ext",
    "peft_lora": "PEFT LoRA",
    "ref": "reference",
}
MODES = ("x_grad", "x_nograd")
TARGETS = {"step_vs_frozen": 1.10, "step_vs_peft_delora": 0.90, "step_vs_peft_lora": 1.0,
           "saved_vs_peft_delora": 1 / 20, "native_peft_vs_ours": 1.05, "native_peft_vs_peft_delora": 0.90}

# Repeats (timed rounds after warm-up) per N, chosen so the full run takes ~8 min on 2 quiet cores.
FULL_REPEATS = {512: 25, 4096: 13}
FULL_WARMUP = 2
QUICK_REPEATS = 5
QUICK_WARMUP = 1
MERGE_REPEATS = {"full": 15, "quick": 5}
CONTENTION_LIMIT = 0.05  # share of wall × cores taken by other processes above which a step is "disturbed"
TICK_S = 0.01            # /proc/stat resolution (USER_HZ = 100)
MAX_ROUND_FACTOR = 2     # at most warm-up + 2 × repeats rounds per group
RETRY_DEADLINE_S = 600   # no disturbed round is repeated after this many seconds of the run (--quick: none)
MIN_CLEAN = 3            # a variant with fewer clean samples than this uses its disturbed ones too (flagged)


# ---------------------------------------------------------------------------------------------------------
# environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in flags]
    except OSError:
        pass
    return []


def _loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def _other_busy_processes(limit: int = 5) -> list[str]:
    """Other processes that used CPU recently (a contended machine makes OpenMP timings meaningless)."""
    try:
        import psutil
    except ImportError:
        return []
    procs = []
    me = os.getpid()
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.pid != me:
                p.cpu_percent(None)
                procs.append(p)
        except Exception:
            pass
    time.sleep(0.5)
    busy = []
    for p in procs:
        try:
            c = p.cpu_percent(None)
            if c > 10:
                busy.append((c, f"{p.info['name']}({p.pid}) {c:.0f}%"))
        except Exception:
            pass
    return [b for _, b in sorted(busy, reverse=True)[:limit]]


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) — their difference over the run is
    what other processes took from the cores we time on."""
    global _ME
    try:
        import psutil
        if _ME is None:
            _ME = psutil.Process()
        ct = psutil.cpu_times()
        busy = ct.user + ct.system + getattr(ct, "nice", 0.0) + getattr(ct, "irq", 0.0) + getattr(ct, "softirq", 0.0)
        me = _ME.cpu_times()
        return busy, me.user + me.system
    except Exception:
        return None


_ME = None


def _source_state() -> dict:
    """Commit of the checkout, whether csrc/ or delora_ext/ differ from it, and when the native library was built
    (the tree may be rebuilt between runs)."""
    import subprocess

    import delora_ext
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    try:
        out["git_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "csrc", "delora_ext", "setup.py"],
                               capture_output=True, text=True, timeout=10).stdout.rstrip()
        out["sources_modified"] = [ln[3:] for ln in dirty.splitlines() if not ln.endswith(".so")]
    except Exception as e:  # pragma: no cover
        out["git_commit"] = f"unavailable ({e})"
    native = getattr(delora_ext.ops, "_C", None)
    so = getattr(native, "__file__", None)
    if so and os.path.exists(so):
        out["native_library"] = os.path.relpath(so, root)
        out["native_library_mtime"] = _dt.datetime.fromtimestamp(os.path.getmtime(so)).astimezone().isoformat(
            timespec="seconds")
    return out


def environment(args) -> dict:
    import delora_ext
    try:
        import peft
        peft_version = peft.__version__
    except Exception as e:  # pragma: no cover
        peft_version = f"unavailable ({e})"
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft_version,
        "delora_ext": getattr(delora_ext, "__version__", "?"),
        "build_info": delora_ext.build_info(),
        "source": _source_state(),
        "torch_num_threads": torch.get_num_threads(),
        "command": " ".join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else "bench_cpu.py"]
                            + list(args.argv)),
        "mode": "quick" if args.quick else "full",
        "loadavg_start": _loadavg(),
        "busy_processes_start": _other_busy_processes(),
    }


# ---------------------------------------------------------------------------------------------------------
# the variants (bench/variants.py)
def trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------
# 1. step time
def make_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    params = trainable(layer)

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y = layer(x)
        if y.requires_grad:
            y.backward(g)

    return step


def _median(v):
    return statistics.median(v) if v else float("nan")


def _iqr(v):
    if len(v) < 4:
        return float("nan")
    q = statistics.quantiles(v, n=4)
    return q[2] - q[0]


# ---------------------------------------------------------------------------------------------------------
# 2. saved activations
def saved_activation_bytes(layer: nn.Module, x: torch.Tensor) -> dict:
    excluded = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    excluded.add(x.untyped_storage().data_ptr())
    seen: dict[int, dict] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in excluded and ptr not in seen and st.nbytes() > 0:
            seen[ptr] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "bytes": st.nbytes()}
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    items = sorted(seen.values(), key=lambda d: -d["bytes"])
    return {"bytes": sum(d["bytes"] for d in items), "tensors": items}


# ---------------------------------------------------------------------------------------------------------
# 3. merge
def _allocation_events(prof) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocator event recorded by the profiler, in time order."""
    alloc_tag = torch._C._profiler._EventType.Allocation
    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        if n.tag == alloc_tag and str(n.extra_fields.device).startswith("cpu"):
            out.append((n.start_time_ns, int(n.extra_fields.alloc_size)))
        stack.extend(n.children)
    out.sort()
    return out


def merge_memory(fn) -> dict:
    """Peak extra bytes (running sum of allocations minus frees, from 0) and the largest single allocation."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = _allocation_events(prof)
    run = peak = largest = 0
    for _, nbytes in events:
        run += nbytes
        peak = max(peak, run)
        largest = max(largest, nbytes)
    return {"peak_extra_bytes": peak, "largest_alloc_bytes": largest, "n_allocs": sum(1 for _, b in events if b > 0)}


def bench_merge(in_f: int, out_f: int, r: int, repeats: int, seed: int) -> dict:
    torch.manual_seed(seed)
    template = nn.Linear(in_f, out_f)
    ours = build_ours(template, r)
    peft_layer, peft_model = build_peft_delora(template, r, ours)
    layers = {"ours": ours, "peft_delora": peft_layer}
    w0 = template.weight.detach().clone()
    # correctness: both merges give the same weight
    ours.merge()
    peft_layer.merge()
    merge_diff = (ours.base_layer.weight - peft_layer.base_layer.weight).abs().max().item()
    ours.unmerge()
    peft_layer.unmerge()
    unmerge_diff = max((ours.base_layer.weight - w0).abs().max().item(),
                       (peft_layer.base_layer.weight - w0).abs().max().item())
    times = {k: {"merge": [], "unmerge": []} for k in layers}
    rng = random.Random(seed)
    names = list(layers)
    for i in range(repeats + 1):
        rng.shuffle(names)
        for k in names:
            layer = layers[k]
            t0 = time.perf_counter()
            layer.merge()
            t1 = time.perf_counter()
            layer.unmerge()
            t2 = time.perf_counter()
            if i > 0:  # the first round is warm-up
                times[k]["merge"].append(t1 - t0)
                times[k]["unmerge"].append(t2 - t1)
    res = {"in": in_f, "out": out_f, "r": r, "out_x_in_bytes": out_f * in_f * 4,
           "max_abs_diff_merged_weight_ours_vs_peft": merge_diff, "max_abs_diff_after_unmerge": unmerge_diff}
    for k, layer in layers.items():
        mem = merge_memory(layer.merge)
        layer.unmerge()
        res[k] = {
            "merge_ms": _median(times[k]["merge"]) * 1e3,
            "unmerge_ms": _median(times[k]["unmerge"]) * 1e3,
            "merge_samples_ms": [t * 1e3 for t in times[k]["merge"]],
            **mem,
            "out_x_in_temporary": mem["largest_alloc_bytes"] >= out_f * in_f * 4,
        }
    del peft_model
    return res


# ---------------------------------------------------------------------------------------------------------
# 4. quantised base: a small Llama, fp32 / bf16 / 4-bit
QUANT_LLAMA = {"vocab_size": 512, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
               "num_attention_heads": 8, "num_key_value_heads": 8}
QUANT_BATCH = (2, 128)  # sequences × tokens
QUANT_RANK = 16
QUANT_VARIANTS = ("fp32", "bf16", "nf4_fp32_compute", "nf4_bf16_compute")


def _resident_bytes(model: nn.Module, opt=None) -> int:
    """Bytes of every distinct storage the model (and optimizer state) keeps: parameters, buffers and the
    tensors of bitsandbytes' QuantState (block scales, code books), which are neither."""
    seen: dict[tuple, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(qs, name, None))
            qs = getattr(qs, "state2", None)
    if opt is not None:
        for st in opt.state.values():
            for v in st.values():
                add(v)
    return sum(seen.values())


def _quant_llama(variant: str, seed: int):
    import transformers

    import delora_ext
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**QUANT_LLAMA)).train()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant.startswith("nf4"):
        import bitsandbytes as bnb
        compute = torch.bfloat16 if variant == "nf4_bf16_compute" else torch.float32
        for path, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and path != "lm_head":  # as QLoRA: every decoder linear in 4 bits
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", compress_statistics=True)
                q.load_state_dict(mod.state_dict())
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, q.to("cpu"))  # quantised here
        gc.collect()
    delora_ext.patch(model, r=QUANT_RANK, target_modules="all-linear", init_weights=False)
    return model


def bench_quantized(repeats: int, warmup: int, seed: int, log) -> dict:
    """Section 4. Step = forward + causal-LM loss + backward + AdamW step + zero_grad, the same token batch for
    every variant; variants interleaved round-robin in a shuffled order per round; medians."""
    missing = []
    for mod in ("transformers", "bitsandbytes"):
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001
            missing.append(f"{mod} ({type(e).__name__}: {e})")
    if missing:
        log(f"  quantized: skipped, not importable: {', '.join(missing)}")
        return {"skipped": f"not importable: {', '.join(missing)}"}
    from torch.profiler import ProfilerActivity, profile
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, QUANT_LLAMA["vocab_size"], QUANT_BATCH, generator=g)
    res = {"config": {**QUANT_LLAMA, "batch": list(QUANT_BATCH), "r": QUANT_RANK, "repeats": repeats,
                      "warmup": warmup}, "variants": {}}
    models, opts, steps = {}, {}, {}
    for v in QUANT_VARIANTS:
        model = _quant_llama(v, seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        models[v], opts[v], steps[v] = model, opt, step
    for v in QUANT_VARIANTS:  # warm-up (the first step also creates the AdamW state)
        for _ in range(max(1, warmup)):
            steps[v]()
    for v in QUANT_VARIANTS:
        resident = _resident_bytes(models[v], opts[v])
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = steps[v]()
        run = peak = 0
        for _, nbytes in _allocation_events(prof):
            run += nbytes
            peak = max(peak, run)
        res["variants"][v] = {"resident_bytes": resident, "step_peak_extra_bytes": peak,
                              "peak_bytes": resident + peak, "loss": float(loss.detach()), "times_s": []}
    rng = random.Random(seed)
    order = list(QUANT_VARIANTS)
    ncpu = os.cpu_count() or 1
    dirty = {v: [] for v in QUANT_VARIANTS}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            rng.shuffle(order)
            for v in order:
                c0 = _cpu_seconds()
                t = time.perf_counter()
                steps[v]()
                dt = time.perf_counter() - t
                c1 = _cpu_seconds()
                other = (c1[0] - c0[0]) - (c1[1] - c0[1]) if c0 and c1 else 0.0
                # as section 1: a step other processes took CPU from is set aside
                (res["variants"][v]["times_s"] if other <= TICK_S + CONTENTION_LIMIT * dt * ncpu
                 else dirty[v]).append(dt)
    finally:
        gc.enable()
    base = res["variants"]["fp32"]
    for v, r in res["variants"].items():
        r["clean_steps"], r["disturbed_steps"] = len(r["times_s"]), len(dirty[v])
        if len(r["times_s"]) < MIN_CLEAN:
            r["times_s"] = r["times_s"] + dirty[v]
            r["disturbed_used"] = True
    for r in res["variants"].values():
        r["step_ms"] = _median(r["times_s"]) * 1e3
        r["step_iqr_ms"] = _iqr(r["times_s"]) * 1e3
        r["peak_ratio_to_fp32"] = r["peak_bytes"] / base["peak_bytes"]
        r["resident_ratio_to_fp32"] = r["resident_bytes"] / base["resident_bytes"]
        r["step_ratio_to_fp32"] = r["step_ms"] / base["step_ms"]
    res["wall_s"] = time.perf_counter() - t0
    log(f"  quantized: {len(QUANT_VARIANTS)} variants x {repeats} steps in {res['wall_s']:.1f} s; 4-bit peak / fp32 "
        f"{res['variants']['nf4_fp32_compute']['peak_ratio_to_fp32']:.3f}, step / fp32 "
        f"{res['variants']['nf4_fp32_compute']['step_ratio_to_fp32']:.2f}")
    return res


def render_quantized(q: dict) -> list[str]:
    L = ["## Quantised base: small Llama, peak training memory and step time", ""]
    if not q or "skipped" in q:
        L += [f"Skipped: {(q or {}).get('skipped', 'not run')}.", ""]
        return L
    c = q["config"]
    L.append(f"Llama {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate "
             f"{c['intermediate_size']}, vocab {c['vocab_size']}; batch {c['batch'][0]}×{c['batch'][1]} tokens; "
             f"DeLoRA r={c['r']} on every decoder linear (fp32 adapters); step = forward + loss + backward + AdamW "
             f"step; {c['repeats']} timed steps per variant, interleaved, after {c['warmup']} warm-up. Peak = "
             f"resident (model + quantisation state + AdamW state) + peak of the running sum of c10 CPU "
             f"allocations during one step (torch profiler).")
    L.append("")
    L.append("| base | resident | resident / fp32 | step peak extra | peak | peak / fp32 | step ms (IQR) | "
             "step / fp32 | clean / disturbed steps | loss |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for v, r in q["variants"].items():
        used = " (disturbed used)" if r.get("disturbed_used") else ""
        L.append(f"| {v} | {_fmt_bytes(r['resident_bytes'])} | {r['resident_ratio_to_fp32']:.3f} | "
                 f"{_fmt_bytes(r['step_peak_extra_bytes'])} | {_fmt_bytes(r['peak_bytes'])} | "
                 f"{r['peak_ratio_to_fp32']:.3f} | {r['step_ms']:.0f} ({r['step_iqr_ms']:.0f}) | "
                 f"{r['step_ratio_to_fp32']:.2f} | {r['clean_steps']} / {r['disturbed_steps']}{used} | "
                 f"{r['loss']:.4f} |")
    L.append("")
    return L


# ---------------------------------------------------------------------------------------------------------
# profiler breakdown of one step
def profile_steps(step, steps: int = 3) -> list[dict]:
    """Self/total CPU time per (op, input shapes), per step, from torch.profiler over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    rows = []
    for ev in prof.key_averages(group_by_input_shape=True):
        shapes = [list(sh) for sh in (ev.input_shapes or []) if sh]
        rows.append({"op": ev.key, "shapes": shapes, "self_ms_per_step": ev.self_cpu_time_total / 1e3 / steps,
                     "total_ms_per_step": ev.cpu_time_total / 1e3 / steps, "calls_per_step": ev.count / steps})
    rows.sort(key=lambda d: -d["self_ms_per_step"])
    return rows


# ---------------------------------------------------------------------------------------------------------
def run_group(N: int, in_f: int, out_f: int, ranks, repeats: int, warmup: int, seed: int, log,
              retry: bool = True, deadline: float = math.inf) -> dict:
    """Build every variant for one (N, in, out), check outputs agree, time them round-robin."""
    torch.manual_seed(seed)
    template = nn.Linear(in_f, out_f)
    x_data = torch.randn(N // SEQ if N >= SEQ else 1, min(N, SEQ), in_f)
    g = torch.randn(*x_data.shape[:-1], out_f)
    xs = {"x_grad": x_data.clone().requires_grad_(True), "x_nograd": x_data}
    layers: dict[tuple, nn.Module] = {("frozen", None): frozen(template)}
    keep = []  # PEFT model wrappers, kept alive
    for r in ranks:
        ours = build_ours(template, r)
        peft_d, m1 = build_peft_delora(template, r, ours)
        peft_n, m3 = build_peft_native(template, r, ours)
        peft_l, m2 = build_peft_lora(template, r)
        keep += [m1, m2, m3]
        layers[("ours", r)] = ours
        layers[("peft_delora", r)] = peft_d
        layers[("peft_native", r)] = peft_n
        layers[("peft_lora", r)] = peft_l
        layers[("ref", r)] = build_ref(template, ours)

    # outputs agree (ours vs PEFT DeLoRA vs reference), relative to max |y|
    agree = {}
    with torch.no_grad():
        for r in ranks:
            y_o = layers[("ours", r)](x_data)
            y_p = layers[("peft_delora", r)](x_data)
            y_r = layers[("ref", r)](x_data)
            y_n = layers[("peft_native", r)](x_data)
            scale = y_p.abs().max().item()
            agree[r] = {"rel_max_diff_ours_vs_peft": (y_o - y_p).abs().max().item() / scale,
                        "rel_max_diff_ours_vs_ref": (y_o - y_r).abs().max().item() / scale,
                        "rel_max_diff_native_peft_vs_peft": (y_n - y_p).abs().max().item() / scale}
            del y_o, y_p, y_r, y_n

    saved = {}
    for (v, r), layer in layers.items():
        for mode, x in xs.items():
            saved[(v, r, mode)] = saved_activation_bytes(layer, x)

    items = [((v, r, mode), make_step(layer, xs[mode], g)) for (v, r), layer in layers.items() for mode in MODES]
    samples = {k: [] for k, _ in items}
    dirty_samples = {k: [] for k, _ in items}
    rng = random.Random(seed)
    ncpu = os.cpu_count() or 1
    t_group = time.perf_counter()
    done = 0
    gc.collect()
    gc.disable()
    try:
        # Each step is classified by the CPU time other processes took while it ran (system busy time minus
        # ours, /proc/stat tick resolution): on a shared 2-core machine one busy neighbour stalls every OpenMP
        # barrier. A step is clean when that is below CONTENTION_LIMIT of its wall × cores (plus one tick of
        # quantisation). Rounds go on for the variants still short of `repeats` clean samples, up to
        # MAX_ROUND_FACTOR × repeats rounds and not past `deadline`; disturbed samples are used only for a
        # variant with fewer than MIN_CLEAN clean ones (and flagged).
        while True:
            pending = [i for i, (k, _) in enumerate(items) if done < warmup or len(samples[k]) < repeats]
            if not pending:
                break
            if done >= warmup + repeats and (not retry or done >= warmup + MAX_ROUND_FACTOR * repeats
                                             or time.perf_counter() > deadline):
                break
            rng.shuffle(pending)
            for i in pending:
                key, step = items[i]
                c0 = _cpu_seconds()
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
                c1 = _cpu_seconds()
                if done < warmup:
                    continue
                other = (c1[0] - c0[0]) - (c1[1] - c0[1]) if c0 and c1 else 0.0
                if other <= TICK_S + CONTENTION_LIMIT * dt * ncpu:
                    samples[key].append(dt)
                else:
                    dirty_samples[key].append(dt)
            done += 1
    finally:
        gc.enable()
    wall = time.perf_counter() - t_group
    flagged = [k for k in samples if len(samples[k]) < MIN_CLEAN]
    n_clean = {k: len(v) for k, v in samples.items()}
    n_dirty = {k: len(v) for k, v in dirty_samples.items()}
    for k in flagged:
        samples[k] = samples[k] + dirty_samples[k]
    log(f"  N={N} {in_f}x{out_f} r={list(ranks)}: {len(items)} variants, {done} rounds ({warmup} warm-up), clean "
        f"samples per variant {min(n_clean.values())}-{max(n_clean.values())}, disturbed "
        f"{sum(n_dirty.values())}, in {wall:.1f} s"
        + (f"  [{len(flagged)} variants with < {MIN_CLEAN} clean samples: disturbed ones used]" if flagged else ""))
    rounds = {"warmup": warmup, "rounds": done, "clean_min": min(n_clean.values()), "clean_max": max(n_clean.values()),
              "disturbed": sum(n_dirty.values()), "flagged": len(flagged)}

    rows = []
    for r in ranks:
        for mode in MODES:
            frozen_med = _median(samples[("frozen", None, mode)])
            row = {"N": N, "in": in_f, "out": out_f, "r": r, "mode": mode, "rounds": rounds, **agree[r]}
            for v in VARIANTS:
                key = (v, None if v == "frozen" else r, mode)
                med = _median(samples[key])
                row[v] = {"median_ms": med * 1e3, "n_clean": n_clean[key], "n_disturbed": n_dirty[key],
                          "disturbed_used": key in flagged, "iqr_ms": _iqr(samples[key]) * 1e3,
                          "min_ms": min(samples[key]) * 1e3, "ratio_to_frozen": med / frozen_med,
                          "samples_ms": [round(t * 1e3, 4) for t in samples[key]],
                          "saved_bytes": saved[key]["bytes"], "saved_tensors": saved[key]["tensors"]}
            rows.append(row)
    extra = {"layers": layers, "xs": xs, "g": g, "keep": keep}
    return {"rows": rows, "wall_s": wall, "_extra": extra}


# ---------------------------------------------------------------------------------------------------------
# reporting
def _fmt_bytes(b: float) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= k:
            return f"{b / k:.1f} {unit}"
    return f"{int(b)} B"


def evaluate_targets(rows, merges) -> list[dict]:
    h = next((r for r in rows if r["N"] == HEADLINE["N"] and r["in"] == HEADLINE["in"]
              and r["out"] == HEADLINE["out"] and r["r"] == HEADLINE["r"] and r["mode"] == "x_grad"), None)
    m = next((m for m in merges if m["in"] == HEADLINE["in"] and m["out"] == HEADLINE["out"]
              and m["r"] == HEADLINE["r"]), None)
    out = []
    if h is not None:
        o = h["ours"]["median_ms"]
        for name, other, limit in (("step ≤ 1.10× frozen nn.Linear", "frozen", TARGETS["step_vs_frozen"]),
                                   ("step ≤ 0.90× PEFT DeLoRA", "peft_delora", TARGETS["step_vs_peft_delora"]),
                                   ("step ≤ 1.00× PEFT LoRA", "peft_lora", TARGETS["step_vs_peft_lora"])):
            ratio = o / h[other]["median_ms"]
            out.append({"target": name, "value": f"{ratio:.3f}×  ({o:.2f} ms vs {h[other]['median_ms']:.2f} ms)",
                        "met": ratio <= limit})
        n = h["peft_native"]["median_ms"]
        for name, other, limit in (("PEFT DeLoRA on delora_ext: step ≤ 1.05× delora_ext", "ours",
                                    TARGETS["native_peft_vs_ours"]),
                                   ("PEFT DeLoRA on delora_ext: step ≤ 0.90× PEFT DeLoRA", "peft_delora",
                                    TARGETS["native_peft_vs_peft_delora"])):
            ratio = n / h[other]["median_ms"]
            out.append({"target": name, "value": f"{ratio:.3f}×  ({n:.2f} ms vs {h[other]['median_ms']:.2f} ms)",
                        "met": ratio <= limit})
        so, sp = h["ours"]["saved_bytes"], h["peft_delora"]["saved_bytes"]
        out.append({"target": "saved activations ≤ 1/20 of PEFT DeLoRA",
                    "value": f"{so / sp:.4f}  ({_fmt_bytes(so)} vs {_fmt_bytes(sp)})",
                    "met": so <= sp * TARGETS["saved_vs_peft_delora"]})
    if m is not None:
        mo = m["ours"]
        out.append({"target": "merge allocates no out×in temporary",
                    "value": f"largest alloc {_fmt_bytes(mo['largest_alloc_bytes'])}, peak extra "
                             f"{_fmt_bytes(mo['peak_extra_bytes'])} (out×in = {_fmt_bytes(m['out_x_in_bytes'])}); "
                             f"PEFT: {_fmt_bytes(m['peft_delora']['peak_extra_bytes'])}",
                    "met": not mo["out_x_in_temporary"] and mo["peak_extra_bytes"] < m["out_x_in_bytes"]})
    return out


def _header_lines(res: dict) -> list[str]:
    env = res["environment"]
    L = []
    L.append(f"# delora_ext CPU benchmark ({env['mode']})")
    L.append("")
    L.append(f"- date: {env['date']}")
    L.append(f"- machine: {env['nproc']} CPUs (affinity {env['affinity']}), {env['cpu_model']}, "
             f"flags {' '.join(env['cpu_flags'])}")
    L.append(f"- torch {env['torch']}, torch.get_num_threads() = {env['torch_num_threads']}, peft {env['peft']}, "
             f"python {env['python']}")
    L.append(f"- delora_ext {env['delora_ext']} build_info: `{json.dumps(env['build_info'])}`")
    src = env.get("source", {})
    L.append(f"- source: commit {src.get('git_commit')}, modified csrc/delora_ext files: "
             f"{', '.join(src.get('sources_modified') or []) or 'none'}; native library built "
             f"{src.get('native_library_mtime')}")
    L.append(f"- command: `{env['command']}`; wall time {res['wall_s']:.0f} s")
    L.append(f"- load average (1/5/15 min) at start {env['loadavg_start']}, at end {env.get('loadavg_end')}; "
             f"other busy processes at start: {', '.join(env['busy_processes_start']) or 'none'}; at end: "
             f"{', '.join(env.get('busy_processes_end') or []) or 'none'}")
    if "other_processes_cpu_s" in env:
        L.append(f"- CPU time taken by other processes during the run: {env['other_processes_cpu_s']} s "
                 f"({100 * env['other_processes_cpu_share']:.1f} % of wall × cores); steps they disturbed are "
                 f"discarded (counts below); merge timings and the profiles are not filtered")
    return L


def render_header(res: dict) -> str:
    """The environment lines alone (``--only host``)."""
    return "\n".join(_header_lines(res)) + "\n\n"


def render_markdown(res: dict) -> str:
    L = _header_lines(res)
    L.append(f"- fp32; x is (N/{SEQ}, {SEQ}, in); step = forward + backward of a fixed random dL/dy, trainable "
             f"grads set to None before each step; ours/PEFT DeLoRA/reference share A, B, λ, w (B random, "
             f"init_weights=False); LoRA: r = lora_alpha, init_lora_weights=False")
    L.append(f"- timed rounds wanted per group (N: rounds): {res['repeats']}, after {res['warmup']} warm-up "
             f"round(s); every variant and mode runs once per round, in a shuffled order; figures are medians over "
             f"clean steps (other processes took < {100 * CONTENTION_LIMIT:.0f} % of the cores + one 10 ms tick while "
             f"the step ran); variants short of clean samples get extra rounds")
    seen_groups = {}
    for r in res["rows"]:
        seen_groups.setdefault((r["N"], r["in"], r["out"]), r["rounds"])
    L.append("- per group: rounds, clean samples per variant (min–max), disturbed samples discarded: " + "; ".join(
        f"N={k[0]} {k[1]}×{k[2]}: {v['rounds']}, {v['clean_min']}–{v['clean_max']}, {v['disturbed']}"
        + (f" ({v['flagged']} variants had < {MIN_CLEAN} clean samples: disturbed ones used)" if v["flagged"] else "")
        for k, v in seen_groups.items()))
    L.append("")
    L.append("## Targets (N=4096, 1024×1024, r=16, fp32, x requires grad)")
    L.append("")
    L.append("| target | value | met |")
    L.append("|---|---|---|")
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {'met' if t['met'] else '**not met**'} |")
    L.append("")
    for mode, title in (("x_grad", "x requires grad (layer inside a network)"),
                        ("x_nograd", "x without grad (first adapted layer; frozen = forward only)")):
        L.append(f"## Step time, {title}: median ms (ratio to frozen nn.Linear)")
        L.append("")
        L.append("| N | in×out | r | frozen | delora_ext | PEFT DeLoRA | PEFT DeLoRA on delora_ext | PEFT LoRA | "
                 "reference | ours/PEFT DeLoRA | ours/LoRA | PEFT on delora_ext / ours |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            if r["mode"] != mode:
                continue
            cells = [f"{r['frozen']['median_ms']:.2f}"]
            for v in ("ours", "peft_delora", "peft_native", "peft_lora", "ref"):
                cells.append(f"{r[v]['median_ms']:.2f} ({r[v]['ratio_to_frozen']:.2f})")
            cells.append(f"{r['ours']['median_ms'] / r['peft_delora']['median_ms']:.2f}")
            cells.append(f"{r['ours']['median_ms'] / r['peft_lora']['median_ms']:.2f}")
            cells.append(f"{r['peft_native']['median_ms'] / r['ours']['median_ms']:.2f}")
            L.append(f"| {r['N']} | {r['in']}×{r['out']} | {r['r']} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Saved activations (x requires grad / x without grad), excluding parameters, buffers and x")
    L.append("")
    L.append("| N | in×out | r | " + " | ".join(LABELS[v] for v in VARIANTS) + " | ours/PEFT DeLoRA |")
    L.append("|---|---|---|" + "---|" * len(VARIANTS) + "---|")
    by = {(r["N"], r["in"], r["out"], r["r"], r["mode"]): r for r in res["rows"]}
    for r in res["rows"]:
        if r["mode"] != "x_grad":
            continue
        r2 = by.get((r["N"], r["in"], r["out"], r["r"], "x_nograd"))
        cells = []
        for v in VARIANTS:
            cells.append(f"{_fmt_bytes(r[v]['saved_bytes'])} / {_fmt_bytes(r2[v]['saved_bytes']) if r2 else '-'}")
        pd = r["peft_delora"]["saved_bytes"]
        cells.append(f"{r['ours']['saved_bytes'] / pd:.4f}" if pd else "-")
        L.append(f"| {r['N']} | {r['in']}×{r['out']} | {r['r']} | " + " | ".join(cells) + " |")
    L.append("")
    h = next((r for r in res["rows"] if r["N"] == HEADLINE["N"] and r["in"] == HEADLINE["in"] and
              r["out"] == HEADLINE["out"] and r["r"] == HEADLINE["r"] and r["mode"] == "x_grad"), None)
    if h:
        L.append("Saved tensors at the headline configuration (x requires grad):")
        L.append("")
        for v in VARIANTS:
            ts = ", ".join(f"{t['dtype']}{t['shape']}" for t in h[v]["saved_tensors"]) or "none"
            L.append(f"- {LABELS[v]}: {ts}")
        L.append("")
    L.append("## Merge (fp32 weight): median ms, peak extra memory, largest single allocation")
    L.append("")
    L.append("Memory: torch profiler allocation events (profile_memory=True) summed in time order: every "
             "allocation/free through c10's CPU allocator during one merge(). MKL/oneDNN-internal scratch and "
             "Python objects are not seen.")
    L.append("")
    L.append("| in×out | r | out×in bytes | ours merge ms | ours peak extra | ours largest alloc | PEFT merge ms | "
             "PEFT peak extra | PEFT largest alloc | max |ΔW ours − PEFT| |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for m in res["merges"]:
        o, p = m["ours"], m["peft_delora"]
        L.append(f"| {m['in']}×{m['out']} | {m['r']} | {_fmt_bytes(m['out_x_in_bytes'])} | {o['merge_ms']:.2f} | "
                 f"{_fmt_bytes(o['peak_extra_bytes'])} | {_fmt_bytes(o['largest_alloc_bytes'])} | {p['merge_ms']:.2f} | "
                 f"{_fmt_bytes(p['peak_extra_bytes'])} | {_fmt_bytes(p['largest_alloc_bytes'])} | "
                 f"{m['max_abs_diff_merged_weight_ours_vs_peft']:.1e} |")
    L.append("")
    if res.get("profile"):
        L.append(f"## Profiler breakdown at the headline configuration (ms per step, self CPU time, "
                 f"{res['profile_steps']} steps)")
        L.append("")
        for name, rows in res["profile"].items():
            tot = sum(r["self_ms_per_step"] for r in rows)
            L.append(f"### {name} (sum of self time {tot:.2f} ms/step)")
            L.append("")
            L.append("| op | input shapes | self ms/step | total ms/step | calls/step |")
            L.append("|---|---|---|---|---|")
            for r in rows[:14]:
                sh = " ".join("×".join(str(d) for d in s_) for s_ in r.get("shapes", []))
                L.append(f"| {r['op']} | {sh} | {r['self_ms_per_step']:.3f} | {r['total_ms_per_step']:.3f} | "
                         f"{r['calls_per_step']:g} |")
            L.append("")
    L.append("## Agreement (max |y − y_PEFT| / max |y_PEFT|, forward)")
    L.append("")
    worst_p = max(r["rel_max_diff_ours_vs_peft"] for r in res["rows"])
    worst_r = max(r["rel_max_diff_ours_vs_ref"] for r in res["rows"])
    worst_n = max(r["rel_max_diff_native_peft_vs_peft"] for r in res["rows"])
    L.append(f"- worst over all configurations: ours vs PEFT {worst_p:.1e}, ours vs reference {worst_r:.1e}, "
             f"PEFT DeLoRA on delora_ext vs PEFT {worst_n:.1e}")
    L.append("")
    if "quantized" in res:
        L += render_quantized(res["quantized"])
    return "\n".join(L)


def render_quantized_only(res: dict) -> str:
    env = res["environment"]
    return "\n".join([
        "# delora_ext CPU benchmark (quantised base section)", "",
        f"- date: {env['date']}",
        f"- machine: {env['nproc']} CPUs (affinity {env['affinity']}), {env['cpu_model']}, "
        f"flags {' '.join(env['cpu_flags'])}",
        f"- torch {env['torch']}, torch.get_num_threads() = {env['torch_num_threads']}, python {env['python']}",
        f"- source: commit {env.get('source', {}).get('git_commit')}",
        f"- command: `{env['command']}`; wall time {res['wall_s']:.0f} s",
        f"- load average (1/5/15 min) at start {env['loadavg_start']}, at end {env.get('loadavg_end')}; other busy "
        f"processes at start: {', '.join(env['busy_processes_start']) or 'none'}", "",
        *render_quantized(res["quantized"])])


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = common.parser("bench_cpu.py", __doc__)
    ap.add_argument("--quick", action="store_true",
                    help="only the headline configuration (N=4096, 1024x1024, r=16), fewer repeats (CI smoke)")
    ap.add_argument("--out", default=None,
                    help="output path; FILE.md and FILE.json are written (a .md/.json suffix is stripped). "
                         "Default: bench/results/cpu-<date>[-quick]")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per group (default: per N, see source)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds per group")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiler breakdown")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when a target is not met")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantized-only", action="store_true",
                    help="only section 4 (small Llama with a 4-bit base against fp32/bf16)")
    ap.add_argument("--no-quantized", action="store_true", help="leave section 4 out")
    ap.add_argument("--quantized-repeats", type=int, default=None,
                    help="timed steps per variant in section 4 (default 7, --quick 3)")
    ap.add_argument("--only", choices=("host",), default=None,
                    help="host: only the host-overhead and mixed-batch sections (a minute)")
    args = ap.parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)

    import warnings

    import peft  # noqa: F401

    import delora_ext  # noqa: F401  (fail early, before any timing)
    warnings.filterwarnings("ignore", message=".*Already unmerged.*")

    t_start = time.perf_counter()
    cpu0 = _cpu_seconds()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    env = environment(args)
    if args.quantized_only:
        env["mode"] = "quantized-only"
    elif args.only:
        env["mode"] = f"only {args.only}"
    log(f"delora_ext CPU benchmark ({env['mode']}): torch {env['torch']}, {env['torch_num_threads']} threads, "
        f"{env['cpu_model']}")
    if env["busy_processes_start"]:
        log(f"WARNING: other processes are using the CPU ({', '.join(env['busy_processes_start'])}); with "
            f"{env['nproc']} cores the timings will be noisy (OpenMP barriers wait for descheduled threads)")

    if args.quantized_only or args.only == "host":
        groups, merge_cfgs = [], []
    elif args.quick:
        groups = [(HEADLINE["N"], HEADLINE["in"], HEADLINE["out"], (HEADLINE["r"],))]
        merge_cfgs = [(HEADLINE["in"], HEADLINE["out"], HEADLINE["r"])]
    else:
        groups = [(N, i, o, FULL_RANKS) for N in FULL_NS for (i, o) in FULL_SHAPES]
        merge_cfgs = [(i, o, r) for (i, o) in FULL_SHAPES for r in FULL_RANKS]
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else FULL_WARMUP)

    def repeats_for(N):
        if args.repeats is not None:
            return args.repeats
        return QUICK_REPEATS if args.quick else FULL_REPEATS.get(N, 9)

    rows, repeats_used, profile = [], {}, {}
    n_profile_steps = 5
    for gi, (N, i, o, ranks) in enumerate(groups):
        reps = repeats_for(N)
        repeats_used[N] = reps
        g = run_group(N, i, o, ranks, reps, warmup, args.seed + gi, log, retry=not args.quick,
                      deadline=t_start + RETRY_DEADLINE_S)
        rows += g["rows"]
        ex = g["_extra"]
        if not args.no_profile and (N, i, o) == (HEADLINE["N"], HEADLINE["in"], HEADLINE["out"]):
            for label, key, mode in (("delora_ext, x requires grad", ("ours", HEADLINE["r"]), "x_grad"),
                                     ("frozen nn.Linear, x requires grad", ("frozen", None), "x_grad"),
                                     ("PEFT DeLoRA, x requires grad", ("peft_delora", HEADLINE["r"]), "x_grad"),
                                     ("PEFT DeLoRA on delora_ext, x requires grad", ("peft_native", HEADLINE["r"]),
                                      "x_grad"),
                                     ("delora_ext, x without grad", ("ours", HEADLINE["r"]), "x_nograd")):
                profile[label] = profile_steps(make_step(ex["layers"][key], ex["xs"][mode], ex["g"]),
                                               n_profile_steps)
        del g, ex
        gc.collect()

    merges = []
    mrep = MERGE_REPEATS["quick" if args.quick else "full"]
    t0 = time.perf_counter()
    for (i, o, r) in merge_cfgs:
        merges.append(bench_merge(i, o, r, mrep, args.seed))
    if merge_cfgs:
        log(f"  merge: {len(merge_cfgs)} configurations x {mrep} repeats in {time.perf_counter() - t0:.1f} s")

    host = mixed = None
    if not args.quantized_only:
        t0 = time.perf_counter()
        quick = args.quick and args.only != "host"
        host = host_overhead.host_overhead(**(dict(rounds=5, calls=50, warmup=1) if quick else {}), seed=args.seed)
        mixed = host_overhead.mixed_batch(**(dict(rounds=3, calls=5, warmup=1) if quick else {}), seed=args.seed)
        log(f"  host overhead and mixed batch in {time.perf_counter() - t0:.1f} s")

    res = {"environment": env, "headline": HEADLINE, "seq": SEQ, "warmup": warmup, "repeats": repeats_used,
           "targets_spec": TARGETS, "rows": rows, "merges": merges, "profile": profile,
           "profile_steps": n_profile_steps, "host_overhead": host, "mixed_batch": mixed}
    if not args.no_quantized and args.only != "host":
        qrep = args.quantized_repeats or (3 if args.quick else 7)
        res["quantized"] = bench_quantized(qrep, 1, args.seed, log)
    cpu1 = _cpu_seconds()
    if cpu0 and cpu1:
        other = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
        span = (time.perf_counter() - t_start) * (os.cpu_count() or 1)
        env["other_processes_cpu_s"] = round(other, 1)
        env["other_processes_cpu_share"] = round(max(other, 0.0) / span, 4)
    env["loadavg_end"] = _loadavg()
    env["busy_processes_end"] = _other_busy_processes()
    res["targets"] = evaluate_targets(rows, merges) if rows else []
    res["wall_s"] = time.perf_counter() - t_start
    if args.quantized_only:
        md = render_quantized_only(res)
    else:
        md = render_markdown(res) if rows else render_header(res)
        md += "\n".join(host_overhead.render(host, mixed)) + "\n"

    if args.out:
        base = args.out
        for suf in (".md", ".json"):
            if base.endswith(suf):
                base = base[: -len(suf)]
    else:
        date = _dt.date.today().isoformat()
        base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            f"cpu-{date}" + ("-quantized" if args.quantized_only else "-host" if args.only == "host"
                                             else "-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(base + ".json", "w") as f:
        json.dump(common.json_safe({**res, "markdown": md}, drop_private=True), f, indent=1, default=str)
    print(md)
    log(f"wrote {base}.md and {base}.json ({res['wall_s']:.0f} s)")
    flagged = sum({(r["N"], r["in"], r["out"]): r["rounds"]["flagged"] for r in rows}.values())
    if flagged:
        log(f"WARNING: {flagged} variant timings had < {MIN_CLEAN} undisturbed samples (other processes took "
            f"{100 * env.get('other_processes_cpu_share', 0.0):.1f} % of the CPU); rerun on a quiet machine")
    met = all(t["met"] for t in res["targets"] + host["targets"])
    return 0 if (met or not args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
