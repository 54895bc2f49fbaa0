"""CUDA ops against the CPU op and the reference; run on a GPU machine (bench/gpu_run.sh), skipped elsewhere.

The layer tests force the native CUDA path (ops.CUDA_LAYERS_NATIVE) so they exercise the kernels whether or not
DELORA_EXT_NATIVE_CUDA=1 is set; the op tests call torch.ops.delora_ext directly.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import delora_ext
from delora_ext import ops
from delora_ext import reference as ref

from helpers import TOL, assert_close, low_precision_budget, make_adapter, make_base, make_x, rel_err, tuned

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
    pytest.mark.skipif(not (ops.NATIVE and "cuda" in (delora_ext.build_info().get("kernels") or [])),
                       reason="delora_ext was built without CUDA kernels"),
]
OPS = torch.ops.delora_ext if ops.NATIVE else None

# (leading shape of x, in, out, r): odd sizes, an empty batch, 3-D x, sizes above the 256-thread block,
# r above a warp and not a power of two.
SHAPES = [((4,), 7, 5, 1), ((3, 5), 16, 4097, 3), ((0,), 8, 6, 2), ((2, 3, 4), 33, 17, 4), ((300,), 256, 512, 32),
          ((40,), 1000, 300, 129)]


@pytest.fixture
def native_cuda_layers(monkeypatch):
    """Route DeLoRALinear's CUDA tensors through the native kernels (as DELORA_EXT_NATIVE_CUDA=1 does)."""
    monkeypatch.setattr(ops, "CUDA_LAYERS_NATIVE", True)
    assert ops.has_kernel("cuda")


def _grad_out(y, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)


