"""Adapter files: what patch() accepts saves and loads back; a save is all or nothing and a concurrent reader
gets one save's config with that save's weights; only regular files are opened; PEFT's set-ordered target lists
and its load-into-an-existing-adapter."""
from __future__ import annotations

import copy
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from model_state import capture, differences, files
from torch import nn

import delora_ext
from delora_ext.model import delora_layers, get_state

from tiny_models import (
    build,
    logits,
    one_thread,  # noqa: F401
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))


# ---- PEFT writes target_modules from a set ------------------------------------------------------------------------
@pytest.mark.parametrize("order", [["q_proj", "v_proj"], ["v_proj", "q_proj"]])
def test_a_peft_adapter_loads_into_a_model_patched_with_the_same_targets_in_any_order(order, tmp_path):
    peft = pytest.importorskip("peft")
    base = build("llama")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(target_modules=["q_proj", "v_proj"],
                                                                    init_weights=False))
    pm.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / CONFIG))
    cfg["target_modules"] = order  # the order PEFT writes changes with PYTHONHASHSEED
    json.dump(cfg, open(tmp_path / CONFIG, "w"))
    ours = delora_ext.patch(copy.deepcopy(base), target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        before = logits(ours, "llama")
    delora_ext.load_adapter(ours, str(tmp_path))
    pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, "llama"), logits(pm, "llama"), rtol=1e-5, atol=1e-6)
        assert (logits(ours, "llama") - before).abs().max() > 1e-3


def test_loading_into_an_existing_adapter_of_the_same_shapes_loads_its_values_and_keeps_its_config(tmp_path):
    src = delora_ext.patch(build("llama"), target_modules=["q_proj", "v_proj"], r=4, init_weights=False,
                           delora_lambda=7.0)
    delora_ext.save_adapter(src, str(tmp_path))
    model = delora_ext.patch(build("llama"), target_modules=["q_proj", "v_proj"], r=4, delora_lambda=3.0)
    with pytest.warns(UserWarning, match=r"the file's config differs in \['delora_lambda'"):
        delora_ext.load_adapter(model, str(tmp_path))
    assert get_state(model).configs["default"].delora_lambda == 3.0  # as PEFT: the model's config is kept
    with torch.no_grad():
        torch.testing.assert_close(logits(model, "llama"), logits(src, "llama"), rtol=0, atol=0)
    other = delora_ext.patch(build("llama"), target_modules=["q_proj"], r=4)
    before = capture(other)
    with pytest.raises(ValueError, match=r"exists on the model with layers other than this file's"):
        delora_ext.load_adapter(other, str(tmp_path))
    assert not differences(before, capture(other))


# ---- what patch() accepts saves and loads -------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("delora_lambda", "15"), ("delora_lambda", True), ("module_dropout", "0.1"),
                                         ("module_dropout", False), ("r", 4.0), ("r", "4"),
                                         ("rank_pattern", {"0": "2"}), ("lambda_pattern", {"0": "1"}),
                                         ("rank_pattern", {0: 2}), ("init_weights", 1)])
def test_a_value_load_adapter_would_refuse_is_refused_by_patch_naming_the_field(field, value):
    m = _mlp()
    before = capture(m)
    with pytest.raises((TypeError, ValueError), match=rf"`{field}"):
        delora_ext.patch(m, target_modules=["0"], **{field: value})
    assert not differences(before, capture(m))


@pytest.mark.parametrize("field,value,saved", [
    ("delora_lambda", np.float32(3.0), 3.0), ("delora_lambda", np.float64(-2.5), -2.5), ("r", np.int64(4), 4),
    ("module_dropout", np.float32(0.25), 0.25), ("lambda_pattern", {"0": np.float32(2.0)}, {"0": 2.0}),
    ("rank_pattern", {"0": np.int32(3)}, {"0": 3}), ("layers_to_transform", None, None)])
def test_numpy_numbers_become_python_numbers_that_save_and_load(field, value, saved, tmp_path):
    m = delora_ext.patch(_mlp(), target_modules=["0"], **{field: value})
    cfg = get_state(m).configs["default"]
    assert getattr(cfg, field) == saved and type(getattr(cfg, field)) is type(saved)
    delora_ext.save_adapter(m, str(tmp_path))
    assert json.load(open(tmp_path / CONFIG))[field] == saved
    fresh = delora_ext.load_adapter(_mlp(), str(tmp_path))
    assert get_state(fresh).configs["default"] == cfg
    delora_ext.load_adapter(m, str(tmp_path))  # and into itself: the same adapter


# ---- a failed save leaves the files as they were --------------------------------------------------------------------
def _two_saves(tmp_path):
    a = delora_ext.patch(_mlp(0), target_modules=["0", "2"], r=2, init_weights=False, delora_lambda=3.0)
    delora_ext.save_adapter(a, str(tmp_path))
    b = delora_ext.patch(_mlp(0), target_modules=["0", "2"], r=2, init_weights=False, delora_lambda=5.0,
                         module_dropout=0.25)
    return a, b


