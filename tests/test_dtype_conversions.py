"""Model dtype/device conversions with modules_to_save, unpatch after parameters were replaced, fp16 at PEFT init
with a large λ, merging adapters of different precision."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear
from delora_ext import reference as ref

from tiny_models import (
    build,
    one_thread,  # noqa: F401
)

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("conv", ["double", "half"])
def test_modules_to_save_original_follows_model_dtype_moves(conv):
    """PEFT keeps the original of a modules_to_save module inside the model (ModulesToSaveWrapper.original_module),
    so model.double()/.half()/.to() converts it too; disable_adapters and unpatch must not bring back a module of
    the old dtype/device."""
    base = build("llama")
    model = build("llama")
    delora_ext.patch(model, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    getattr(model, conv)()
    getattr(base, conv)()
    with delora_ext.disable_adapters(model):
        y = model(input_ids=IDS).logits
    assert torch.equal(y, base(input_ids=IDS).logits)
    delora_ext.unpatch(model)
    assert model.lm_head.weight.dtype == base.lm_head.weight.dtype


def test_unpatch_restores_requires_grad_after_parameters_were_replaced():
    """to_empty() (meta-initialised model) and conversions with overwrite_module_params_on_conversion create new
    Parameter objects; unpatch must still restore the flags the model had before patch (all True here)."""
    with torch.device("meta"):
        model = build("llama")
    assert all(p.requires_grad for p in model.parameters())
    delora_ext.patch(model, target_modules=["q_proj"])
    model.to_empty(device="cpu")
    delora_ext.unpatch(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("lam", [1e5, 1e8])
def test_fp16_base_peft_init_large_lambda_is_exactly_the_base(lam):
    """B = 0 (PEFT init): the DeLoRA term is exactly 0 for any finite λ (the fp32 reference gives the base output);
    the fp16 native path must not produce inf·0 = NaN, in the output or in dx."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).half()
    layer = DeLoRALinear(lin, r=1, delora_lambda=lam)
    x = torch.randn(3, 64, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y_ref = ref.linear_ref(x.detach(), lin.weight, lin.bias, *(t.detach() for t in layer._params("default")))
    assert torch.equal(y_ref, lin(x).detach())
    assert torch.equal(y, lin(x))
    # The backward's dx term carries λ/r on A⊙w (bounded by |w|·λ/r, B = 0 makes g·B exactly 0), so dx is finite
    # while |w|·λ/r fits fp16 (here max |w|·λ = 5.8e4 at λ = 1e5); λ = 1e8 is beyond that.
    if lam * layer.delora_w_norm["default"].max().item() >= 6e4:
        return
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), n


def test_merge_adapters_of_different_precision_together():
    """model.double() makes the existing adapter fp64; an adapter added afterwards is fp32 (the documented default).
    Merging both (PEFT merges any set of adapters) must work and match the unmerged output."""
    model = build("llama")
    torch.manual_seed(1)
    delora_ext.patch(model, target_modules=["q_proj"], init_weights=False)
    model.double()
    delora_ext.patch(model, target_modules=["q_proj"], init_weights=False, adapter_name="b")
    delora_ext.set_adapter(model, ["default", "b"])
    y = model(input_ids=IDS).logits
    delora_ext.merge(model)
    assert torch.allclose(model(input_ids=IDS).logits, y, atol=1e-6)
    delora_ext.unmerge(model)
    assert torch.allclose(model(input_ids=IDS).logits, y, atol=1e-6)


@pytest.fixture(params=["default", "swap", "overwrite"])
def conversion_mode(request):
    """How nn.Module conversions replace parameters: .data assignment (default), torch.utils.swap_tensors, or a new
    Parameter object."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    over = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param == "swap")
    torch.__future__.set_overwrite_module_params_on_conversion(request.param == "overwrite")
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(swap)
    torch.__future__.set_overwrite_module_params_on_conversion(over)


def test_a_merged_model_converts_and_unmerges_under_every_conversion_mode(conversion_mode):
    """A conversion converts the merged weight, it does not rewrite it: .double() works on a merged model (with
    swap_tensors it used to fail half-way, leaving fp32 and fp64 parameters mixed), and unmerge then gives the
    converted base model back, as PEFT's."""
    base = build("llama")
    model = build("llama")
    delora_ext.patch(model, target_modules=["q_proj", "v_proj"], init_weights=False)
    delora_ext.merge(model)
    model.double()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    delora_ext.unmerge(model)
    base.double()
    with delora_ext.disable_adapters(model):
        y = model(input_ids=IDS).logits
    torch.testing.assert_close(y, base(input_ids=IDS).logits, rtol=1e-6, atol=1e-6)


def test_load_state_dict_while_merged_is_still_caught_under_swap(conversion_mode):
    """The merge record still tells a weight rewritten by load_state_dict (here the pretrained values) from the merged
    one, also when load_state_dict swaps tensors; the model loads (no weak reference blocks the swap)."""
    model = build("llama")
    pretrained = {k: v.clone() for k, v in build("llama").state_dict().items()}
    delora_ext.patch(model, target_modules=["q_proj"], init_weights=False)
    delora_ext.merge(model)
    layer = model.model.layers[0].self_attn.q_proj
    sd = {"model.layers.0.self_attn.q_proj.base_layer.weight": pretrained["model.layers.0.self_attn.q_proj.weight"]}
    model.load_state_dict(sd, strict=False)
    with pytest.raises(ValueError, match="replaced or rewritten"):
        delora_ext.unmerge(model)
    delora_ext.unmerge(model, stale="discard")
    assert torch.equal(layer.base_layer.weight, pretrained["model.layers.0.self_attn.q_proj.weight"])
