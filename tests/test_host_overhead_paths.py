"""What a forward costs the host, counted (not timed): dispatcher calls per layer and direction, no dropout seed
without dropout, no nn.Module.__getattr__ on the forward path; and the paths that keep it small still compute what
they did: paper init's frozen term in training, meta-device w, hooks on the layer itself, and the patched model
under torch.compile(mode="reduce-overhead") for a training step and an inference forward (on CPU here; on CUDA,
CUDA graphs, by the GPU check)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import delora_ext
from delora_ext import DeLoRALinear
from delora_ext import reference as ref

from helpers import TOL, assert_close, rel_err, requires_cuda, requires_native
from tiny_models import build, one_thread  # noqa: F401  (one_thread: autouse fixture)

pytestmark = [requires_native, pytest.mark.usefixtures("gemm_path")]



class _CountOps(TorchDispatchMode):
    """Every op that reaches the dispatcher's Python key, by name (a custom op counts once; the ATen calls its
    kernel makes inside are not seen)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func.namespace}::{func.overloadpacket.__name__}"
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _layer(init=False, dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = DeLoRALinear(nn.Linear(48, 40).to(dtype), r=4, init_weights=init, module_dropout=dropout)
    if init == "paper":
        with torch.no_grad():
            layer.delora_A["default"].mul_(1.5)
    return layer


# ---- dispatcher calls --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_step_is_one_native_op_per_direction(dropout):
    layer = _layer(dropout=dropout).train()
    x = torch.randn(3, 48, requires_grad=True)
    with _CountOps() as fwd:
        y = layer(x)
    with _CountOps() as bwd:
        y.backward(torch.randn_like(y))
    assert fwd.counts == ({"delora_ext::linear_fwd": 1} if dropout == 0 else
                          {"delora_ext::linear_fwd": 1, "aten::randint": 1}), fwd.counts
    assert bwd.counts.get("delora_ext::linear_bwd") == 1 and not any(k.startswith("delora_ext::prep")
                                                                    for k in bwd.counts), bwd.counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paper_init_frozen_term_needs_no_second_native_op_in_training(dtype):
    """The frozen initial update is a constant low-rank term: from cached factors it is two GEMMs (autograd
    differentiates them in x), not a second native forward with its own preparation pass. fp16 keeps the op
    (its backward splits the scale differently)."""
    layer = _layer(init="paper", dtype=dtype).train()
    x = torch.randn(3, 48, dtype=dtype, requires_grad=True)
    layer(x)  # fills the frozen term's cache entry
    with _CountOps() as fwd:
        layer(x)
    c = fwd.counts
    assert c.get("delora_ext::linear_fwd") == 1
    if dtype == torch.float32:
        assert "delora_ext::adapter_fwd" not in c and "delora_ext::prep" not in c and c.get("aten::mm") == 2, c
    else:
        assert c.get("delora_ext::adapter_fwd") == 1, c


def test_paper_init_training_gradients_match_the_op_path_and_the_reference():
    layer = _layer(init="paper").train()
    x = torch.randn(2, 5, 48, requires_grad=True)
    g = torch.randn(2, 5, 40)
    params = [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], g)
    layer.inference_cache = False
    y_op = layer(x)
    grads_op = torch.autograd.grad(y_op, [x, *params], g)
    layer.inference_cache = True
    assert torch.equal(y, y_op)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    b = layer.base_layer
    w = layer.delora_w_norm["default"].double()
    A0, B0, lam0, _ = (t.double() for t in layer._params0("default"))
    y64 = (ref.linear_ref(x64, b.weight.double(), b.bias.double(), *p64, w) - ref.adapter_ref(x64, A0, B0, lam0, w))
    grads64 = torch.autograd.grad(y64, [x64, *p64], g.double())
    for name, a, o, e in zip(["x", "A", "B", "lambda"], grads, grads_op, grads64):
        assert_close(a, o, 1e-6, f"d{name} vs the op path")
        assert_close(a, e, TOL[torch.float32], f"d{name} vs fp64 reference")


def test_cached_eval_forward_is_three_gemms():
    layer = _layer().eval()
    x = torch.randn(4, 48)
    with torch.no_grad():
        layer(x)
        with _CountOps() as ops:
            layer(x)
    gemms = {k: v for k, v in ops.counts.items() if k in ("aten::addmm", "aten::mm", "aten::addmm_")}
    assert gemms == {"aten::addmm": 1, "aten::mm": 1, "aten::addmm_": 1}, ops.counts
    assert not any(k.startswith("delora_ext::") for k in ops.counts), ops.counts
    assert sum(ops.counts.values()) <= 4, ops.counts  # + F.linear's weight transpose


