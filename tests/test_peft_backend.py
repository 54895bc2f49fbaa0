"""delora_ext.peft: PEFT's own DeLoRA layers on delora_ext's ops, side by side with PEFT's eager layer."""
from __future__ import annotations

import copy
import inspect
import os
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
dp = pytest.importorskip("delora_ext.peft", reason="delora_ext.peft needs PEFT with DeLoRA (peft >= 0.18)")

from delora_ext import reference as ref  # noqa: E402

from helpers import assert_close, rel_err, requires_native  # noqa: E402
from tiny_models import build, one_thread  # noqa: E402,F401

pytestmark = requires_native


@pytest.fixture(autouse=True)
def fresh_backend():
    """Each test starts with PEFT's own factory, the backend unchecked and no warning given yet."""
    dp.disable()
    dp._problem.clear()
    dp._warned.clear()
    yield
    dp.disable()
    dp._problem.clear()
    dp._warned.clear()


class Net(nn.Module):
    def __init__(self, in_f=24, hid=20, out=16, bias=True):
        super().__init__()
        self.a = nn.Linear(in_f, hid, bias=bias)
        self.b = nn.Linear(hid, out, bias=bias)
        self.head = nn.Linear(out, 4)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


def _cfg(**kw):
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["a", "b"])
    kw.setdefault("init_weights", False)
    return peft.DeloraConfig(**kw)


def _pair(cfg=None, seed=0, net=None, **kw):
    """(PEFT's eager model, the accelerated one) with the same weights."""
    torch.manual_seed(seed)
    net = Net(**kw) if net is None else net
    eager = peft.get_peft_model(copy.deepcopy(net), cfg or _cfg())
    dp.enable()
    native = peft.get_peft_model(copy.deepcopy(net), cfg or _cfg())
    dp.disable()
    native.load_state_dict(eager.state_dict())
    return eager, native


def _delora(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, dp.PeftDeloraLinear)}


def _dlam_cond(layer, name, x, g):
    """Condition number Σ|t_k| / |Σ t_k| of dλ = Σ_k t_k (fp64), t_k = Σ_n u_nk (g B)_nk / (r a_k b_k): the fp32
    dλ of both implementations is only good to u·Σ|t_k| (as tests/test_peft_parity.py)."""
    A, B = layer.delora_A[name].detach().double(), layer.delora_B[name].detach().double()
    w = layer.delora_w_norm[name].detach().double()
    x2, g2 = x.double().reshape(-1, A.shape[1]), g.double().reshape(-1, B.shape[0])
    u = (x2 * w) @ A.t()
    a, b = A.norm(dim=1).clamp_min(1e-4), B.norm(dim=0).clamp_min(1e-4)
    t = (u * (g2 @ B)).sum(0) / (A.shape[0] * a * b)
    return max(1.0, (t.abs().sum() / t.sum().abs().clamp_min(1e-300)).item())


def _record_layers(model):
    """Each DeLoRA layer's input and upstream gradient in the next forward/backward, by module path."""
    inputs, grads, hooks = {}, {}, []
    for n, m in _delora(model).items():
        def hook(mod, args, out, n=n):
            inputs[n] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(n, g.detach()))
        hooks.append(m.register_forward_hook(hook))
    return inputs, grads, hooks


