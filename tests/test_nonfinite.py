"""The NaN/Inf policy (docs/robustness.md, "Non-finite values"), tested.

- Ops (forward, backward, delta_weight, the raw merge_ op) never check and never raise on values: non-finite
  inputs or parameters propagate as IEEE arithmetic does, and an output entry is non-finite exactly where the
  fp64-free reference (same dtype, PEFT's order of operations) has one. Forward outputs agree on NaN vs ±Inf too;
  gradients agree on which entries are non-finite (the fused backward orders products differently, so an
  entry the reference makes -inf may come out NaN).
- DeLoRALinear.merge / unmerge (and so patching.merge, merge_and_unload) refuse adapters with a non-finite
  A, B, λ or w (w non-finite means the base weight has non-finite columns) with a ValueError naming the
  parameter, before touching the weight. safe_merge additionally refuses a merged weight that is not finite
  (overflow in the weight's dtype, or a base weight that already was), leaving the weight bit-identical.
- Loading an adapter file with non-finite values is refused (see tests/test_adapter_fuzz.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear, ops
from delora_ext import reference as ref

from helpers import make_adapter, make_base, make_x, requires_native

NONFINITE = [math.nan, math.inf, -math.inf]
WHERE = ["x", "W", "bias", "A", "B", "lam", "w"]


def _inputs(where, value, kind, dtype, index):
    A, B, lam, w = make_adapter(3, 10, 6, kind, dtype)
    W, b = make_base(10, 6, dtype)
    x = make_x((5,), 10, dtype)
    t = dict(x=x, W=W, bias=b, A=A, B=B, lam=lam, w=w)[where]
    t.view(-1)[min(index, t.numel() - 1)] = value
    return x, W, b, A, B, lam, w


def _same_nonfinite(got, exp, what, kinds=True):
    """Non-finite at the same entries (and the same NaN/±Inf when ``kinds``); finite entries close."""
    assert torch.equal(got.isfinite(), exp.isfinite()), f"{what}: non-finite entries differ"
    if kinds:
        assert torch.equal(got.isnan(), exp.isnan()), f"{what}: NaN entries differ"
        assert torch.equal(got == math.inf, exp == math.inf), f"{what}: +Inf entries differ"
    fin = exp.isfinite()
    scale = exp[fin].abs().max().item() if fin.any() else 0.0
    torch.testing.assert_close(got[fin], exp[fin], rtol=1e-5, atol=1e-5 * max(scale, 1.0), msg=what)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "zeroB", "clamped"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_ops_propagate_non_finite_like_the_reference(where, value, kind, dtype):
    for index in (0, 7):
        x, W, b, A, B, lam, w = _inputs(where, value, kind, dtype, index)
        what = f"{where}[{index}]={value}, {kind}, {dtype}"
        outs = []
        for f in (ops.linear, ref.linear_ref):
            leaves = [t.clone().requires_grad_() for t in (x, A, B, lam)]
            y = f(leaves[0], W, b, *leaves[1:], w)  # no exception, whatever the values
            outs.append([y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))])
        (y, *grads), (y_ref, *grads_ref) = outs
        _same_nonfinite(y, y_ref, f"y ({what})")
        for name, g, g_ref in zip(["dx", "dA", "dB", "dlam"], grads, grads_ref):
            _same_nonfinite(g, g_ref, f"{name} ({what})", kinds=False)
        if where not in ("x", "W", "bias"):
            _same_nonfinite(ops.delta_weight(A, B, lam, w), ref.delta_weight_ref(A, B, lam, w), f"ΔW ({what})",
                            kinds=False)


@requires_native
def test_raw_merge_op_is_ieee_and_does_not_check():
    """The op is arithmetic only (no host sync); the layer is where the policy lives."""
    A, B, lam, w = make_adapter(3, 10, 6)
    W, _ = make_base(10, 6, bias=False)
    A[1, 4] = math.nan
    got = W.clone()
    ops.merge_(got, A, B, lam, w, 1.0)
    _same_nonfinite(got, ref.merge_ref(W, A, B, lam, w), "merge_", kinds=False)


def _trained_layer(init_weights=False):
    torch.manual_seed(0)
    return DeLoRALinear(nn.Linear(32, 24), r=4, init_weights=init_weights)


def _poison(layer, param, value):
    with torch.no_grad():
        if param == "base":
            layer.base_layer.weight[2, 5] = value
        else:
            getattr(layer, param)["default"].view(-1)[0] = value


@pytest.mark.parametrize("param", ["delora_A", "delora_B", "delora_lambda"])
@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("safe", [False, True])
def test_merge_refuses_non_finite_adapter_and_leaves_weight(param, value, safe):
    layer = _trained_layer()
    _poison(layer, param, value)
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"cannot merge: {param}\['default'\] has non-finite values.*unchanged"):
        layer.merge(safe_merge=safe)
    assert torch.equal(layer.base_layer.weight, W0) and not layer.merged


def test_merge_refuses_base_weight_with_non_finite_column():
    """w is computed from the base weight; a NaN there would spread over the whole column on merge."""
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    with torch.no_grad():
        base.weight[2, 5] = math.inf
    layer = DeLoRALinear(base, r=4, init_weights=False)
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"delora_w_norm\['default'\].*base weight has non-finite columns"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, W0)
    assert not layer.merged


def test_paper_init_frozen_terms_are_checked_too():
    layer = _trained_layer(init_weights="paper")
    with torch.no_grad():
        layer.delora_B0["default"][0, 0] = math.nan
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"delora_B0\['default'\]"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, W0)


def test_unmerge_subtracts_what_merge_added_even_if_parameters_became_non_finite():
    """unmerge subtracts the recorded merged terms: parameters poisoned after the merge do not reach the weight."""
    layer = _trained_layer()
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    _poison(layer, "delora_B", math.nan)
    layer.unmerge()
    assert not layer.merged and torch.isfinite(layer.base_layer.weight).all()
    torch.testing.assert_close(layer.base_layer.weight, W0)


def test_unmerge_without_a_merge_record_refuses_non_finite_parameters():
    """A layer whose merge was not recorded (merged_adapters set by hand) falls back to the current parameters,
    and refuses non-finite ones before writing."""
    layer = _trained_layer()
    layer.merge()
    layer._merged_terms.clear()
    W_merged = layer.base_layer.weight.detach().clone()
    _poison(layer, "delora_B", math.nan)
    with pytest.raises(ValueError, match=r"cannot unmerge: delora_B\['default'\]"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W_merged) and layer.merged


def test_safe_merge_refuses_overflow_in_weight_dtype():
    """Finite parameters whose ΔW overflows fp16: unsafe merge writes Inf (documented); safe merge refuses."""
    torch.manual_seed(0)
    layer = DeLoRALinear(nn.Linear(32, 24).half(), r=4, init_weights=False, delora_lambda=1e9)
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"overflows torch.float16.*left unchanged"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W0) and not layer.merged
    layer.merge()
    assert not torch.isfinite(layer.base_layer.weight).all()


@pytest.mark.parametrize("how", ["nan_param", "nan_param_safe", "overflow_safe"])
def test_model_merge_refused_by_one_layer_leaves_every_weight_bit_identical(how):
    from tiny_models import build

    model = build("llama")
    if how == "overflow_safe":
        model.half()
    delora_ext.patch(model, delora_ext.DeLoRAConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False))
    layers = [m for m in model.modules() if isinstance(m, DeLoRALinear)]
    with torch.no_grad():  # the last layer: the others come first
        if how == "overflow_safe":
            layers[-1].delora_lambda["default"].fill_(1e9)
        else:
            layers[-1].delora_A["default"][0, 0] = math.nan
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot merge" if how.startswith("nan") else "overflows"):
        delora_ext.merge_and_unload(model, safe_merge=how.endswith("safe"))
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k].isnan(), v.isnan()) and torch.equal(after[k].nan_to_num(), v.nan_to_num()), k
    assert not any(m.merged for m in layers)


def test_forward_with_non_finite_input_does_not_raise_and_marks_only_affected_rows():
    layer = _trained_layer()
    x = make_x((4,), 32)
    x[1, 3] = math.nan
    y = layer(x)
    assert not y[1].isfinite().any() and y[[0, 2, 3]].isfinite().all()