@pytest.mark.parametrize("fail", ["config serialisation", "config rename"])
def test_a_failed_save_leaves_the_previous_adapter_files_as_they_were(fail, tmp_path, monkeypatch):
    a, b = _two_saves(tmp_path)
    before = files(str(tmp_path))
    if fail == "config serialisation":
        def dumps(*args, **kwargs):
            raise TypeError("Object of type float32 is not JSON serializable")
        monkeypatch.setattr(delora_ext.io.json, "dumps", dumps)
    else:
        real, calls = os.replace, []

        def replace(src, dst, *args, **kwargs):
            calls.append(dst)
            if os.path.basename(str(dst)) == CONFIG:
                raise OSError(28, "No space left on device")
            return real(src, dst, *args, **kwargs)
        monkeypatch.setattr(delora_ext.io.os, "replace", replace)
    with pytest.raises((TypeError, OSError)):
        delora_ext.save_adapter(b, str(tmp_path))
    monkeypatch.undo()
    assert files(str(tmp_path)) == before, "a failed save changed the directory"
    loaded = delora_ext.load_adapter(_mlp(0), str(tmp_path))
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), a(x), rtol=0, atol=0)


_WRITER_SCRIPT = """
import sys, torch
from torch import nn
import delora_ext
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
a = delora_ext.patch(mlp(), target_modules=["0", "2"], r=2, init_weights=False, delora_lambda=3.0)
b = delora_ext.patch(mlp(), target_modules=["0", "2"], r=2, init_weights=False, delora_lambda=5.0,
                     module_dropout=0.25)
print("READY", flush=True)
while True:
    for m in (b, a):
        delora_ext.save_adapter(m, sys.argv[1])
"""


def _no_folder_lock(d, exclusive):
    """_folder_lock where the platform has no flock: the reader's fingerprint check alone pairs the files."""
    import contextlib

    @contextlib.contextmanager
    def unlocked():
        yield False
    return unlocked()


@pytest.mark.parametrize("writer_in,locks", [("thread", True), ("thread", False), ("process", True)])
def test_a_reader_concurrent_with_a_writer_gets_one_saves_config_with_its_weights(writer_in, locks, tmp_path,
                                                                                monkeypatch):
    a, b = _two_saves(tmp_path)
    if not locks:
        monkeypatch.setattr(delora_ext.io, "_folder_lock", _no_folder_lock)
    pairs = {0.0: 3.0, 0.25: 5.0}  # config module_dropout -> the λ in that save's weights
    stop, errors, proc = threading.Event(), [], None

    def writer():
        try:
            while not stop.is_set():
                for m in (b, a):
                    delora_ext.save_adapter(m, str(tmp_path))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    if writer_in == "thread":
        t = threading.Thread(target=writer, daemon=True)
        t.start()
    else:
        import subprocess
        import sys
        proc = subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "READY"
    loads, mixed = 0, []
    start = time.monotonic()
    try:
        # 4 s of racing, or longer on a loaded machine until 20 loads have raced the writer (at most 60 s)
        while loads < 300 and (time.monotonic() - start < 4.0 or (loads < 20 and time.monotonic() - start < 60.0)):
            m = delora_ext.load_adapter(_mlp(0), str(tmp_path))
            p = get_state(m).configs["default"].module_dropout
            lam = float(m[0].delora_lambda["default"].detach())
            if pairs[p] != lam:
                mixed.append((p, lam))
            loads += 1
    finally:
        stop.set()
        if proc is None:
            t.join()
        else:
            assert proc.poll() is None, "the writer process died"
            proc.kill()
            proc.wait()
    assert not errors, errors
    assert loads >= 20
    assert not mixed, f"{len(mixed)} of {loads} loads got one save's config with another's weights"


def test_the_weights_metadata_and_tensors_come_from_the_file_that_was_opened(tmp_path, monkeypatch):
    """A weights file replaced between the reader's open and its parse (the window where safetensors' safe_open
    opens the path a second time) cannot pair one save's fingerprint with another save's tensors."""
    a, b = _two_saves(tmp_path)  # the folder holds a's files
    delora_ext.save_adapter(b, str(tmp_path / "b"))
    real_read, swapped = delora_ext.io._open_regular, []

    def open_then_replace(path, what):
        f = real_read(path, what)
        if path.endswith(WEIGHTS) and not swapped:  # the writer renames b's weights in right after our open
            os.replace(tmp_path / "b" / WEIGHTS, path)
            swapped.append(path)
        return f

    monkeypatch.setattr(delora_ext.io, "_open_regular", open_then_replace)
    m = delora_ext.load_adapter(_mlp(0), str(tmp_path))
    assert swapped
    assert get_state(m).configs["default"].module_dropout == 0.0 and float(m[0].delora_lambda["default"].detach()) == 3.0


