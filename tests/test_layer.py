"""DeLoRALinear: identity at init, merge/unmerge, adapters, state_dict layout, compile, memory, bad input."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear, ops
from delora_ext import reference as ref

from helpers import TOL, assert_close, make_x, rel_err, requires_native, saved_activation_bytes


def _layer(in_f=32, out=24, r=4, init_weights=False, seed=0, **kw):
    torch.manual_seed(seed)
    return DeLoRALinear(nn.Linear(in_f, out), r=r, init_weights=init_weights, **kw)


def _ref_forward(layer, x, names=None):
    base = layer.base_layer
    y = nn.functional.linear(x, base.weight, base.bias)
    for n in names or layer.active_adapters:
        y = y + ref.adapter_ref(x, layer.delora_A[n], layer.delora_B[n], layer.delora_lambda[n], layer.delora_w_norm[n])
    return y


def test_identity_at_init_and_frozen_base():
    base = nn.Linear(64, 48)
    layer = DeLoRALinear(copy.deepcopy(base), r=8)
    x = make_x((3, 5), 64)
    assert_close(layer(x), base(x), 1e-6, "identity at init")
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad
    names = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert names == ["delora_A.default", "delora_B.default", "delora_lambda.default"]
    assert torch.all(layer.delora_B["default"] == 0) and layer.delora_lambda["default"].item() == 15.0


def test_w_is_fp32_column_norm_of_base_weight():
    base = nn.Linear(40, 30).to(torch.bfloat16)
    layer = DeLoRALinear(base, r=2)
    w = layer.delora_w_norm["default"]
    assert w.dtype == torch.float32
    assert_close(w, base.weight.double().norm(dim=0), 1e-7, "w")
    assert layer.delora_A["default"].dtype == torch.float32


@pytest.mark.parametrize("shape", [(), (0,), (7,), (2, 3), (2, 0, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_forward_backward_matches_reference(shape, layout):
    layer = _layer()
    x = make_x(shape, 32, layout=layout).requires_grad_()
    y = layer(x)
    y_ref = _ref_forward(layer, x)
    assert y.shape == (*shape, 24)
    assert_close(y, y_ref, TOL[torch.float32], "y")
    params = [x, layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
    g = torch.autograd.grad(y.sum(), params)
    g_ref = torch.autograd.grad(y_ref.sum(), params)
    for name, a, b in zip(["dx", "dA", "dB", "dlam"], g, g_ref):
        assert_close(a, b, TOL[torch.float32], name)


def test_merge_equals_unmerged_forward_and_unmerge_restores():
    layer = _layer(64, 48, r=8)
    x = make_x((10,), 64)
    W0 = layer.base_layer.weight.detach().clone()
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    assert rel_err(layer(x), y_unmerged) <= 1e-6
    assert_close(layer.base_layer.weight, W0 + layer.get_delta_weight(), 1e-6, "merged weight")
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.base_layer.weight, W0) <= 1e-6


def test_merge_twice_warns_and_does_nothing():
    layer = _layer()
    layer.merge()
    W1 = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="^All adapters are already merged, nothing to do.$"):  # PEFT's words
        layer.merge()
    assert torch.equal(layer.base_layer.weight, W1)
    layer.update_layer("other", 4, init_weights=False, activate=False)
    with pytest.warns(UserWarning, match="^Already following adapters were merged default. You are now "
                                         "additionally merging other.$"):
        layer.merge(adapter_names=["default", "other"])
    assert layer.merged_adapters == ["default", "other"]
    layer.unmerge()
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()


def test_disable_adapters_gives_base_output():
    layer = _layer()
    x = make_x((4,), 32)
    base_y = nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    layer.merge()
    layer.enable_adapters(False)
    assert not layer.merged and layer.disable_adapters
    assert_close(layer(x), base_y, 1e-6, "disabled")
    layer.enable_adapters(True)
    assert rel_err(layer(x), base_y) > 1e-3


def test_several_adapters_are_summed_and_w_comes_from_unmerged_weight():
    layer = _layer(r=3)
    w_default = layer.delora_w_norm["default"].clone()
    layer.merge()
    layer.update_layer("b", r=5, delora_lambda=2.0, init_weights=False)
    assert_close(layer.delora_w_norm["b"], w_default, 1e-6, "w of a new adapter while another is merged")
    layer.unmerge()
    layer.set_adapter(["default", "b"])
    x = make_x((6,), 32).requires_grad_()
    y = layer(x)
    y_ref = _ref_forward(layer, x, ["default", "b"])
    assert_close(y, y_ref, TOL[torch.float32], "two adapters")
    layer.merge()
    assert rel_err(layer(x), y_ref) < 1e-6
    layer.unmerge()
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        layer.set_adapter("c")


def test_dropout_only_in_training():
    layer = _layer(module_dropout=0.5)
    x = make_x((50,), 32)
    layer.eval()
    assert_close(layer(x), _ref_forward(layer, x), TOL[torch.float32], "eval")
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    y1.sum().backward()


def test_state_dict_names_and_shapes():
    layer = _layer(20, 10, r=4)
    sd = layer.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "base_layer.weight": (10, 20), "base_layer.bias": (10,), "delora_A.default": (4, 20),
        "delora_B.default": (10, 4), "delora_lambda.default": (1,), "delora_w_norm.default": (20,),
    }
    assert "r=4" in repr(layer)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(r=0), ValueError, "`r` should be a positive integer"),
    (dict(r=-2), ValueError, "`r` should be a positive integer"),
    (dict(r=2.5), ValueError, "`r` should be a positive integer"),
    (dict(delora_lambda=float("nan")), ValueError, "`delora_lambda` must be finite"),
    (dict(delora_lambda="x"), TypeError, "`delora_lambda` must be a real number"),
    (dict(module_dropout=1.0), ValueError, "`module_dropout` must be in"),
    (dict(w_norm=torch.tensor([1.0] * 7 + [float("nan")])), ValueError, "`w_norm` has non-finite values"),
    (dict(w_norm=torch.ones(8, device="meta")), ValueError, "`w_norm` is on the meta device"),
    (dict(w_norm=torch.ones(7)), ValueError, r"`w_norm` must be a floating tensor of shape \(8,\)"),
])
def test_constructor_rejects_bad_arguments(bad, exc, match):
    """... naming the argument, and the refused call leaves the base layer's parameters as they were."""
    kw = dict(r=4)
    kw.update(bad)
    base = nn.Linear(8, 8)
    base.bias.requires_grad_(False)
    before = {n: (p.clone(), p.requires_grad) for n, p in base.named_parameters()}
    with pytest.raises(exc, match=match):
        DeLoRALinear(base, **kw)
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n


