#!/usr/bin/env python
"""The two CPU GEMMs of linear_bwd whose operand layout csrc/delora_ops.cpp picks by rank (docs/native.md):

- G = g·Bd (N×out times out×r): Bd as stored (row-major out×r) or as the transpose of a contiguous r×out copy;
- M = gᵀu (out×N times N×r): as written, or as (uᵀg)ᵀ.

Each pair is timed interleaved in one process (medians of ``--rounds`` rounds), with the copies each layout costs;
the ratio is what matters.

    python bench/cpu_gemm_layouts.py [--n 4096] [--out 1024] [--ranks 4 8 16] [--rounds 40]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def medians_ms(fns: dict, rounds: int) -> dict:
    for f in fns.values():  # warm-up
        f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="rows of g (tokens)")
    ap.add_argument("--out", type=int, default=1024, help="out_features")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    g = torch.randn(args.n, args.out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = {args.n}, out = {args.out}, fp32\n")
    print("| r | G = g·B, B row-major | G, B as transposed copy | ratio | M = gᵀu | M = (uᵀg)ᵀ | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in args.ranks:
        B = torch.randn(args.out, r)
        u = torch.randn(args.n, r)
        # As linear_bwd runs them, copies included: B's transposed copy, and M made contiguous for finalize.
        m = medians_ms({"G": lambda B=B: torch.mm(g, B), "Gt": lambda B=B: torch.mm(g, B.t().contiguous().t()),
                        "M": lambda u=u: torch.mm(g.t(), u).contiguous(),
                        "Mt": lambda u=u: torch.mm(u.t(), g).t().contiguous()}, args.rounds)
        print(f"| {r} | {m['G']:.2f} ms | {m['Gt']:.2f} ms | {m['G'] / m['Gt']:.2f} | {m['M']:.2f} ms | "
              f"{m['Mt']:.2f} ms | {m['M'] / m['Mt']:.2f} |")


if __name__ == "__main__":
    main()
