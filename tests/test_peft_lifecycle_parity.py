"""The adapter lifecycle side by side with the installed PEFT, on tiny Llama, BERT, DeBERTa, DeBERTa-v2, a RoBERTa
classifier and T5 built from configs: after every call both models give the same outputs, train the same
parameters, report the same active/merged adapters per layer, and warn or refuse alike.

PEFT's values are copied into ours once after each adapter is created (both initialise randomly); everything after
that is each library's own work. Outputs agree to 1e-5 (relative); where the call is a no-op for the numbers (set,
disable, delete), bit-for-bit expectations are checked against the model itself.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import delora_ext
from delora_ext.model import delora_layers, get_state

from helpers import assert_close
from tiny_models import (
    build,
    logits,
    one_thread,  # noqa: F401
    peft_layers,
    tiny_config,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "bert", "deberta", "deberta-v2", "roberta-cls", "t5"]
# the second adapter's targets (a subset of each model type's default targets, so it extends some layers only)
OTHER = {"llama": ["q_proj"], "bert": ["query"], "deberta": ["in_proj"], "deberta-v2": ["query_proj"],
         "roberta-cls": ["value"], "t5": ["q"]}
SAVE = {"roberta-cls": ["classifier"]}  # the classifier head trains as a modules_to_save copy, as usual


def _cfg(arch, **kw):
    d = dict(r=4, init_weights=False, modules_to_save=SAVE.get(arch))
    d.update(kw)
    return d


def _out(model, arch):
    model.eval()
    with torch.no_grad():
        return logits(model, arch)


def _copy_adapter(pm, ours, name):
    """PEFT's freshly initialised adapter ``name`` into ours (layers and modules_to_save copies)."""
    theirs = peft_layers(pm)
    mine = {p: layer for p, layer in delora_layers(ours).items() if name in layer.delora_A}
    assert {p for p, m in theirs.items() if name in m.delora_A} == set(mine), "different layers adapted"
    with torch.no_grad():
        for p, layer in mine.items():
            t = theirs[p]
            for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"):
                getattr(layer, k)[name].copy_(getattr(t, k)[name])
        for p, copies in get_state(ours).saved_copies.items():
            if name in copies:
                wrapper = pm.base_model.model.get_submodule(p)
                copies[name].load_state_dict(wrapper.modules_to_save[name].state_dict())


def _bump(pm, ours, seed):
    """The same random step on the trainable parameters of both (a stand-in for training)."""
    g = torch.Generator().manual_seed(seed)
    theirs = dict(pm.named_parameters())
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for n in sorted(_trainable_ours(ours)):
            if n.startswith("<"):
                continue
            noise = torch.randn(mine[n].shape, generator=g) * 0.1
            mine[n].add_(noise)
            theirs[_peft_name(pm, n)].add_(noise)


def _peft_name(pm, ours_name):
    """Our parameter name (active modules_to_save copies at their module's path) as PEFT names it."""
    for p in getattr(pm.base_model, "modules_to_save", None) or SAVE_PATHS(pm):
        if ours_name.startswith(p + "."):
            return f"base_model.model.{p}.modules_to_save.{pm.active_adapter}.{ours_name[len(p) + 1:]}"
    return f"base_model.model.{ours_name}"


def SAVE_PATHS(pm):  # noqa: N802
    return [n.removeprefix("base_model.model.") for n, m in pm.named_modules()
            if type(m).__name__ == "ModulesToSaveWrapper"]


def _trainable_peft(pm):
    active = set(pm.active_adapters)
    out = set()
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        n = n.removeprefix("base_model.model.")
        m = re.match(r"(.*)\.modules_to_save\.([^.]+)\.(.*)", n)
        if m:
            path, name, rest = m.groups()
            n = f"{path}.{rest}" if name in active else f"<copy {path}[{name}]>.{rest}"
        out.add(n)
    return out


def _trainable_ours(ours):
    out = {n for n, p in ours.named_parameters() if p.requires_grad}
    for path, copies in get_state(ours).saved_copies.items():
        for name, twin in copies.items():
            if twin is not ours.get_submodule(path):
                out |= {f"<copy {path}[{name}]>.{n}" for n, p in twin.named_parameters() if p.requires_grad}
    return out


