"""Host-overhead and mixed-batch sections of the CPU benchmark (bench_cpu.py runs them; ``--only host`` runs them
alone).

Host overhead: a 64×64 layer, r = 8, 4 rows, one intra-op thread, where the arithmetic is negligible and what is
timed is the per-call cost of Python, the dispatcher and autograd. Variants, interleaved round-robin (shuffled
order each round) in one process:

- eval forward (``torch.no_grad()``, ``.eval()``): nn.Linear, DeLoRALinear, the raw ``delora_ext::linear_fwd`` op on
  the same tensors called through ``torch.ops`` and through the direct entry point the layer uses (the floor of an
  uncached call into the native op), PEFT DeLoRA, PEFT LoRA;
- training step (forward + backward of a fixed dL/dy, x requires grad, trainable grads set to None first): the
  frozen nn.Linear, DeLoRALinear, PEFT DeLoRA, PEFT LoRA, and the raw op with its autograd node and no layer
  around it, both ways (the floor of what Python-side work can reach).

One sample times ``calls`` back-to-back calls and divides; each figure is the median over rounds. Two clocks per
sample: wall (``perf_counter``) and this thread's CPU time (``thread_time``), which leaves out the time the thread
was descheduled by other processes on a shared machine. The targets are read off the CPU-time medians.

Mixed batch: ``delora_ext.mixed_batch`` with 8 adapters on one layer and a batch of 32 rows (4 per adapter,
shuffled), against the loop a caller writes without it: for each adapter, ``set_adapter`` and a forward of that
adapter's rows, the results scattered back into one output. Both under ``torch.no_grad()``, eval mode. Beside
them, the layer's forward inside an already open block with each strategy (grouped, masked and the native
segmented op), the base GEMM alone, and one adapter applied to every row (the floor of the adapter part).
"""
from __future__ import annotations

import copy
import random
import statistics
import time

import torch
from torch import nn

from variants import build_ours, build_peft_delora, build_peft_lora, frozen

HOST = {"in": 64, "out": 64, "r": 8, "N": 4}
HOST_TARGETS = {"eval_vs_linear": 2.0, "step_vs_frozen": 1.8, "step_vs_peft_lora": 0.65}
MIXED_SHAPES = ((64, 64, 8), (1024, 1024, 16))
MIXED = {"adapters": 8, "rows": 32}


def _time_interleaved(items: dict, rounds: int, calls: int, warmup: int, seed: int) -> dict:
    """{name: {"wall_us", "cpu_us", samples}} per call: medians over `rounds` shuffled rounds of `calls` calls."""
    rng = random.Random(seed)
    names = list(items)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for i in range(warmup + rounds):
        rng.shuffle(names)
        for k in names:
            f = items[k]
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(calls):
                f()
            t1, c1 = time.perf_counter(), time.thread_time()
            if i >= warmup:
                wall[k].append((t1 - t0) / calls * 1e6)
                cpu[k].append((c1 - c0) / calls * 1e6)
    return {k: {"wall_us": statistics.median(wall[k]), "cpu_us": statistics.median(cpu[k]),
                "wall_samples_us": [round(v, 2) for v in wall[k]], "cpu_samples_us": [round(v, 2) for v in cpu[k]]}
            for k in items}


def _step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(g)

    return step


