#!/usr/bin/env python
"""Where the fused CPU pass stops paying: a training step of the raw ``linear_fwd`` op (forward and backward of a
fixed dL/dy, x and the adapter requiring grad) with the adapter part fused (``cpu_fused="always"``) against the
GEMM path (``cpu_fused="off"``), over shapes spanning N·r·(in + out), fp32.

The two variants alternate in random order in one process; each figure is the median over ``--rounds`` rounds of
this thread's CPU time per step (``thread_time``, which leaves out time descheduled by other processes). The size
rule in csrc/kernels.h (``kCpuFusedMaxWork``) is set from where the ratio crosses 1.

    python bench/cpu_fused_crossover.py [--threads 1] [--rounds 15] [--calls 30]
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parser  # noqa: E402

# (N, in, out, r)
SHAPES = [(4, 64, 64, 8), (32, 64, 64, 8), (8, 128, 128, 16), (16, 128, 128, 16), (64, 64, 64, 8),
          (8, 256, 256, 16), (16, 256, 256, 16), (32, 256, 256, 16), (4, 1024, 1024, 8), (8, 1024, 1024, 16),
          (32, 512, 512, 16)]


def _step(N: int, in_f: int, out: int, r: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, in_f, generator=g, requires_grad=True)
    W = torch.randn(out, in_f, generator=g) / in_f ** 0.5
    b = torch.randn(out, generator=g)
    A = torch.randn(r, in_f, generator=g, requires_grad=True)
    B = torch.randn(out, r, generator=g, requires_grad=True)
    lam = torch.tensor([3.0], requires_grad=True)
    w = W.norm(dim=0)
    gy = torch.randn(N, out, generator=g)
    op = torch.ops.delora_ext.linear_fwd

    def step():
        x.grad = A.grad = B.grad = lam.grad = None
        op(x, W, b, A, B, lam, w, 0.0, None)[0].backward(gy)

    return step


def main(argv=None) -> None:
    ap = parser("cpu_fused_crossover.py", __doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=30, help="steps per sample")
    args = ap.parse_args(argv)
    from delora_ext import ops
    if not ops.NATIVE:
        raise SystemExit(f"the native extension is not loaded: {ops.native_error}")
    torch.set_num_threads(args.threads)
    before = ops.tuning()
    rng = random.Random(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, median thread-CPU µs per training step\n")
    print("| N | in × out | r | N·r·(in+out) | fused | GEMM path | fused / GEMM |")
    print("|---|---|---|---|---|---|---|")
    try:
        for N, in_f, out, r in SHAPES:
            step = _step(N, in_f, out, r)
            times = {"always": [], "off": []}
            for i in range(args.rounds + 2):
                for mode in rng.sample(list(times), 2):
                    ops.set_tuning(cpu_fused=mode)
                    c0 = time.thread_time()
                    for _ in range(args.calls):
                        step()
                    if i >= 2:  # two warm-up rounds
                        times[mode].append((time.thread_time() - c0) / args.calls * 1e6)
            fused, gemm = statistics.median(times["always"]), statistics.median(times["off"])
            print(f"| {N} | {in_f} × {out} | {r} | {N * r * (in_f + out)} | {fused:.1f} | {gemm:.1f} | "
                  f"{fused / gemm:.2f} |", flush=True)
    finally:
        ops.set_tuning(**{k: v for k, v in before.items() if k == "cpu_fused"})


if __name__ == "__main__":
    main()