def test_a_save_killed_between_its_renames_loads_at_once_with_a_warning(tmp_path):
    """New weights beside the old config and the dead save's temporary config: under the folder lock the mismatch
    is the files' own state, so the load neither waits for the save nor mixes silently."""
    a, b = _two_saves(tmp_path)
    delora_ext.save_adapter(b, str(tmp_path / "b"))
    os.replace(tmp_path / "b" / WEIGHTS, tmp_path / WEIGHTS)  # b's weights renamed in, then the writer died
    (tmp_path / f".tmp-x{CONFIG}").write_bytes((tmp_path / "b" / CONFIG).read_bytes())
    start = time.monotonic()
    with pytest.warns(UserWarning, match="was saved with another adapter_config.json"):
        m = delora_ext.load_adapter(_mlp(0), str(tmp_path))
    assert time.monotonic() - start < delora_ext.io.PAIR_WAIT_S / 2
    assert get_state(m).configs["default"].module_dropout == 0.0  # the config in the folder, as it is


def test_a_config_edited_after_saving_is_loaded_with_a_warning(tmp_path):
    a, _ = _two_saves(tmp_path)
    cfg = json.load(open(tmp_path / CONFIG))
    cfg["module_dropout"] = 0.5
    json.dump(cfg, open(tmp_path / CONFIG, "w"))
    with pytest.warns(UserWarning, match="was saved with another adapter_config.json"):
        m = delora_ext.load_adapter(_mlp(0), str(tmp_path))
    assert get_state(m).configs["default"].module_dropout == 0.5


# ---- only regular files are opened --------------------------------------------------------------------------------
_LOAD_SCRIPT = """
import sys, torch
from torch import nn
import delora_ext
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
try:
    delora_ext.load_adapter(m, sys.argv[1])
    print("LOADED")
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("which", [CONFIG, WEIGHTS])
def test_load_adapter_refuses_a_fifo_instead_of_blocking(which, tmp_path):
    import subprocess
    import sys
    _two_saves(tmp_path)
    os.unlink(tmp_path / which)
    os.mkfifo(tmp_path / which)
    root = os.path.dirname(os.path.dirname(os.path.abspath(delora_ext.__file__)))
    # a separate process: a reader blocked in open() may hold the GIL (safetensors' reader does)
    try:
        out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                             timeout=120, cwd=root, env=dict(os.environ, PYTHONPATH=root))
    except subprocess.TimeoutExpired:
        pytest.fail("load_adapter blocked on a FIFO")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert last.startswith("ValueError") and "is a FIFO" in last and which in last, last


# ---- adapter names that cannot be folder names ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a\0b", "x" * 256, "é" * 128, "\ud800"])
def test_adapter_names_that_cannot_be_folder_names_are_refused_before_anything_is_written(name, tmp_path):
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2)
    before = capture(m)
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        delora_ext.patch(m, target_modules=["2"], r=2, adapter_name=name)
    assert not differences(before, capture(m))
    with pytest.raises(ValueError, match=r"`adapter_name`"):
        delora_ext.load_adapter(_mlp(), str(tmp_path), adapter_name=name)
    delora_ext.save_adapter(m, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == [CONFIG, WEIGHTS]


def test_a_save_that_fails_for_a_later_adapter_writes_none_of_them(tmp_path, monkeypatch):
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2)
    delora_ext.patch(m, target_modules=["2"], r=2, adapter_name="second")
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "keep.txt").write_text("user file")
    before = files(str(tmp_path / "out"))
    real = delora_ext.io._write_weights
    calls = []

    def write(tensors, path, fingerprint):
        calls.append(path)
        if len(calls) == 2:  # the second adapter's weights
            raise OSError(28, "No space left on device")
        real(tensors, path, fingerprint)
    monkeypatch.setattr(delora_ext.io, "_write_weights", write)
    with pytest.raises(OSError):
        delora_ext.save_adapter(m, str(tmp_path / "out"))
    assert files(str(tmp_path / "out")) == before
    assert len(delora_layers(m)) == 2


def test_a_folder_another_writer_creates_meanwhile_is_used_and_left_in_place(tmp_path, monkeypatch):
    """Every FSDP rank calls save_adapter into the same folder: the other rank may create it between the check and
    this rank's mkdir."""
    m = delora_ext.patch(_mlp(), target_modules=["0"], r=2)
    target = tmp_path / "shared"
    real = os.mkdir

    def racing_mkdir(path, *args, **kwargs):
        if str(path) == str(target) and not os.path.exists(path):
            real(path)  # the other rank wins the race
        return real(path, *args, **kwargs)
    monkeypatch.setattr(delora_ext.io.os, "mkdir", racing_mkdir)
    delora_ext.save_adapter(m, str(target))
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == [CONFIG, WEIGHTS]
