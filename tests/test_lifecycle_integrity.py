"""Model lifecycle integrity: every accepted call leaves the model PEFT would leave, every refused one leaves it as
it was (module train/eval mode, bias="all", disable/enable state, merged adapters, adapter names, aliases, tied
weights, weights replaced while merged)."""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from model_state import capture, differences
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear
from delora_ext.model import delora_layers, get_state

from tiny_models import (
    build,
    one_thread,  # noqa: F401
    tiny_config,
)

transformers = pytest.importorskip("transformers")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


def _x(seed=1):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


def _no_change(model, before, what):
    diff = differences(before, capture(model))
    assert not diff, f"{what} changed the model: {diff[:5]}"


# ---- modules put back into the model follow its train/eval mode ------------------------------------------------
def _roberta_with_dropout():
    cls, cfg = tiny_config("roberta-cls")
    cfg.hidden_dropout_prob = 0.3  # the classifier head's dropout is this one
    torch.manual_seed(0)
    return cls(cfg)  # in training mode, as from_pretrained + .train()


def _cls_logits(model):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_modules_put_back_by_disable_adapters_follow_the_models_eval_mode():
    base = _roberta_with_dropout()
    model = delora_ext.patch(copy.deepcopy(base), target_modules=["query", "value"], modules_to_save=["classifier"],
                             init_weights=False)
    model.eval()
    base.eval()
    with delora_ext.disable_adapters(model):
        assert not model.classifier.training, "the original classifier came back in training mode"
        torch.testing.assert_close(_cls_logits(model), _cls_logits(base), rtol=0, atol=0)


def test_modules_put_back_by_set_adapter_and_unpatch_follow_the_models_eval_mode():
    base = _roberta_with_dropout()
    model = delora_ext.patch(copy.deepcopy(base), target_modules=["query", "value"], modules_to_save=["classifier"],
                             init_weights=False)
    delora_ext.patch(model, target_modules=["query"], adapter_name="plain", init_weights=False)
    model.eval()
    delora_ext.set_adapter(model, "plain")  # no copy of the classifier: the original goes back
    assert not any(m.training for m in model.classifier.modules())
    delora_ext.set_adapter(model, "default")
    model.train()
    delora_ext.set_adapter(model, "plain")
    assert all(m.training for m in model.classifier.modules())
    model.eval()
    delora_ext.unpatch(model)
    base.eval()
    assert [m.training for m in model.modules()] == [m.training for m in base.modules()]
    torch.testing.assert_close(_cls_logits(model), _cls_logits(base), rtol=0, atol=0)


# ---- bias="all" trains exactly the parameters named `bias` ------------------------------------------------------
def test_bias_all_trains_and_saves_exactly_the_parameters_named_bias(tmp_path):
    model = delora_ext.patch(build("deberta"), target_modules=["in_proj"], bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith(("q_bias", "v_bias")) for n in trainable), "DeBERTa's q_bias / v_bias train"
    biases = {n for n in trainable if "delora_" not in n}
    assert biases and all(n.endswith(".bias") for n in biases)
    delora_ext.save_adapter(model, str(tmp_path))
    from safetensors.torch import load_file
    saved = {k.removeprefix("base_model.model.") for k in load_file(str(tmp_path / "adapter_model.safetensors"))}
    assert biases <= saved, f"trained biases not saved: {sorted(biases - saved)[:3]}"


# ---- leaving disable_adapters puts each layer back --------------------------------------------------------------
def test_leaving_disable_adapters_puts_each_layer_back_as_it_was():
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    m[0].enable_adapters(False)
    with delora_ext.disable_adapters(m):
        assert m[0].disable_adapters and m[2].disable_adapters
    assert m[0].disable_adapters, "a layer disabled before the block was enabled by leaving it"
    assert not m[2].disable_adapters


# ---- a merged adapter is not deleted ----------------------------------------------------------------------------
def test_deleting_a_merged_adapter_is_refused_and_changes_nothing():
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    delora_ext.patch(m, target_modules=["0"], r=2, adapter_name="other", init_weights=False)
    delora_ext.merge(m)
    before = capture(m)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        delora_ext.delete_adapter(m, "default")
    _no_change(m, before, "a refused delete_adapter")
    with pytest.raises(ValueError, match="while they are merged"):
        m[0].delete_adapter("default")
    _no_change(m, before, "a refused layer delete_adapter")
    delora_ext.delete_adapter(m, "other")  # not merged: fine
    assert "other" not in m[0].delora_A


