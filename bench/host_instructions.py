"""Instructions per training step of the host-overhead shape (64×64 layer, r = 8, 4 rows, one thread), counted by
valgrind's callgrind: a measure of host work that does not move with the machine's load, where the timed section
(host_overhead.py) does by ±10 % on a shared machine.

    valgrind --tool=callgrind --callgrind-out-file=cg.out --dump-before='os_getppid*' \\
        python bench/host_instructions.py 1000
    python bench/host_instructions.py --report cg.out

Variants, each run `steps` times after a warm-up, separated by an os.getppid() call (callgrind writes one dump
before each): training steps of the frozen nn.Linear, DeLoRALinear, and the layer's op called through its direct
entry point with no layer around it; then eval forwards (``torch.no_grad()``, ``.eval()``) of nn.Linear and
DeLoRALinear (which reuses its cached folded factors). The report prints instructions per call and the ratios to
the frozen step and to nn.Linear's eval forward.
"""
from __future__ import annotations

import copy
import gc
import glob
import os
import re
import sys

VARIANTS = ("frozen nn.Linear", "DeLoRALinear", "direct entry, no layer")
EVAL_VARIANTS = ("eval: nn.Linear", "eval: DeLoRALinear")


def run(steps: int) -> None:
    import torch
    from torch import nn

    import delora_ext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = delora_ext.DeLoRALinear(nn.Linear(64, 64), r=8, init_weights=False).train()
    frozen = nn.Linear(64, 64).requires_grad_(False)
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 64)
    A, B, lam, w = (getattr(layer, k)["default"] for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
    W, b = layer.base_layer.weight, layer.base_layer.bias
    direct = delora_ext.ops._direct_linear
    forwards = [lambda: frozen(x), lambda: layer(x), lambda: direct(x, W, b, A, B, lam, w, 0.0, None)]

    def loop(f, n):
        for _ in range(n):
            for p in (A, B, lam):
                p.grad = None
            x.grad = None
            f().backward(g)

    eval_layer = copy.deepcopy(layer).eval()
    lin = nn.Linear(64, 64).eval()
    x_eval = x.detach()

    def eval_loop(f, n):
        with torch.no_grad():
            for _ in range(n):
                f(x_eval)

    for f in forwards:
        loop(f, 200)
    for f in (lin, eval_layer):
        eval_loop(f, 200)
    gc.disable()  # collections would land in whichever variant triggers them
    for f in forwards:
        os.getppid()
        loop(f, steps)
    for f in (lin, eval_layer):
        os.getppid()
        eval_loop(f, steps)
    os.getppid()


def report(prefix: str, steps: int) -> None:
    dumps = sorted(glob.glob(prefix + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    counts = []
    for path in dumps:
        with open(path) as f:
            m = re.search(r"^summary: (\d+)", f.read(), re.M)
        counts.append(int(m.group(1)) if m else 0)
    # dump 1 is start-up and warm-up; dumps 2.. are the variants in order
    per_call = [c / steps for c in counts[1:1 + len(VARIANTS) + len(EVAL_VARIANTS)]]
    print("| variant | instructions per call | ratio |\n|---|---|---|")
    for name, c in zip(VARIANTS, per_call):
        print(f"| step: {name} | {c:,.0f} | {c / per_call[0]:.2f}× the frozen step |")
    evals = per_call[len(VARIANTS):]
    for name, c in zip(EVAL_VARIANTS, evals):
        print(f"| {name} | {c:,.0f} | {c / evals[0]:.2f}× nn.Linear |")


if __name__ == "__main__":
    if sys.argv[1] == "--report":
        report(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1000)
    else:
        run(int(sys.argv[1]))
