"""Model patching on real (tiny) architectures: Llama, GPT-2 (Conv1D), BERT, T5.

Identity at init, training touches only the adapter, merge_and_unload, unpatch, PEFT's matching rules
(target_modules / exclude_modules / layers_to_transform / rank_pattern / lambda_pattern / bias), several named
adapters, disable_adapters, paper init, meta-device construction and non-float base weights. Adapter files are
tested in test_adapter_files.py.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear
from delora_ext.layer import is_conv1d
from delora_ext.patching import STATE_ATTR

from helpers import assert_close, rel_err
from tiny_models import (
    ARCHS,
    LAYERS_PATTERN,
    OUTPUT_EMBEDDING,
    PEFT_ARCHS,
    all_linear,
    all_linear_paths,
    assert_state_equal,
    base_key,
    build,
    build_meta,
    delora_paths,
    expected_by_regex,
    expected_by_suffix,
    linear_paths,
    logits,
    module_types,
    one_thread,  # noqa: F401  (autouse: the model tests run single-threaded)
    peft_layers,
    peft_model_for,
    snapshot,
    train,
)

# The model-type defaults (PEFT's mapping), another list, and a regex, per architecture.
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}
LIST_TARGETS = {"llama": ["k_proj", "down_proj"], "gpt2": ["c_fc", "c_proj"], "bert": ["key", "dense"],
                "t5": ["k", "wo"]}
REGEX_TARGETS = {"llama": r"model\.layers\.1\.self_attn\.(q|k)_proj", "gpt2": r"transformer\.h\.0\.(attn|mlp)\.c_proj",
                 "bert": r".*attention\.self\.(query|key)", "t5": r"decoder\..*EncDecAttention\.(q|v)"}
ADAPTER_KEYS = (".delora_A.", ".delora_B.", ".delora_lambda.")


def _column_norms(module: nn.Module) -> torch.Tensor:
    W = module.weight.t() if is_conv1d(module) else module.weight
    return W.detach().double().norm(dim=0)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _adapter_params(model, names=("default",)) -> set[str]:
    return {f"{path}.{k}.{n}" for path, layer in model.named_modules() if isinstance(layer, DeLoRALinear)
            for k in ("delora_A", "delora_B", "delora_lambda") for n in names if n in layer.delora_A}


# ---- identity, training, merge, unpatch ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_at_init(arch):
    base = build(arch)
    with torch.no_grad():
        y0 = logits(base, arch)
        model = delora_ext.patch(copy.deepcopy(base), r=4, **all_linear(arch))
        assert delora_paths(model) == all_linear_paths(base, arch)
        assert_close(logits(model, arch), y0, 1e-6, "patched output at init")


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_loss_and_changes_only_adapter_parameters(arch):
    model = delora_ext.patch(build(arch), r=4, **all_linear(arch))
    assert _trainable(model) == _adapter_params(model)
    before = snapshot(model)
    loss0, loss1 = train(model, arch, steps=3)
    assert loss1 < loss0, (loss0, loss1)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all(any(a in k for a in ADAPTER_KEYS) for k in changed), sorted(changed)
    assert any(".delora_B." in k for k in changed) and any(".delora_A." in k for k in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_equals_unmerged_and_returns_plain_modules(arch):
    base = build(arch)
    types = module_types(base)
    model = delora_ext.patch(copy.deepcopy(base), r=4, init_weights=False, **all_linear(arch))
    paths = delora_paths(model)
    with torch.no_grad():
        y = logits(model, arch)
        assert rel_err(y, logits(base, arch)) > 1e-3  # the adapter does something
        out = delora_ext.merge_and_unload(model)
        assert out is model
        assert_close(logits(model, arch), y, 1e-5, "merged output")
    assert module_types(model) == types
    assert not any(isinstance(m, DeLoRALinear) for m in model.modules())
    assert not hasattr(model, STATE_ATTR)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [n for n, _ in base.named_parameters()]
    changed = [p for p in paths if not torch.equal(model.get_submodule(p).weight, base.get_submodule(p).weight)]
    assert changed == paths


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_restores_original_modules_weights_and_flags(arch):
    model = build(arch)
    model.get_input_embeddings().weight.requires_grad_(False)  # a mix of flags to restore
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    originals = {n: model.get_submodule(n) for n in linear_paths(model)}
    before, types = snapshot(model), module_types(model)
    delora_ext.patch(model, r=4, **all_linear(arch))
    train(model, arch, steps=2)
    assert delora_ext.unpatch(model) is model
    assert module_types(model) == types
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert_state_equal(model, before, "after unpatch")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, STATE_ATTR)

    # unpatch after a merge: the merged update is subtracted again
    delora_ext.patch(model, r=4, init_weights=False, **all_linear(arch))
    delora_ext.merge(model)
    delora_ext.unpatch(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    for k, v in before.items():
        assert_close(model.state_dict()[k], v, 1e-6, k)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---- which modules are adapted (PEFT's rules) ------------------------------------------------------------
def _targets(arch, mode, model):
    if mode == "list":
        return LIST_TARGETS[arch], expected_by_suffix(model, LIST_TARGETS[arch])
    if mode == "regex":
        return REGEX_TARGETS[arch], expected_by_regex(model, REGEX_TARGETS[arch])
    if mode == "all-linear":
        return "all-linear", [n for n in linear_paths(model) if n != OUTPUT_EMBEDDING[arch]]
    return None, expected_by_suffix(model, DEFAULT_TARGETS[arch])


@pytest.mark.parametrize("mode", ["list", "regex", "all-linear", "default"])
@pytest.mark.parametrize("arch", ARCHS)
def test_target_modules(arch, mode):
    base = build(arch)
    spec, expected = _targets(arch, mode, base)
    assert expected and len(expected) < len(linear_paths(base))
    model = delora_ext.patch(copy.deepcopy(base), target_modules=spec, r=2)
    assert delora_paths(model) == expected
    assert OUTPUT_EMBEDDING[arch] not in delora_paths(model) or mode == "list"
    if arch in PEFT_ARCHS:
        assert sorted(peft_layers(peft_model_for(base, target_modules=spec, r=2))) == sorted(expected)


@pytest.mark.parametrize("kind", ["list", "regex"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exclude_modules(arch, kind):
    base = build(arch)
    all_linear = [n for n in linear_paths(base) if n != OUTPUT_EMBEDDING[arch]]
    if kind == "list":
        leaf, full = LIST_TARGETS[arch][0], all_linear[-1]
        exclude = [leaf, full]
        expected = [n for n in all_linear if n.rsplit(".", 1)[-1] != leaf and n != full]
    else:
        exclude = rf".*\.{LAYERS_PATTERN[arch]}\.1\..*"
        expected = [n for n in all_linear if not re.fullmatch(exclude, n)]
    assert 0 < len(expected) < len(all_linear) - 1
    model = delora_ext.patch(copy.deepcopy(base), target_modules="all-linear", exclude_modules=exclude, r=2)
    assert delora_paths(model) == expected
    if arch in PEFT_ARCHS:
        pm = peft_model_for(base, target_modules="all-linear", exclude_modules=exclude, r=2)
        assert sorted(peft_layers(pm)) == sorted(expected)


@pytest.mark.parametrize("with_pattern", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_layers_to_transform_and_layers_pattern(arch, with_pattern):
    base = build(arch)
    pat = LAYERS_PATTERN[arch]
    kw = dict(layers_to_transform=[1], layers_pattern=pat) if with_pattern else dict(layers_to_transform=0)
    idx = 1 if with_pattern else 0
    expected = [n for n in expected_by_suffix(base, DEFAULT_TARGETS[arch]) if f".{pat}.{idx}." in n]
    assert expected
    model = delora_ext.patch(copy.deepcopy(base), target_modules=DEFAULT_TARGETS[arch], r=2, **kw)
    assert delora_paths(model) == expected
    if arch in PEFT_ARCHS:
        pm = peft_model_for(base, target_modules=DEFAULT_TARGETS[arch], r=2, **kw)
        assert sorted(peft_layers(pm)) == sorted(expected)


@pytest.mark.parametrize("target", [r".*\.(q_proj|v_proj)", "all-linear"])
def test_layers_to_transform_with_a_string_target_is_refused(target):
    """As PEFT: a regex is matched as is, so layers_to_transform would otherwise be silently ignored."""
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        peft_model_for(build("llama"), target_modules=target, layers_to_transform=[0], r=2)
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
        delora_ext.patch(model, target_modules=target, layers_to_transform=[0], r=2)
    assert not hasattr(model, STATE_ATTR)
    assert_state_equal(model, before, "refused config")


@pytest.mark.parametrize("arch", ARCHS)
def test_rank_and_lambda_pattern(arch):
    base = build(arch)
    paths = [n for n in linear_paths(base) if n != OUTPUT_EMBEDDING[arch]]
    first, leaf = paths[0], LIST_TARGETS[arch][1]
    lam_re = rf"{LAYERS_PATTERN[arch]}\.1\..*"
    cfg = dict(target_modules="all-linear", r=2, delora_lambda=15.0, rank_pattern={re.escape(first): 4, leaf: 3},
               lambda_pattern={lam_re: 3.0})
    model = delora_ext.patch(copy.deepcopy(base), **cfg)
    layers = {p: model.get_submodule(p) for p in delora_paths(model)}
    assert list(layers) == paths
    for p, layer in layers.items():
        r = 4 if p == first else 3 if p.rsplit(".", 1)[-1] == leaf else 2
        lam = 3.0 if re.search(rf"(^|\.){lam_re}$", p) else 15.0
        assert layer.r["default"] == r, p
        assert layer.delora_A["default"].shape == (r, layer.in_features)
        assert layer.delora_B["default"].shape == (layer.out_features, r)
        assert layer.delora_lambda["default"].item() == lam, p
    assert len({lay.r["default"] for lay in layers.values()}) == 3
    assert len({lay.delora_lambda["default"].item() for lay in layers.values()}) == 2
    if arch in PEFT_ARCHS:
        theirs = peft_layers(peft_model_for(base, **cfg))
        assert {p: t.r["default"] for p, t in theirs.items()} == {p: lay.r["default"] for p, lay in layers.items()}
        assert {p: t.delora_lambda["default"].item() for p, t in theirs.items()} == \
            {p: lay.delora_lambda["default"].item() for p, lay in layers.items()}


@pytest.mark.parametrize("bias", ["none", "all", "delora_only"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])  # the architectures with biases
def test_bias_trainability(arch, bias):
    base = build(arch)
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    model = delora_ext.patch(copy.deepcopy(base), target_modules=DEFAULT_TARGETS[arch], r=2, bias=bias)
    adapters = _adapter_params(model)
    biases = {"none": set(), "all": {n for n, _ in model.named_parameters() if n.endswith(".bias")},
              "delora_only": {f"{p}.base_layer.bias" for p in delora_paths(model)}}[bias]
    assert _trainable(model) == adapters | biases
    if bias == "delora_only":
        assert biases < {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    if arch in PEFT_ARCHS:
        pm = peft_model_for(base, target_modules=DEFAULT_TARGETS[arch], r=2, bias=bias)
        assert {n.removeprefix("base_model.model.") for n in _trainable(pm)} == adapters | biases
    before = snapshot(model)
    train(model, arch, steps=2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # state_dict keys, so tied aliases count too (BERT's cls.predictions.decoder.bias is cls.predictions.bias)
    may_change = {k for k in before if k.endswith(".bias")} if bias == "all" else biases
    assert {k for k in changed if not any(a in k for a in ADAPTER_KEYS)} <= may_change
    if bias != "none":
        assert changed & biases
    delora_ext.unpatch(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---- the patch call itself ----------------------------------------------------------------------------
def test_patch_is_idempotent_with_same_config_and_refuses_another():
    model = delora_ext.patch(build("llama"), target_modules=["q_proj", "v_proj"], r=4)
    layers = {p: model.get_submodule(p) for p in delora_paths(model)}
    before, types = snapshot(model), module_types(model)
    assert delora_ext.patch(model, delora_ext.DeLoRAConfig(target_modules=["q_proj", "v_proj"], r=4)) is model
    assert delora_ext.patch(model, target_modules=["q_proj", "v_proj"], r=4) is model
    assert all(model.get_submodule(p) is lay for p, lay in layers.items())
    assert_state_equal(model, before, "same config again")
    with pytest.raises(ValueError, match="adapter 'default' already exists on this model with a different config"):
        delora_ext.patch(model, target_modules=["q_proj", "v_proj"], r=8)
    with pytest.raises(ValueError, match="already exists"):
        delora_ext.patch(model, target_modules=["k_proj"], r=4)
    assert module_types(model) == types
    assert_state_equal(model, before, "refused config")
    assert set(delora_ext.patching.get_state(model).configs) == {"default"}


@pytest.mark.parametrize("arch", ARCHS)
def test_no_match_error_lists_module_names_and_leaves_model(arch):
    model = build(arch)
    before, types = snapshot(model), module_types(model)
    with pytest.raises(ValueError, match=r"no module matched target_modules=\['nope'\]") as e:
        delora_ext.patch(model, target_modules=["nope"], r=2)
    # the message names modules the user could target: this architecture's linear layers
    assert linear_paths(model)[0] in str(e.value), str(e.value)
    assert module_types(model) == types
    assert_state_equal(model, before, "no match")
    assert not hasattr(model, STATE_ATTR)


def test_patch_rejects_unsupported_listed_module_and_leaves_model():
    model = build("llama")
    before, types = snapshot(model), module_types(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"target module 'model.embed_tokens' is a Embedding"):
        delora_ext.patch(model, target_modules=["q_proj", "embed_tokens"], r=2)
    assert module_types(model) == types
    assert_state_equal(model, before, "unsupported target")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---- several named adapters ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_several_adapters_sum_and_delete(arch):
    base = build(arch)
    model = delora_ext.patch(copy.deepcopy(base), r=2, init_weights=False, **all_linear(arch))
    with torch.no_grad():
        y_default = logits(model, arch)
    delora_ext.patch(model, adapter_name="b", target_modules=DEFAULT_TARGETS[arch], r=3, delora_lambda=2.0,
                     init_weights=False)
    layers = {p: model.get_submodule(p) for p in delora_paths(model)}
    assert [p for p, lay in layers.items() if "b" in lay.delora_A] == expected_by_suffix(base, DEFAULT_TARGETS[arch])
    # a newly added adapter is neither active nor trainable
    assert _trainable(model) == _adapter_params(model, ["default"])
    with torch.no_grad():
        assert torch.equal(logits(model, arch), y_default)

    # layer by layer, both adapters active = base + delta_default + delta_b
    g = torch.Generator().manual_seed(11)
    xs = {p: torch.randn(3, lay.in_features, generator=g) for p, lay in layers.items()}

    def outs():
        with torch.no_grad():
            return {p: lay(xs[p]) for p, lay in layers.items()}

    delora_ext.set_adapter(model, ["default", "b"])
    assert _trainable(model) == _adapter_params(model, ["default", "b"])
    both = outs()
    delora_ext.set_adapter(model, "default")
    only_a = outs()
    delora_ext.set_adapter(model, "b")
    only_b = outs()
    with delora_ext.disable_adapters(model):
        plain = outs()
    for p in layers:
        expected = plain[p] + (only_a[p] - plain[p]) + (only_b[p] - plain[p])
        assert_close(both[p], expected, 1e-5, f"{p}: sum of two adapters")
        if "b" in layers[p].delora_A:
            assert rel_err(both[p], only_a[p]) > 1e-4

    # the whole model with both active equals the model with both merged
    delora_ext.set_adapter(model, ["default", "b"])
    with torch.no_grad():
        y_both = logits(model, arch)
        delora_ext.merge(model)
        assert all(set(lay.merged_adapters) == ({"default", "b"} & set(lay.delora_A)) for lay in layers.values())
        assert_close(logits(model, arch), y_both, 1e-5, "both adapters merged")
        delora_ext.unmerge(model)

    delora_ext.delete_adapter(model, "b")
    assert not any("b" in lay.delora_A or "b" in lay.delora_w_norm for lay in layers.values())
    assert not any(k.endswith(".b") for k in model.state_dict())
    assert list(delora_ext.patching.get_state(model).configs) == ["default"]
    assert _trainable(model) == _adapter_params(model, ["default"])
    with torch.no_grad():
        # the merge and unmerge above rounded the base weights in fp32 (a few ulps)
        assert_close(logits(model, arch), y_default, 1e-5, "after delete_adapter")
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        delora_ext.set_adapter(model, "b")
    with pytest.raises(ValueError, match="unknown adapter 'b'"):
        delora_ext.delete_adapter(model, "b")


@pytest.mark.parametrize("arch", ARCHS)
def test_disable_adapters_gives_base_output(arch):
    base = build(arch)
    model = delora_ext.patch(copy.deepcopy(base), r=2, init_weights=False, **all_linear(arch))
    with torch.no_grad():
        y0, y = logits(base, arch), logits(model, arch)
        assert rel_err(y, y0) > 1e-3
        with delora_ext.disable_adapters(model) as m:
            assert m is model
            assert torch.equal(logits(model, arch), y0)
        assert torch.equal(logits(model, arch), y)
        delora_ext.merge(model)
        with delora_ext.disable_adapters(model):  # merged adapters are unmerged first
            assert_close(logits(model, arch), y0, 1e-6, "disabled after merge")
        assert_close(logits(model, arch), y, 1e-6, "re-enabled")


@pytest.mark.parametrize("arch", ARCHS)
def test_new_adapter_w_comes_from_unmerged_base_weight(arch):
    base = build(arch)
    model = delora_ext.patch(copy.deepcopy(base), r=2, init_weights=False, **all_linear(arch))
    delora_ext.merge(model)
    paths = delora_paths(model)
    assert not torch.equal(model.get_submodule(paths[0]).base_layer.weight, base.get_submodule(paths[0]).weight)
    delora_ext.patch(model, adapter_name="b", r=3, **all_linear(arch))
    for p in paths:
        layer = model.get_submodule(p)
        w_true = _column_norms(base.get_submodule(p))
        assert_close(layer.delora_w_norm["b"], w_true, 1e-6, f"{p}: w of the new adapter")
        assert_close(layer.delora_w_norm["default"], w_true, 1e-7, f"{p}: w of the merged adapter")


# ---- paper init ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_paper_init_identity_and_training(arch):
    base = build(arch)
    model = delora_ext.patch(copy.deepcopy(base), r=2, init_weights="paper", **all_linear(arch))
    layers = [model.get_submodule(p) for p in delora_paths(model)]
    assert all(lay.delora_B["default"].abs().sum() > 0 for lay in layers)  # B random, unlike PEFT's init
    with torch.no_grad():
        assert_close(logits(model, arch), logits(base, arch), 1e-5, "paper init at step 0")
    assert _trainable(model) == _adapter_params(model)
    before = snapshot(model)
    loss0, loss1 = train(model, arch, steps=3)
    assert loss1 < loss0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(a in k for a in ADAPTER_KEYS) for k in changed), sorted(changed)
    with torch.no_grad():
        y = logits(model, arch)
        delora_ext.merge(model)
        assert_close(logits(model, arch), y, 1e-5, "paper init merged")


# ---- meta device ----------------------------------------------------------------------------------------
def _materialise(meta_model, real):
    """to_empty + the real non-persistent buffers (rotary tables, position ids: not in any state_dict)."""
    meta_model.to_empty(device="cpu")
    persistent = set(real.state_dict())
    with torch.no_grad():
        for n, b in real.named_buffers():
            if n not in persistent:
                meta_model.get_buffer(n).copy_(b)


@pytest.mark.parametrize("via", ["state_dict", "adapter_file"])
@pytest.mark.parametrize("arch", ARCHS)
def test_meta_device_w_is_real_column_norm(arch, via, tmp_path):
    real = build(arch)
    cfg = dict(r=2, init_weights=False, **all_linear(arch))
    ref = delora_ext.patch(copy.deepcopy(real), **cfg)  # patched on the real weights
    model = delora_ext.patch(build_meta(arch), **cfg)
    paths = delora_paths(model)
    assert paths == delora_paths(ref)
    assert all(model.get_submodule(p).delora_w_norm["default"].is_meta for p in paths)
    _materialise(model, real)
    base_sd = {base_key(model, k): v for k, v in real.state_dict().items()}
    if via == "state_dict":
        adapter_sd = {k: v for k, v in ref.state_dict().items() if any(a in k for a in ADAPTER_KEYS)}
        res = model.load_state_dict({**base_sd, **adapter_sd}, strict=False)
        assert not res.unexpected_keys
        assert all(".delora_w_norm." in k for k in res.missing_keys)
    else:
        delora_ext.save_adapter(ref, str(tmp_path))
        delora_ext.load_adapter(model, str(tmp_path))
        res = model.load_state_dict(base_sd, strict=False)
        assert not res.unexpected_keys
    for p in paths:
        w = model.get_submodule(p).delora_w_norm["default"]
        assert not torch.equal(w, torch.ones_like(w))
        assert_close(w, _column_norms(real.get_submodule(p)), 1e-6, f"{p}: w after materialising")
    with torch.no_grad():
        assert_close(logits(model, arch), logits(ref, arch), 1e-6, "meta-built model output")


# ---- non-float base weights ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_non_float_base_weight_without_w_is_refused_and_model_unchanged(arch):
    model = build(arch)
    victim = model.get_submodule(linear_paths(model)[3])
    victim.weight = nn.Parameter(torch.zeros(victim.weight.shape, dtype=torch.int8), requires_grad=False)
    before, types = snapshot(model), module_types(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match=r"must be floating point .*pass `w_norm`"):
        delora_ext.patch(model, target_modules="all-linear", r=2)
    assert module_types(model) == types
    assert_state_equal(model, before, "refused patch")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, STATE_ATTR)


def test_t5_feed_forward_output_can_be_adapted():
    base = build("t5")
    model = delora_ext.patch(copy.deepcopy(base), target_modules=["wo"], r=2)
    with torch.no_grad():
        assert_close(logits(model, "t5"), logits(base, "t5"), 1e-6, "T5 with wo adapted")


def test_lifecycle_functions_see_through_training_wrappers():
    """merge / unmerge / set_adapter / disable_adapters / unpatch accept the torch.compile (and DDP) wrapper."""
    base = build("llama")
    model = delora_ext.patch(copy.deepcopy(base), target_modules=["q_proj", "v_proj"], r=2, init_weights=False)
    wrapped = torch.compile(model)  # lazily compiled: nothing runs until called
    with torch.no_grad():
        y = logits(model, "llama")
        delora_ext.merge(wrapped)
        assert all(layer.merged for layer in delora_ext.patching.delora_layers(model).values())
        assert_close(logits(model, "llama"), y, 1e-5, "merged through the wrapper")
        delora_ext.unmerge(wrapped)
        delora_ext.set_adapter(wrapped, "default")
        with delora_ext.disable_adapters(wrapped) as m:
            assert m is wrapped
            assert_close(logits(model, "llama"), logits(base, "llama"), 1e-6, "disabled through the wrapper")
    assert delora_ext.unpatch(wrapped) is wrapped
    assert not delora_ext.patching.delora_layers(model)


def test_patched_layers_follow_the_models_train_eval_mode():
    """Patching an eval() model must not turn adapter dropout on (nn.Module defaults to training mode)."""
    model = build("llama")  # eval()
    delora_ext.patch(model, r=2, module_dropout=0.5, init_weights=False, target_modules=["q_proj", "v_proj"])
    layers = [m for m in model.modules() if isinstance(m, delora_ext.DeLoRALinear)]
    assert layers and not any(m.training for m in layers)
    with torch.no_grad():
        assert torch.equal(logits(model, "llama"), logits(model, "llama"))
    model.train()
    assert all(m.training for m in layers)