def _same(pm, ours, arch, what):
    assert_close(_out(ours, arch), _out(pm, arch), 1e-5, f"{arch}: outputs after {what}")
    assert _trainable_ours(ours) == _trainable_peft(pm), f"{arch}: trainable parameters after {what}"
    theirs = peft_layers(pm)
    for p, layer in delora_layers(ours).items():
        assert layer.active_adapters == list(theirs[p].active_adapters), f"{arch}: {p} active after {what}"
        assert layer.merged_adapters == list(theirs[p].merged_adapters), f"{arch}: {p} merged after {what}"
        assert layer.disable_adapters == theirs[p].disable_adapters, f"{arch}: {p} disabled after {what}"


def _warnings(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    return sorted({str(x.message) for x in w if issubclass(x.category, UserWarning)
                   and ("Adapter" in str(x.message) or "unmerg" in str(x.message).lower())})


def _add_other(pm, ours, arch):
    """The second adapter, "other" (inactive, on fewer layers), added to both, PEFT's values copied into ours."""
    pm.add_adapter("other", peft.DeloraConfig(**_cfg(arch, target_modules=OTHER[arch])))
    delora_ext.patch(ours, **_cfg(arch, target_modules=OTHER[arch]), adapter_name="other")
    _copy_adapter(pm, ours, "other")


def _pair(arch, **kw):
    base = build(arch)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(**_cfg(arch, **kw)))
    ours = delora_ext.patch(copy.deepcopy(base), **_cfg(arch, **kw))
    _copy_adapter(pm, ours, "default")
    return base, pm, ours