def test_forward_does_not_go_through_module_getattr(monkeypatch):
    """Each nn.Module.__getattr__ (submodules, ParameterDict entries, the base weight) is a Python call; the forward
    reads containers directly, in training and in the cached eval path."""
    layer = _layer().train()
    x = torch.randn(3, 48, requires_grad=True)
    layer(x)
    calls = []
    original = nn.Module.__getattr__

    def counting(self, name):
        calls.append(name)
        return original(self, name)

    monkeypatch.setattr(nn.Module, "__getattr__", counting)
    layer(x).sum().backward()
    train_calls = list(calls)
    layer.eval()
    with torch.no_grad():
        layer(x)
        calls.clear()
        layer(x)
    assert train_calls == [] and calls == [], (train_calls, calls)


# ---- the direct entry points and the backward node ----------------------------------------------------------
def _value_and_grads(y, layer, x, g):
    params = [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
    return (y, *torch.autograd.grad(y, [x, *params], g))


@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_direct_entry_matches_the_torch_ops_call_bit_for_bit(shape, dropout, bias):
    """ops.linear / ops.adapter call the op through _C.linear / _C.adapter (the typed dispatcher handle, y alone);
    the outputs and every gradient equal torch.ops' call of the same op."""
    torch.manual_seed(1)
    layer = DeLoRALinear(nn.Linear(48, 40, bias=bias), r=4, init_weights=False).train()
    A, B, lam, w = (getattr(layer, k)["default"] for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
    base = layer.base_layer
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape[:-1], 40)
    for direct, packet in ((lambda s: delora_ext.ops.linear(x, base.weight, base.bias, A, B, lam, w, dropout),
                            lambda s: torch.ops.delora_ext.linear_fwd(x, base.weight, base.bias, A, B, lam, w, dropout,
                                                                      s)[0]),
                           (lambda s: delora_ext.ops.adapter(x, A, B, lam, w, dropout),
                            lambda s: torch.ops.delora_ext.adapter_fwd(x, A, B, lam, w, dropout, s)[0])):
        torch.manual_seed(7)
        got = _value_and_grads(direct(None), layer, x, g)
        torch.manual_seed(7)
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout else None
        want = _value_and_grads(packet(seed), layer, x, g)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_torch_function_modes_and_overrides_see_the_op():
    """Where a __torch_function__ mode or override applies, the call goes through torch.ops, which honours it."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    class Tagged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if "delora_ext" in str(func):
                cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    layer = _layer().train()
    x = torch.randn(3, 48)
    want = layer(x)
    with Record() as mode:
        y = layer(x)
    assert "linear_fwd.default" in mode.seen and torch.equal(y, want), mode.seen
    y = layer(x.as_subclass(Tagged))
    assert Tagged.calls == 1 and torch.equal(y.as_subclass(torch.Tensor), want)


def test_backward_node_semantics():
    """The op's backward node, written as ATen's nodes are: one node per call with a fixed name, edges in schema
    order, saved tensors freed after backward, gradients only for what is asked."""
    layer = _layer().train()
    x = torch.randn(3, 48, requires_grad=True)
    y = layer(x)
    node = y.grad_fn
    assert node.name() == "DeloraLinearBackward0"
    # (x, weight, bias, A, B, lam, w): the frozen weight, bias and the w buffer have no edge to follow
    kinds = [type(f).__name__ if f is not None else None for f, _ in node.next_functions]
    assert kinds == ["AccumulateGrad", None, None, "AccumulateGrad", "AccumulateGrad", "AccumulateGrad", None]
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, [x], g, retain_graph=True)
    assert layer.delora_A["default"].grad is None  # only x was asked for
    y.backward(g)
    assert torch.equal(x.grad, gx) and layer.delora_A["default"].grad is not None
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(g)
    d = delora_ext.ops.adapter(x, layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"],
                               layer.delora_w_norm["default"])
    assert d.grad_fn.name() == "DeloraAdapterBackward0"


def test_compiled_autograd_is_refused_with_a_clear_error():
    """Compiled autograd needs compiled_args from every node; this node has none, and says so by name."""
    from torch._dynamo import compiled_autograd

    layer = _layer().train()
    x = torch.randn(3, 48, requires_grad=True)
    with pytest.raises(NotImplementedError, match="DeloraLinearBackward0"):
        with compiled_autograd._enable(lambda gm: gm):
            layer(x).sum().backward()


# ---- behaviours the fast paths keep --------------------------------------------------------------------------
def test_hooks_on_the_delora_layer_itself_still_run():
    layer = _layer().eval()
    seen = []
    layer.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    layer.register_forward_hook(lambda mod, args, out: out * 3)
    x = torch.randn(2, 48)
    with torch.no_grad():
        y = layer(x)
        layer.inference_cache = False
        y_op = layer(x)
    assert seen == ["pre", "pre"] and torch.equal(y, y_op)


def test_meta_built_layer_first_forward_under_no_grad():
    real = _layer().eval()
    with torch.device("meta"):
        meta = DeLoRALinear(nn.Linear(48, 40), r=4, init_weights=False)
    meta.to_empty(device="cpu")
    real_sd = real.state_dict()
    with torch.no_grad():
        for n, t in meta.state_dict(keep_vars=True).items():
            if "delora_w_norm" not in n:
                t.copy_(real_sd[n])
    meta.eval()
    assert meta._w_pending
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(meta(x), real(x))
    assert not meta._w_pending


# ---- torch.compile(mode="reduce-overhead") ---------------------------------------------------------------------
def _patched_llama(device):
    model = build("llama")
    torch.manual_seed(1)
    return delora_ext.patch(model, r=4, target_modules="all-linear", init_weights=False).to(device)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reduce_overhead_matches_eager(device, tol):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3)).to(device)
    model = _patched_llama(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, mode="reduce-overhead")
        eager_model = _patched_llama(device).train()
        eager_opt = torch.optim.SGD([p for p in eager_model.parameters() if p.requires_grad], lr=0.05)
        for step in range(3):  # parameters change between calls: a replay must see the new values
            for m, o in ((compiled, opt), (eager_model, eager_opt)):
                o.zero_grad(set_to_none=True)
                loss = m(input_ids=ids, labels=ids).loss
                loss.backward()
                o.step()
            gc, ge = _grads(model), _grads(eager_model)
            assert list(gc) == list(ge)
            for kind in ("delora_A", "delora_B", "delora_lambda"):
                # per kind, all layers together: a scalar dλ is a sum of r terms that can cancel, so each is held
                # to the size of the largest dλ rather than its own
                keys = [k for k in ge if f".{kind}." in k]
                err = rel_err(torch.cat([gc[k].flatten() for k in keys]), torch.cat([ge[k].flatten() for k in keys]))
                assert err <= tol, f"step {step}: d{kind} {err:.1e}"
        model.eval()
        eager_model.eval()
        with torch.no_grad():
            for step in range(3):
                y_c = compiled(input_ids=ids).logits
                y_e = eager_model(input_ids=ids).logits
                assert rel_err(y_c, y_e) <= tol, f"inference call {step}: {rel_err(y_c, y_e):.1e}"
                for p, q in zip(params, [p for p in eager_model.parameters() if p.requires_grad]):
                    p.add_(0.01)
                    q.add_(0.01)
    finally:
        torch._dynamo.reset()


def test_reduce_overhead_compile_training_step_and_inference_on_cpu():
    _reduce_overhead_matches_eager("cpu", 1e-5)


@requires_cuda
def test_reduce_overhead_compile_training_step_and_inference_on_cuda():
    """On CUDA, mode="reduce-overhead" records CUDA graphs of the forward and backward (the native ops launch on
    the current stream and allocate through the caching allocator, so they can be captured)."""
    _reduce_overhead_matches_eager("cuda", 1e-4)


@requires_cuda
def test_graphed_eval_forward_follows_parameter_updates_on_cuda():
    """A CUDA graph captured around a patched model's eval forward: replays after an in-place update compute with
    the new parameters (while capturing, the layers skip the cache and the op prepares the factors inside the
    graph)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    model = delora_ext.patch(model, target_modules=["0", "2"], r=4, init_weights=False).cuda().eval()
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        for _ in range(2):
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
            graph.replay()
            torch.cuda.synchronize()
            assert rel_err(out, model(x)) <= 1e-5


@pytest.mark.parametrize("kind", ["full backward hook", "backward pre-hook", "global forward hook",
                                  "global forward pre-hook", "global backward hook"])
def test_hooks_on_the_base_layer_run_as_in_peft(kind):
    """PEFT's layer calls its base layer, so every hook on it runs, also global module hooks and backward hooks.
    Where one is registered the fused op does not stand in for the base's forward: the base is called and the
    adapter term added; the numbers are those of the fused path."""
    from torch.nn.modules import module as nn_module

    torch.manual_seed(0)
    layer = delora_ext.DeLoRALinear(nn.Linear(12, 10), r=3, init_weights=False)
    x = torch.randn(4, 12, requires_grad=True)
    y0 = layer(x)
    g0 = torch.autograd.grad(y0.sum(), [x, layer.delora_A["default"]])
    calls = []
    base = layer.base_layer

    def note(m, *args):
        if m is base:
            calls.append(kind)

    handle = {
        "full backward hook": lambda: base.register_full_backward_hook(note),
        "backward pre-hook": lambda: base.register_full_backward_pre_hook(note),
        "global forward hook": lambda: nn_module.register_module_forward_hook(note),
        "global forward pre-hook": lambda: nn_module.register_module_forward_pre_hook(note),
        "global backward hook": lambda: nn_module.register_module_full_backward_hook(note),
    }[kind]()
    try:
        y = layer(x)
        g = torch.autograd.grad(y.sum(), [x, layer.delora_A["default"]])
    finally:
        handle.remove()
    assert calls == [kind]
    assert_close(y, y0, 1e-6, kind)
    for a, b in zip(g, g0):
        assert_close(a, b, 1e-5, kind)
