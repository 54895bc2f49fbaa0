"""The harness of the adapter-file fuzz tests (test_adapter_fuzz.py): the good adapter and the models it is loaded
into, the unpickling tripwires, model fingerprints, the tensor oracle, and running one mutated case."""
from __future__ import annotations

import _pickle
import copy
import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file

import delora_ext
from delora_ext.io import CONFIG_NAME, WEIGHTS_NAME
from delora_ext.patching import delora_layers, get_state

from tiny_models import (
    build,
    one_thread,  # noqa: F401  (autouse: the model tests run single-threaded)
    outputs,
    train,
)

SEED = int(os.environ.get("DELORA_FUZZ_SEED", "6"))
SCALE = float(os.environ.get("DELORA_FUZZ_SCALE", "1"))
ONLY_CASE = os.environ.get("DELORA_FUZZ_CASE")
PREFIX = "base_model.model."
BIN_NAME = "adapter_model.bin"
ADAPTER_ATTRS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")

SAME, LOADS, ERROR, EITHER, ORACLE = "same", "loads", "error", "either", "oracle"
LOADS_COUNT = {"n": 0, "kinds": set()}


# ---- the good adapter and the models it is loaded into --------------------------------------------------------
@dataclasses.dataclass
class World:
    good: str  # directory of the good adapter
    raw: bytes  # its safetensors file
    config: dict  # its adapter_config.json
    tensors: dict  # its tensors
    y_ref: torch.Tensor  # the trained model's outputs
    base: torch.nn.Module  # the unpatched model
    models: dict  # scenario -> model to deep-copy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = build("llama")
    trained = delora_ext.patch(copy.deepcopy(base), r=4, modules_to_save=["lm_head"])
    train(trained, "llama", steps=2)
    good = str(tmp_path_factory.mktemp("good"))
    delora_ext.save_adapter(trained, good)
    tensors = load_file(os.path.join(good, WEIGHTS_NAME))
    assert len(tensors) == 17 and all(t.abs().sum() > 0 for t in tensors.values()), "the good adapter is not trained"
    raw = open(os.path.join(good, WEIGHTS_NAME), "rb").read()
    config = json.load(open(os.path.join(good, CONFIG_NAME)))

    patched = delora_ext.patch(copy.deepcopy(base), target_modules=["q_proj", "k_proj"], r=2, init_weights=False,
                               adapter_name="existing")
    reload = delora_ext.load_adapter(copy.deepcopy(base), good)
    with torch.no_grad():  # a different "default" than the file's, so an in-place overwrite is visible
        for layer in delora_layers(reload).values():
            layer.delora_A["default"].mul_(1.5)
            layer.delora_B["default"].mul_(-0.5)
            layer.delora_lambda["default"].add_(1.0)
            layer.delora_w_norm["default"].mul_(2.0)
        reload.lm_head.weight.add_(0.01)
    return World(good, raw, config, tensors, outputs(trained, "llama"), base,
                 {"fresh": base, "patched": patched, "reload": reload})