@pytest.mark.parametrize("arch", ARCHS)
def test_the_adapter_lifecycle_matches_peft(arch):
    base, pm, ours = _pair(arch)
    _same(pm, ours, arch, "get_peft_model / patch")
    _bump(pm, ours, 0)
    _same(pm, ours, arch, "training the default adapter")

    # a second adapter: inactive, frozen, on fewer layers
    _add_other(pm, ours, arch)
    _same(pm, ours, arch, "adding an inactive adapter")

    pm.set_adapter("other")
    delora_ext.set_adapter(ours, "other")
    _bump(pm, ours, 1)
    _same(pm, ours, arch, "set_adapter('other') and training it")

    # disabled: the base model, and back
    with pm.disable_adapter(), delora_ext.disable_adapters(ours):
        assert_close(_out(ours, arch), _out(pm, arch), 1e-6, f"{arch}: disabled")
        assert torch.equal(_out(ours, arch), _out(base, arch)), f"{arch}: disabled is not the base model"
    _same(pm, ours, arch, "leaving disable_adapters")

    # merged, then unmerged
    pm.merge_adapter()
    delora_ext.merge(ours)
    _same(pm, ours, arch, "merge")
    pm.unmerge_adapter()
    delora_ext.unmerge(ours)
    _same(pm, ours, arch, "unmerge")

    # set_adapter while merged: both warn and unmerge first
    pm.merge_adapter()
    delora_ext.merge(ours)
    w_peft = _warnings(lambda: pm.set_adapter("default"))
    w_ours = _warnings(lambda: delora_ext.set_adapter(ours, "default"))
    assert w_ours == w_peft and w_peft, (w_ours, w_peft)
    _same(pm, ours, arch, "set_adapter on a merged model")

    # a merged adapter is not deleted, by either
    pm.merge_adapter()
    delora_ext.merge(ours)
    with pytest.raises(ValueError, match="while they are merged") as e_peft:
        pm.delete_adapter("default")
    with pytest.raises(ValueError, match="while they are merged") as e_ours:
        delora_ext.delete_adapter(ours, "default")
    assert str(e_ours.value) == str(e_peft.value)
    pm.unmerge_adapter()
    delora_ext.unmerge(ours)
    _same(pm, ours, arch, "a refused delete_adapter")

    # deleting the active adapter: both warn and activate the remaining one
    w_peft = _warnings(lambda: pm.delete_adapter("default"))
    w_ours = _warnings(lambda: delora_ext.delete_adapter(ours, "default"))
    assert w_ours == w_peft, (w_ours, w_peft)
    # PEFT takes the model's new active adapter from its first adapter layer; where that layer had only the deleted
    # one (the RoBERTa classifier's first query layer) PEFT's model is left with the deleted one as its active
    # adapter and cannot run a forward (KeyError) until set_adapter. Ours activates "other" on the model and on every
    # layer that has it.
    assert get_state(ours).active == ["other"]
    if list(pm.active_adapters) != ["other"]:
        assert arch == "roberta-cls", f"{arch}: PEFT's active adapter after the deletion: {pm.active_adapters}"
        pm.set_adapter("other")
        for layer in delora_layers(ours).values():  # a layer left without adapters reports none, as PEFT's
            assert layer.active_adapters == (["other"] if "other" in layer.delora_A else [])
        delora_ext.set_adapter(ours, "other")
    _same(pm, ours, arch, "deleting the active adapter")

    # merge_and_unload: plain modules with the same merged weights
    plain_ours = delora_ext.merge_and_unload(copy.deepcopy(ours))
    try:
        plain_peft = pm.merge_and_unload()
    except AttributeError:  # PEFT 0.21 cannot unload a modules_to_save head without a `weight` (the classifier)
        assert arch == "roberta-cls"
        pm.merge_adapter()
        want = _out(pm, arch)
    else:
        assert [type(m) for m in plain_ours.modules()] == [type(m) for m in plain_peft.modules()]
        want = _out(plain_peft, arch)
    assert not any(isinstance(m, delora_ext.DeLoRALinear) for m in plain_ours.modules())
    assert_close(_out(plain_ours, arch), want, 1e-5, f"{arch}: merge_and_unload")


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_files_cross_between_peft_and_us_through_the_lifecycle(arch, tmp_path):
    base, pm, ours = _pair(arch)
    _bump(pm, ours, 0)
    _add_other(pm, ours, arch)
    pm.set_adapter("other")
    delora_ext.set_adapter(ours, "other")
    _bump(pm, ours, 1)
    pm.set_adapter("default")
    delora_ext.set_adapter(ours, "default")

    # ours -> PEFT: from_pretrained + load_adapter of the second one
    delora_ext.save_adapter(ours, str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"), is_trainable=True)
    pm2.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other", is_trainable=True)
    # PEFT -> ours, the same calls
    pm.save_pretrained(str(tmp_path / "peft"))
    ours2 = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    delora_ext.load_adapter(ours2, str(tmp_path / "peft" / "other"), adapter_name="other", is_trainable=True)
    for name in ("default", "other"):
        for m in (ours, ours2):
            delora_ext.set_adapter(m, name)
        for m in (pm, pm2):
            m.set_adapter(name)
        want = _out(pm, arch)
        assert_close(_out(ours, arch), want, 1e-5, f"{arch}: adapter {name!r} before saving")
        assert_close(_out(pm2, arch), want, 1e-5, f"{arch}: adapter {name!r} saved by us, read by PEFT")
        assert_close(_out(ours2, arch), want, 1e-5, f"{arch}: adapter {name!r} saved by PEFT, read by us")
    # an adapter loaded as trainable next to the active one trains in both (PEFT 0.21)
    delora_ext.set_adapter(ours2, "default")
    pm2.set_adapter("default")
    delora_ext.load_adapter(ours2, str(tmp_path / "peft" / "other"), adapter_name="third", is_trainable=True)
    pm2.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="third", is_trainable=True)
    assert _trainable_ours(ours2) == _trainable_peft(pm2)
    # and as PEFT, an inference load freezes everything and puts the model in eval mode
    ours3 = delora_ext.load_adapter(copy.deepcopy(base).train(), str(tmp_path / "peft"), is_trainable=False)
    pm3 = peft.PeftModel.from_pretrained(copy.deepcopy(base).train(), str(tmp_path / "ours"), is_trainable=False)
    assert _trainable_ours(ours3) == _trainable_peft(pm3) == set()
    assert not ours3.training and not pm3.training