# ---- the pinned PEFT layout ---------------------------------------------------------------------------------
def test_pinned_peft_layout():
    """Everything NativeDeloraLinear relies on in PEFT's layer. A PEFT that changes any of it is outside the
    tested range or fails backend_problem(), and its layers run PEFT's code."""
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.delora import layer as L
    from peft.tuners.delora import model as M
    v = dp._version(peft.__version__)
    assert dp.TESTED_PEFT_VERSIONS[0] <= v <= dp.TESTED_PEFT_VERSIONS[1], peft.__version__
    assert L.DeloraLayer.adapter_layer_names == dp.ADAPTER_LAYER_NAMES == ("delora_A", "delora_B", "delora_lambda")
    assert L.DeloraLayer.other_param_names == dp.OTHER_PARAM_NAMES == ("r", "delora_dropout", "delora_w_norm")
    assert isinstance(M.DeloraModel.__dict__["_create_new_module"], staticmethod)
    assert list(inspect.signature(L.DeloraLinear.merge).parameters) == ["self", "safe_merge", "adapter_names"]
    assert list(inspect.signature(L.DeloraLinear.unmerge).parameters) == ["self"]
    assert list(inspect.signature(L.DeloraLayer.get_delta_weight).parameters) == ["self", "adapter"]
    assert callable(L.check_adapters_to_merge)
    eager, _ = _pair(_cfg(module_dropout=0.1))
    layer = eager.base_model.model.a
    assert isinstance(layer.delora_A, nn.ParameterDict) and isinstance(layer.delora_B, nn.ParameterDict)
    assert isinstance(layer.delora_lambda, nn.ParameterDict) and isinstance(layer.delora_w_norm, BufferDict)
    assert isinstance(layer.delora_dropout, nn.ModuleDict) and type(layer.delora_dropout["default"]) is nn.Dropout
    assert layer.r == {"default": 4} and isinstance(layer.base_layer, nn.Linear)
    assert layer.delora_A["default"].shape == (4, 24) and layer.delora_B["default"].shape == (20, 4)
    assert layer.delora_lambda["default"].shape == (1,) and layer.delora_w_norm["default"].shape == (24,)
    # the 1e-4 clamp of ‖A_k‖ and ‖B_:,k‖ that the native ops share (reference.NORM_EPS)
    A, B = torch.zeros(2, 3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64)
    A[0, 0] = 1e-6
    lam, w = torch.tensor([2.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert dp.NORM_EPS == ref.NORM_EPS == 1e-4
    assert torch.allclose(L.DeloraLayer._compute_delta(A, B, lam, 2, w), ref.delta_weight_ref(A, B, lam, w),
                          rtol=1e-12, atol=0)
    assert dp.backend_problem() is None


# ---- enable / disable / accelerate --------------------------------------------------------------------
def test_enable_is_idempotent_and_disable_restores_peft_layers():
    original = dp.DeloraModel.__dict__["_create_new_module"]
    dp.enable()
    dp.enable()
    assert dp.is_enabled()
    m1 = peft.get_peft_model(Net(), _cfg())
    assert {type(m) for m in _delora(m1).values()} == {dp.NativeDeloraLinear}
    dp.disable()
    dp.disable()
    assert not dp.is_enabled() and dp.DeloraModel.__dict__["_create_new_module"] is original
    m2 = peft.get_peft_model(Net(), _cfg())
    assert {type(m) for m in _delora(m2).values()} == {dp.PeftDeloraLinear}
    assert {type(m) for m in _delora(m1).values()} == {dp.NativeDeloraLinear}  # built ones keep their class
    assert repr(m1) == repr(m2)  # the accelerated layer prints as PEFT's


def test_enable_leaves_the_global_rng_alone():
    """enable() runs its self-check on a small PEFT layer: the user's random stream must not move."""
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    dp.enable()
    assert torch.equal(torch.rand(5), expected)


def test_every_peft_entry_point_builds_native_layers(tmp_path):
    torch.manual_seed(0)
    net = Net()
    dp.enable()
    model = peft.get_peft_model(copy.deepcopy(net), _cfg())
    model.add_adapter("second", _cfg(r=2))
    model.save_pretrained(tmp_path)
    assert all(type(m) is dp.NativeDeloraLinear for m in _delora(model).values())
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    assert all(type(m) is dp.NativeDeloraLinear for m in _delora(loaded).values())
    assert set(_delora(loaded)["base_model.model.a"].delora_A) == {"default", "second"}
    low = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path, low_cpu_mem_usage=True)
    injected = peft.inject_adapter_in_model(_cfg(), copy.deepcopy(net))
    assert type(injected.a) is dp.NativeDeloraLinear and type(injected.b) is dp.NativeDeloraLinear
    x = torch.randn(3, 24)
    dp.disable()
    eager = peft.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path)
    assert all(type(m) is dp.PeftDeloraLinear for m in _delora(eager).values())
    with torch.no_grad():
        assert_close(loaded(x), eager(x), 1e-6, "from_pretrained")
        assert_close(low(x), eager(x), 1e-6, "from_pretrained(low_cpu_mem_usage=True)")


