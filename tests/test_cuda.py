"""CUDA ops against the CPU op and the reference; run on a GPU machine (bench/gpu_run.sh), skipped elsewhere."""
from __future__ import annotations

import pytest
import torch

import delora_ext
from delora_ext import ops
from delora_ext import reference as ref

from conftest import TOL, assert_close, make_adapter, make_base, make_x, rel_err

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    pytest.mark.skipif(not (ops.NATIVE and "cuda" in (delora_ext.build_info().get("kernels") or [])),
                       reason="delora_ext was built without CUDA kernels"),
]
OPS = torch.ops.delora_ext if ops.NATIVE else None

SHAPES = [((4,), 7, 5, 1), ((3, 5), 16, 4097, 3), ((0,), 8, 6, 2), ((2, 3, 4), 33, 17, 4), ((300,), 256, 512, 32)]


@pytest.mark.parametrize("shape,in_f,out,r", SHAPES)
@pytest.mark.parametrize("kind", ["random", "zeroB", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_reference(shape, in_f, out, r, kind, dtype):
    A, B, lam, w = make_adapter(r, in_f, out, kind, dtype, device="cuda")
    W, b = make_base(in_f, out, dtype, device="cuda")
    x = make_x(shape, in_f, dtype, device="cuda").requires_grad_()
    leaves = [x, *[t.requires_grad_() for t in (A, B, lam)]]
    y = ops.linear(x, W, b, A, B, lam, w)
    x64, A64, B64, l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = ref.linear_ref(x64, W.double(), b.double(), A64, B64, l64, w.double())
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)  # TF32 is off by default; cuBLAS order differs
    assert_close(y, y64, tol, "y")
    g = torch.randn_like(y64)
    for name, a, e in zip(["dx", "dA", "dB", "dlam"], torch.autograd.grad(y, leaves, g.to(dtype)),
                          torch.autograd.grad(y64, [x64, A64, B64, l64], g)):
        assert_close(a, e, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_matches_cpu_op(dtype):
    A, B, lam, w = make_adapter(16, 256, 384, "random", torch.float32)
    W, b = make_base(256, 384, dtype)
    x = make_x((512,), 256, dtype)
    y_cpu = ops.linear(x, W, b, A, B, lam, w).double()
    y_gpu = ops.linear(x.cuda(), W.cuda(), b.cuda(), A.cuda(), B.cuda(), lam.cuda(), w.cuda()).double().cpu()
    assert rel_err(y_gpu, y_cpu) < 4 * torch.finfo(dtype).eps


def test_cuda_dropout_mask_equals_cpu_and_reference():
    A, B, lam, w = make_adapter(3, 24, 10, "random", torch.float64)
    x = make_x((5, 7), 24, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64)
    d_cpu = OPS.adapter_fwd(x, A, B, lam, w, 0.3, seed)[0]
    d_gpu = OPS.adapter_fwd(x.cuda(), A.cuda(), B.cuda(), lam.cuda(), w.cuda(), 0.3, seed.cuda())[0]
    keep = ref.dropout_keep_ref(987654321, x.shape, 0.3)
    assert_close(d_gpu, ref.adapter_ref(x, A, B, lam, w, keep, 0.3), TOL[torch.float64], "gpu")
    assert_close(d_gpu, d_cpu, TOL[torch.float64], "gpu vs cpu")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_merge(wdtype):
    A, B, lam, w = make_adapter(8, 300, 4097, "random", torch.float32, device="cuda")
    W, _ = make_base(300, 4097, torch.float32, device="cuda")
    W = W.to(wdtype)
    merged = W.clone()
    OPS.merge_(merged, A, B, lam, w, 1.0)
    exact = W.double() + ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
    assert rel_err(merged, exact) <= max(torch.finfo(wdtype).eps, 1e-6)


def test_cuda_opcheck():
    A, B, lam, w = make_adapter(3, 10, 6, "random", torch.float32, device="cuda")
    W, b = make_base(10, 6, device="cuda")
    x = make_x((2, 5), 10, device="cuda")
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
    torch.library.opcheck(OPS.linear_fwd.default, (leaves[0], W, b, *leaves[1:], w, 0.0, None))
    torch.library.opcheck(OPS.adapter_fwd.default, (leaves[0], *leaves[1:], w, 0.25, seed))
    torch.library.opcheck(OPS.prep.default, (A, B, lam, w))
    torch.library.opcheck(OPS.delta_weight.default, (A, B, lam, w))
    torch.library.opcheck(OPS.merge_.default, (W.clone(), A, B, lam, w, 1.0))


def test_cuda_graph_captured_training_step():
    torch.manual_seed(0)
    layer = delora_ext.DeLoRALinear(torch.nn.Linear(256, 128).cuda(), r=8, init_weights=False)
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up on a side stream, as graph capture requires
            y = layer(x)
            grads = torch.autograd.grad(y.square().sum(), params)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), params)
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    y_eager = layer(x)
    eager = torch.autograd.grad(y_eager.square().sum(), params)
    assert_close(y, y_eager, 1e-6, "graph y")
    for a, e in zip(grads, eager):
        assert_close(a, e, 1e-5, "graph grad")
