"""Determinism on CPU: the same inputs give bit-identical outputs and gradients run to run (fixed-order
reductions in the kernels; the dropout mask is a function of the seed). CUDA: tests/test_cuda.py."""
from __future__ import annotations

import pytest
import torch

import delora_ext
from delora_ext import ops

from helpers import make_adapter, make_base, make_x, requires_native
from tiny_models import all_linear, batch, build, one_thread, train  # noqa: F401  (one_thread: autouse fixture)

pytestmark = requires_native
OPS = torch.ops.delora_ext if ops.NATIVE else None
RUNS = 3


def _all_equal(runs, what):
    for i, run in enumerate(runs[1:], 1):
        for k, (a, b) in enumerate(zip(runs[0], run)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: output {k} differs between run 0 and run {i}"


@pytest.mark.parametrize("mode", ["fp32", "fp64", "autocast_bf16", "dropout"])
@pytest.mark.parametrize("shape,in_f,out,r", [((300,), 256, 128, 8), ((3, 41), 97, 1031, 5)])
def test_ops_bit_identical_run_to_run(mode, shape, in_f, out, r):
    dtype = torch.float64 if mode == "fp64" else torch.float32
    A, B, lam, w = make_adapter(r, in_f, out, "random", dtype)
    W, b = make_base(in_f, out, dtype)
    x = make_x(shape, in_f, dtype)
    p = 0.3 if mode == "dropout" else 0.0
    seed = torch.tensor([1234567], dtype=torch.int64) if p else None
    runs = []
    for _ in range(RUNS):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast_bf16"):
            y = OPS.linear_fwd(leaves[0], W, b, *leaves[1:], w, p, seed)[0]
            d = OPS.adapter_fwd(leaves[0], *leaves[1:], w, p, seed)[0]
        grads = torch.autograd.grad((y.float().square().sum() + d.float().sum()), leaves)
        merged = W.clone()
        ops.merge_(merged, A, B, lam, w, 0.7)
        runs.append([y.detach(), d.detach(), *grads, merged, ops.delta_weight(A, B, lam, w), *ops.prep(A, B, lam, w)])
    _all_equal(runs, mode)


def test_training_run_bit_identical():
    """Three AdamW steps on a patched tiny Llama, twice from the same start: bit-identical adapters and logits."""
    runs = []
    for _ in range(2):
        model = delora_ext.patch(build("llama"), r=4, init_weights=False, **all_linear("llama"))
        train(model, "llama", steps=3)
        with torch.no_grad():
            out = model(**batch("llama")).logits
        runs.append([out] + [p.detach() for p in model.parameters() if p.requires_grad])
    _all_equal(runs, "training")
