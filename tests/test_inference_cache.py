"""The folded-factor cache of inference forwards (delora_ext.inference): the cached forward computes the native op's
exact result, every way an adapter tensor can change invalidates it, and it stays correct under torch.compile,
torch.inference_mode, autocast and threads. ``inference_cache = False`` (the op on every call) is the reference for
bit equality; the fp64 reference for the values."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear
from delora_ext import reference as ref

from helpers import TOL, assert_close, requires_cuda, requires_native, tuned
from tiny_models import one_thread  # noqa: F401  (fixture)

pytestmark = [requires_native, pytest.mark.usefixtures("gemm_path")]

CACHE = "_fold_cache"


def _layer(in_f=48, out=40, r=4, init=False, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = DeLoRALinear(nn.Linear(in_f, out, bias=bias).to(dtype), r=r, init_weights=init).eval()
    if init == "paper":  # move A, B away from their frozen copies so that the update is not zero
        with torch.no_grad():
            layer.delora_A["default"].mul_(1.5)
            layer.delora_B["default"].add_(0.3)
    return layer


def _uncached(layer, x, **kw):
    """The layer's output with the cache off: the native op on this call."""
    layer.inference_cache = False
    try:
        with torch.no_grad():
            return layer(x, **kw)
    finally:
        layer.inference_cache = True


def _cached(layer, x):
    with torch.no_grad():
        return layer(x)


def _expected64(layer, x):
    """fp64 reference: base + every active adapter term, paper init's frozen term with −λ₀."""
    b = layer.base_layer
    W = b.weight.t() if type(b).__name__ == "Conv1D" else b.weight
    y = torch.nn.functional.linear(x.double(), W.double(), None if b.bias is None else b.bias.double())
    for n in layer.active_adapters:
        A, B, lam, w = (t.double() for t in layer._params(n))
        y = y + ref.adapter_ref(x.double(), A, B, lam, w)
        if n in layer.delora_A0:
            A0, B0, lam0, _ = (t.double() for t in layer._params0(n))
            y = y - ref.adapter_ref(x.double(), A0, B0, lam0, w)
    return y


def _entries(layer):
    return layer.__dict__.get(CACHE, {})


# ---- the cached forward is the op's result, bit for bit ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("init", [False, "paper"])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 7), "strided", (0,)], ids=str)
def test_cached_forward_equals_the_op_bitwise(dtype, init, shape):
    layer = _layer(init=init, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    if shape == "strided":
        x = torch.randn(6, 96, generator=g).to(dtype)[:, ::2]
    else:
        x = torch.randn(*shape, 48, generator=g).to(dtype)
    y = _cached(layer, x)
    assert _entries(layer), "the forward did not use the cache"
    assert torch.equal(y, _uncached(layer, x))
    assert torch.equal(_cached(layer, x), y), "a cache hit differs from the miss"
    if dtype in (torch.float32, torch.float64):
        assert_close(y, _expected64(layer, x), TOL[torch.float32], "cached vs fp64 reference")


def test_fp16_split_scale_keeps_pefts_exact_zero_at_init():
    """B = 0 (PEFT's init) makes s ~ 1e4·λ/r: B⊙s whole overflows nothing only with the split scale (as the op)."""
    layer = _layer(init=True, dtype=torch.float16, r=1)
    x = torch.randn(4, 48).half()
    y = _cached(layer, x)
    assert torch.isfinite(y).all()
    assert torch.equal(y, layer.base_layer(x).detach())


@pytest.mark.parametrize("kind", ["two_adapters", "conv1d", "no_bias", "forward_hook", "pre_hook", "instance_forward"])
def test_cached_forward_equals_the_op_for_every_layer_kind(kind):
    import functools
    layer = _layer(bias=kind != "no_bias")
    if kind == "two_adapters":
        layer.update_layer("b", 3, init_weights=False)
        layer.set_adapter(["default", "b"])
    elif kind == "conv1d":
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        layer = DeLoRALinear(transformers.pytorch_utils.Conv1D(40, 48), r=4, init_weights=False).eval()
    elif kind == "forward_hook":
        layer.base_layer.register_forward_hook(lambda mod, args, out: out * 2)
    elif kind == "pre_hook":
        layer.base_layer.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
    elif kind == "instance_forward":  # accelerate's add_hook_to_module
        old = layer.base_layer.forward
        layer.base_layer.forward = functools.partial(lambda module, *a: old(*a) - 0.5, layer.base_layer)
    x = torch.randn(2, 5, 48)
    y = _cached(layer, x)
    assert _entries(layer)
    assert torch.equal(y, _uncached(layer, x))
    if kind in ("two_adapters", "conv1d", "no_bias"):
        assert_close(y, _expected64(layer, x), TOL[torch.float32], kind)


def test_accelerate_offload_hook_on_the_base_layer():
    """accelerate's cpu_offload on the base layer replaces its forward and keeps its weight on the meta device
    between calls (moved in for each forward): the layer calls it as it is and adds the cached adapter term."""
    accelerate = pytest.importorskip("accelerate")
    layer = _layer()
    x = torch.randn(3, 48)
    expected = _uncached(layer, x)
    accelerate.cpu_offload(layer.base_layer, execution_device=torch.device("cpu"))
    assert layer.base_layer.weight.device.type == "meta"
    first, second = _cached(layer, x), _cached(layer, x)
    assert _entries(layer)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


@pytest.mark.parametrize("grad", [False, True])
def test_accelerate_offload_of_a_whole_model_needs_delora_layers_preloaded(grad):
    """cpu_offload of a whole patched model puts the adapters' ParameterDicts on the meta device too, and those
    modules are never called, so their hooks never load them: the forward says so and names accelerate's remedy,
    preload_module_classes=["DeLoRALinear"], with which the offloaded model computes what it did before."""
    accelerate = pytest.importorskip("accelerate")
    x = torch.randn(3, 8, requires_grad=grad)

    def model():
        torch.manual_seed(0)
        return delora_ext.patch(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), target_modules=["0", "2"],
                                r=2, init_weights=False).eval()

    with torch.set_grad_enabled(grad):
        expected = model()(x)
        bare = model()
        accelerate.cpu_offload(bare, execution_device=torch.device("cpu"))
        with pytest.raises(RuntimeError, match=r"meta device.*preload_module_classes=\['DeLoRALinear'\]"):
            bare(x)
        ok = model()
        accelerate.cpu_offload(ok, execution_device=torch.device("cpu"), preload_module_classes=["DeLoRALinear"])
        assert ok[0].delora_A["default"].is_meta  # offloaded between calls
        torch.testing.assert_close(ok(x), expected, rtol=0, atol=0)