def test_accelerate_converts_in_place_and_keeps_everything_peft():
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), _cfg())
    params = {n: p for n, p in model.named_parameters()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 24)
    with torch.no_grad():
        y = model(x)
    assert dp.accelerate(model) is model
    assert all(type(m) is dp.NativeDeloraLinear for m in _delora(model).values())
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert list(model.state_dict()) == list(sd) and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad():
        assert_close(model(x), y, 1e-6, "output after accelerate")
    assert dp.accelerate(model) is model  # again: nothing changes


def test_accelerate_rejects_what_is_not_a_peft_delora_model():
    with pytest.raises(TypeError, match="`model` must be a peft.PeftModel"):
        dp.accelerate(Net())
    with pytest.raises(TypeError, match="`model` must be a peft.PeftModel .*got NoneType"):
        dp.accelerate(None)
    lora = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["a"]))
    with pytest.raises(ValueError, match="`model` has no PEFT DeLoRA layers .*LoraConfig"):
        dp.accelerate(lora)


# ---- parity with PEFT's eager layer ---------------------------------------------------------------------
@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lam", [15.0, -2.5])
@pytest.mark.parametrize("shape", [(7,), (2, 5)])
def test_forward_and_gradients_equal_peft_fp32(init_weights, bias, lam, shape):
    cfg = _cfg(init_weights=init_weights, delora_lambda=lam, module_dropout=0.2)
    eager, native = _pair(cfg, bias=bias)
    eager.train()
    native.train()
    for model in (eager, native):  # dropout off (mask streams differ by design), the layers still in train mode
        for m in _delora(model).values():
            m.delora_dropout["default"].p = 0.0
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, 24, generator=g)
    gy = torch.randn(*shape, 4, generator=g)
    ys, grads = [], []
    for model in (eager, native):
        xi = x.clone().requires_grad_()
        if model is eager:
            inputs, upstream, hooks = _record_layers(model)
        y = model(xi)
        y.backward(gy)
        if model is eager:
            for h in hooks:
                h.remove()
        ys.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad} | {"x": xi.grad})
    assert_close(ys[1], ys[0], 1e-6, "output")
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 1 + 3 * 2
    for name in grads[0]:
        tol = 1e-6
        if ".delora_lambda." in name:
            path = name.split(".delora_lambda.")[0]
            tol *= _dlam_cond(_delora(eager)[path], "default", inputs[path], upstream[path])
        assert_close(grads[1][name], grads[0][name], tol, name)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_and_delta_weight_equal_peft(safe_merge):
    eager, native = _pair(_cfg(r=3))
    for model in (eager, native):
        model.base_model.merge_adapter(safe_merge=safe_merge)
    for (n, e), (_, o) in zip(_delora(eager).items(), _delora(native).items()):
        assert e.merged_adapters == o.merged_adapters == ["default"]
        assert_close(o.base_layer.weight, e.base_layer.weight, 1e-6, f"{n} merged weight")
        assert_close(o.get_delta_weight("default"), e.get_delta_weight("default"), 1e-6, f"{n} ΔW")
        assert o.get_delta_weight("default").dtype == e.get_delta_weight("default").dtype
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert_close(native(x), eager(x), 1e-6, "merged output")
    w_before = {n: m.base_layer.weight.clone() for n, m in _delora(native).items()}
    with pytest.warns(UserWarning, match="All adapters are already merged"):
        _delora(native)["base_model.model.a"].merge()
    for model in (eager, native):
        model.base_model.unmerge_adapter()
    for (n, e), (_, o) in zip(_delora(eager).items(), _delora(native).items()):
        assert o.merged_adapters == []
        assert_close(o.base_layer.weight, e.base_layer.weight, 1e-6, f"{n} unmerged weight")
        assert not torch.equal(o.base_layer.weight, w_before[n])
    with pytest.warns(UserWarning, match="Already unmerged"):
        _delora(native)["base_model.model.a"].unmerge()
    with pytest.raises(ValueError, match="Adapter nope not found"):
        _delora(native)["base_model.model.a"].get_delta_weight("nope")


