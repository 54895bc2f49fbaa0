"""Adapter files on real (tiny) architectures: save/load round trips, PEFT interoperability both ways, exact LoRA
export, modules_to_save, trained biases, paper init, and bad files (each refused with its own error, the model left
exactly as it was)."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import delora_ext
from delora_ext.io import CONFIG_NAME, WEIGHTS_NAME
from delora_ext.model import delora_layers
from delora_ext.patching import STATE_ATTR

from helpers import assert_close, rel_err
from tiny_models import (
    ARCHS,
    PEFT_ARCHS,
    all_linear,
    all_linear_paths,
    assert_state_equal,
    build,
    delora_paths,
    logits,
    module_types,
    one_thread,  # noqa: F401  (autouse: the model tests run single-threaded)
    outputs,
    snapshot,
    train,
)

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


def _trained(arch, steps=2, **cfg):
    """A model patched with ``cfg`` (default: the model type's default targets, r=4) and trained a few steps."""
    cfg = {"r": 4, **cfg}
    model = delora_ext.patch(build(arch), **cfg)
    train(model, arch, steps=steps)
    for p in delora_paths(model):
        assert model.get_submodule(p).delora_B["default"].abs().sum() > 0
    return model


def _peft_out(pm, arch):
    pm.eval()
    with torch.no_grad():
        return logits(pm, arch)


# ---- round trips ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = _trained(arch, **all_linear(arch))
    y = outputs(model, arch)
    delora_ext.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "DELORA" and cfg["r"] == 4
    keys = load_file(str(tmp_path / WEIGHTS_NAME))
    assert set(keys) == {f"{PREFIX}{p}.{k}" for p in delora_paths(model)
                         for k in ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")}
    fresh = delora_ext.load_adapter(build(arch), str(tmp_path))
    assert delora_paths(fresh) == delora_paths(model)
    assert torch.equal(outputs(fresh, arch), y)
    sd, sd_fresh = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(sd[k], sd_fresh[k]) for k in sd)
    # is_trainable=False loads a frozen adapter
    frozen = delora_ext.load_adapter(build(arch), str(tmp_path), is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(outputs(frozen, arch), y)


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_our_adapter_loads_in_peft(arch, tmp_path):
    model = _trained(arch)
    delora_ext.save_adapter(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(build(arch), str(tmp_path))
    assert_close(_peft_out(pm, arch), outputs(model, arch), 1e-5, "PEFT loading our adapter")


@pytest.mark.parametrize("how", ["init_weights=False", "trained"])
@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_peft_adapter_loads_in_delora_ext(arch, how, tmp_path):
    pm = peft.get_peft_model(build(arch), peft.DeloraConfig(r=4, init_weights=how == "trained"))
    if how == "trained":
        train(pm, arch, steps=2)
    pm.save_pretrained(str(tmp_path))
    y_peft = _peft_out(pm, arch)
    ours = delora_ext.load_adapter(build(arch), str(tmp_path))
    assert delora_paths(ours)
    assert all(ours.get_submodule(p).delora_B["default"].abs().sum() > 0 for p in delora_paths(ours))
    assert_close(outputs(ours, arch), y_peft, 1e-5, "delora_ext loading PEFT's adapter")


@pytest.mark.parametrize("arch", ARCHS)
def test_export_lora_matches_delora(arch, tmp_path):
    model = _trained(arch, **all_linear(arch))
    delora_ext.export_lora(model, str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 4
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    pm = peft.PeftModel.from_pretrained(build(arch), str(tmp_path))
    assert_close(_peft_out(pm, arch), outputs(model, arch), 1e-5, "LoRA export")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_lora_with_mixed_ranks(arch, tmp_path):
    paths = all_linear_paths(build(arch), arch)
    model = delora_ext.patch(build(arch), r=2, init_weights=False,
                             rank_pattern={paths[0].replace(".", r"\."): 5, paths[-1].rsplit(".", 1)[-1]: 3},
                             **all_linear(arch))
    ranks = {p: model.get_submodule(p).r["default"] for p in paths}
    assert len(set(ranks.values())) == 3
    delora_ext.export_lora(model, str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert {p: tensors[f"{PREFIX}{p}.lora_A.weight"].shape[0] for p in paths} == ranks
    assert cfg["r"] in ranks.values() and len(cfg["rank_pattern"]) == sum(r != cfg["r"] for r in ranks.values())
    pm = peft.PeftModel.from_pretrained(build(arch), str(tmp_path))
    lora = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert {p: lora[p].r["default"] for p in paths} == ranks
    assert all(lora[p].scaling["default"] == 1.0 for p in paths)
    assert_close(_peft_out(pm, arch), outputs(model, arch), 1e-5, "mixed-rank LoRA export")


def test_export_lora_where_one_module_path_ends_another(tmp_path):
    """PEFT matches rank_pattern keys and target_modules by suffix: "0" would also match "1.0" (a wrong rank, an
    extra wrapped layer). The export anchors them, so PEFT adapts exactly the exported modules at their ranks."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 8)),
                              torch.nn.Sequential(torch.nn.Linear(8, 8))).eval()
    model = delora_ext.patch(copy.deepcopy(seq), r=2, target_modules=r"0|1\.0", rank_pattern={"^0$": 4},
                             init_weights=False)
    assert {p: m.r["default"] for p, m in delora_layers(model).items()} == {"0": 4, "1.0": 2}
    delora_ext.export_lora(model, str(tmp_path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(seq), str(tmp_path))
    lora = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert {p: m.r["default"] for p, m in lora.items()} == {"0": 4, "1.0": 2}  # not "2.0", not "1.0" at 4
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert_close(pm(x), model(x), 1e-6, "LoRA export with suffix paths")


def test_several_adapters_saved_in_subfolders_and_reloaded(tmp_path):
    arch = "llama"
    model = delora_ext.patch(build(arch), r=2, init_weights=False, **all_linear(arch))
    delora_ext.patch(model, adapter_name="b", target_modules=["q_proj"], r=3, init_weights=False)
    delora_ext.set_adapter(model, ["default", "b"])
    y = outputs(model, arch)
    delora_ext.save_adapter(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME, "b"]
    assert sorted(os.listdir(tmp_path / "b")) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = delora_ext.load_adapter(build(arch), str(tmp_path))
    delora_ext.load_adapter(fresh, str(tmp_path / "b"), adapter_name="b")
    delora_ext.set_adapter(fresh, ["default", "b"])
    assert torch.equal(outputs(fresh, arch), y)
    with pytest.raises(ValueError, match="unknown adapter 'c'"):
        delora_ext.save_adapter(model, str(tmp_path / "x"), adapter_names=["c"])


def test_peft_refuses_conv1d_so_gpt2_is_checked_through_lora_export():
    """Why GPT-2 has no PEFT DeLoRA round trip here; if PEFT learns Conv1D this fails: add gpt2 to PEFT_ARCHS."""
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        peft.get_peft_model(build("gpt2"), peft.DeloraConfig(r=2, target_modules=["c_attn"]))


# ---- modules_to_save, biases ------------------------------------------------------------------------------
def test_modules_to_save_saved_and_restored(tmp_path):
    arch = "llama"
    base = build(arch)
    model = delora_ext.patch(copy.deepcopy(base), r=4, modules_to_save=["lm_head"], **all_linear(arch))
    assert "lm_head" not in delora_paths(model)
    assert model.lm_head.weight.requires_grad
    train(model, arch, steps=2)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    y = outputs(model, arch)
    delora_ext.save_adapter(model, str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert torch.equal(tensors[f"{PREFIX}lm_head.weight"], model.lm_head.weight)
    fresh = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert fresh.lm_head.weight.requires_grad
    assert torch.equal(outputs(fresh, arch), y)
    # PEFT reads our modules_to_save too
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert_close(_peft_out(pm, arch), y, 1e-5, "PEFT loading modules_to_save")


def test_peft_modules_to_save_loads_in_delora_ext(tmp_path):
    arch = "llama"
    base = build(arch)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(r=4, modules_to_save=["lm_head"]))
    train(pm, arch, steps=2)
    pm.save_pretrained(str(tmp_path))
    ours = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert not torch.equal(ours.lm_head.weight, base.lm_head.weight)
    assert_close(outputs(ours, arch), _peft_out(pm, arch), 1e-5, "PEFT modules_to_save in delora_ext")


@pytest.mark.parametrize("direction", ["peft->ours", "ours->peft"])
def test_modules_to_save_with_tied_weights_matches_peft(direction, tmp_path):
    arch = "t5"
    base = build(arch)
    assert base.lm_head.weight is base.get_input_embeddings().weight
    if direction == "peft->ours":
        pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(r=4, modules_to_save=["lm_head"]))
        train(pm, arch, steps=2)
        pm.save_pretrained(str(tmp_path))
        ours = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    else:
        ours = delora_ext.patch(copy.deepcopy(base), r=4, modules_to_save=["lm_head"])
        train(ours, arch, steps=2)
        delora_ext.save_adapter(ours, str(tmp_path))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert torch.equal(ours.get_input_embeddings().weight, base.get_input_embeddings().weight), \
        "training/loading lm_head changed the (tied) input embedding"
    assert_close(outputs(ours, arch), _peft_out(pm, arch), 1e-5, f"tied modules_to_save, {direction}")


@pytest.mark.parametrize("bias", ["all", "delora_only"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_trained_biases_round_trip(arch, bias, tmp_path):
    base = build(arch)
    model = _trained(arch, bias=bias)
    y = outputs(model, arch)
    assert rel_err(y, outputs(base, arch)) > 1e-4
    delora_ext.save_adapter(model, str(tmp_path))
    fresh = delora_ext.load_adapter(build(arch), str(tmp_path))
    assert_close(outputs(fresh, arch), y, 1e-6, f"bias={bias} round trip")
    if arch in PEFT_ARCHS:
        pm = peft.PeftModel.from_pretrained(build(arch), str(tmp_path))
        assert_close(_peft_out(pm, arch), y, 1e-5, f"PEFT loading bias={bias}")
    lora_dir = tmp_path / "lora"
    delora_ext.export_lora(model, str(lora_dir))
    pm = peft.PeftModel.from_pretrained(build(arch), str(lora_dir))
    assert_close(_peft_out(pm, arch), y, 1e-5, f"LoRA export with bias={bias}")
    # the trained biases are part of the adapter: a file without one of them is incomplete
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    dropped = sorted(k for k in tensors if k.endswith(".base_layer.bias"))[0]
    del tensors[dropped]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"missing key '{dropped}'".replace(".", r"\.")):
        delora_ext.load_adapter(build(arch), str(tmp_path))


@pytest.mark.parametrize("bias,modules_to_save", [("all", None), ("delora_only", None), ("all", ["transform"])])
def test_peft_adapter_with_trained_biases_loads(bias, modules_to_save, tmp_path):
    arch = "bert"
    pm = peft.get_peft_model(build(arch), peft.DeloraConfig(r=4, bias=bias, modules_to_save=modules_to_save))
    train(pm, arch, steps=2)
    pm.save_pretrained(str(tmp_path))
    ours = delora_ext.load_adapter(build(arch), str(tmp_path))
    assert_close(outputs(ours, arch), _peft_out(pm, arch), 1e-5, f"PEFT bias={bias} in delora_ext")
    if modules_to_save:  # PEFT also wrote its wrapper's inner copies; ours are trained in place
        assert any(".original_module." in k for k in load_file(str(tmp_path / WEIGHTS_NAME)))
        trained_bias = ours.cls.predictions.transform.dense.bias
        assert not torch.equal(trained_bias, build(arch).cls.predictions.transform.dense.bias)


@pytest.mark.parametrize("how", ["save_embedding_layers", "lm_head targeted"])
def test_peft_adapter_with_embedding_layers_loads(how, tmp_path):
    """PEFT writes the input and output embeddings beside the adapter with save_embedding_layers=True (a resized
    vocabulary), and by default when lm_head is targeted; its from_pretrained puts them into the model."""
    targets = ["q_proj", "v_proj"] + (["lm_head"] if how == "lm_head targeted" else [])
    base = build("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(r=4, target_modules=targets))
    train(pm, "llama", steps=2)
    with torch.no_grad():  # as a fine-tune that changed the embeddings PEFT saves (new tokens' rows)
        pm.get_output_embeddings().weight[-5:].normal_()
        if how == "save_embedding_layers":
            pm.get_input_embeddings().weight[-3:].normal_()
    kw = {"save_embedding_layers": True} if how == "save_embedding_layers" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "Setting save_embedding_layers to True" and the like
        pm.save_pretrained(str(tmp_path), **kw)
    keys = load_file(str(tmp_path / WEIGHTS_NAME))
    embedding_keys = sorted(k for k in keys if ".delora_" not in k)
    assert embedding_keys == ([f"{PREFIX}lm_head.base_layer.weight"] if targets[-1] == "lm_head" else
                              [f"{PREFIX}lm_head.weight", f"{PREFIX}model.embed_tokens.weight"])
    y_peft = _peft_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)), "llama")
    assert rel_err(y_peft, _peft_out(pm, "llama")) <= 1e-5  # PEFT restores the embeddings
    ours = delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path))
    assert_close(outputs(ours, "llama"), y_peft, 1e-5, "delora_ext loading PEFT's adapter with embeddings")
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(ours, get)().weight, getattr(pm, get)().weight), get

    # a wrong embedding shape is refused before the model is touched
    bad = embedding_keys[0]
    save_file(dict(keys, **{bad: keys[bad][:-1]}), str(tmp_path / WEIGHTS_NAME))
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{re.escape(bad)}' has shape"):
        delora_ext.load_adapter(model, str(tmp_path))
    assert_state_equal(model, before)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_our_adapter_with_embedding_layers_loads_in_peft(targets, tmp_path):
    """save_adapter(save_embedding_layers=True) writes the embeddings as PEFT keys them: PEFT's from_pretrained on a
    fresh base model restores them (and so does load_adapter)."""
    base = build("llama")
    model = delora_ext.patch(copy.deepcopy(base), r=4, target_modules=targets)
    train(model, "llama", steps=2)
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:].normal_()
        model.get_output_embeddings().weight[-5:].normal_()
    y = outputs(model, "llama")
    delora_ext.save_adapter(model, str(tmp_path / "plain"))
    delora_ext.save_adapter(model, str(tmp_path / "emb"), save_embedding_layers=True)
    lm_head = "lm_head.base_layer.weight" if "lm_head" in targets else "lm_head.weight"
    assert sorted(k for k in load_file(str(tmp_path / "emb" / WEIGHTS_NAME)) if ".delora_" not in k) == \
        [f"{PREFIX}{lm_head}", f"{PREFIX}model.embed_tokens.weight"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "emb"))
    assert_close(_peft_out(pm, "llama"), y, 1e-5, "PEFT loading our adapter with its embeddings")
    assert_close(outputs(delora_ext.load_adapter(copy.deepcopy(base), str(tmp_path / "emb")), "llama"), y, 1e-5,
                 "delora_ext loading it")
    without = _peft_out(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "plain")), "llama")
    assert rel_err(without, y) > 1e-3  # the embeddings matter
    with pytest.raises(TypeError, match="`save_embedding_layers` must be True or False"):
        delora_ext.save_adapter(model, str(tmp_path / "x"), save_embedding_layers="auto")
    assert not (tmp_path / "x").exists()


def test_a_config_targeting_an_unsupported_module_is_a_value_error(tmp_path):
    model = delora_ext.patch(build("llama"), r=2, target_modules=["q_proj"])
    delora_ext.save_adapter(model, str(tmp_path))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(dict(cfg, target_modules=["q_proj", "embed_tokens"])))
    fresh = build("llama")
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"cannot be applied to the model .*embed_tokens"):
        delora_ext.load_adapter(fresh, str(tmp_path))
    assert_state_equal(fresh, before)


@pytest.mark.parametrize("writer", ["save_adapter", "export_lora"])
def test_saving_where_a_file_is_names_the_path(writer, tmp_path):
    model = delora_ext.patch(build("llama"), r=2, target_modules=["q_proj"])
    delora_ext.patch(model, r=2, target_modules=["v_proj"], adapter_name="other")
    write = getattr(delora_ext, writer)
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    with pytest.raises(NotADirectoryError, match=rf"cannot save to .*{blocker}.* exists and is not a directory"):
        write(model, str(blocker))
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        write(model, str(blocker / "below"))
    assert blocker.read_text() == "keep me"
    if writer == "save_adapter":  # an adapter's subfolder
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "other").write_text("keep me too")
        with pytest.raises(NotADirectoryError, match=r"other exists and is not a directory"):
            delora_ext.save_adapter(model, str(tmp_path / "d"))
        assert sorted(os.listdir(tmp_path / "d")) == ["other"]


@pytest.mark.parametrize("writer", ["save_adapter", "export_lora"])
def test_saved_files_have_the_permissions_of_new_files(writer, tmp_path):
    """As PEFT's files: 0666 less the umask, readable by the other users a serving process may run as."""
    model = delora_ext.patch(build("llama"), r=2, target_modules=["q_proj"])
    old = os.umask(0o022)
    try:
        getattr(delora_ext, writer)(model, str(tmp_path))
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ---- paper init ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_paper_init_files(arch, tmp_path):
    model = delora_ext.patch(build(arch), r=2, init_weights="paper", **all_linear(arch))
    train(model, arch, steps=2)
    y = outputs(model, arch)
    peft_dir = tmp_path / "peft"
    with pytest.raises(ValueError, match="paper's init .* PEFT cannot represent; save with for_peft=False"):
        delora_ext.save_adapter(model, str(peft_dir))
    assert not peft_dir.exists() or not os.listdir(peft_dir)

    ours_dir = tmp_path / "ours"
    delora_ext.save_adapter(model, str(ours_dir), for_peft=False)
    assert json.loads((ours_dir / CONFIG_NAME).read_text())["init_weights"] == "paper"
    assert any(k.endswith(".delora_A0") for k in load_file(str(ours_dir / WEIGHTS_NAME)))
    fresh = delora_ext.load_adapter(build(arch), str(ours_dir))
    assert torch.equal(outputs(fresh, arch), y)
    # PEFT has no field for the frozen term: as "DELORA" it would load A, B and λ without it (other outputs, no
    # warning), so the file's type is one PEFT's loaders refuse
    cfg = json.loads((ours_dir / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "DELORA_PAPER_INIT"
    with pytest.raises(KeyError, match="DELORA_PAPER_INIT"):
        peft.PeftModel.from_pretrained(build(arch), str(ours_dir))
    # a file written as "DELORA" with init_weights "paper" (as saves did before) still loads
    (ours_dir / CONFIG_NAME).write_text(json.dumps(dict(cfg, peft_type="DELORA")))
    assert torch.equal(outputs(delora_ext.load_adapter(build(arch), str(ours_dir)), arch), y)
    (ours_dir / CONFIG_NAME).write_text(json.dumps(dict(cfg, init_weights=True)))
    with pytest.raises(ValueError, match=r"peft_type 'DELORA_PAPER_INIT' \(the paper's init\) but init_weights="):
        delora_ext.load_adapter(build(arch), str(ours_dir))

    lora_dir = tmp_path / "lora"
    delora_ext.export_lora(model, str(lora_dir))
    tensors = load_file(str(lora_dir / WEIGHTS_NAME))
    for p in delora_paths(model):
        layer = model.get_submodule(p)
        assert tensors[f"{PREFIX}{p}.lora_A.weight"].shape == (4, layer.in_features)
        assert tensors[f"{PREFIX}{p}.lora_B.weight"].shape == (layer.out_features, 4)
    pm = peft.PeftModel.from_pretrained(build(arch), str(lora_dir))
    assert_close(_peft_out(pm, arch), y, 1e-5, "paper init as a rank-2r LoRA")


# ---- bad files ------------------------------------------------------------------------------------------
def _corrupt(d, kind):
    wpath, cpath = os.path.join(d, WEIGHTS_NAME), os.path.join(d, CONFIG_NAME)
    tensors = load_file(wpath)
    some = sorted(k for k in tensors if k.endswith(".delora_A"))[0]
    if kind == "missing key":
        del tensors[some]
    elif kind == "wrong shape":
        tensors[some] = torch.zeros(tensors[some].shape[0] + 1, tensors[some].shape[1])
    elif kind == "non-floating tensor":
        tensors[some.replace(".delora_A", ".delora_lambda")] = torch.tensor([15], dtype=torch.int64)
    elif kind == "unexpected key":
        tensors[f"{PREFIX}model.layers.0.mlp.gate_proj.delora_A"] = torch.zeros(4, 32)
    if kind in ("missing key", "wrong shape", "non-floating tensor", "unexpected key"):
        save_file(tensors, wpath, metadata={"format": "pt"})
    elif kind == "truncated safetensors":
        data = open(wpath, "rb").read()
        open(wpath, "wb").write(data[: len(data) // 2])
    elif kind == "LoRA config":
        cfg = json.load(open(cpath))
        cfg["peft_type"] = "LORA"
        json.dump(cfg, open(cpath, "w"))
    elif kind == "invalid JSON":
        open(cpath, "w").write('{"peft_type": "DELORA", "r": 4,')
    else:
        raise ValueError(kind)
    return some


BAD = {
    "missing key": r"adapter_model\.safetensors: missing key '{key}'",
    "wrong shape": r"key '{key}' has shape \(5, 32\), expected \(4, 32\)",
    "non-floating tensor": r"has dtype torch\.int64; a floating-point tensor is required",
    "unexpected key": r"unexpected key 'base_model\.model\.model\.layers\.0\.mlp\.gate_proj\.delora_A'",
    "truncated safetensors": r"adapter_model\.safetensors is not a valid safetensors file",
    "LoRA config": r"adapter config is for peft_type 'LORA', not 'DELORA'",
    "invalid JSON": r"adapter_config\.json is not valid JSON",
}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    delora_ext.save_adapter(_trained("llama"), str(d))
    return d


@pytest.mark.parametrize("into", ["plain model", "patched model"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_is_refused_and_model_unchanged(kind, into, good_adapter, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(good_adapter, d)
    key = _corrupt(str(d), kind)
    model = build("llama")
    if into == "patched model":
        delora_ext.patch(model, target_modules=["k_proj"], r=2, init_weights=False)
    before, types = snapshot(model), module_types(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = delora_ext.patching.get_state(model)
    configs = dict(state.configs) if state else None
    y = outputs(model, "llama")
    name = "default" if into == "plain model" else "other"
    with pytest.raises(ValueError, match=BAD[kind].format(key=key.replace(".", r"\."))):
        delora_ext.load_adapter(model, str(d), adapter_name=name)
    assert module_types(model) == types
    assert_state_equal(model, before, kind)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hasattr(model, STATE_ATTR) == (into == "patched model")
    if state:
        assert delora_ext.patching.get_state(model).configs == configs
    assert torch.equal(outputs(model, "llama"), y)
    # and the good file still loads into the same model afterwards
    delora_ext.load_adapter(model, str(good_adapter), adapter_name=name)


def test_a_failed_lora_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from model_state import files
    model = delora_ext.patch(build("llama"), target_modules=["q_proj", "v_proj"], r=4, init_weights=False)
    delora_ext.export_lora(model, str(tmp_path))
    before = files(str(tmp_path))
    with torch.no_grad():
        for layer in delora_layers(model).values():
            layer.delora_B["default"].add_(1.0)
    real, seen = os.replace, []

    def replace(src, dst):  # the config's rename, after the weights were renamed in
        seen.append(dst)
        if str(dst).endswith("adapter_config.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        delora_ext.export_lora(model, str(tmp_path))
    monkeypatch.undo()
    assert any(str(d).endswith("adapter_model.safetensors") for d in seen)
    assert files(str(tmp_path)) == before


@pytest.mark.parametrize("writer", ["save_adapter", "export_lora"])
def test_a_layer_at_two_paths_warns_that_peft_adapts_the_first_only(writer, tmp_path):
    """delora_ext adapts a module reachable at two paths at both; PEFT at the first only, so PEFT loading the file
    computes the second path without the adapter. Writing such a file says so."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    model.add_module("again", model[0])
    delora_ext.patch(model, r=2, target_modules=["0"], init_weights=False)
    with pytest.warns(UserWarning, match=rf"{writer}: layer '0' is also reachable at \['again'\]"):
        getattr(delora_ext, writer)(model, str(tmp_path))