# ---- when the cache applies ---------------------------------------------------------------------------------
def test_grad_mode_uses_the_op_and_keeps_gradients():
    layer = _layer()
    x = torch.randn(3, 48, requires_grad=True)
    y = layer(x)
    assert y.requires_grad and y.grad_fn is not None and not _entries(layer)
    y.square().sum().backward()
    assert layer.delora_A["default"].grad is not None and x.grad is not None


def test_training_mode_with_dropout_under_no_grad_still_drops():
    layer = _layer()
    layer.module_dropout["default"] = 0.5
    layer.train()
    x = torch.randn(4, 48)
    torch.manual_seed(3)
    with torch.no_grad():
        y = layer(x)
    assert not _entries(layer), "dropout is not a cached computation"
    torch.manual_seed(3)
    assert torch.equal(y, _uncached(layer, x)), "the same seed gives the op's mask"
    layer.eval()
    assert not torch.equal(y, _cached(layer, x)), "eval drops nothing"


def test_autocast_runs_the_op():
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        layer.inference_cache = False
        y_op = layer(x)
        layer.inference_cache = True
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_op)
    assert not _entries(layer)


def test_inference_cache_false_never_stores():
    layer = _layer()
    layer.inference_cache = False
    with torch.no_grad():
        layer(torch.randn(2, 48))
    assert not _entries(layer)


# ---- invalidation ------------------------------------------------------------------------------------------
def _adamw_step(layer):
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(3, 48)).square().sum().backward()
    opt.step()


def _replace_param(layer):
    layer.delora_B["default"] = nn.Parameter(torch.randn(40, 4))


def _set_data(layer):
    layer.delora_A["default"].data = torch.randn(4, 48)


def _load_state(layer):
    sd = {k: v + 0.25 for k, v in layer.state_dict().items() if "delora_" in k}
    layer.load_state_dict(sd, strict=False)


def _copy_lambda(layer):
    with torch.no_grad():
        layer.delora_lambda["default"].copy_(torch.tensor([3.0]))


def _edit_w(layer):
    with torch.no_grad():
        layer.delora_w_norm["default"].mul_(2.0)


def _double(layer):
    layer.double()