def test_safe_merge_refuses_a_broken_adapter_and_leaves_the_weight():
    _, native = _pair()
    layer = _delora(native)["base_model.model.a"]
    with torch.no_grad():
        layer.delora_A["default"][0, 0] = float("nan")
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []


def test_get_delta_weight_is_differentiable_like_peft():
    eager, native = _pair()
    grads = []
    for model in (eager, native):
        layer = _delora(model)["base_model.model.a"]
        d = layer.get_delta_weight("default")
        assert d.requires_grad
        params = [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
        grads.append(torch.autograd.grad(d.square().sum(), params))
    for name, a, b in zip(("A", "B", "λ"), *grads):
        assert_close(b, a, 1e-6, f"d‖ΔW‖²/d{name}")


def test_merge_and_unload_unload_and_adapter_lifecycle_equal_peft():
    cfg = _cfg(modules_to_save=["head"])
    eager, native = _pair(cfg)
    for model in (eager, native):
        model.add_adapter("other", _cfg(r=2, delora_lambda=3.0))
    native.load_state_dict(eager.state_dict())
    x = torch.randn(6, 24)
    with torch.no_grad():
        for names in (["other"], ["default", "other"], "default"):
            for model in (eager, native):
                model.base_model.set_adapter(names)
            assert_close(native(x), eager(x), 1e-6, f"active {names}")
        with native.disable_adapter(), eager.disable_adapter():
            assert_close(native(x), eager(x), 1e-6, "adapters disabled")
        for model in (eager, native):
            model.delete_adapter("other")
        assert all("other" not in m.delora_A for m in _delora(native).values())
        assert_close(native(x), eager(x), 1e-6, "after delete_adapter")
        merged_e = copy.deepcopy(eager).merge_and_unload()
        merged_n = copy.deepcopy(native).merge_and_unload()
        assert not _delora(merged_n) and isinstance(merged_n.a, nn.Linear)
        assert_close(merged_n.a.weight, merged_e.a.weight, 1e-6, "merge_and_unload weight")
        assert_close(merged_n(x), eager(x), 1e-6, "merge_and_unload output")
        plain = native.unload()
        assert type(plain.a) is nn.Linear


def test_save_pretrained_files_are_peft_files(tmp_path):
    from safetensors.torch import load_file
    eager, native = _pair(_cfg(modules_to_save=["head"]))
    eager.save_pretrained(tmp_path / "eager")
    native.save_pretrained(tmp_path / "native")
    a = load_file(tmp_path / "eager" / "adapter_model.safetensors")
    b = load_file(tmp_path / "native" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("delora_w_norm") for k in a)
    config = "adapter_config.json"
    assert (tmp_path / "eager" / config).read_text() == (tmp_path / "native" / config).read_text()


def test_bf16_autocast_within_twice_peft_error():
    """Under bf16 autocast both layers compute in bf16: ours must stay within 2x of PEFT's own error against the
    fp64 reference (the low-precision rule), for the output and every gradient, averaged over upstream
    gradients (a scalar such as dλ sampled once is noise)."""
    eager, native = _pair()
    la_e, la_n = _delora(eager)["base_model.model.a"], _delora(native)["base_model.model.a"]
    W, b = la_e.base_layer.weight.detach(), la_e.base_layer.bias.detach()
    A, B, lam, w = (t.detach() for t in (la_e.delora_A["default"], la_e.delora_B["default"],
                                          la_e.delora_lambda["default"], la_e.delora_w_norm["default"]))
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    errs = {"peft": torch.zeros(5, dtype=torch.float64), "ours": torch.zeros(5, dtype=torch.float64)}
    for seed in range(6):
        g = torch.randn(64, 20, generator=torch.Generator().manual_seed(10 + seed))
        x64, A64, B64, lam64 = (t.double().requires_grad_() for t in (x, A, B, lam))
        y64 = ref.linear_ref(x64, W.double(), b.double(), A64, B64, lam64, w.double())
        exp = [y64.detach(), *torch.autograd.grad(y64, [x64, A64, B64, lam64], g.double())]
        for key, layer in (("peft", la_e), ("ours", la_n)):
            xi = x.clone().requires_grad_()
            params = [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(xi)
            got = [y.detach(), *torch.autograd.grad(y, [xi, *params], g.to(y.dtype))]
            errs[key] += torch.tensor([rel_err(a, e) for a, e in zip(got, exp)])
    for name, o, p in zip(("y", "dx", "dA", "dB", "dλ"), errs["ours"].tolist(), errs["peft"].tolist()):
        assert o <= 2 * p, f"{name}: ours {o / 6:.3e} vs PEFT's {p / 6:.3e} under bf16 autocast"


def test_bf16_model_with_fp32_adapters_within_twice_peft_error():
    """A bf16 model (PEFT keeps the adapters in fp32, autocast_adapter_dtype=True): bf16 x and base."""
    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)
    eager = peft.get_peft_model(copy.deepcopy(net), _cfg())
    dp.enable()
    native = peft.get_peft_model(copy.deepcopy(net), _cfg())
    native.load_state_dict(eager.state_dict())
    la = _delora(eager)["base_model.model.a"]
    assert la.delora_A["default"].dtype == torch.float32 and la.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(2))
    A, B, lam, w = (t.detach().double() for t in (la.delora_A["default"], la.delora_B["default"],
                                                   la.delora_lambda["default"], la.delora_w_norm["default"]))
    W, b = la.base_layer.weight.detach().double(), la.base_layer.bias.detach().double()
    exp = ref.linear_ref(x.double(), W, b, A, B, lam, w)
    with torch.no_grad():
        e = rel_err(la(x.bfloat16()), exp)
        o = rel_err(_delora(native)["base_model.model.a"](x.bfloat16()), exp)
    assert o <= 2 * e, (o, e)