# ---- set_adapter on a merged model -------------------------------------------------------------------------------
def test_set_adapter_on_a_merged_model_warns_and_unmerges_first():
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    delora_ext.patch(m, target_modules=["0", "2"], r=2, adapter_name="b", init_weights=False)
    want = copy.deepcopy(m)
    delora_ext.set_adapter(want, "b")
    delora_ext.merge(m)
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first"):
        delora_ext.set_adapter(m, "b")
    assert not any(layer.merged for layer in delora_layers(m).values())
    torch.testing.assert_close(m(_x()), want(_x()), rtol=1e-6, atol=1e-6)


# ---- a layer reports the model's active adapters ----------------------------------------------------------------
def test_a_layer_without_the_active_adapter_reports_the_models_active_adapters():
    model = delora_ext.patch(build("llama"), target_modules=["q_proj", "v_proj"], init_weights=False)
    delora_ext.patch(model, target_modules=["q_proj"], adapter_name="other", init_weights=False)
    v = model.model.layers[0].self_attn.v_proj
    assert v.active_adapters == ["default"]
    delora_ext.set_adapter(model, "other")
    assert v.active_adapters == ["other"], "as PEFT, the layer reports the model's active adapters"
    assert all(layer.active_adapters == ["other"] for layer in delora_layers(model).values())
    base = build("llama")
    delora_ext.merge(model)  # only the layers that have "other" merge it; v_proj has nothing to merge
    assert v.merged_adapters == [] and torch.equal(v.base_layer.weight, base.model.layers[0].self_attn.v_proj.weight)


def test_an_inactive_adapter_loaded_as_trainable_requires_grad(tmp_path):
    src = delora_ext.patch(build("llama"), target_modules=["q_proj"], init_weights=False, adapter_name="x")
    delora_ext.save_adapter(src, str(tmp_path), adapter_names=["x"])
    model = delora_ext.patch(build("llama"), target_modules=["v_proj"])
    delora_ext.load_adapter(model, str(tmp_path / "x"), adapter_name="x", is_trainable=True)
    q = model.model.layers[0].self_attn.q_proj
    assert q.delora_A["x"].requires_grad and q.delora_lambda["x"].requires_grad, "PEFT 0.21: it trains"
    assert model.model.layers[0].self_attn.v_proj.delora_A["default"].requires_grad
    assert get_state(model).active == ["default"]


# ---- patch whose modules_to_save cannot be copied ----------------------------------------------------------------
class _Uncopyable(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.lock = threading.Lock()  # deepcopy refuses locks

    def forward(self, x):
        return self.proj(x)


def test_patch_with_a_modules_to_save_that_cannot_be_copied_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), _Uncopyable())
    before = capture(m)
    with pytest.raises(TypeError):
        delora_ext.patch(m, target_modules=["0"], modules_to_save=["1"])
    _no_change(m, before, "a failed patch")
    assert get_state(m) is None
    delora_ext.patch(m, target_modules=["0"])  # the model can still be patched, saved and unpatched
    delora_ext.unpatch(m)
    assert type(m[0]) is nn.Linear


# ---- adapter names that are attributes of the containers --------------------------------------------------------
@pytest.mark.parametrize("name", ["training", "forward", "keys", "update", "_parameters", "to"])
def test_adapter_names_that_are_module_attributes_are_refused_up_front(name, tmp_path):
    m = _mlp()
    before = capture(m)
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        delora_ext.patch(m, target_modules=["0", "2"], r=2, adapter_name=name)
    _no_change(m, before, "a refused patch")
    m.eval()
    delora_ext.patch(m, target_modules=["0", "2"], r=2)
    before = capture(m)
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        delora_ext.patch(m, target_modules=["0"], r=2, adapter_name=name)
    _no_change(m, before, "a refused second adapter")
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        m[0].update_layer(name, 2)
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        delora_ext.load_adapter(_mlp(), str(tmp_path), adapter_name=name)
    m.train()
    m.eval()


# ---- an adapter listed twice --------------------------------------------------------------------------------------
def test_an_adapter_listed_twice_in_one_merge_is_refused():
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    before = capture(m)
    with pytest.raises(ValueError, match=r"`adapter_names` lists 'default' more than once"):
        delora_ext.merge(m, adapter_names=["default", "default"])
    _no_change(m, before, "a refused merge")
    with pytest.raises(ValueError, match="more than once"):
        m[0].merge(adapter_names=["default", "default"])
    _no_change(m, before, "a refused layer merge")
    with pytest.raises(ValueError, match="more than once"):
        delora_ext.set_adapter(m, ["default", "default"])
    _no_change(m, before, "a refused set_adapter")