@pytest.mark.parametrize("order", ["as saved", "reversed"])
@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_loading_over_an_existing_adapter_matches_peft(arch, order, tmp_path):
    """PEFT's load_adapter into an adapter name the model has loads the file's values and keeps the model's config;
    the file's target_modules come in the order of a set (it changes with PYTHONHASHSEED)."""
    import json
    base, pm, ours = _pair(arch)
    _bump(pm, ours, 0)
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    if isinstance(cfg["target_modules"], list) and order == "reversed":
        cfg["target_modules"] = cfg["target_modules"][::-1]
    cfg["delora_lambda"] = 2.0  # a config field that differs: both keep the model's
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    _, pm_b, ours_b = _pair(arch)  # the same layout, other values
    pm_b.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delora_ext.load_adapter(ours_b, str(tmp_path), adapter_name="default", is_trainable=True)
    assert pm_b.peft_config["default"].delora_lambda == get_state(ours_b).configs["default"].delora_lambda == 15
    _same(pm_b, ours_b, arch, "loading over the existing adapter")
    assert_close(_out(ours_b, arch), _out(pm, arch), 1e-5, f"{arch}: the file's values")


@pytest.mark.parametrize("arch", ["deberta", "bert"])
def test_bias_all_trains_and_saves_what_peft_does(arch, tmp_path):
    from safetensors.torch import load_file
    base, pm, ours = _pair(arch, bias="all")
    _same(pm, ours, arch, "bias='all'")
    _bump(pm, ours, 0)
    _same(pm, ours, arch, "training with bias='all'")
    pm.save_pretrained(str(tmp_path / "peft"))
    delora_ext.save_adapter(ours, str(tmp_path / "ours"))
    keys = [set(load_file(str(tmp_path / d / "adapter_model.safetensors"))) for d in ("peft", "ours")]
    assert keys[0] == keys[1], sorted(keys[0] ^ keys[1])[:6]
    with pm.disable_adapter(), delora_ext.disable_adapters(ours):  # trained biases stay: PEFT warns as much
        assert_close(_out(ours, arch), _out(pm, arch), 1e-5, f"{arch}: disabled with trained biases")


def test_modules_to_save_follow_eval_mode_as_in_peft():
    """The RoBERTa classifier with dropout: after model.eval(), the disabled model is the base model in eval mode
    (PEFT keeps the original head inside the model; ours puts it back in the model's mode)."""
    cls, cfg = tiny_config("roberta-cls")
    cfg.hidden_dropout_prob = 0.3
    torch.manual_seed(0)
    base = cls(cfg)
    kw = dict(target_modules=["query", "value"], modules_to_save=["classifier"], init_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(**kw))
    ours = delora_ext.patch(copy.deepcopy(base), **kw)
    _copy_adapter(pm, ours, "default")
    pm.eval()
    ours.eval()
    base.eval()
    with torch.no_grad(), pm.disable_adapter(), delora_ext.disable_adapters(ours):
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
        want = base(input_ids=ids).logits
        assert torch.equal(pm(input_ids=ids).logits, want)
        assert torch.equal(ours(input_ids=ids).logits, want)


def _unfreeze_norm(pm, ours, arch):
    """A base parameter the user chose to train besides the adapter (the last norm, or the first LayerNorm)."""
    name = next(n for n, _ in ours.named_parameters() if "norm" in n.lower() and n.endswith("weight"))
    ours.get_parameter(name).requires_grad_(True)
    pm.base_model.model.get_parameter(name).requires_grad_(True)
    return name


@pytest.mark.parametrize("arch", ["llama", "bert", "roberta-cls"])
def test_parameters_the_user_unfroze_keep_training_through_the_lifecycle_as_in_peft(arch, tmp_path):
    """After the first patch, adding, setting, deleting and loading adapters change the adapters' own flags only
    (PEFT's inject_adapter restores every pre-existing flag; its set_adapter touches the adapter layers)."""
    base, pm, ours = _pair(arch)
    name = _unfreeze_norm(pm, ours, arch)
    _add_other(pm, ours, arch)
    _same(pm, ours, arch, "adding an adapter")
    pm.set_adapter("other")
    delora_ext.set_adapter(ours, "other")
    _same(pm, ours, arch, "set_adapter")
    assert ours.get_parameter(name).requires_grad, name
    delora_ext.save_adapter(ours, str(tmp_path), adapter_names=["other"])
    where = str(tmp_path / "other")  # PEFT's layout: an adapter other than "default" in its own folder
    for trainable in (True, False):
        loaded = f"loaded_{trainable}"
        pm.load_adapter(where, adapter_name=loaded, is_trainable=trainable)
        delora_ext.load_adapter(ours, where, adapter_name=loaded, is_trainable=trainable)
        _same(pm, ours, arch, f"load_adapter(is_trainable={trainable})")
    pm.delete_adapter("loaded_True")
    delora_ext.delete_adapter(ours, "loaded_True")
    _same(pm, ours, arch, "delete_adapter")
    assert ours.get_parameter(name).requires_grad, name