def test_constructor_rejects_non_linear_and_non_float_base():
    with pytest.raises(TypeError, match="`base_layer` must be an nn.Linear"):
        DeLoRALinear(nn.Conv1d(3, 3, 1), r=2)
    lin = nn.Linear(8, 4)
    lin.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="`base_layer.weight` must be floating point"):
        DeLoRALinear(lin, r=2)


def test_forward_rejects_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match="`x` must have last dimension in_features=32"):
        layer(torch.randn(3, 31))
    with pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(3, 32, dtype=torch.float64))


def test_reference_fallback_matches_native(monkeypatch):
    layer = _layer()
    x = make_x((5,), 32)
    y_native = layer(x)
    monkeypatch.setattr(ops, "NATIVE", False)  # what an import that could not load the extension leaves
    monkeypatch.setattr(delora_ext.ops, "_warned", set())
    with pytest.warns(RuntimeWarning, match="using the PyTorch reference"):
        y_ref = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # warns once only
    assert_close(y_native, y_ref, TOL[torch.float32], "fallback")


@requires_native
def test_saved_activation_bytes_are_N_by_r():
    N, in_f, out, r = 512, 256, 128, 8
    layer = _layer(in_f, out, r=r)
    x = torch.randn(N, in_f, requires_grad=True)
    saved = saved_activation_bytes(layer, x)
    budget = N * r * 4 + 3 * r * 8 + r * (in_f + out) * 4
    assert saved <= budget, f"saved {saved} bytes > {budget}"


@requires_native
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    layer = _layer(48, 40, r=4)
    x = make_x((3, 7), 48).requires_grad_()
    y = layer(x)
    g = torch.autograd.grad(y.square().sum(), [x, *[p for p in layer.parameters() if p.requires_grad]])
    compiled = torch.compile(layer, fullgraph=True)
    yc = compiled(x)
    gc = torch.autograd.grad(yc.square().sum(), [x, *[p for p in layer.parameters() if p.requires_grad]])
    assert_close(yc, y, 1e-6, "compiled y")
    for a, b in zip(gc, g):
        assert_close(a, b, 1e-5, "compiled grad")


def test_merge_of_several_adapters_and_paper_init_rounds_once_in_bf16():
    """Two adapters, one of them paper init (a frozen second term): all of it lands in one pass, so the bf16
    weight is within half an ulp of the exact sum; unmerge also goes back in one pass."""
    torch.manual_seed(0)
    layer = DeLoRALinear(nn.Linear(48, 40).to(torch.bfloat16), r=4, init_weights="paper")
    layer.update_layer("second", r=3, delora_lambda=7.0, init_weights=False)
    with torch.no_grad():
        for n in ("default", "second"):
            layer.delora_A[n].add_(torch.randn_like(layer.delora_A[n]) * 0.3)
            layer.delora_B[n].add_(torch.randn_like(layer.delora_B[n]) * 0.3)
    layer.set_adapter(["default", "second"])
    W0 = layer.base_layer.weight.detach().clone()
    exact = W0.double() + sum(layer.get_delta_weight(n).double() for n in ("default", "second"))
    layer.merge()
    got = layer.base_layer.weight.double()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs()
    assert ((got - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs().max()).all()
    layer.unmerge()
    assert not layer.merged
    back = layer.base_layer.weight.double()
    exact_back = got - sum(layer.get_delta_weight(n).double() for n in ("default", "second"))
    assert ((back - exact_back).abs() <= 0.5 * torch.finfo(torch.bfloat16).eps * exact_back.abs()
            + 1e-6 * exact_back.abs().max()).all()
