"""Target matching (PEFT's rules, property-tested against PEFT), default targets, per-adapter modules_to_save copies,
bias adapters: each checked against PEFT."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import delora_ext
from delora_ext.config import DEFAULT_TARGET_MODULES
from delora_ext.patching import STATE_ATTR

from helpers import assert_close
from tiny_models import (
    assert_state_equal,
    build,
    delora_paths,
    logits,
    one_thread,  # noqa: F401
    outputs,
    snapshot,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_out(pm, arch):
    pm.eval()
    with torch.no_grad():
        return logits(pm, arch)


def _bump_trainable(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# Each adapter has its own modules_to_save copy (PEFT's ModulesToSaveWrapper keeps one per adapter): with one copy
# shared between adapters, loading or training a second adapter would overwrite the first one's module.
def test_two_adapters_with_the_same_modules_to_save_keep_their_own_copies(tmp_path):
    arch = "llama"
    base = build(arch)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["q_proj"], init_weights=False,
                                                                    modules_to_save=["lm_head"]))
    pm.add_adapter("other", peft.DeloraConfig(target_modules=["v_proj"], init_weights=False,
                                              modules_to_save=["lm_head"]))
    want = {}
    for i, name in enumerate(["default", "other"]):
        pm.set_adapter(name)
        _bump_trainable(pm, i)
    for name in ["default", "other"]:
        pm.set_adapter(name)
        want[name] = _peft_out(pm, arch)
    assert (want["default"] - want["other"]).abs().max() > 1e-2
    pm.save_pretrained(str(tmp_path / "peft"))

    ours = copy.deepcopy(base)
    delora_ext.load_adapter(ours, str(tmp_path / "peft"))
    delora_ext.load_adapter(ours, str(tmp_path / "peft" / "other"), adapter_name="other")
    for name in ["default", "other"]:
        delora_ext.set_adapter(ours, name)
        assert_close(outputs(ours, arch), want[name], 1e-5, f"adapter {name!r} after loading both")
    # and each adapter saves its own copy: PEFT reads both back with the same outputs
    delora_ext.save_adapter(ours, str(tmp_path / "ours"))
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    pm2.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    for name in ["default", "other"]:
        pm2.set_adapter(name)
        assert_close(_peft_out(pm2, arch), want[name], 1e-5, f"PEFT reading our {name!r}")


# PEFT selects modules_to_save by a plain string suffix (`key.endswith(name)`, peft.utils.other._set_trainable), and
# so does delora_ext: with a '.'-suffix, files with e.g. modules_to_save=["head"] (PEFT: lm_head) would not load
# either way.
@pytest.mark.parametrize("direction", ["peft_to_ours", "ours_to_peft"])
def test_modules_to_save_name_is_a_plain_suffix_as_in_peft(direction, tmp_path):
    arch = "llama"
    base = build(arch)
    cfg = dict(target_modules=["q_proj"], init_weights=False, modules_to_save=["head"])
    if direction == "peft_to_ours":
        src = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(**cfg))
        _bump_trainable(src, 0)
        want = _peft_out(src, arch)
        src.save_pretrained(str(tmp_path))
        got = outputs(delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path)), arch)
    else:
        src = delora_ext.patch(copy.deepcopy(base), **cfg)
        assert src.lm_head.weight.requires_grad
        _bump_trainable(src, 0)
        want = outputs(src, arch)
        delora_ext.save_adapter(src, str(tmp_path))
        got = _peft_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)), arch)
    assert_close(got, want, 1e-5, f"modules_to_save=['head'], {direction}")


# A regex target_modules matching a module DeLoRA cannot adapt: PEFT raises TypeError, for a list and for a regex,
# and so does delora_ext (skipping the module would save an adapter PEFT cannot load).
def test_regex_target_matching_a_non_linear_module_is_refused_as_in_peft():
    base = build("llama")
    regex = r".*\.self_attn.*"  # matches model.layers.0.self_attn (LlamaAttention) and its projections
    with pytest.raises(TypeError):
        peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=regex))
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(TypeError, match="self_attn"):
        delora_ext.patch(model, target_modules=regex)
    assert not hasattr(model, STATE_ATTR)
    assert_state_equal(model, before, "refused regex")


# target_modules=None: PEFT's default for every model type it knows (deberta and codegen among them).
def test_default_target_modules_are_peft_s():
    from peft.utils import TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING as peft_map
    norm = lambda v: v if isinstance(v, str) else sorted(v)  # noqa: E731
    assert {k: norm(v) for k, v in DEFAULT_TARGET_MODULES.items()} == {k: norm(v) for k, v in peft_map.items()}


def test_default_target_modules_on_deberta_as_in_peft():
    t = transformers
    base = t.DebertaModel(t.DebertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=16)).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig())
    want = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if type(m).__name__ == "DeloraLinear")
    assert want
    assert delora_paths(delora_ext.patch(copy.deepcopy(base))) == want


# PEFT allows only one adapter with bias != "none" (BaseTuner._check_new_adapter_config): the biases are shared, so
# a second one (loading its file, or training it) would overwrite the biases the first adapter's outputs use.
@pytest.mark.parametrize("how", ["patch", "load"])
def test_a_second_adapter_with_trained_biases_is_refused_as_in_peft(how, tmp_path):
    arch = "bert"
    base = build(arch)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["query"], bias="all"))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        pm.add_adapter("other", peft.DeloraConfig(target_modules=["value"], bias="all"))
    model = delora_ext.patch(copy.deepcopy(base), target_modules=["query"], bias="all")
    before = snapshot(model)
    if how == "patch":
        with pytest.raises(ValueError, match="only one adapter"):
            delora_ext.patch(model, adapter_name="other", target_modules=["value"], bias="delora_only")
    else:
        src = delora_ext.patch(copy.deepcopy(base), target_modules=["query"], bias="all")
        _bump_trainable(src, 1)
        delora_ext.save_adapter(src, str(tmp_path))
        with pytest.raises(ValueError, match="only one adapter"):
            delora_ext.load_adapter(model, str(tmp_path), adapter_name="other")
    assert_state_equal(model, before, "refused second bias adapter")
    assert list(getattr(model, STATE_ATTR).configs) == ["default"]


# Loading an inactive adapter with modules_to_save must not change what the active adapter computes (PEFT keeps
# the original module for adapters without a copy), so the loaded adapter's copy is not swapped in.
def test_loading_an_inactive_adapter_with_modules_to_save_keeps_the_active_outputs(tmp_path):
    arch = "llama"
    base = build(arch)
    src = delora_ext.patch(copy.deepcopy(base), target_modules=["q_proj"], modules_to_save=["lm_head"])
    _bump_trainable(src, 0)
    delora_ext.save_adapter(src, str(tmp_path))
    model = delora_ext.patch(copy.deepcopy(base), adapter_name="existing", target_modules=["v_proj"],
                             init_weights=False)
    want = outputs(model, arch)
    delora_ext.load_adapter(model, str(tmp_path))
    assert_close(outputs(model, arch), want, 0.0, "active adapter after loading an inactive one")
    delora_ext.set_adapter(model, "default")
    assert_close(outputs(model, arch), outputs(src, arch), 1e-6, "the loaded adapter once active")
    delora_ext.delete_adapter(model, "default")
    assert model.lm_head is base.lm_head or torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert not getattr(model, STATE_ATTR).saved_originals


# Property: the set of adapted modules equals PEFT's (check_target_module_exists after PEFT's "all-linear" expansion
# and default targets), on llama / gpt2 (Conv1D, which PEFT's DeLoRA itself refuses) / bert / t5; where PEFT would
# raise (a matched module that is not Linear/Conv1D) delora_ext raises too.

_MODELS = {}
_NAMES = ["q_proj", "v_proj", "o_proj", "mlp", "lm_head", "c_attn", "c_proj", "c_fc", "attn", "query", "value",
          "dense", "decoder", "q", "v", "o", "wi", "SelfAttention.q", "self_attn.q_proj", "0.self_attn.k_proj",
          "layers.1.mlp.up_proj", "h.0.attn.c_attn", "proj", "k", "head"]
_REGEX = ["all-linear", "ALL-LINEAR", r".*\.(q|v)", r".*(q_proj|c_attn|query|wi)", r".*layers\.0\..*proj",
          r".*\.1\..*", r"(encoder|model|transformer)\..*", r".*(decoder|lm_head)"]
_PATTERNS = ["layers", "h", "layer", "block", "layers.1", "encoder.block", "self_attn"]


def _peft_targets(model, kw):
    from peft.tuners.tuners_utils import _ExcludedModule, _maybe_include_all_linear_layers, check_target_module_exists
    from peft.utils import TRANSFORMERS_MODELS_TO_DELORA_TARGET_MODULES_MAPPING as peft_map
    from transformers.pytorch_utils import Conv1D
    cfg = peft.DeloraConfig(**kw)
    if cfg.target_modules is None:
        cfg.target_modules = set(peft_map[model.config.model_type])
    cfg = _maybe_include_all_linear_layers(cfg, model)
    out = []
    for k, m in model.named_modules():
        r = check_target_module_exists(cfg, k) if k else False
        if r and not isinstance(r, _ExcludedModule):
            if not isinstance(m, (torch.nn.Linear, Conv1D)):
                return None  # PEFT raises TypeError
            out.append(k)
    return sorted(out)


@st.composite
def _configs(draw):
    kw = {}
    if draw(st.booleans()):
        kw["target_modules"] = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4, unique=True))
        if draw(st.booleans()):
            kw["layers_to_transform"] = draw(st.one_of(st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2)))
            if draw(st.booleans()):
                kw["layers_pattern"] = draw(st.one_of(st.sampled_from(_PATTERNS),
                                                      st.lists(st.sampled_from(_PATTERNS), min_size=1, max_size=2)))
    else:
        kw["target_modules"] = draw(st.sampled_from(_REGEX + [None]))
    if draw(st.booleans()):
        kw["exclude_modules"] = draw(st.one_of(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3),
                                               st.sampled_from(_REGEX[2:])))
    if draw(st.booleans()):
        kw["modules_to_save"] = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=2))
    return kw


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["llama", "gpt2", "bert", "t5"]), _configs())
def test_adapted_modules_equal_peft_s(arch, kw):
    if arch not in _MODELS:
        _MODELS[arch] = build(arch)
    base = _MODELS[arch]
    want = _peft_targets(base, kw)
    model = copy.deepcopy(base)
    if want is None:
        with pytest.raises(TypeError):
            delora_ext.patch(model, **kw)
    elif not want:
        with pytest.raises(ValueError, match="no module matched"):
            delora_ext.patch(model, **kw)
    else:
        assert sorted(delora_paths(delora_ext.patch(model, **kw))) == want


def test_switching_to_an_adapter_copy_after_a_dtype_conversion():
    """An added adapter is inactive, its modules_to_save copy outside the module tree: set_adapter converts it to what
    the model was converted to since (here .double()), so the switched model runs."""
    model = build("llama")
    delora_ext.patch(model, target_modules=["q_proj"], r=2, modules_to_save=["lm_head"], adapter_name="a")
    delora_ext.patch(model, target_modules=["q_proj"], r=2, modules_to_save=["lm_head"], adapter_name="b")
    model.double()
    delora_ext.set_adapter(model, "b")
    assert model.lm_head.weight.dtype == torch.float64
    out = outputs(model, "llama")
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    with pytest.warns(UserWarning, match="Setting active adapter to a"):  # as PEFT: a becomes active
        delora_ext.delete_adapter(model, "b")  # and its lm_head copy, kept outside the tree, is converted too
    assert model.lm_head.weight.dtype == torch.float64
