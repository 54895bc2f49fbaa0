"""Parity with Hugging Face PEFT's DeloraLinear: same weights -> same output, gradients and merged weight."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from delora_ext import DeLoRALinear

from helpers import assert_close, make_x, saved_activation_bytes
from tiny_models import Wrap

peft = pytest.importorskip("peft")


def _pair(in_f, out, r, lam=15.0, init_weights=False, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out, bias=bias)
    cfg = peft.DeloraConfig(r=r, delora_lambda=lam, target_modules=["lin"], init_weights=init_weights)
    pm = peft.get_peft_model(Wrap(copy.deepcopy(lin)), cfg)
    theirs = pm.base_model.model.lin
    ours = DeLoRALinear(copy.deepcopy(lin), r=r, delora_lambda=lam, init_weights=init_weights)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _dlam_terms(layer, x, g):
    """fp64 per-rank terms t_k of dλ = Σ_k t_k, t_k = (Σ_n u_nk (gB)_nk) / (r a_k b_k) (a, b clamped norms)."""
    A, B, lam, w = (t.detach().double() for t in layer._params("default"))
    x2, g2 = x.double().reshape(-1, A.shape[1]), g.double().reshape(-1, B.shape[0])
    u = (x2 * w) @ A.t()
    a, b = A.norm(dim=1).clamp_min(1e-4), B.norm(dim=0).clamp_min(1e-4)
    return (u * (g2 @ B)).sum(0) / (A.shape[0] * a * b)


def test_state_dict_keys_and_shapes_equal_peft():
    ours, theirs = _pair(24, 16, 4)
    a = {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()}
    b = {k: (tuple(v.shape), v.dtype) for k, v in theirs.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("in_f,out,r,lam", [(64, 48, 8, 15.0), (7, 33, 1, 3.0), (128, 64, 16, -2.0)])
@pytest.mark.parametrize("init_weights", [True, False])
@pytest.mark.parametrize("shape", [(9,), (2, 5)])
def test_outputs_gradients_and_merge_equal_peft(in_f, out, r, lam, init_weights, shape):
    ours, theirs = _pair(in_f, out, r, lam, init_weights)
    x1 = make_x(shape, in_f).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(*shape, out)
    y1, y2 = ours(x1), theirs(x2)
    assert_close(y1, y2, 1e-5, "output")
    y1.backward(g)
    y2.backward(g)
    assert_close(x1.grad, x2.grad, 1e-5, "dx")
    for name in ("delora_A", "delora_B"):
        assert_close(getattr(ours, name)["default"].grad, getattr(theirs, name)["default"].grad, 1e-5, name)
    # dλ = Σ_k t_k sums r terms that can cancel (here up to ~100x): both fp32 results are only good to
    # u·Σ|t_k|, so the tolerance scales with the condition number Σ|t_k| / |Σ t_k| (from fp64).
    t = _dlam_terms(ours, x1.detach(), g)
    cond = (t.abs().sum() / t.sum().abs().clamp_min(1e-300)).item()
    assert_close(ours.delora_lambda["default"].grad, theirs.delora_lambda["default"].grad, 1e-5 * max(1.0, cond),
                 "delora_lambda")
    ours.merge()
    theirs.merge()
    assert_close(ours.base_layer.weight, theirs.base_layer.weight, 1e-5, "merged weight")
    assert_close(ours.get_delta_weight(), theirs.get_delta_weight("default"), 1e-5, "delta weight")


def test_peft_saves_an_extra_activation_we_do_not():
    """PEFT's forward saves x ⊙ w (N×in); ours saves u (N×r) beside x."""
    N, in_f, out, r = 256, 128, 64, 4
    ours, theirs = _pair(in_f, out, r)

    def saved_bytes(layer):
        return saved_activation_bytes(layer, torch.randn(N, in_f, requires_grad=True))

    mine, peft_bytes = saved_bytes(ours), saved_bytes(theirs)
    assert peft_bytes >= N * in_f * 4
    assert mine * 20 <= peft_bytes, (mine, peft_bytes)


def test_patch_takes_peft_deloraconfig_as_peft_takes_it():
    """patch(model, peft.DeloraConfig(...)) adapts what get_peft_model adapts with the same config, at the same
    ranks; another PEFT config type is refused, naming `config`."""
    import delora_ext

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = peft.DeloraConfig(r=2, target_modules=["0", "2"], delora_lambda=5.0, rank_pattern={"2": 3})
    ours = delora_ext.patch(copy.deepcopy(model), cfg)
    theirs = peft.get_peft_model(copy.deepcopy(model), cfg)
    r_ours = {n: m.r for n, m in ours.named_modules() if isinstance(m, DeLoRALinear)}
    r_theirs = {n.removeprefix("base_model.model."): dict(m.r) for n, m in theirs.named_modules()
                if type(m).__name__ == "DeloraLinear"}
    assert r_ours == r_theirs == {"0": {"default": 2}, "2": {"default": 3}}
    assert delora_ext.model.get_state(ours).configs["default"].delora_lambda == 5.0
    with pytest.raises(TypeError, match="`config` must be a delora_ext.DeLoRAConfig or a peft.DeloraConfig, got "
                                        "peft.*LoraConfig"):
        delora_ext.patch(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["0"]))