def _edit_frozen(layer):
    with torch.no_grad():
        layer.delora_B0["default"].add_(1.0)


def _set_adapter(layer):
    layer.update_layer("other", 2, init_weights=False, activate=False)
    layer.set_adapter("other")


def _delete_and_recreate(layer):
    """Same name, new tensors (a stale entry for the name must not survive)."""
    layer.delete_adapter("default")
    layer.update_layer("default", 4, init_weights=False)


def _merge(layer):
    layer.merge()


def _inplace_in_inference_mode(layer):
    with torch.inference_mode():
        layer.delora_A["default"].add_(0.5)


CHANGES = [_adamw_step, _replace_param, _set_data, _load_state, _copy_lambda, _edit_w, _double, _edit_frozen,
           _set_adapter, _delete_and_recreate, _merge, _inplace_in_inference_mode]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_every_change_of_an_adapter_tensor_invalidates(change):
    layer = _layer(init="paper")
    x = torch.randn(3, 48)
    before = _cached(layer, x)
    assert _entries(layer)
    change(layer.train() if change is _adamw_step else layer)
    layer.eval()
    x = x.to(layer.base_layer.weight.dtype)
    after = _cached(layer, x)
    assert torch.equal(after, _uncached(layer, x)), "stale cached factors"
    assert not torch.equal(after, before.to(after.dtype)), "the change changes the output"


def test_writes_through_data_need_clear_inference_cache():
    layer = _layer()
    x = torch.randn(3, 48)
    _cached(layer, x)
    layer.delora_B["default"].data.add_(1.0)  # bypasses the version counter, as autograd's .data does
    delora_ext.clear_inference_cache(layer)
    assert torch.equal(_cached(layer, x), _uncached(layer, x))


def test_deleted_adapters_leave_the_cache():
    layer = _layer()
    layer.update_layer("b", 2, init_weights=False)
    layer.set_adapter(["default", "b"])
    x = torch.randn(2, 48)
    _cached(layer, x)
    assert {k[0] for k in _entries(layer)} == {"default", "b"}
    layer.delete_adapter("b")
    with torch.no_grad():
        layer.delora_A["default"].add_(1.0)  # the next miss prunes
    _cached(layer, x)
    assert {k[0] for k in _entries(layer)} == {"default"}


def test_one_entry_per_dtype_and_clear_for_a_model():
    model = delora_ext.patch(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), target_modules=["0", "1"], r=2,
                             init_weights=False).eval()
    with torch.no_grad():
        model(torch.randn(2, 8))
        model.double()
        model(torch.randn(2, 8, dtype=torch.float64))
    layers = [m for m in model.modules() if isinstance(m, DeLoRALinear)]
    assert all({k[1] for k in _entries(m)} == {torch.float64} for m in layers), "the stale fp32 entries stayed"
    delora_ext.clear_inference_cache(model)
    assert not any(_entries(m) for m in layers)