# ---- nothing is ever unpickled ---------------------------------------------------------------------------------
class UnpicklingAttempted(BaseException):
    """A BaseException so that no `except Exception` in the code under test can swallow it."""


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    calls = []

    def tripwire(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise UnpicklingAttempted(f"{name} called while loading an adapter")
        return f

    class TripUnpickler:
        def __init__(self, *args, **kwargs):
            calls.append("Unpickler")
            raise UnpicklingAttempted("pickle.Unpickler instantiated while loading an adapter")

    for mod in (pickle, _pickle):
        monkeypatch.setattr(mod, "load", tripwire(f"{mod.__name__}.load"))
        monkeypatch.setattr(mod, "loads", tripwire(f"{mod.__name__}.loads"))
        monkeypatch.setattr(mod, "Unpickler", TripUnpickler)
    monkeypatch.setattr(torch, "load", tripwire("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", tripwire("torch.serialization.load"))
    yield calls
    assert not calls, f"something was unpickled: {calls}"


# ---- model fingerprints ----------------------------------------------------------------------------------------
def fingerprint(model):
    """Everything a failed load must leave as it was (tensors cloned, objects by identity)."""
    state = get_state(model)
    return {
        "attrs": sorted(vars(model)),
        "modules": [(n, type(m), id(m), m.training) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.dtype, p.device, p.requires_grad, p.detach().clone())
                   for n, p in model.named_parameters(remove_duplicate=False)},
        "buffers": {n: (id(b), b.dtype, b.device, b.detach().clone())
                    for n, b in model.named_buffers(remove_duplicate=False)},
        "layers": {n: (list(m.delora_A), list(m.delora_w_norm.keys()), list(m.delora_A0.keys()), list(m.active_adapters),
                       list(m.merged_adapters), dict(m.r), dict(m.module_dropout), set(m._w_pending),
                       m._disable_adapters)
                   for n, m in delora_layers(model).items()},
        "state": None if state is None else (dict(state.configs), list(state.active), len(state.requires_grad),
                                             {k: id(v) for k, v in state.saved_originals.items()}),
    }


def unchanged_problems(before, after) -> list[str]:
    problems = [f"{k} changed" for k in ("attrs", "modules", "layers", "state") if before[k] != after[k]]
    for kind in ("params", "buffers"):
        if list(before[kind]) != list(after[kind]):
            problems.append(f"{kind}: names changed")
            continue
        for n, b in before[kind].items():
            a = after[kind][n]
            if a[:-1] != b[:-1] or not torch.equal(a[-1], b[-1]):
                problems.append(f"{kind[:-1]} {n} changed")
    return problems


# ---- the tensor oracle -----------------------------------------------------------------------------------------
def nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def tensor_oracle(path: str, good: dict, allow_nonfinite: bool = False):
    """(expectation, what, file tensors cast to fp32 or None) for a safetensors file next to the good config,
    decided without delora_ext: safetensors' own reader, then keys, dtypes, shapes and finiteness."""
    try:
        got = load_file(path)
    except Exception as e:  # noqa: BLE001 (safetensors' reader refuses it: so must we)
        return ERROR, f"load_file: {type(e).__name__}", None
    if set(got) != set(good):
        return ERROR, "keys differ", None
    cast = {}
    for k, t in got.items():
        if not t.is_floating_point():
            return ERROR, f"{k}: {t.dtype}", None
        if tuple(t.shape) != tuple(good[k].shape):
            return ERROR, f"{k}: shape {tuple(t.shape)}", None
        try:
            cast[k] = t.to(torch.float32)
        except Exception:  # noqa: BLE001
            return ERROR, f"{k}: {t.dtype} does not cast", None
        if not allow_nonfinite and not torch.isfinite(cast[k]).all():
            return ERROR, f"{k}: non-finite", None
    if all(torch.equal(cast[k], good[k]) for k in good):
        return SAME, "the good values", cast
    return LOADS, "other values", cast


# ---- running one case ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    kind: str
    index: int
    seed: int
    rng: random.Random
    detail: str = ""
    expect: str = ORACLE
    match: str | None = None  # regex the error message must match
    fnf_ok: bool = False  # FileNotFoundError is the right error (a file is absent)
    # whether the config's semantics differ from the good one's: a reload then loads into the existing adapter
    # if the file fits its layout, else refuses it (None: unknown)
    config_changed: bool | None = False
    allow_nonfinite_too: bool = False  # also load with allow_nonfinite=True (must load, values as in the file)

    def __str__(self):
        return f"[{self.kind} #{self.index} seed={self.seed}] {self.detail}"


def file_tensor_targets(model, key):
    path, _, attr = key[len(PREFIX):].rpartition(".")
    if attr in ADAPTER_ATTRS:
        return getattr(model.get_submodule(path), attr)["default"]
    rel = key[len(PREFIX):]
    for mpath, copies in get_state(model).saved_copies.items():  # the adapter's own modules_to_save copy
        if rel.startswith(mpath + ".") and "default" in copies:
            return copies["default"].state_dict()[rel[len(mpath) + 1:]]
    mpath, _, pname = rel.rpartition(".")
    return model.get_submodule(mpath).state_dict()[pname]


def _load(world, d, scenario, case, expect, cast, match=None, allow_nonfinite=False) -> list[str]:
    """Load ``d`` into a copy of the scenario's model; the problems found (empty: fine)."""
    model = copy.deepcopy(world.models[scenario])
    before = fingerprint(model)
    kw = {"allow_nonfinite": True} if allow_nonfinite else {}
    t0 = time.perf_counter()
    try:
        delora_ext.load_adapter(model, d, adapter_name="default", **kw)
        err = None
    except Exception as e:  # noqa: BLE001 (judged below)
        err = e
    took = time.perf_counter() - t0
    LOADS_COUNT["n"] += 1
    where = f"{case} scenario={scenario}{' allow_nonfinite' if allow_nonfinite else ''}"
    problems = []
    if took > 10:
        problems.append(f"{where}: took {took:.1f} s")
    if err is None:
        if expect == ERROR:
            return problems + [f"{where}: loaded, expected an error"]
        if cast is not None:  # every file tensor is in the model, as the file has it (cast to fp32)
            for k, v in cast.items():
                got = file_tensor_targets(model, k)
                if not nan_equal(got.detach(), v):
                    problems.append(f"{where}: {k} in the model is not the file's value")
        if not allow_nonfinite:
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                problems.append(f"{where}: non-finite parameters after loading: {bad[:3]}")
        if expect == SAME:
            if scenario == "patched":
                existing = world.models["patched"].model.layers[0].self_attn.k_proj.delora_B["existing"]
                if not torch.equal(model.model.layers[0].self_attn.k_proj.delora_B["existing"], existing):
                    problems.append(f"{where}: the existing adapter changed")
                delora_ext.set_adapter(model, "default")
            # patch() leaves new DeLoRA layers in training mode inside an eval() model (so module_dropout > 0
            # would apply): compare in eval mode, as every loaded adapter is used
            model.eval()
            if not torch.equal(outputs(model, "llama"), world.y_ref):
                problems.append(f"{where}: loaded but outputs differ from the good adapter's")
        return problems
    # refused: a clear error, the model untouched
    msg = f"{type(err).__name__}: {str(err)[:400]}"
    if expect in (SAME, LOADS):
        problems.append(f"{where}: expected to load, got {msg}")
    clear = (ValueError, TypeError) + ((FileNotFoundError,) if case.fnf_ok else ())
    if type(err) not in clear:
        problems.append(f"{where}: unclear error type {msg}")
    elif not any(name in str(err) for name in (CONFIG_NAME, WEIGHTS_NAME, BIN_NAME)):
        problems.append(f"{where}: the error does not name the file: {msg}")
    elif match and not re.search(match, str(err)):
        problems.append(f"{where}: error does not match /{match}/: {msg}")
    problems += [f"{where}: {p} by a refused load ({msg})" for p in unchanged_problems(before, fingerprint(model))]
    return problems


def run_kind(world, tmp_path, kind, mutate, count):
    """``count`` cases of ``mutate(case, d, world)``; fail with every problem found, each naming its case."""
    LOADS_COUNT["kinds"].add(kind)
    problems = []
    indices = range(count) if ONLY_CASE is None else [int(ONLY_CASE)]
    for i in indices:
        seed = SEED * 100_000 + i
        case = Case(kind, i, seed, random.Random(f"{kind}:{seed}"))
        d = str(tmp_path / f"{kind}-{i}")
        shutil.copytree(world.good, d)
        mutate(case, d, world)
        expect, cast = case.expect, None
        wpath = os.path.join(d, WEIGHTS_NAME)
        if expect in (ORACLE, LOADS, SAME, EITHER) and os.path.isfile(wpath):
            oracle, why, cast = tensor_oracle(wpath, world.tensors)
            if expect == ORACLE:
                expect = oracle
                case.detail += f" (oracle: {oracle}, {why})"
            elif oracle == ERROR and expect != EITHER:
                problems.append(f"{case}: test bug: the oracle refuses this file ({why}) but {expect} is expected")
        elif expect == ORACLE:
            expect = ERROR
        for scenario in ("fresh", "patched" if i % 2 == 0 else "reload"):
            exp, match = expect, case.match
            if scenario == "reload" and case.config_changed is None:
                exp = EITHER
            elif scenario == "reload" and case.config_changed:
                # "default" is on the model with the good config: as PEFT's load_adapter, the file's values load
                # into it when they fit its layout (its config is kept), and another layout is refused as such
                # (a rank the config alone changes is not a layout change: the existing adapter's ranks count)
                shapes_only = bool(case.match) and "expected \\(" in case.match
                exp = ERROR if expect == ERROR and not shapes_only else EITHER
                match = r"adapter_config\.json: adapter 'default' exists on the model with .* other than this file's"
                if case.expect == ERROR and case.match:  # or refused for what it is, before that
                    match = f"(?:{case.match})|(?:{match})"
            problems += _load(world, d, scenario, case, exp, cast, match)
        if os.path.exists(os.path.join(d, "UNPICKLED")):
            problems.append(f"{case}: a pickle was executed")
        if case.allow_nonfinite_too:
            _, why, cast_nf = tensor_oracle(wpath, world.tensors, allow_nonfinite=True)
            problems += _load(world, d, "fresh", case, LOADS, cast_nf, None, allow_nonfinite=True)
        shutil.rmtree(d, ignore_errors=True)
    assert not problems, (f"{len(problems)} problem(s); rerun one case with DELORA_FUZZ_SEED={SEED} "
                          f"DELORA_FUZZ_CASE=<#> python -m pytest 'tests/test_adapter_fuzz.py::test_fuzz[{kind}]':\n"
                          + "\n".join(problems[:25]))


def n(count: int) -> int:
    return max(1, round(count * SCALE))


# ---- safetensors bytes -----------------------------------------------------------------------------------------
def split_st(raw: bytes):
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def join_st(header, body: bytes, header_bytes: bytes | None = None) -> bytes:
    hb = header_bytes if header_bytes is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(hb)) + hb + body


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)


def tensor_keys(world):
    return sorted(world.tensors)


JUNK_STRINGS = ["", "x", "(", ")", "[", ".*", "q_proj", "lm_head", "é中\u202e", "\x00", "a" * 300, "NaN", "-1"]


def junk(rng: random.Random, depth: int = 0):
    """A random JSON value (NaN and Infinity included: Python's json reads them)."""
    choices = [None, True, False, 0, 1, -1, 4, 2 ** 31, 2 ** 63, 2 ** 64, -(2 ** 70), 10 ** 30,
               rng.uniform(-1e6, 1e6), 0.5, float("nan"), float("inf"), -float("inf"), 1e308,
               rng.choice(JUNK_STRINGS)]
    if depth < 2:
        choices += [[junk(rng, depth + 1) for _ in range(rng.randint(0, 3))],
                    {rng.choice(JUNK_STRINGS): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}]
    return rng.choice(choices)