def test_set_adapter_leaves_biases_as_peft_does():
    """An adapter with bias='all' unfreezes the biases at the first patch; activating one with bias='none' leaves
    them training, as PEFT's set_adapter (which only touches the adapter layers)."""
    arch = "bert"
    base, pm, ours = _pair(arch, bias="all")
    _add_other(pm, ours, arch)
    pm.set_adapter("other")
    delora_ext.set_adapter(ours, "other")
    _same(pm, ours, arch, "set_adapter to a bias='none' adapter")
    assert any(n.endswith(".bias") for n in _trainable_ours(ours))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merging_while_disabled_computes_as_the_base_model_as_in_peft(arch):
    """PEFT's forward unmerges a disabled layer: a merge inside disable_adapters does not change the outputs there,
    and the adapter is unmerged by the first forward."""
    base, pm, ours = _pair(arch)
    want = _out(base, arch)
    with pm.disable_adapter(), delora_ext.disable_adapters(ours):
        pm.base_model.merge_adapter()
        delora_ext.merge(ours)
        # W + ΔW − ΔW: the base weight back to rounding (PEFT's unmerge is no closer)
        assert_close(_out(ours, arch), want, 1e-6, f"{arch}: a merge inside disable_adapters changed the outputs")
        assert_close(_out(pm, arch), want, 1e-6, f"{arch}: PEFT")
        _same(pm, ours, arch, "merging while disabled")
    _same(pm, ours, arch, "leaving disable_adapters after a merge")


def test_a_disabled_layer_unmerges_on_its_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 10)
    layer = delora_ext.DeLoRALinear(copy.deepcopy(lin), r=3, init_weights=False)
    x = torch.randn(4, 12)
    layer.enable_adapters(False)
    layer.merge()
    with torch.no_grad():
        y = layer(x)
    assert layer.merged_adapters == []
    assert_close(y, lin(x).detach(), 1e-6, "disabled after merge")


def test_deleting_an_inactive_adapter_leaves_the_others_flags_as_peft(tmp_path):
    """PEFT's delete_adapter calls set_adapter only when the deleted adapter was active: an inactive adapter loaded
    with is_trainable=True keeps training when another inactive one is deleted."""
    arch = "llama"
    base, pm, ours = _pair(arch)
    _add_other(pm, ours, arch)
    delora_ext.save_adapter(ours, str(tmp_path), adapter_names=["other"])
    pm.load_adapter(str(tmp_path / "other"), adapter_name="loaded", is_trainable=True)
    delora_ext.load_adapter(ours, str(tmp_path / "other"), adapter_name="loaded", is_trainable=True)
    _same(pm, ours, arch, "loading a trainable inactive adapter")
    pm.delete_adapter("other")
    delora_ext.delete_adapter(ours, "other")
    _same(pm, ours, arch, "deleting another inactive adapter")
    assert any(n.endswith(".loaded") for n in _trainable_ours(ours))


def test_leaving_disable_adapters_sets_the_flags_as_peft(tmp_path):
    """PEFT's disable_adapter() freezes the adapters and their modules_to_save copies and, on leaving, lets the
    active adapter and its copies train (also one loaded for inference)."""
    arch = "roberta-cls"
    base = build(arch)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(**_cfg(arch)))
    pm.save_pretrained(str(tmp_path))
    pi = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=False)
    ours = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path), is_trainable=False)
    assert _trainable_ours(ours) == _trainable_peft(pi) == set()
    with pi.disable_adapter(), delora_ext.disable_adapters(ours):
        assert _trainable_ours(ours) == _trainable_peft(pi) == set()
    assert _trainable_ours(ours) == _trainable_peft(pi)
    assert any("classifier" in n for n in _trainable_ours(ours))  # the head's copy trains with its adapter


def test_a_peft_config_in_inference_mode_patches_a_frozen_adapter():
    arch = "llama"
    base = build(arch)
    cfg = peft.DeloraConfig(**_cfg(arch), inference_mode=True)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    ours = delora_ext.patch(copy.deepcopy(base), cfg)
    assert _trainable_ours(ours) == _trainable_peft(pm) == set()