def test_deepcopy_of_a_cached_layer_follows_the_copy():
    layer = _layer()
    x = torch.randn(3, 48)
    _cached(layer, x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.delora_B["default"].add_(1.0)
    assert torch.equal(_cached(twin, x), _uncached(twin, x))
    assert torch.equal(_cached(layer, x), _uncached(layer, x))


# ---- inference_mode ----------------------------------------------------------------------------------------
def test_inference_mode_entries_are_shared_with_no_grad():
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.inference_mode():
        y_inf = layer(x)
    assert _entries(layer), "inference_mode uses the cache"
    with torch.no_grad():
        y_ng = layer(x)  # the factors made in inference mode, read outside it
    assert torch.equal(y_inf, y_ng) and torch.equal(y_ng, _uncached(layer, x))
    with torch.inference_mode():
        layer.delora_lambda["default"].mul_(-1.0)  # a version bump inside inference mode
        y_new = layer(x)
    assert torch.equal(y_new, _uncached(layer, x)) and not torch.equal(y_new, y_inf)


def test_w_computed_in_inference_mode_falls_back_to_the_op():
    """A model built on the meta device computes w at its first forward; inside inference_mode that w is an
    inference tensor, which has no version counter: such a layer runs the op instead of a cache it cannot stamp."""
    real = _layer()
    with torch.device("meta"):
        meta = DeLoRALinear(nn.Linear(48, 40), r=4, init_weights=False)
    meta.to_empty(device="cpu")
    with torch.no_grad():
        real_sd = real.state_dict()
        for n, t in meta.state_dict(keep_vars=True).items():
            if "delora_w_norm" not in n:
                t.copy_(real_sd[n])
    meta.eval()
    x = torch.randn(3, 48)
    with torch.inference_mode():
        y = meta(x)
    assert torch.is_inference(meta.delora_w_norm["default"])
    assert torch.equal(y, _cached(real, x))
    with torch.inference_mode():
        assert torch.equal(meta(x), y)


# ---- torch.compile -----------------------------------------------------------------------------------------
def test_compiled_inference_follows_parameter_updates():
    """Under torch.compile the graph calls the op (nothing is cached at trace time), so a compiled forward sees an
    in-place update without recompiling."""
    torch._dynamo.reset()
    layer = _layer()
    x = torch.randn(3, 48)
    compiled = torch.compile(layer, fullgraph=True)
    try:
        with torch.no_grad():
            y0 = compiled(x)
            assert torch.equal(y0, _uncached(layer, x)) or torch.allclose(y0, _uncached(layer, x), rtol=1e-6,
                                                                            atol=1e-6)
            layer.delora_B["default"].add_(1.0)
            y1 = compiled(x)
        assert_close(y1, _expected64(layer, x), TOL[torch.float32], "compiled after update")
        assert not torch.allclose(y0, y1)
    finally:
        torch._dynamo.reset()


# ---- threads -----------------------------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_threads_filling_and_reading_the_cache_agree_with_serial():
    """Threads race on a cold cache, then on one invalidated by an update between rounds: every result equals the
    op's for the parameters of its round."""
    layer = _layer(init="paper")
    layer.update_layer("b", 3, init_weights=False)
    layer.set_adapter(["default", "b"])
    xs = [torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    n_threads, rounds = 4, 3
    barrier = threading.Barrier(n_threads + 1)
    got = [[None] * len(xs) for _ in range(rounds)]
    errors = []

    def worker(t):
        # one intra-op thread here too (each thread has its own OpenMP setting): the serial expectation is
        # computed with one, and a GEMM split over two threads may round differently
        torch.set_num_threads(1)
        try:
            for rnd in range(rounds):
                barrier.wait()
                for i in range(t, len(xs), n_threads):
                    with torch.no_grad():
                        for _ in range(5):
                            got[rnd][i] = layer(xs[i])
                barrier.wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    expected = []
    for _ in range(rounds):
        expected.append([_uncached(layer, x) for x in xs])
        barrier.wait()  # the round runs
        barrier.wait()  # the round is done
        with torch.no_grad():
            layer.delora_A["b"].add_(0.1)
            layer.delora_lambda["default"].add_(1.0)
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for rnd in range(rounds):
        for i, (a, b) in enumerate(zip(got[rnd], expected[rnd])):
            assert torch.equal(a, b), f"round {rnd}, input {i}"


# ---- CUDA (run by the GPU check) -------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_cached_forward_equals_the_op(dtype):
    layer = _layer(init="paper", dtype=dtype).cuda()
    x = torch.randn(4, 5, 48, device="cuda").to(dtype)
    y = _cached(layer, x)
    assert _entries(layer)
    tol = 0 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, _uncached(layer, x), rtol=tol, atol=tol)


@requires_cuda
def test_cuda_graph_capture_does_not_read_the_cache():
    """A CUDA graph captured around an eval forward recomputes the factors inside the graph (the cache is bypassed
    while capturing), so replays follow in-place parameter updates and never read tensors the cache dropped."""
    layer = _layer().cuda()
    x = torch.randn(4, 48, device="cuda")
    with torch.no_grad():
        layer(x)  # a warm cache entry exists before the capture
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        for _step in range(3):
            layer.delora_B["default"].add_(0.5)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(y, _uncached(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", [False, "paper"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_forward_agrees_with_the_fused_cpu_op_to_rounding(dtype, init):
    """With the default switches a small CPU layer's op takes the fused pass (other rounding order than the cache's
    GEMMs): the two agree to a few units of rounding, and both with the fp64 reference."""
    layer = _layer(init=init, dtype=dtype)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    with tuned(cpu_fused="on"):
        y = _cached(layer, x)
        y_op = _uncached(layer, x)
    assert _entries(layer), "the forward did not use the cache"
    assert_close(y, y_op, 1e-6 if dtype == torch.float32 else 1e-14, "cached vs the fused op")
    assert_close(y, _expected64(layer, x), TOL[torch.float32], "cached vs fp64 reference")