# ---- weights shared with another module ---------------------------------------------------------------------------
def test_merging_a_tied_output_embedding_is_refused():
    cls, cfg = tiny_config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = cls(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    delora_ext.patch(model, target_modules=["lm_head"], init_weights=False)
    before = capture(model)
    with pytest.raises(ValueError, match=r"cannot merge into 'lm_head': its base weight shares memory with "
                                         r"'model\.embed_tokens\.weight'"):
        delora_ext.merge(model)
    _no_change(model, before, "a refused merge")
    with pytest.raises(ValueError, match="shares memory"):
        delora_ext.merge_and_unload(model)
    _no_change(model, before, "a refused merge_and_unload")


@pytest.mark.parametrize("adapt_both", [False, True])
def test_merging_into_a_weight_that_two_linears_share_is_refused(adapt_both):
    m = _mlp()
    m[2].weight = m[0].weight
    delora_ext.patch(m, target_modules=["0", "2"] if adapt_both else ["0"], r=2, init_weights=False)
    before = capture(m)
    with pytest.raises(ValueError, match=r"cannot merge into '0': its base weight shares memory with '2"):
        delora_ext.merge(m)
    _no_change(m, before, "a refused merge")


def test_a_weight_sharing_only_a_storage_with_another_but_no_elements_merges():
    big = nn.Parameter(torch.randn(16, 8))
    m = _mlp()
    m[0].weight = nn.Parameter(big.data[:8])  # views of one storage, disjoint rows (a split fused weight)
    m[2].weight = nn.Parameter(big.data[8:])
    delora_ext.patch(m, target_modules=["0"], r=2, init_weights=False)
    before_other = m[2].weight.detach().clone()
    want = m(_x())
    delora_ext.merge(m)
    torch.testing.assert_close(m(_x()), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(m[2].weight, before_other)


# ---- a weight replaced or reloaded while merged -------------------------------------------------------------------
@pytest.mark.parametrize("how", ["load_state_dict", "assign", "load_state_dict_assign"])
def test_unmerge_after_the_base_weight_was_replaced_while_merged_is_refused(how):
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    pristine = {k: v.clone() for k, v in m.state_dict().items()}
    delora_ext.merge(m)
    if how == "assign":
        m[0].base_layer.weight = nn.Parameter(pristine["0.base_layer.weight"].clone(), requires_grad=False)
    else:
        m.load_state_dict(pristine, assign=how.endswith("assign"))  # the pretrained (unmerged) weights again
    before = capture(m)
    with pytest.raises(ValueError, match=r"'0': cannot unmerge this layer: its base weight was replaced or "
                                         r"rewritten"):
        delora_ext.unmerge(m)
    _no_change(m, before, "a refused unmerge")
    for refused in (lambda: delora_ext.unpatch(m), lambda: delora_ext.set_adapter(m, "default"),
                    lambda: m[0].unmerge(), lambda: m[0].merge(), lambda: m[0].update_layer("more", 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="replaced or rewritten"):
                refused()
        _no_change(m, before, "a refused call")
    delora_ext.unmerge(m, stale="discard")  # it holds the pretrained values: forget the merge, keep them
    assert not any(layer.merged for layer in delora_layers(m).values())
    assert torch.equal(m[0].base_layer.weight, pristine["0.base_layer.weight"])
    if how == "assign":  # layer 2 kept its merged weight: unmerged as usual
        torch.testing.assert_close(m[2].base_layer.weight, pristine["2.base_layer.weight"], rtol=0, atol=1e-6)
    else:
        assert torch.equal(m[2].base_layer.weight, pristine["2.base_layer.weight"])


def test_unmerge_subtract_takes_a_reloaded_merged_weight_as_merged():
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2, init_weights=False)
    want = m[0].base_layer.weight.detach().clone()
    delora_ext.merge(m)
    merged_sd = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(merged_sd)  # a checkpoint saved while merged
    delora_ext.unmerge(m, stale="subtract")
    torch.testing.assert_close(m[0].base_layer.weight, want, rtol=0, atol=1e-6)


def test_a_model_converted_while_merged_still_unmerges():
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2, init_weights=False)
    delora_ext.merge(m)
    m.double()
    m.float()
    delora_ext.unmerge(m)  # .to()/.half() keep the weight object and its version: not a replaced weight
    assert not m[0].merged


# ---- a module reachable at two paths ----------------------------------------------------------------------------
class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = self.a  # the same module under a second name

    def forward(self, x):
        return self.b(self.a(x)) + self.c(x)


@pytest.mark.parametrize("target", ["a", "c"])
def test_a_module_reachable_at_two_paths_is_adapted_at_both(target, tmp_path):
    m = _Aliased()
    original = m.a
    delora_ext.patch(m, target_modules=[target], r=2, init_weights=False)
    assert isinstance(m.a, DeLoRALinear) and m.c is m.a, "adapted at one path and left plain at the other"
    layer = m.a
    x = _x()
    dW = layer.get_delta_weight()
    with torch.no_grad():
        ya = original(x) + x @ dW.t()
        want = m.b(ya) + ya
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    delora_ext.save_adapter(m, str(tmp_path))
    fresh = _Aliased()
    delora_ext.load_adapter(fresh, str(tmp_path))
    assert fresh.c is fresh.a and isinstance(fresh.a, DeLoRALinear)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    delora_ext.unpatch(m)
    assert m.a is original and m.c is original


# ---- errors that name what is wrong -------------------------------------------------------------------------------
def test_a_layer_refuses_a_zero_dim_input_naming_x():
    layer = DeLoRALinear(nn.Linear(8, 8), r=2)
    with pytest.raises(ValueError, match=r"`x` must have last dimension in_features=8, got shape \(\)"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("lam", [1e39, -1e39, float("inf")])
def test_a_lambda_beyond_float32_is_refused_naming_delora_lambda(lam):
    with pytest.raises(ValueError, match=r"`delora_lambda` must be finite in float32"):
        DeLoRALinear(nn.Linear(8, 8), r=2, delora_lambda=lam)
    m = _mlp()
    before = capture(m)
    with pytest.raises(ValueError, match=r"`delora_lambda` must be finite in float32"):
        delora_ext.patch(m, target_modules=["0"], delora_lambda=lam)
    with pytest.raises(ValueError, match=r"`lambda_pattern\['0'\]` must be finite in float32"):
        delora_ext.patch(m, target_modules=["0"], lambda_pattern={"0": lam})
    _no_change(m, before, "a refused patch")


def test_save_adapter_takes_a_bare_adapter_name(tmp_path):
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2)
    delora_ext.patch(m, target_modules=["2"], r=2, adapter_name="other")
    delora_ext.save_adapter(m, str(tmp_path), adapter_names="other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    with pytest.raises(ValueError, match=r"`adapter_names`: unknown adapter 'typo'"):
        delora_ext.save_adapter(m, str(tmp_path), adapter_names=["typo"])


def test_a_failed_patch_restores_a_model_whose_modules_hold_self_referencing_containers(monkeypatch):
    m = _mlp()
    m.notes = {"layers": [1, 2]}
    m.notes["self"] = m.notes  # a dict holding itself, and a list shared with a second module
    m[2].shared = m.notes["layers"]
    before = capture(m)
    with pytest.raises(ValueError):
        delora_ext.patch(m, target_modules=["0", "2"], r=2, rank_pattern={"2": 2}, lambda_pattern={"2": 1e39})
    _no_change(m, before, "a refused patch")
    calls = []
    real = DeLoRALinear.update_layer

    def fail_second(self, *args, **kwargs):  # the second layer fails after the first was swapped in
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(DeLoRALinear, "update_layer", fail_second)
    with pytest.raises(MemoryError):
        delora_ext.patch(m, target_modules=["0", "2"], r=2)
    monkeypatch.undo()
    _no_change(m, before, "a failed patch")
    assert m.notes["self"] is m.notes and m[2].shared is m.notes["layers"]


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_merged_model_copied_or_saved_whole_still_unmerges_and_still_detects_a_replaced_weight(how, tmp_path):
    import io as _io
    m = delora_ext.patch(_mlp(), target_modules=["0", "2"], r=2, init_weights=False)
    want = m[0].base_layer.weight.detach().clone()
    delora_ext.merge(m)

    def copied(model):
        if how == "deepcopy":
            return copy.deepcopy(model)
        buf = _io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    c = copied(m)
    delora_ext.unmerge(c)  # the copy's record is of the copy's own weight
    torch.testing.assert_close(c[0].base_layer.weight, want, rtol=0, atol=1e-6)
    assert m[0].merged, "the original is still merged"
    with torch.no_grad():
        m[2].base_layer.weight.add_(1.0)  # rewritten while merged: stale, and a copy is stale too
    c = copied(m)
    with pytest.raises(ValueError, match="replaced or rewritten"):
        delora_ext.unmerge(c)
    with pytest.raises(ValueError, match="replaced or rewritten"):
        delora_ext.unmerge(m)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_a_model_whose_merged_weight_was_replaced_refuses_to_unmerge(how):
    """A weight replaced (not rewritten) while merged, e.g. load_state_dict(assign=True) of the pretrained values:
    a deepcopy or a torch.save/torch.load of the model is as stale as the model; unmerging it would subtract ΔW
    from the pretrained weight."""
    import io as _io
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2, init_weights=False)
    pretrained = m[0].base_layer.weight.detach().clone()
    delora_ext.merge(m)
    m.load_state_dict({"0.base_layer.weight": pretrained.clone()}, strict=False, assign=True)
    if how == "deepcopy":
        c = copy.deepcopy(m)
    else:
        buf = _io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        c = torch.load(buf, weights_only=False)
    with pytest.raises(ValueError, match="replaced or rewritten"):
        delora_ext.unmerge(c)
    delora_ext.unmerge(c, stale="discard")
    assert torch.equal(c[0].base_layer.weight, pretrained)