@pytest.mark.parametrize("shape,in_f,out,r", SHAPES)
@pytest.mark.parametrize("kind", ["random", "zeroB", "clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cuda_matches_reference(shape, in_f, out, r, kind, dtype, gemm_order, small_n):
    A, B, lam, w = make_adapter(r, in_f, out, kind, dtype, device="cuda")
    W, b = make_base(in_f, out, dtype, device="cuda")
    x = make_x(shape, in_f, dtype, device="cuda").requires_grad_()
    leaves = [x, *[t.requires_grad_() for t in (A, B, lam)]]
    y = ops.linear(x, W, b, A, B, lam, w)
    assert y.shape == (*shape, out) and y.dtype == dtype and y.is_cuda
    x64, A64, B64, l64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = ref.linear_ref(x64, W.double(), b.double(), A64, B64, l64, w.double())
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)  # TF32 is off by default; cuBLAS order differs
    assert_close(y, y64, tol, "y")
    g = _grad_out(y64)
    for name, a, e in zip(["dx", "dA", "dB", "dlam"], torch.autograd.grad(y, leaves, g.to(dtype)),
                          torch.autograd.grad(y64, [x64, A64, B64, l64], g)):
        assert a.dtype == dtype, name
        assert_close(a, e, tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cuda_strided_x(dtype):
    A, B, lam, w = make_adapter(5, 48, 40, "random", dtype, device="cuda")
    W, b = make_base(48, 40, dtype, device="cuda")
    x = make_x((3, 7), 48, dtype, device="cuda", layout="strided").requires_grad_()
    A.requires_grad_()
    y = ops.linear(x, W, b, A, B, lam, w)
    x64, A64 = [t.detach().double().requires_grad_() for t in (x, A)]
    y64 = ref.linear_ref(x64, W.double(), b.double(), A64, B.double(), lam.double(), w.double())
    tol = TOL[dtype] * (10 if dtype == torch.float32 else 1)
    assert_close(y, y64, tol, "y")
    g = _grad_out(y64)
    for name, a, e in zip(["dx", "dA"], torch.autograd.grad(y, [x, A], g.to(dtype)),
                          torch.autograd.grad(y64, [x64, A64], g)):
        assert a.shape == e.shape, name
        assert_close(a, e, tol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_low_precision_matches_cpu_op(dtype, gemm_order):
    A, B, lam, w = make_adapter(16, 256, 384, "random", torch.float32)
    W, b = make_base(256, 384, dtype)
    x = make_x((512,), 256, dtype)
    y_cpu = ops.linear(x, W, b, A, B, lam, w).double()
    y_gpu = ops.linear(x.cuda(), W.cuda(), b.cuda(), A.cuda(), B.cuda(), lam.cuda(), w.cuda()).double().cpu()
    assert rel_err(y_gpu, y_cpu) < 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("param_dtype", ["same", "fp32"])
def test_cuda_low_precision_within_2x_of_torch(dtype, param_dtype, gemm_order):
    """Forward and every gradient in bf16/fp16 (finalize_kernel with a low-precision M and Q), held to 2x the
    error PyTorch's own ops make in that dtype on the same device, as tests/test_ops.py does on the CPU."""
    in_f, out, r, n = 384, 320, 16, 256
    A, B, lam, w = make_adapter(r, in_f, out, "random", torch.float64, device="cuda")
    W, b = make_base(in_f, out, torch.float64, device="cuda")
    x = make_x((n,), in_f, torch.float64, device="cuda")
    g = torch.randn(n, out, generator=torch.Generator().manual_seed(9), dtype=torch.float64).cuda()

    def run(fn, x, W, b, A, B, lam, w, g):
        x, A, B, lam = [t.detach().clone().requires_grad_() for t in (x, A, B, lam)]
        y = fn(x, W, b, A, B, lam, w)
        return [y, *torch.autograd.grad(y, [x, A, B, lam], g.to(y.dtype))]

    args64 = (x, W, b, A, B, lam, w, g)
    budget = low_precision_budget(lambda *a: run(ref.linear_ref, *a), args64, dtype)
    exp = run(ref.linear_ref, *args64)
    pd = dtype if param_dtype == "same" else torch.float32
    got = run(ops.linear, x.to(dtype), W.to(dtype), b.to(dtype), A.to(pd), B.to(pd), lam.to(pd), w.to(pd),
              g.to(dtype))
    floor = 0.1 * torch.finfo(dtype).eps
    for name, gt, e, bud in zip(["y", "dx", "dA", "dB"], got, exp, budget):
        assert torch.isfinite(gt).all(), name
        err = rel_err(gt, e)
        assert err <= 2 * bud + floor, f"{name}: error {err:.3e} vs torch's own {bud:.3e} in {dtype}"
    # dλ = Σ_k gs_k / (r a_k b_k) is one scalar with cancellation between the k terms, so one sample of
    # torch's own error is a noisy yardstick (ours/torch ranged 0.1x..14x over seeds on the CPU op). Bound it
    # by the condition of the sum instead: |error| ≤ 2·eps·Σ_k |term_k| (ours and torch both stay under 1x).
    _, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None)
    terms = ((g.t() @ u) * B).sum(0) / (r * a.clamp_min(1e-4) * bn.clamp_min(1e-4))
    dlam_err = (got[4].double() - exp[4]).abs().item()
    limit = max(2 * budget[4] * exp[4].abs().item(), 2 * torch.finfo(dtype).eps * terms.abs().sum().item())
    assert torch.isfinite(got[4]).all() and dlam_err <= limit, f"dlam: error {dlam_err:.3e} > {limit:.3e}"
    assert got[2].dtype == pd and got[3].dtype == pd and got[4].dtype == pd


def test_cuda_dropout_mask_equals_cpu_and_reference():
    A, B, lam, w = make_adapter(3, 24, 10, "random", torch.float64)
    x = make_x((5, 7), 24, torch.float64)
    seed = torch.tensor([987654321], dtype=torch.int64)
    d_cpu = OPS.adapter_fwd(x, A, B, lam, w, 0.3, seed)[0]
    d_gpu = OPS.adapter_fwd(x.cuda(), A.cuda(), B.cuda(), lam.cuda(), w.cuda(), 0.3, seed.cuda())[0]
    keep = ref.dropout_keep_ref(987654321, x.shape, 0.3)
    assert_close(d_gpu, ref.adapter_ref(x, A, B, lam, w, keep, 0.3), TOL[torch.float64], "gpu")
    assert_close(d_gpu, d_cpu, TOL[torch.float64], "gpu vs cpu")


def test_cuda_dropout_forward_backward_equals_cpu():
    """linear_fwd/linear_bwd with dropout: the mask regenerated in backward (in place on G A') is the CPU's."""
    in_f, out, r, p = 300, 70, 6, 0.3
    A, B, lam, w = make_adapter(r, in_f, out, "random", torch.float64)
    W, b = make_base(in_f, out, torch.float64)
    x = make_x((4, 33), in_f, torch.float64)
    seed = torch.tensor([2**40 + 12345], dtype=torch.int64)
    results = []
    for dev in ("cpu", "cuda"):
        leaves = [t.to(dev).clone().requires_grad_() for t in (x, A, B, lam)]
        y = OPS.linear_fwd(leaves[0], W.to(dev), b.to(dev), *leaves[1:], w.to(dev), p, seed.to(dev))[0]
        results.append([y, *torch.autograd.grad(y, leaves, _grad_out(y))])
    for name, c, g in zip(["y", "dx", "dA", "dB", "dlam"], *results):
        assert_close(g, c, TOL[torch.float64], name)


@pytest.mark.parametrize("out,in_f", [(4097, 300), (2100, 4096)])  # one row block; three, the last partial
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_merge(out, in_f, wdtype, merge_kernel):
    A, B, lam, w = make_adapter(8, in_f, out, "random", torch.float32, device="cuda")
    W, _ = make_base(in_f, out, torch.float32, device="cuda")
    W = W.to(wdtype)
    merged = W.clone()
    OPS.merge_(merged, A, B, lam, w, 1.0)
    dW = ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
    exact = W.double() + dW
    if wdtype == torch.float32:
        assert rel_err(merged, exact) <= 1e-6
    else:
        # one rounding of the fp32-accumulated sum: at most half an ulp per element away from the fp64 result
        ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
        assert ((merged.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()
    assert_close(OPS.delta_weight(A, B, lam, w), dW, 1e-5, "delta_weight")
    OPS.merge_(merged, A, B, lam, w, -1.0)
    if wdtype == torch.float32:
        assert_close(merged, W, 1e-6, "unmerged")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("out,in_f", [(4097, 300), (70, 1)])
def test_cuda_merge_transposed_weight(out, in_f, wdtype, merge_kernel):
    """A Conv1D-style weight ((out, in) view of (in, out) storage) takes the kernel's swapped C/L/R path; in = 1
    takes it too. Several adapters in one pass (merge_many_) as well."""
    adapters = [make_adapter(r, in_f, out, "random", torch.float32, device="cuda", seed=r) for r in (5, 3)]
    W, _ = make_base(in_f, out, torch.float32, device="cuda")
    W = W.to(wdtype)
    for many in (False, True):
        view = W.new_empty((in_f, out)).copy_(W.t()).t()  # own storage (W.t().contiguous() aliases W at in = 1)
        assert view.stride(0) == 1
        if many:
            OPS.merge_many_(view, *[list(t) for t in zip(*adapters)], [1.0, -0.5])
            exact = W.double() + sum(al * ref.delta_weight_ref(*[t.double() for t in ad])
                                     for ad, al in zip(adapters, (1.0, -0.5)))
        else:
            OPS.merge_(view, *adapters[0], 1.0)
            exact = W.double() + ref.delta_weight_ref(*[t.double() for t in adapters[0]])
        ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
        assert ((view.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all(), f"many={many}"


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["aligned", "offset1", "offset8", "ragged"])
def test_cuda_merge_vector_and_scalar_paths(layout, wdtype, merge_kernel):
    """merge_kernel's 16-byte vector path (aligned rows, columns a multiple of the vector width) and its scalar
    path (a weight slice starting 1 or 8 elements into its storage, a row length that is not a multiple of the
    width) give the same one-rounding result; r = 70 spans three rank chunks of the kernel (32 + 32 + 6)."""
    out, in_f = 300, 4096 if layout != "ragged" else 4093
    A, B, lam, w = make_adapter(70, in_f, out, "random", torch.float32, device="cuda", seed=3)
    W, _ = make_base(in_f, out, torch.float32, device="cuda")
    W = W.to(wdtype)
    off = {"offset1": 1, "offset8": 8}.get(layout, 0)
    store = torch.zeros(out, in_f + 16, device="cuda", dtype=wdtype)
    view = store[:, off:off + in_f]
    view.copy_(W)
    OPS.merge_(view, A, B, lam, w, 1.0)
    exact = W.double() + ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
    ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
    assert ((view.double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()
    untouched = torch.ones(out, in_f + 16, dtype=torch.bool, device="cuda")
    untouched[:, off:off + in_f] = False
    assert torch.all(store[untouched] == 0), "wrote outside the weight"
    # the same result as the aligned, contiguous weight (vector path) bit for bit: one accumulation order
    dense = W.clone()
    OPS.merge_(dense, A, B, lam, w, 1.0)
    assert torch.equal(dense, view)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("out,in_f,r,adtype", [(4096, 4096, 32, torch.float32), (1000, 2050, 200, torch.float32),
                                               (8192, 4096, 200, torch.float32), (4097, 300, 8, torch.float32),
                                               (3000, 8, 3, torch.float32), (4096, 4096, 32, torch.float64)],
                         ids=["4096-32", "ragged-r200", "passes-r200", "4097", "in8", "fp64-adapters"])
def test_cuda_merge_kernels_bit_identical(out, in_f, r, adtype, wdtype):
    """The tiled merge kernel (R's strip in shared memory, blocks of several passes; r = 200 is staged in chunks,
    re-staged every pass at 8192 rows; fp64 adapters accumulate in double) gives the rows kernel's result bit for
    bit, and that result is one rounding of the exact sum."""
    A, B, lam, w = make_adapter(r, in_f, out, "random", adtype, device="cuda", seed=5)
    W, _ = make_base(in_f, out, torch.float32, device="cuda")
    W = W.to(wdtype)
    results = {}
    for kernel in ("rows", "tiled"):
        with tuned(merge_kernel=kernel):
            results[kernel] = W.clone()
            OPS.merge_(results[kernel], A, B, lam, w, 1.0)
    assert torch.equal(results["rows"], results["tiled"])
    exact = W.double() + ref.delta_weight_ref(A.double(), B.double(), lam.double(), w.double())
    ulp = torch.finfo(wdtype).eps * exact.abs().clamp_min(torch.finfo(wdtype).tiny)
    assert ((results["tiled"].double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [1, 7, 16])
@pytest.mark.parametrize("in_f,out,r", [(7, 4097, 1), (4096, 4096, 32), (300, 200, 129)])
@pytest.mark.parametrize("kind", ["random", "zeroB", "clamped"])
def test_cuda_small_n_forward(dtype, n, in_f, out, r, kind):
    """The small-N forward (2 launches) against the general path and the fp64 reference: s and the norms bit for
    bit (prep's reduction), y and u as close to the reference as the general path's, the exact base output at
    B = 0, and gradients through the saved u."""
    A, B, lam, w = make_adapter(r, in_f, out, kind, torch.float32, device="cuda", seed=n)
    W, b = make_base(in_f, out, dtype, device="cuda")
    x = make_x((n,), in_f, dtype, device="cuda")
    outs = {}
    for mode in ("off", "on", "overlap"):
        with tuned(small_n=mode):
            outs[mode] = [OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None), OPS.adapter_fwd(x, A, B, lam, w, 0.0, None)]
    # overlap runs the same kernels, the u launch on a side stream concurrent with the base GEMM: bit-identical.
    for got, want in zip(outs["overlap"][0] + outs["overlap"][1], outs["on"][0] + outs["on"][1]):
        assert torch.equal(got, want)
    (y_off, u_off, *norms_off), (d_off, *_) = outs["off"]
    (y_on, u_on, *norms_on), (d_on, ud_on, *_) = outs["on"]
    for name, p, q in zip(["s", "a", "b"], norms_off, norms_on):
        assert torch.equal(p, q), name
    assert torch.equal(u_on, ud_on)
    W64, b64, A64, B64, l64, w64, x64 = [t.double() for t in (W, b, A, B, lam, w, x)]
    y64 = ref.linear_ref(x64, W64, b64, A64, B64, l64, w64)
    d64 = ref.adapter_ref(x64, A64, B64, l64, w64)
    u64 = x64 @ (A64 * w64).t()
    floor = torch.finfo(dtype).eps
    for name, on, off, exp in [("y", y_on, y_off, y64), ("u", u_on, u_off, u64), ("delta", d_on, d_off, d64)]:
        assert torch.isfinite(on).all(), name
        assert rel_err(on, exp) <= 2 * rel_err(off, exp) + floor, f"{name}: {rel_err(on, exp):.2e} vs {rel_err(off, exp):.2e}"
    if kind == "zeroB":
        assert torch.equal(y_on, torch.nn.functional.linear(x, W, b))
    # Gradients through the saved u (dA, dB, dλ depend on it via M = gᵀu; dx does not): each path against the
    # fp64 reference, the small-N one within 2x of the general one's error (+ a floor: one u element can dominate
    # dB where s is large, and dλ is a cancelling sum).
    grads = {}
    for mode in ("off", "on"):
        with tuned(small_n=mode):
            leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
            y = ops.linear(leaves[0], W, b, *leaves[1:], w)
            grads[mode] = torch.autograd.grad(y, leaves, _grad_out(y))
    leaves64 = [t.detach().clone().requires_grad_() for t in (x64, A64, B64, l64)]
    y64 = ref.linear_ref(leaves64[0], W64, b64, *leaves64[1:], w64)
    grads64 = torch.autograd.grad(y64, leaves64, _grad_out(y64).double())
    assert torch.equal(grads["on"][0], grads["off"][0]), "dx does not depend on u"
    for name, gn, go, ge in zip(["dx", "dA", "dB", "dlam"], grads["on"], grads["off"], grads64):
        assert torch.isfinite(gn).all(), name
        lim = 2 * rel_err(go, ge) + 4 * floor + (1e-5 if name == "dlam" else 0)
        assert rel_err(gn, ge) <= lim, f"{name}: {rel_err(gn, ge):.2e} vs general path {rel_err(go, ge):.2e}"


def test_cuda_merge_captured_in_graph(merge_kernel):
    """merge_/unmerge captured in a CUDA graph (no host sync, no attribute call at capture: the tiled kernel's
    shared-memory opt-in is made once, on the first eager call) replay to the eager result, r = 70 > 48 KiB."""
    A, B, lam, w = make_adapter(70, 4096, 1024, "random", torch.float32, device="cuda", seed=2)
    W, _ = make_base(4096, 1024, torch.bfloat16, device="cuda")
    eager = W.clone()
    OPS.merge_(eager, A, B, lam, w, 1.0)
    target = W.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        OPS.merge_(target, A, B, lam, w, 1.0)
        OPS.merge_(target, A, B, lam, w, -1.0)
    torch.cuda.current_stream().wait_stream(s)
    target.copy_(W)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        OPS.merge_(target, A, B, lam, w, 1.0)
    target.copy_(W)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(target, eager)


def test_cuda_merge_is_in_place_on_views():
    A, B, lam, w = make_adapter(2, 8, 6, device="cuda")
    W, _ = make_base(8, 6, device="cuda")
    big = torch.zeros(6, 16, device="cuda")
    view = big[:, ::2]
    view.copy_(W)
    OPS.merge_(view, A, B, lam, w, 1.0)
    assert_close(big[:, ::2], ref.merge_ref(W, A, B, lam, w), TOL[torch.float32], "strided merge")
    assert torch.all(big[:, 1::2] == 0)


def test_cuda_opcheck(small_n):
    A, B, lam, w = make_adapter(3, 10, 6, "random", torch.float32, device="cuda")
    W, b = make_base(10, 6, device="cuda")
    x = make_x((2, 5), 10, device="cuda")
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
    torch.library.opcheck(OPS.linear_fwd.default, (leaves[0], W, b, *leaves[1:], w, 0.0, None))
    torch.library.opcheck(OPS.linear_fwd.default, (leaves[0], W, None, *leaves[1:], w, 0.25, seed))
    torch.library.opcheck(OPS.adapter_fwd.default, (leaves[0], *leaves[1:], w, 0.25, seed))
    torch.library.opcheck(OPS.prep.default, (A, B, lam, w))
    torch.library.opcheck(OPS.delta_weight.default, (A, B, lam, w))
    torch.library.opcheck(OPS.merge_.default, (W.clone(), A, B, lam, w, 1.0))
    _, u, s, a, bn = OPS.linear_fwd(x, W, b, A, B, lam, w, 0.0, None)
    g = torch.randn(2, 5, 6, device="cuda")
    torch.library.opcheck(OPS.linear_bwd.default,
                          (g, x, W, A, B, lam, w, u, s, a, bn, 0.0, None, [True, True, True, True]))
    torch.library.opcheck(OPS.linear_bwd.default,
                          (g, x, None, A, B, lam, w, u, s, a, bn, 0.0, None, [False, True, False, True]))


def test_cuda_deterministic_run_to_run():
    """Fixed-order block reductions: two runs give bitwise-identical outputs and gradients."""
    A, B, lam, w = make_adapter(32, 1000, 700, "random", torch.float32, device="cuda")
    W, b = make_base(1000, 700, torch.bfloat16, device="cuda")
    x = make_x((513,), 1000, torch.bfloat16, device="cuda")
    outs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
        y = ops.linear(leaves[0], W, b, *leaves[1:], w)
        outs.append([y, *torch.autograd.grad(y, leaves, _grad_out(y)), *ops.prep(A, B, lam, w)])
    for i, (p, q) in enumerate(zip(*outs)):
        assert torch.equal(p, q), f"output {i} differs between runs"


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_cuda_no_host_sync(dropout_p, gemm_order):
    """No launcher synchronises with the host (λ and the seed are read on the device): forward and backward
    run under torch.cuda.set_sync_debug_mode('error')."""
    A, B, lam, w = make_adapter(8, 64, 48, "random", torch.float32, device="cuda")
    W, b = make_base(64, 48, torch.bfloat16, device="cuda")
    x = make_x((32,), 64, torch.bfloat16, device="cuda").requires_grad_()
    leaves = [x, *[t.requires_grad_() for t in (A, B, lam)]]
    ops.linear(x, W, b, A, B, lam, w, dropout_p)  # warm-up: lazy cuBLAS/handle set-up may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ops.linear(x, W, b, A, B, lam, w, dropout_p)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        d = ops.adapter(x, A, B, lam, w, dropout_p)
        torch.autograd.grad(d, leaves, torch.ones_like(d))
        OPS.merge_(W, A, B, lam, w, 1.0)
        OPS.merge_(W, A, B, lam, w, -1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(t).all() for t in grads)


def test_cuda_autocast_bf16_keeps_adapter_fp32():
    A, B, lam, w = make_adapter(4, 32, 24, device="cuda")
    W, b = make_base(32, 24, device="cuda")
    x = make_x((16,), 32, device="cuda").requires_grad_()
    for t in (A, B, lam):
        t.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ops.linear(x, W, b, A, B, lam, w)
    assert y.dtype == torch.bfloat16
    got = torch.autograd.grad(y.float().sum(), [x, A, B, lam])
    assert all(t.dtype == torch.float32 for t in got)
    y32 = ref.linear_ref(x, W, b, A, B, lam, w)
    exp = torch.autograd.grad(y32.sum(), [x, A, B, lam])
    assert rel_err(y, y32) < 2e-2
    for name, gt, e in zip(["dx", "dA", "dB", "dlam"], got, exp):
        assert rel_err(gt, e) < 3e-2, name


def test_cuda_layer_two_adapters_bf16_matches_reference(native_cuda_layers, monkeypatch):
    """DeLoRALinear on a bf16 base with fp32 adapters: the native path (linear_fwd for the first adapter,
    adapter_fwd for the second) against the same layer on the reference path; then merge/unmerge."""
    torch.manual_seed(0)
    layer = delora_ext.DeLoRALinear(torch.nn.Linear(320, 192).cuda().to(torch.bfloat16), r=8, init_weights=False)
    layer.update_layer("second", r=4, delora_lambda=3.0, init_weights=False)
    layer.set_adapter(["default", "second"])
    x = torch.randn(3, 50, 320, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == 6 and all(p.dtype == torch.float32 for p in params)

    def run():
        y = layer(x)
        return [y, *torch.autograd.grad(y, [x, *params], _grad_out(y))]

    native = run()
    monkeypatch.setattr(ops, "CUDA_LAYERS_NATIVE", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no native kernel ... using the PyTorch reference"
        reference = run()
    monkeypatch.setattr(ops, "CUDA_LAYERS_NATIVE", True)
    for i, (n, r_) in enumerate(zip(native, reference)):
        assert n.dtype == r_.dtype and n.shape == r_.shape, i
        tol = 6e-2 if n.numel() == 1 else 2e-2  # dλ: one scalar, a sum with cancellation between the k terms
        assert rel_err(n, r_) < tol, f"output {i}: {rel_err(n, r_):.2e}"

    W0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y_unmerged = layer(x)
        layer.merge()
        y_merged = layer(x)
        layer.unmerge()
    assert rel_err(y_merged, y_unmerged) < 2e-2
    assert rel_err(layer.base_layer.weight, W0) < 1e-2


def test_cuda_graph_captured_training_step(native_cuda_layers, gemm_order, small_n):
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


def test_cuda_graph_captured_bf16_inference_forward(native_cuda_layers, small_n):
    """The decode-time use: a bf16 no-grad forward captured once and replayed on new inputs."""
    torch.manual_seed(1)
    layer = delora_ext.DeLoRALinear(torch.nn.Linear(512, 384).cuda().to(torch.bfloat16), r=16,
                                    init_weights=False).eval()
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                layer(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = layer(x)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            g.replay()
            torch.cuda.synchronize()
            assert_close(y, layer(x), 1e-2, "graph replay vs eager")
