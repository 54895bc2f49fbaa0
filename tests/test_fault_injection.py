"""A model operation that fails part-way leaves the model and the files as they were.

For each of patch, merge, unmerge, delete_adapter, set_adapter, save_adapter and load_adapter, every internal
step it runs is made to fail in turn: every function of delora_ext's modules and every method of its layer and
config classes that the operation calls, and the library calls it makes (copy.deepcopy, os.replace, os.link,
os.mkdir, os.fsync, tempfile.mkstemp, safetensors' save_file / load, json.dumps / loads), each at its first,
second, middle and last call. The model (every parameter and buffer bit for bit, with dtype, device, requires_grad
and identity; every module at every path with its train/eval mode; adapter and patch state, including the
modules_to_save originals and copies held outside the module tree) and the adapter directory (every file's bytes)
must then be exactly as before the call. Cleanup after a committed save (removing the old files' backups) and the
restore itself are not failed: they are not steps of the operation.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import inspect
import json as json_module
import os
import tempfile as tempfile_module
import warnings

import pytest
import torch
from model_state import capture, differences, files
from torch import nn

import delora_ext
from delora_ext import config as cfg_mod
from delora_ext import core, io, ops, patching, quant
from delora_ext import layer as layer_mod
from delora_ext import model as model_mod


class InjectedFault(Exception):
    """Raised by a step made to fail (an Exception, not an OSError: nothing may take it for a benign error)."""


# ---- the steps ------------------------------------------------------------------------------------------------
MODULES = [patching, model_mod, io, cfg_mod, core, ops, layer_mod, quant]
CLASSES = [layer_mod.DeLoRALayer, layer_mod.DeLoRALinear, layer_mod.BufferDict, cfg_mod.DeLoRAConfig]
# the machinery that restores the model (failing it is not a step of the operation)
RESTORE = {getattr(model_mod, n, None) for n in ("transaction", "note_write", "note_data", "_snap", "_unsnap")}
RESTORE |= {f for f in vars(getattr(model_mod, "Undo", object)).values() if inspect.isfunction(f)}
LIBRARY = [(copy_module, "deepcopy"), (os, "replace"), (os, "link"), (os, "mkdir"), (os, "fsync"),
           (tempfile_module, "mkstemp"), (io, "save_file"), (io, "load_safetensors"), (json_module, "dumps"),
           (json_module, "loads")]


def _steps():
    """step name -> [(namespace, attribute)] binding the same callable (a function imported into several modules
    is failed wherever it is called from)."""
    by_obj: dict[int, tuple[str, object, list]] = {}
    for mod in MODULES:
        for name, obj in vars(mod).items():
            if inspect.isfunction(obj) and obj.__module__.startswith("delora_ext") and obj not in RESTORE:
                by_obj.setdefault(id(obj), (f"{obj.__module__}.{obj.__qualname__}", obj, []))[2].append((mod, name))
    for cls in CLASSES:
        for name, obj in vars(cls).items():
            if inspect.isfunction(obj) or isinstance(obj, (staticmethod, classmethod)):
                if name in ("__init_subclass__", "__class_getitem__"):
                    continue
                by_obj.setdefault(id(obj), (f"{cls.__name__}.{name}", obj, []))[2].append((cls, name))
    steps = {label: bindings for label, _, bindings in by_obj.values()}
    for ns, name in LIBRARY:
        steps[f"{ns.__name__}.{name}"] = [(ns, name)]
    return steps


STEPS = _steps()


class _Injector:
    """Wraps every step: counts calls, and makes call number ``fail_at`` of step ``target`` raise."""

    def __init__(self, target: str | None = None, fail_at: int = 0):
        self.target, self.fail_at, self.calls, self.saved = target, fail_at, {}, []

    def _wrap(self, label, fn):
        def wrapper(*args, **kwargs):
            n = self.calls[label] = self.calls.get(label, 0) + 1
            if label == self.target and n == self.fail_at:
                raise InjectedFault(f"{label} call {n} failed")
            return fn(*args, **kwargs)
        return wrapper

    def __enter__(self):
        targets = STEPS if self.target is None else {self.target: STEPS[self.target]}
        for label, bindings in targets.items():
            for ns, name in bindings:
                raw = vars(ns)[name] if isinstance(ns, type) else getattr(ns, name)
                if isinstance(raw, (staticmethod, classmethod)):
                    new = type(raw)(self._wrap(label, raw.__func__))
                else:
                    new = self._wrap(label, raw)
                self.saved.append((ns, name, raw))
                setattr(ns, name, new)
        return self

    def __exit__(self, *exc):
        for ns, name, raw in reversed(self.saved):
            setattr(ns, name, raw)
        return False


# ---- the scenarios --------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Sequential(nn.Linear(8, 4), nn.Dropout(0.1))

    def forward(self, x):
        return self.head(self.body(x))


def _two_adapters(merged=False, dtype=torch.float32):
    m = Net().to(dtype)
    delora_ext.patch(m, target_modules=["body.0", "body.2"], r=2, init_weights=False, modules_to_save=["head"])
    delora_ext.patch(m, target_modules=["body.0"], r=3, init_weights=False, adapter_name="second",
                     modules_to_save=["head"])
    with torch.no_grad():
        m.head[0].weight.add_(0.5)  # the default adapter's trained head copy
    m.eval()
    if merged:
        delora_ext.merge(m)
    return m


def _saved(tmp, m, names=None):
    delora_ext.save_adapter(m, tmp, adapter_names=names)
    return tmp


@dataclasses.dataclass
class Scenario:
    name: str
    setup: object  # tmp dir -> (model, directory or None)
    op: object  # (model, directory) -> None


SCENARIOS = [
    Scenario("patch first adapter", lambda d: (Net(), None),
             lambda m, d: delora_ext.patch(m, target_modules=["body.0", "body.2"], r=2, modules_to_save=["head"])),
    Scenario("patch another adapter", lambda d: (_two_adapters(), None),
             lambda m, d: delora_ext.patch(m, target_modules=["body.0", "body.2"], r=2, adapter_name="third",
                                           init_weights=False, modules_to_save=["head"])),
    Scenario("merge", lambda d: (_two_adapters(), None),
             lambda m, d: delora_ext.merge(m, adapter_names=["default", "second"])),
    Scenario("merge bf16 safe", lambda d: (_two_adapters(dtype=torch.bfloat16), None),
             lambda m, d: delora_ext.merge(m, safe_merge=True)),
    Scenario("unmerge", lambda d: (_two_adapters(merged=True), None), lambda m, d: delora_ext.unmerge(m)),
    Scenario("delete the active adapter", lambda d: (_two_adapters(), None),
             lambda m, d: delora_ext.delete_adapter(m, "default")),
    Scenario("delete an inactive adapter", lambda d: (_two_adapters(), None),
             lambda m, d: delora_ext.delete_adapter(m, "second")),
    Scenario("set_adapter on a merged model", lambda d: (_two_adapters(merged=True), None),
             lambda m, d: delora_ext.set_adapter(m, "second")),
    Scenario("save_adapter over an older save", lambda d: (_two_adapters(), _saved(d, _older())),
             lambda m, d: delora_ext.save_adapter(m, d)),
    Scenario("save_adapter into a new folder", lambda d: (_two_adapters(), d),
             lambda m, d: delora_ext.save_adapter(m, os.path.join(d, "new", "sub"))),
    Scenario("load_adapter into a fresh model", lambda d: (Net(), _saved(d, _two_adapters(), ["default"])),
             lambda m, d: delora_ext.load_adapter(m, d)),
    Scenario("load_adapter as a new inactive adapter",
             lambda d: (_patched_default(), _saved(d, _two_adapters(), ["second"])),
             lambda m, d: delora_ext.load_adapter(m, os.path.join(d, "second"), adapter_name="second")),
    Scenario("load_adapter into the existing adapter", lambda d: (_two_adapters(), _saved(d, _older(), ["default"])),
             lambda m, d: delora_ext.load_adapter(m, d, is_trainable=False)),
]


def _older():
    m = _two_adapters()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.mul_(-1.5)
    return m


def _patched_default():
    m = Net()
    delora_ext.patch(m, target_modules=["body.0", "body.2"], r=2, init_weights=False, modules_to_save=["head"])
    return m


def _run(scenario, tmp, target=None, fail_at=0):
    model, d = scenario.setup(str(tmp))
    before, before_files = capture(model), (files(d) if d else None)
    err = None
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _Injector(target, fail_at) as inj:
            try:
                scenario.op(model, d)
            except InjectedFault as e:
                err = e
            except Exception as e:  # noqa: BLE001 (a step's failure surfacing as another error is fine)
                if not any(isinstance(c, InjectedFault) for c in _causes(e)):
                    raise
                err = e
    return model, d, before, before_files, err, inj.calls


def _causes(e):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _fail_points(n: int) -> list[int]:
    return sorted({1, 2, (n + 1) // 2, n} & set(range(1, n + 1)))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_every_step_failing_leaves_the_model_and_files_as_they_were(scenario, tmp_path):
    (tmp_path / "clean").mkdir()
    _, _, _, _, err, calls = _run(scenario, tmp_path / "clean")
    assert err is None
    assert calls, "no step was called"
    problems, runs = [], 0
    for label in sorted(calls):
        for k in _fail_points(calls[label]):
            runs += 1
            tmp = tmp_path / f"run{runs}"
            tmp.mkdir()
            model, d, before, before_files, err, _ = _run(scenario, tmp, label, k)
            if err is None:
                problems.append(f"{label} call {k}: the failure was swallowed and the call returned")
                continue
            diff = differences(before, capture(model))
            if diff:
                problems.append(f"{label} call {k}: the model changed: {diff[:3]}")
            if d is not None and files(d) != before_files:
                changed = sorted(set(files(d)) ^ set(before_files)) or "file contents"
                problems.append(f"{label} call {k}: the files changed: {changed}")
    assert runs >= 10
    assert not problems, f"{len(problems)} of {runs} injected failures:\n" + "\n".join(problems[:30])


def test_the_steps_cover_each_operations_own_work():
    """The injection reaches the operations' own steps (not only checks): a guard against a silent no-op."""
    for name, must in [("patch first adapter", ["DeLoRALinear.__init__", "copy.deepcopy",
                                                 "delora_ext.model.replace_module"]),
                       ("patch another adapter", ["DeLoRALayer.update_layer", "copy.deepcopy"]),
                       ("merge", ["DeLoRALinear._merge_commit", "delora_ext.core.apply_delta"]),
                       ("unmerge", ["DeLoRALinear.unmerge"]),
                       ("set_adapter on a merged model", ["delora_ext.patching._install", "DeLoRALinear.unmerge"]),
                       ("delete the active adapter", ["DeLoRALayer._drop_adapter", "delora_ext.patching.set_adapter"]),
                       ("save_adapter over an older save", ["delora_ext.io._write_weights", "os.replace", "os.link"]),
                       ("load_adapter into the existing adapter", ["delora_ext.io._copy_values"])]:
        scenario = next(s for s in SCENARIOS if s.name == name)
        with tempfile_module.TemporaryDirectory() as tmp:
            calls = _run(scenario, tmp)[-1]
        missing = [m for m in must if m not in calls]
        assert not missing, f"{name}: steps never called: {missing}"