def test_training_a_tiny_llama_matches_peft():
    """A few AdamW steps on every linear layer of a tiny Llama: the same losses and adapters as PEFT's eager."""
    base = build("llama")
    cfg = peft.DeloraConfig(r=4, target_modules="all-linear", init_weights=False)
    eager = peft.get_peft_model(copy.deepcopy(base), cfg)
    dp.enable()
    native = peft.get_peft_model(copy.deepcopy(base), cfg)
    native.load_state_dict(eager.state_dict())
    assert len(_delora(native)) == 14 and all(type(m) is dp.NativeDeloraLinear for m in _delora(native).values())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    losses = {}
    for key, model in (("eager", eager), ("native", native)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            losses[key].append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses["native"] == pytest.approx(losses["eager"], rel=1e-6)
    pe, pn = dict(eager.named_parameters()), dict(native.named_parameters())
    for n, p in pe.items():
        if p.requires_grad:
            assert_close(pn[n], p, 1e-5, n)


# ---- falling back to PEFT's code --------------------------------------------------------------------------
@pytest.fixture
def peft_calls(monkeypatch):
    """Counts calls of PEFT's own DeloraLinear.forward / merge / unmerge / get_delta_weight (after the backend's
    self-check, which runs PEFT's forward once)."""
    assert dp.backend_problem() is None
    calls = {"forward": 0, "merge": 0, "unmerge": 0, "get_delta_weight": 0}
    for name in calls:
        orig = getattr(dp.PeftDeloraLinear, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(dp.PeftDeloraLinear, name, spy)
    return calls


def _native_single(cfg=None):
    torch.manual_seed(0)
    eager = peft.get_peft_model(Net(), cfg or _cfg())
    native = dp.accelerate(copy.deepcopy(eager))
    return eager, native


def test_native_path_never_calls_peft_code(peft_calls):
    eager, native = _native_single()
    x = torch.randn(3, 24, requires_grad=True)
    native(x).sum().backward()
    native.base_model.merge_adapter()
    native.base_model.unmerge_adapter()
    _delora(native)["base_model.model.a"].get_delta_weight("default")
    assert peft_calls == {"forward": 0, "merge": 0, "unmerge": 0, "get_delta_weight": 0}


def _one_warning(record, match):
    hits = [str(w.message) for w in record if "delora_ext.peft" in str(w.message)]
    assert len(hits) == 1 and match in hits[0], hits
    return hits[0]


def test_peft_version_outside_tested_range_warns_once_and_falls_back(monkeypatch, peft_calls):
    eager, native = _native_single()
    monkeypatch.setattr(dp._peft, "__version__", "0.99.0")
    dp._problem.clear()
    x = torch.randn(3, 24)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1, y2 = native(x), native(x)
        native.base_model.merge_adapter()
        native.base_model.unmerge_adapter()
    msg = _one_warning(rec, "PEFT 0.99.0 is outside the tested range 0.18-0.21")
    assert "running PEFT's own DeloraLinear code" in msg
    assert peft_calls["forward"] == 4 and peft_calls["merge"] == 2 and peft_calls["unmerge"] == 2
    with torch.no_grad():
        assert torch.equal(y1, eager(x)) and torch.equal(y2, y1)


def test_unknown_layer_layout_warns_once_and_falls_back(monkeypatch, peft_calls):
    _, native = _native_single()
    monkeypatch.setattr(dp.PeftDeloraLayer, "other_param_names", ("r", "delora_dropout", "delora_w_norm", "new"))
    dp._problem.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        native(torch.randn(2, 24))
        native(torch.randn(2, 24))
    _one_warning(rec, "unknown PEFT DeLoRA layer layout (DeloraLayer.other_param_names")
    assert peft_calls["forward"] == 4


def test_a_changed_peft_formula_is_caught_by_the_self_check(monkeypatch):
    """Same layout, different math (here a changed clamp of the norms): the self-check sees it."""
    orig = dp.PeftDeloraLinear.forward

    def changed(self, x, *a, **k):
        return orig(self, x, *a, **k) * 1.001
    monkeypatch.setattr(dp.PeftDeloraLinear, "forward", changed)
    assert "output differs from delora_ext's" in dp.backend_problem()


def test_per_layer_fallbacks_warn_once_with_the_reason(peft_calls):
    eager, native = _native_single()
    la, lb = _delora(native)["base_model.model.a"], _delora(native)["base_model.model.b"]
    x = torch.randn(3, 24)
    # an r that disagrees with A (PEFT scales by self.r, our ops by A's rows): PEFT's code
    la.r["default"] = 5
    _delora(eager)["base_model.model.a"].r["default"] = 5
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = native(x)
        native(x)
    _one_warning(rec, "unknown PEFT DeLoRA layer layout (adapter 'default': r=5")
    with torch.no_grad():
        assert_close(y, eager(x), 1e-6, "output")  # layer b still runs natively
    assert peft_calls["forward"] == 2 + 2  # 2 calls to the layer with r=5, and eager's 2 layers
    la.r["default"] = 4
    # a dropout module PEFT does not build
    lb.delora_dropout["default"] = nn.AlphaDropout(0.1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        native(x)
    _one_warning(rec, "dropout of 'default' is AlphaDropout")


def test_mixed_batch_adapter_names_run_peft_code(peft_calls):
    _, native = _native_single()
    layer = _delora(native)["base_model.model.a"]
    with warnings.catch_warnings(record=True) as rec, pytest.raises(TypeError):
        warnings.simplefilter("always")
        layer(torch.randn(2, 24), adapter_names=["default", "default"])  # PEFT 0.21's own DeLoRA has no such path
    _one_warning(rec, "mixed-batch `adapter_names`")
    assert peft_calls["forward"] == 1


class QuantisedParam(nn.Parameter):
    """Stands for a quantised weight (bitsandbytes' Params4bit and Int8Params subclass nn.Parameter)."""


def test_quantised_base_runs_peft_code(peft_calls):
    eager, native = _native_single()
    for model in (eager, native):
        base = _delora(model)["base_model.model.a"].base_layer
        base.weight = QuantisedParam(base.weight.detach().clone(), requires_grad=False)
    x = torch.randn(3, 24)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = native(x)
        native.base_model.merge_adapter()
    msg = _one_warning(rec, "a quantised or tensor-subclass base weight (Linear with a QuantisedParam")
    assert "not supported yet" in msg
    assert peft_calls["forward"] == 1 and peft_calls["merge"] == 1
    with torch.no_grad():
        assert_close(y, eager(x), 1e-6, "output")  # layer b still runs natively


def test_module_dropout_in_training_only():
    """PEFT's nn.Dropout on the adapter input becomes the native ops' dropout: applied in train mode (its masks
    come from delora_ext's generator, seeded from torch's RNG), never in eval."""
    _, native = _native_single(_cfg(module_dropout=0.5))
    x = torch.randn(8, 24)
    with torch.no_grad():
        native.eval()
        y_eval = native(x)
        native.train()
        torch.manual_seed(1)
        y1 = native(x)
        torch.manual_seed(1)
        y2 = native(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y_eval)
    native.eval()
    with torch.no_grad():
        assert torch.equal(native(x), y_eval)


def test_torch_compile_fullgraph_of_an_accelerated_model():
    """The accelerated forward compiles without graph breaks (the backend check is a plain list read)."""
    eager, native = _pair()
    dp.accelerate(native)
    dp.backend_problem()
    compiled = torch.compile(native, fullgraph=True)
    x = torch.randn(5, 24, requires_grad=True)
    y = compiled(x)
    assert_close(y, eager(x), 1e-6, "compiled output")
    y.sum().backward()
    assert x.grad is not None and _delora(native)["base_model.model.a"].delora_lambda["default"].grad is not None


def test_fp64_model_equals_peft_to_fp64_rounding():
    eager, _ = _pair()
    eager.double()
    native = dp.accelerate(copy.deepcopy(eager))
    x = torch.randn(6, 24, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ye, yn = eager(x), native(x2)
    assert_close(yn, ye, 1e-12, "fp64 output")
    ye.sum().backward()
    yn.sum().backward()
    assert_close(x2.grad, x.grad, 1e-12, "fp64 dx")
    for model in (eager, native):
        model.base_model.merge_adapter()
    for (n, e), (_, o) in zip(_delora(eager).items(), _delora(native).items()):
        assert_close(o.base_layer.weight, e.base_layer.weight, 1e-14, f"{n} fp64 merged weight")


def test_bf16_adapters_within_twice_peft_error():
    """autocast_adapter_dtype=False keeps PEFT's adapters in bf16 too: forward, ΔW and merge within 2x of PEFT's
    own error against fp64."""
    torch.manual_seed(0)
    eager = peft.get_peft_model(Net().bfloat16(), _cfg(), autocast_adapter_dtype=False)
    native = dp.accelerate(copy.deepcopy(eager))
    le, ln = _delora(eager)["base_model.model.a"], _delora(native)["base_model.model.a"]
    assert le.delora_A["default"].dtype == torch.bfloat16
    A, B, lam, w = (t.detach().double() for t in (le.delora_A["default"], le.delora_B["default"],
                                                   le.delora_lambda["default"], le.delora_w_norm["default"]))
    W, b = le.base_layer.weight.detach().double(), le.base_layer.bias.detach().double()
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    y64, d64 = ref.linear_ref(x.double(), W, b, A, B, lam, w), ref.delta_weight_ref(A, B, lam, w)
    with torch.no_grad():
        assert rel_err(ln(x), y64) <= 2 * rel_err(le(x), y64)
        de, dn = le.get_delta_weight("default"), ln.get_delta_weight("default")
        assert dn.dtype == de.dtype == torch.bfloat16 and rel_err(dn, d64) <= 2 * rel_err(de, d64)
        le.merge()
        ln.merge()
        assert rel_err(ln.base_layer.weight, W + d64) <= 2 * rel_err(le.base_layer.weight, W + d64)


def test_the_package_works_without_peft_and_transformers():
    """delora_ext imports neither: without them the core API works, and delora_ext.peft / DeLoRACallback are
    AttributeErrors carrying the install hint (so hasattr() and introspection stay safe)."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "sys.modules['peft'] = None; sys.modules['transformers'] = None\n"
        "import torch, delora_ext\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        "delora_ext.patch(m, target_modules=['0'], r=2)\n"
        "groups = delora_ext.param_groups(m, 1e-3, lambda_lr=1e-2)\n"
        "assert [g['name'] for g in groups] == ['delora', 'delora_lambda']\n"
        "assert not hasattr(delora_ext, 'peft') and not hasattr(delora_ext, 'DeLoRACallback')\n"
        "try:\n"
        "    delora_ext.peft\n"
        "except AttributeError as e:\n"
        "    assert 'pip install' in str(e), e\n"
        "try:\n"
        "    import delora_ext.peft\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'delora_ext[peft]'\" in str(e), e\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