def _raw_step(op, x, g, layer):
    """The native floor of a training step: the op called directly (no layer), backward through its C++ node."""
    base = layer.base_layer
    A, B, lam, w = (getattr(layer, k)["default"] for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
    params = [A, B, lam]

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        y = op(x, base.weight, base.bias, A, B, lam, w, 0.0, None)
        (y[0] if isinstance(y, tuple) else y).backward(g)

    return step


def _no_grad(f):
    def call():
        with torch.no_grad():
            return f()
    return call


def host_overhead(rounds: int = 30, calls: int = 200, warmup: int = 3, seed: int = 0) -> dict:
    import delora_ext

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        template = nn.Linear(HOST["in"], HOST["out"])
        r = HOST["r"]
        train_ours = build_ours(template, r).train()
        eval_ours = copy.deepcopy(train_ours).eval()
        peft_d, m1 = build_peft_delora(template, r, train_ours)
        peft_d_eval, m2 = build_peft_delora(template, r, train_ours)
        peft_l, m3 = build_peft_lora(template, r)
        peft_l_eval = copy.deepcopy(peft_l).eval()
        for m in (m1, m3):
            m.train()
        m2.eval()
        lin = frozen(template).eval()
        x = torch.randn(HOST["N"], HOST["in"])
        xg = x.clone().requires_grad_(True)
        g = torch.randn(HOST["N"], HOST["out"])
        base = eval_ours.base_layer
        A, B, lam, w = (getattr(eval_ours, k)["default"] for k in ("delora_A", "delora_B", "delora_lambda",
                                                                     "delora_w_norm"))
        op = torch.ops.delora_ext.linear_fwd
        direct = delora_ext.ops._direct_linear  # what ops.linear calls in eager (y alone)
        with torch.no_grad():
            agree = (eval_ours(x) - peft_d_eval(x)).abs().max().item() / peft_d_eval(x).abs().max().item()
        items = {
            "eval: nn.Linear": _no_grad(lambda: lin(x)),
            "eval: DeLoRALinear": _no_grad(lambda: eval_ours(x)),
            "eval: raw linear_fwd op": _no_grad(lambda: op(x, base.weight, base.bias, A, B, lam, w, 0.0, None)),
            "eval: raw op, direct entry": _no_grad(lambda: direct(x, base.weight, base.bias, A, B, lam, w, 0.0, None)),
            "eval: PEFT DeLoRA": _no_grad(lambda: peft_d_eval(x)),
            "eval: PEFT LoRA": _no_grad(lambda: peft_l_eval(x)),
            "step: frozen nn.Linear": _step(lin, xg, g),
            "step: DeLoRALinear": _step(train_ours, xg, g),
            "step: PEFT DeLoRA": _step(peft_d, xg, g),
            "step: PEFT LoRA": _step(peft_l, xg, g),
            "step: raw linear_fwd op + autograd": _raw_step(op, xg, g, train_ours),
            "step: raw op, direct entry + autograd": _raw_step(direct, xg, g, train_ours),
        }
        res = _time_interleaved(items, rounds, calls, warmup, seed)
        del m1, m2, m3
    finally:
        torch.set_num_threads(threads)
    c = {k: v["cpu_us"] for k, v in res.items()}
    targets = [
        {"target": f"eval forward ≤ {HOST_TARGETS['eval_vs_linear']}× nn.Linear",
         "value": c["eval: DeLoRALinear"] / c["eval: nn.Linear"], "limit": HOST_TARGETS["eval_vs_linear"]},
        {"target": f"training step ≤ {HOST_TARGETS['step_vs_frozen']}× the frozen step",
         "value": c["step: DeLoRALinear"] / c["step: frozen nn.Linear"], "limit": HOST_TARGETS["step_vs_frozen"]},
        {"target": f"training step ≤ {HOST_TARGETS['step_vs_peft_lora']}× PEFT LoRA's step",
         "value": c["step: DeLoRALinear"] / c["step: PEFT LoRA"], "limit": HOST_TARGETS["step_vs_peft_lora"]},
    ]
    for t in targets:
        t["met"] = t["value"] <= t["limit"]
    return {"shape": HOST, "rounds": rounds, "calls": calls, "warmup": warmup, "timings": res, "targets": targets,
            "rel_max_diff_eval_ours_vs_peft": agree}


def _mixed_layer(in_f: int, out_f: int, r: int, n_adapters: int, seed: int):
    import delora_ext
    torch.manual_seed(seed)
    layer = delora_ext.DeLoRALinear(nn.Linear(in_f, out_f), r=r, init_weights=False, adapter_name="a0")
    for i in range(1, n_adapters):
        layer.update_layer(f"a{i}", r, init_weights=False, activate=False)
    return layer.eval()


def mixed_batch(rounds: int = 20, calls: int = 20, warmup: int = 2, seed: int = 0) -> dict:
    """mixed_batch(layer, names) vs the loop of one set_adapter + forward per adapter, same rows, same output; and
    the layer's forward inside an open block (no per-block grouping) with each strategy, the base GEMM alone and
    one adapter on all rows."""
    import delora_ext
    from delora_ext import inference

    k, n = MIXED["adapters"], MIXED["rows"]
    rows = []
    for in_f, out_f, r in MIXED_SHAPES:
        layer = _mixed_layer(in_f, out_f, r, k, seed)
        names = [f"a{i % k}" for i in range(n)]
        random.Random(seed).shuffle(names)
        x = torch.randn(n, in_f)
        groups = [(f"a{i}", torch.tensor([j for j, nm in enumerate(names) if nm == f"a{i}"])) for i in range(k)]
        base = layer.base_layer

        def loop():
            with torch.no_grad():
                y = x.new_empty(n, out_f)
                for name, idx in groups:
                    layer.set_adapter(name)
                    y[idx] = layer(x[idx])
                layer.set_adapter("a0")
                return y

        def mixed():
            with torch.no_grad(), delora_ext.mixed_batch(layer, names):
                return layer(x)

        def in_block(strategy):
            plans = {id(layer): inference._Plan(names, strategy)}  # what the block computes on entry

            def run():
                token = inference._PLAN.set(plans)
                try:
                    with torch.no_grad():
                        return layer(x)
                finally:
                    inference._PLAN.reset(token)
            return run

        def base_only():
            with torch.no_grad():
                return torch.nn.functional.linear(x, base.weight, base.bias)

        def one_adapter():
            with torch.no_grad():
                return layer(x)  # a0 active, every row

        diff = (mixed() - loop()).abs().max().item() / loop().abs().max().item()
        items = {"loop of single-adapter calls": loop, "mixed_batch": mixed, "grouped, open block": in_block("grouped"),
                 "masked, open block": in_block("masked"), "segmented, open block": in_block("segmented"),
                 "base GEMM alone": base_only,
                 "one adapter, all rows": one_adapter}
        res = _time_interleaved(items, rounds, calls, warmup, seed)
        c = {key: v["cpu_us"] for key, v in res.items()}
        rows.append({"in": in_f, "out": out_f, "r": r, "adapters": k, "rows": n, "timings": res,
                     "rel_max_diff_mixed_vs_loop": diff,
                     "ratio_cpu": c["mixed_batch"] / c["loop of single-adapter calls"],
                     "ratio_wall": res["mixed_batch"]["wall_us"] / res["loop of single-adapter calls"]["wall_us"],
                     "grouped_adapter_part_cpu_us": c["grouped, open block"] - c["base GEMM alone"],
                     "masked_adapter_part_cpu_us": c["masked, open block"] - c["base GEMM alone"],
                     "segmented_adapter_part_cpu_us": c["segmented, open block"] - c["base GEMM alone"],
                     "one_adapter_part_cpu_us": c["one adapter, all rows"] - c["base GEMM alone"]})
    return {"rounds": rounds, "calls": calls, "threads": torch.get_num_threads(), "rows": rows}


def render(host: dict | None, mixed: dict | None) -> list[str]:
    L = []
    if host:
        s = host["shape"]
        L.append(f"## Host overhead ({s['in']}×{s['out']} layer, r={s['r']}, {s['N']} rows, fp32, one thread)")
        L.append("")
        L.append(f"Medians per call over {host['rounds']} interleaved rounds of {host['calls']} calls "
                 f"({host['warmup']} warm-up rounds). CPU = this thread's CPU time (leaves out descheduling by "
                 f"other processes); the targets use it. Eval forwards under torch.no_grad().")
        L.append("")
        L.append("| variant | CPU µs | wall µs | CPU ratio |")
        L.append("|---|---|---|---|")
        t = host["timings"]
        for k, v in t.items():
            ref = "eval: nn.Linear" if k.startswith("eval") else "step: frozen nn.Linear"
            L.append(f"| {k} | {v['cpu_us']:.1f} | {v['wall_us']:.1f} | {v['cpu_us'] / t[ref]['cpu_us']:.2f}× "
                     f"{ref.split(': ')[1]} |")
        L.append("")
        L.append("| target | value | met |")
        L.append("|---|---|---|")
        for tg in host["targets"]:
            L.append(f"| {tg['target']} | {tg['value']:.2f}× | {'met' if tg['met'] else '**not met**'} |")
        L.append("")
        L.append(f"Eval output, ours vs PEFT DeLoRA: max |Δy| / max |y| = {host['rel_max_diff_eval_ours_vs_peft']:.1e}")
        L.append("")
    if mixed:
        L.append(f"## Mixed-batch inference ({MIXED['adapters']} adapters, {MIXED['rows']} rows, "
                 f"{mixed['threads']} threads, fp32, torch.no_grad())")
        L.append("")
        L.append("loop: for each adapter, set_adapter and a forward of its rows, scattered back. mixed_batch: one "
                 "block (strategy auto) and one forward per call. Open block: the layer's forward alone with each "
                 "strategy (the grouping is made once per block). Adapter part: that minus the base GEMM alone; one "
                 "adapter on all rows is its floor (the same two skinny GEMMs, nothing to group). Medians per call, "
                 f"CPU µs, over {mixed['rounds']} interleaved rounds of {mixed['calls']} calls.")
        L.append("")
        L.append("| in×out | r | loop | mixed_batch | mixed/loop (CPU, wall) | grouped, open block | "
                 "masked, open block | segmented, open block | base GEMM alone | "
                 "adapter part: grouped / masked / segmented / one adapter | max |Δy|/max |y| |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in mixed["rows"]:
            t = {k: v["cpu_us"] for k, v in r["timings"].items()}
            L.append(f"| {r['in']}×{r['out']} | {r['r']} | {t['loop of single-adapter calls']:.1f} | "
                     f"{t['mixed_batch']:.1f} | {r['ratio_cpu']:.2f}, {r['ratio_wall']:.2f} | "
                     f"{t['grouped, open block']:.1f} | {t['masked, open block']:.1f} | "
                     f"{t['segmented, open block']:.1f} | {t['base GEMM alone']:.1f} | "
                     f"{r['grouped_adapter_part_cpu_us']:.1f} / {r['masked_adapter_part_cpu_us']:.1f} / "
                     f"{r['segmented_adapter_part_cpu_us']:.1f} / "
                     f"{r['one_adapter_part_cpu_us']:.1f} | {r['rel_max_diff_mixed_vs_loop']:.1e} |")
        L.append("")
    return L
