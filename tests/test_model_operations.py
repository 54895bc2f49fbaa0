"""Model-level operations at their edges: all-or-nothing unmerge/delete/disable, adapter-name handling, loading
into a merged adapter, integer buffers of modules_to_save, argument type errors, meta-device loading. Each test
names the way the operation would otherwise go wrong."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def _merged_with_nan_in_second_layer():
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    delora_ext.merge(m)
    merged_w = [m[i].base_layer.weight.detach().clone() for i in (0, 2)]
    with torch.no_grad():
        m[2].delora_A["default"][0, 0] = float("nan")
    # unmerge subtracts what merge recorded; without that record (merged_adapters set by hand) layer 2 falls back
    # to its current, non-finite parameters and must refuse
    m[2]._merged_terms.clear()
    return m, merged_w


# Model-level unmerge / delete_adapter / disable_adapters check every layer first: a refusal must not leave the
# model half done.
def test_model_unmerge_refused_leaves_every_layer_merged():
    m, merged_w = _merged_with_nan_in_second_layer()
    with pytest.raises(ValueError, match="non-finite"):
        delora_ext.unmerge(m)
    assert m[0].merged_adapters == ["default"] and m[2].merged_adapters == ["default"]
    assert torch.equal(m[0].base_layer.weight, merged_w[0]), "layer 0 was unmerged although the unmerge failed"


def test_model_delete_adapter_refused_leaves_every_layer_intact():
    m, merged_w = _merged_with_nan_in_second_layer()
    with pytest.raises(ValueError, match="while they are merged"):  # as PEFT: a merged adapter is not deleted
        delora_ext.delete_adapter(m, "default")
    assert "default" in m[0].delora_A, "layer 0 lost the adapter although delete_adapter failed"
    assert torch.equal(m[0].base_layer.weight, merged_w[0])


def test_disable_adapters_refused_leaves_every_layer_enabled_and_merged():
    m, merged_w = _merged_with_nan_in_second_layer()
    with pytest.raises(ValueError, match="non-finite"):
        with delora_ext.disable_adapters(m):
            pass
    assert not m[0].disable_adapters and m[0].merged_adapters == ["default"]
    assert torch.equal(m[0].base_layer.weight, merged_w[0])


# Model-level merge refuses unknown adapter names (PEFT ignores them silently, so a typo merges nothing); a bare
# string is one name.
@pytest.mark.parametrize("names", [["typo"], "default"])
def test_model_merge_refuses_unknown_adapter_names(names):
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    if isinstance(names, str):  # a bare string is one adapter name, not a list of characters
        delora_ext.merge(m, adapter_names=names)
        assert m[0].merged_adapters == ["default"]
        return
    with pytest.raises(ValueError, match="typo"):
        delora_ext.merge(m, adapter_names=names)


# A string adapter name is one name: not matched as a substring by unmerge, not iterated as characters by merge.
def test_layer_unmerge_with_a_string_unmerges_only_that_adapter():
    layer = DeLoRALinear(nn.Linear(8, 8), r=2, init_weights=False, adapter_name="a")
    layer.update_layer("ab", 2, init_weights=False)
    layer.merge(adapter_names=["a", "ab"])
    layer.unmerge("ab")
    assert layer.merged_adapters == ["a"]


def test_layer_merge_with_a_string():
    layer = DeLoRALinear(nn.Linear(8, 8), r=2, init_weights=False, adapter_name="ab")
    layer.merge(adapter_names="ab")
    assert layer.merged_adapters == ["ab"]


# load_adapter into a merged adapter is refused: the weight holds the old ΔW, so a later unmerge would subtract
# the new one and corrupt the base weight.
def test_load_adapter_into_merged_adapter_does_not_corrupt_base_weight(tmp_path):
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    W0 = m[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        m[0].delora_lambda["default"].fill_(3.0)
    delora_ext.save_adapter(m, str(tmp_path))
    with torch.no_grad():
        m[0].delora_lambda["default"].fill_(15.0)
    delora_ext.merge(m)
    merged = m[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"adapter 'default' is merged into '0' and 1 more layers; unmerge it"):
        delora_ext.load_adapter(m, str(tmp_path))
    assert torch.equal(m[0].base_layer.weight, merged) and m[0].delora_lambda["default"].item() == 15.0
    delora_ext.unmerge(m)
    assert torch.allclose(m[0].base_layer.weight, W0, atol=1e-5), "base weight corrupted"


# modules_to_save holding an integer buffer (BatchNorm's num_batches_tracked): the saved file must reload.
class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("writer", ["ours", "peft"])
def test_modules_to_save_with_integer_buffer_round_trips(writer, tmp_path):
    if writer == "ours":
        m = delora_ext.patch(_BN(), target_modules=["lin"], r=2, modules_to_save=["bn"])
        m.train()
        m(torch.randn(5, 4))  # updates running stats and num_batches_tracked
        delora_ext.save_adapter(m, str(tmp_path))
        src_bn = m.bn
    else:
        m = peft.get_peft_model(_BN(), peft.DeloraConfig(target_modules=["lin"], r=2, modules_to_save=["bn"]))
        m.train()
        m(torch.randn(5, 4))
        m.save_pretrained(str(tmp_path))
        src_bn = m.base_model.model.bn.modules_to_save["default"]
    fresh = delora_ext.load_adapter(_BN(), str(tmp_path))
    assert torch.equal(fresh.bn.running_mean, src_bn.running_mean)
    assert int(fresh.bn.num_batches_tracked) == int(src_bn.num_batches_tracked) == 1


# disable_adapters computes with the original modules_to_save module, as PEFT does, not the trained copy.
def test_disable_adapters_uses_original_modules_to_save_as_peft():
    base = _mlp()
    x = torch.randn(3, 8)
    y0 = base(x)
    m = delora_ext.patch(copy.deepcopy(base), target_modules=["0"], r=2, modules_to_save=["2"])
    with torch.no_grad():
        m[2].weight.add_(1.0)
    y_on = m(x)
    with delora_ext.disable_adapters(m):
        assert torch.allclose(m(x), y0), "disabled model does not compute as the base model"
    assert torch.equal(m(x), y_on)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["0"], r=2, modules_to_save=["2"]))
    with torch.no_grad():
        pm.base_model.model[2].modules_to_save["default"].weight.add_(1.0)
    with pm.disable_adapter():
        assert torch.allclose(pm(x), y0)


# Config arguments of the wrong type raise an error that names the argument.
@pytest.mark.parametrize("kw,field", [(dict(module_dropout=None), "module_dropout"),
                                      (dict(module_dropout="x"), "module_dropout"),
                                      (dict(target_modules=5), "target_modules"),
                                      (dict(exclude_modules=5), "exclude_modules")])
def test_config_type_errors_name_the_argument(kw, field):
    with pytest.raises((TypeError, ValueError), match=field):
        delora_ext.DeLoRAConfig(**{"target_modules": ["0"], **kw})


def test_layer_module_dropout_type_error_names_the_argument():
    with pytest.raises((TypeError, ValueError), match="module_dropout"):
        DeLoRALinear(nn.Linear(4, 4), module_dropout="x")


# load_state_dict(assign=True) of the base weights into a model patched on the meta device works completely.
def test_meta_patched_model_loads_base_weights_with_assign_then_adapter():
    real = _mlp()
    ref = delora_ext.patch(copy.deepcopy(real), target_modules=["0", "2"], r=2, init_weights=False)
    with torch.device("meta"):
        meta = _mlp()
    m = delora_ext.patch(meta, target_modules=["0", "2"], r=2, init_weights=False)
    base_sd = {k: v for k, v in ref.state_dict().items() if ".base_layer." in k}
    m.load_state_dict(base_sd, strict=False, assign=True)
    assert not any(m[i].base_layer.weight.is_meta for i in (0, 2))
    adapter_sd = {k: v for k, v in ref.state_dict().items() if ".delora_" in k and ".delora_w_norm." not in k}
    m.load_state_dict(adapter_sd, strict=False, assign=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(m(x), ref(x), atol=1e-6)


# load_adapter into a model patched on the meta device: the file's values become the adapter parameters.
def test_load_adapter_into_meta_patched_model_then_base_weights(tmp_path):
    real = _mlp()
    ref = delora_ext.patch(copy.deepcopy(real), target_modules=["0", "2"], r=2, init_weights=False)
    delora_ext.save_adapter(ref, str(tmp_path))
    with torch.device("meta"):
        meta = _mlp()
    m = delora_ext.load_adapter(meta, str(tmp_path))
    for i in (0, 2):
        for k in ("delora_A", "delora_B", "delora_lambda"):
            got, want = getattr(m[i], k)["default"], getattr(ref[i], k)["default"]
            assert not got.is_meta and torch.equal(got, want) and got.requires_grad == want.requires_grad, k
    base_sd = {k: v for k, v in ref.state_dict().items() if ".base_layer." in k}
    m.load_state_dict(base_sd, strict=False, assign=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))


def test_load_adapter_with_modules_to_save_into_meta_model_refuses(tmp_path):
    ref = delora_ext.patch(_BN(), target_modules=["lin"], r=2, modules_to_save=["bn"])
    delora_ext.save_adapter(ref, str(tmp_path))
    with torch.device("meta"):
        meta = _BN()
    with pytest.raises(ValueError, match=r"modules_to_save\) cannot load into a model with tensors on the meta"):
        delora_ext.load_adapter(meta, str(tmp_path))
    assert not any(isinstance(mod, DeLoRALinear) for mod in meta.modules()), "refused before patching"


# One tensor on the meta device among CPU ones is refused (the fake kernel would return uninitialised memory).
def test_ops_refuse_a_meta_tensor_among_real_ones():
    from delora_ext import ops
    if not ops.NATIVE:
        pytest.skip("native ops only")
    A, B, lam, W, x = torch.randn(2, 8), torch.randn(8, 2), torch.tensor([3.0]), torch.randn(8, 8), torch.randn(3, 8)
    w = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match=r"delora_ext::linear_fwd: `w` is on meta but `x` is on cpu"):
        ops.linear(x, W, None, A, B, lam, w)
    with pytest.raises(RuntimeError, match=r"delora_ext::adapter_fwd: `A` is on meta"):
        ops.adapter(x, A.to("meta"), B, lam, torch.ones(8))
    W0 = W.clone()
    with pytest.raises(RuntimeError, match=r"delora_ext::merge_: `w` is on meta but `weight` is on cpu"):
        ops.merge_(W, A, B, lam, w)
    with pytest.raises(RuntimeError, match=r"delora_ext::merge_many_: `w\[0\]` is on meta"):
        torch.ops.delora_ext.merge_many_(W, [A], [B], [lam], [w], [1.0])
    with pytest.raises(RuntimeError, match=r"delora_ext::delta_weight: `w` is on meta"):
        ops.delta_weight(A, B, lam, w)
    assert torch.equal(W, W0)


# Hooks on the base layer (user hooks, accelerate's replaced forward) run, as in PEFT, which calls base_layer(x).
@pytest.mark.parametrize("how", ["forward_hook", "pre_hook", "instance_forward"])
def test_hooked_base_layer_runs_its_hooks_as_peft(how):
    import functools
    base = _mlp()
    x = torch.randn(3, 8)

    def hook(lin):
        if how == "forward_hook":
            lin.register_forward_hook(lambda mod, args, out: out * 2)
        elif how == "pre_hook":
            lin.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))
        else:  # accelerate's add_hook_to_module replaces the instance's forward
            old = lin.forward

            def new_forward(module, *args, **kwargs):
                return old(*args, **kwargs) - 0.5
            lin.forward = functools.partial(new_forward, lin)

    ours = delora_ext.patch(copy.deepcopy(base), target_modules=["0"], r=2, init_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["0"], r=2, init_weights=False))
    for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"):
        getattr(pm.base_model.model[0], k)["default"].data.copy_(getattr(ours[0], k)["default"])
    with torch.no_grad():
        y_unhooked = ours(x)
    hook(ours[0].base_layer), hook(pm.base_model.model[0].base_layer)
    with torch.no_grad():
        y_ours, y_peft = ours(x), pm(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_ours, y_unhooked), "the hook changes the output"


# Parameters changed while merged (an optimizer step with zero gradients, weight decay): unmerge subtracts the ΔW
# that merge added, so no ΔW_old − ΔW_new is left in the base weight (PEFT leaves it).
@pytest.mark.parametrize("init", [False, "paper"])
def test_unmerge_after_parameters_changed_while_merged_restores_the_base_weight(init):
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=init)
    W0 = [m[i].base_layer.weight.detach().clone() for i in (0, 2)]
    x = torch.randn(4, 8)
    delora_ext.merge(m)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)  # zero_grad(set_to_none=False): weight decay still moves them
    opt.step()
    assert not torch.equal(m[0].delora_A["default"], m[0]._merged_terms["default"][0][0])
    delora_ext.unmerge(m)
    for i, W in zip((0, 2), W0):
        torch.testing.assert_close(m[i].base_layer.weight, W)
    with torch.no_grad():  # and the layer computes base + its current adapter
        y = m(x)
        delora_ext.merge(m)
        torch.testing.assert_close(m(x), y)


# An adapter name is also a folder name in saved adapter directories: names that could act as paths (empty, or
# containing '.', '/' or '\'; an absolute one would write outside the folder) are refused.
@pytest.mark.parametrize("name", ["/tmp/elsewhere", "a/b", "a\\b", "..", "a.b", ""])
def test_adapter_names_that_are_paths_are_refused(name, tmp_path):
    m = _mlp()
    with pytest.raises(ValueError, match=r"`adapter_name` must be a non-empty string without '\.', '/' or '\\'"):
        delora_ext.patch(m, target_modules=["0"], r=2, adapter_name=name)
    assert not any(isinstance(mod, DeLoRALinear) for mod in m.modules())
    with pytest.raises(ValueError, match=r"`adapter_name` must be a non-empty string"):
        delora_ext.load_adapter(_mlp(), str(tmp_path), adapter_name=name)


# layers_to_transform given as a tuple is kept as a list, as it is saved in JSON, so reloading into the same model
# finds the same config.
def test_tuple_layers_to_transform_round_trips(tmp_path):
    from tiny_models import build
    model = build("llama")
    delora_ext.patch(model, target_modules=["q_proj"], r=2, layers_to_transform=(0,), layers_pattern=("layers",))
    delora_ext.save_adapter(model, str(tmp_path))
    delora_ext.load_adapter(model, str(tmp_path))  # the same adapter again: a no-op, not a config clash
    from delora_ext.patching import get_state
    assert get_state(model).configs["default"].layers_to_transform == [0]


# Deleting the only active adapter activates the first remaining one, with a warning, as PEFT does.
def test_deleting_the_active_adapter_activates_the_first_remaining_as_peft():
    base = _mlp()
    x = torch.randn(3, 8)
    m = delora_ext.patch(copy.deepcopy(base), target_modules=["0"], r=2, init_weights=False, adapter_name="a")
    delora_ext.patch(m, target_modules=["0"], r=2, init_weights=False, adapter_name="b")
    delora_ext.set_adapter(m, "b")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["0"], r=2, init_weights=False),
                             adapter_name="a")
    pm.add_adapter("b", peft.DeloraConfig(target_modules=["0"], r=2, init_weights=False))
    pm.set_adapter("b")
    for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"):
        for n in ("a", "b"):
            getattr(pm.base_model.model[0], k)[n].data.copy_(getattr(m[0], k)[n])
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        delora_ext.delete_adapter(m, "b")
    with pytest.warns(UserWarning, match="Setting active adapter to a"):
        pm.delete_adapter("b")
    assert m[0].active_adapters == ["a"] == pm.base_model.model[0].active_adapters
    assert m[0].delora_A["a"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(m(x), pm(x))
