"""Adapter files from strangers (issue 6): seeded fuzzing of ``load_adapter``.

A good adapter (tiny Llama, r=4, q_proj/v_proj, modules_to_save=["lm_head"], trained so every value matters) is
saved once; every case copies it, mutates the copy in one way, and loads it into three kinds of model:

- ``fresh``:   an unpatched model (adapter "default");
- ``patched``: a model already patched with another trained adapter "existing" (q_proj, k_proj, r=2); the file
  is added as "default" next to it (extending q_proj, wrapping v_proj);
- ``reload``:  a model that already has "default" from the good file, with its values then perturbed; the file
  is loaded over it in place (so a load that fails half-way would show).

Every case runs ``fresh`` and one of the other two (alternating). A load must end in one of two ways:

- it works: every tensor of the file is in the model, cast to the parameter's dtype (fp32), bit for bit; when
  the mutation is benign (the file still holds exactly the good values and config semantics: whitespace in the
  header, metadata, a fp64 copy of fp32 values, config fields PEFT ignores, ...) the outputs equal the good
  adapter's outputs bit for bit;
- or it raises a *clear* error: exactly ``ValueError`` or ``TypeError`` (``FileNotFoundError`` only where a file
  is really absent), whose message names the file (adapter_config.json / adapter_model.safetensors /
  adapter_model.bin) and, for the kinds where we know, the key and what was expected. Never a raw SafetensorError,
  struct.error, JSONDecodeError (a ValueError subclass: refused here on purpose), KeyError, AttributeError,
  re.error, torch's RuntimeError/NotImplementedError, MemoryError or a crash. The model is then exactly as
  before: the same module objects at the same paths, the same parameter/buffer objects with bit-identical values,
  dtypes and requires_grad, the same adapters, active adapters and patch state.

What "works" means for dtypes (decided here): any floating dtype of the right shape (fp16, bf16, fp64, the fp8
types) loads, cast to fp32; a cast that overflows to Inf/NaN is refused like a non-finite value; integer, bool,
unsigned and complex tensors are refused; a floating dtype torch cannot cast (float4_e2m1fn_x2) is refused.
Non-finite values (NaN/±Inf) are refused unless ``allow_nonfinite=True``.

The expectation of a tensor-file mutation comes from an independent oracle: the mutated file is read with
safetensors' own ``load_file`` (if that fails, loading must fail) and compared with the good file's keys, shapes
and values. Nothing is ever unpickled: pickle/torch.load are replaced by tripwires during every test.

Reproduce a failure: every failure names kind, case index, seed and the mutation (offset, byte, key, value);
``DELORA_FUZZ_SEED=<seed base> python -m pytest 'tests/test_adapter_fuzz.py::test_fuzz[<kind>]'`` reruns that
kind (the case seed is seed base * 100000 + index), and ``DELORA_FUZZ_CASE=<index>`` limits it to one case. ``DELORA_FUZZ_SCALE=<float>`` scales the random case counts.
"""
from __future__ import annotations

import _pickle
import copy
import dataclasses
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import delora_ext
from delora_ext.io import CONFIG_NAME, WEIGHTS_NAME
from delora_ext.patching import delora_layers, get_state

from tiny_models import one_thread  # noqa: F401  (autouse: the model tests run single-threaded)
from tiny_models import build, logits, train

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


def _out(model):
    with torch.no_grad():
        return logits(model, "llama")


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
    return World(good, raw, config, tensors, _out(trained), base,
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


def test_tripwires_are_armed(no_unpickling):
    with pytest.raises(UnpicklingAttempted):
        torch.load(io.BytesIO(b"x"))
    with pytest.raises(UnpicklingAttempted):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(UnpicklingAttempted):
        pickle.Unpickler(io.BytesIO(b"x"))
    no_unpickling.clear()


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
def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
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


def _file_tensor_targets(model, key):
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
                got = _file_tensor_targets(model, k)
                if not _nan_equal(got.detach(), v):
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
            if not torch.equal(_out(model), world.y_ref):
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


# ---- mutations of the safetensors bytes ------------------------------------------------------------------------
def m_truncate(case, d, world):
    raw = world.raw
    size = struct.unpack("<Q", raw[:8])[0]
    region = case.rng.choice(["prefix", "header", "data"])
    lo, hi = {"prefix": (0, 8), "header": (8, 8 + size), "data": (8 + size, len(raw))}[region]
    cut = case.rng.randrange(lo, hi)
    write(os.path.join(d, WEIGHTS_NAME), raw[:cut])
    case.detail = f"truncated to {cut} of {len(raw)} bytes ({region})"
    case.expect, case.match = ERROR, r"adapter_model\.safetensors is not a valid safetensors file"


def m_append(case, d, world):
    extra = case.rng.choice([b"\x00", b" ", b"{}", bytes(case.rng.randrange(256) for _ in range(case.rng.randint(1, 64)))])
    write(os.path.join(d, WEIGHTS_NAME), world.raw + extra)
    case.detail = f"appended {extra[:16]!r} ({len(extra)} bytes)"


def _flip(case, data: bytearray, lo: int, hi: int, count: int) -> str:
    done = []
    for _ in range(count):
        off = case.rng.randrange(lo, hi)
        new = case.rng.choice([case.rng.randrange(256), data[off] ^ (1 << case.rng.randrange(8))])
        done.append(f"@{off}:{data[off]:#04x}->{new:#04x}")
        data[off] = new
    return " ".join(done)


def m_flip_prefix(case, d, world):
    data = bytearray(world.raw)
    case.detail = "header-length prefix flips " + _flip(case, data, 0, 8, case.rng.randint(1, 3))
    write(os.path.join(d, WEIGHTS_NAME), bytes(data))


def m_prefix_value(case, d, world):
    size = struct.unpack("<Q", world.raw[:8])[0]
    value = case.rng.choice([0, 1, 2, 7, size - 1, size + 1, size + 8, len(world.raw) - 8, len(world.raw),
                             2 ** 31, 2 ** 40, 100_000_001, 2 ** 63, 2 ** 64 - 1])
    write(os.path.join(d, WEIGHTS_NAME), struct.pack("<Q", value) + world.raw[8:])
    case.detail = f"header length {value} (really {size})"


def m_flip_header(case, d, world):
    data = bytearray(world.raw)
    size = struct.unpack("<Q", world.raw[:8])[0]
    case.detail = "JSON header flips " + _flip(case, data, 8, 8 + size, case.rng.choice([1, 1, 2, 4]))
    write(os.path.join(d, WEIGHTS_NAME), bytes(data))


def m_flip_data(case, d, world):
    data = bytearray(world.raw)
    size = struct.unpack("<Q", world.raw[:8])[0]
    case.detail = "data flips " + _flip(case, data, 8 + size, len(data), case.rng.randint(1, 8))
    write(os.path.join(d, WEIGHTS_NAME), bytes(data))


def m_header_whitespace(case, d, world):
    header, body = split_st(world.raw)
    indent = case.rng.choice([None, 0, 1, 4, "\t"])
    text = json.dumps(header, indent=indent, separators=(case.rng.choice([",", ", ", " ,\n"]), case.rng.choice([":", " : "])))
    text += " " * case.rng.randrange(8) + case.rng.choice(["", "\n", "\t", "\r\n"])
    write(os.path.join(d, WEIGHTS_NAME), join_st(None, body, text.encode()))
    case.detail = f"header re-serialised with indent={indent!r}, {len(text)} bytes"
    case.expect = SAME


def m_header_metadata(case, d, world):
    header, body = split_st(world.raw)
    what = case.rng.choice(["drop", "format np", "extra strings", "junk"])
    if what == "drop":
        del header["__metadata__"]
    elif what == "format np":
        header["__metadata__"] = {"format": "np"}
    elif what == "extra strings":
        header["__metadata__"].update({"x" * case.rng.randint(1, 50): "é" * case.rng.randint(0, 50), "": ""})
    else:
        header["__metadata__"] = junk(case.rng)
    write(os.path.join(d, WEIGHTS_NAME), join_st(header, body))
    case.detail = f"__metadata__: {what} -> {str(header.get('__metadata__'))[:80]}"
    case.expect = SAME if what != "junk" else ORACLE


ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 0.5, "C64": 8}


def _entry(case, header):
    key = case.rng.choice(sorted(k for k in header if k != "__metadata__"))
    return key, header[key]


def m_header_dtype(case, d, world):
    header, body = split_st(world.raw)
    key, e = _entry(case, header)
    new = case.rng.choice(list(ST_DTYPES) + ["F128", "", "f32", "float32", 7, None, ["F32"]])
    e["dtype"] = new
    how = "shape kept"
    if isinstance(new, str) and new in ST_DTYPES and case.rng.random() < 0.7:  # reinterpret the same bytes: last dim scaled to fit
        nbytes = e["data_offsets"][1] - e["data_offsets"][0]
        lead = math.prod(e["shape"][:-1])
        last = nbytes / ST_DTYPES[new] / lead
        if last == int(last):
            e["shape"] = e["shape"][:-1] + [int(last)]
            how = f"shape {e['shape']} (same bytes)"
    write(os.path.join(d, WEIGHTS_NAME), join_st(header, body))
    case.detail = f"{key}: dtype {new!r}, {how}"


HUGE_SHAPES = [[2 ** 20, 2 ** 20], [2 ** 40], [2 ** 62, 4], [2 ** 64 - 1], [2 ** 63], [2 ** 32, 2 ** 32, 2 ** 32],
               [2 ** 62, 0], [2 ** 64 - 1, 0], [0, 2 ** 63], [-1, 32], [4, -32], ["4", 32], [4.0, 32], [4, None],
               [], [1] * 70, [0] * 70, [[4], 32], "4,32", None, {"r": 4}]


def m_header_shape(case, d, world):
    """A shape whose product is enormous (or overflows 64 bits), negative, zero-sized with a huge dim, of the
    wrong JSON type, ...; the byte range kept, claimed (numel x 4 bytes), or the file rebuilt around it so that
    it is consistent (only where that takes few bytes: a zero-sized tensor with a 2**64-1 dim, 70 dims)."""
    shape = copy.deepcopy(case.rng.choice(HUGE_SHAPES))
    ints = isinstance(shape, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)
    numel = math.prod(shape) if ints else None
    mode = case.rng.choice(["kept", "claimed", "consistent"] if numel is not None and numel <= 2 ** 16
                           else ["kept", "claimed"])
    if mode == "consistent":
        entries = st_entries(world.raw)
        i = case.rng.randrange(len(entries))
        key = entries[i][0]
        entries[i] = (key, "F32", shape, bytes(4 * numel))
        write(os.path.join(d, WEIGHTS_NAME), build_st(entries))
    else:
        header, body = split_st(world.raw)
        key, e = _entry(case, header)
        e["shape"] = shape
        if mode == "claimed":
            start = e["data_offsets"][0]
            e["data_offsets"] = [start, start + 4 * (numel if numel is not None else 1)]
        write(os.path.join(d, WEIGHTS_NAME), join_st(header, body))
    case.detail = f"{key}: shape {str(shape)[:60]}, data {mode}"


def m_header_offsets(case, d, world):
    header, body = split_st(world.raw)
    key, e = _entry(case, header)
    a, b = e["data_offsets"]
    e["data_offsets"] = case.rng.choice([
        [0, 2 ** 40], [a, 2 ** 40], [2 ** 64 - 1, 2 ** 64 - 1], [b, a], [a - 4, b - 4], [a + 4, b + 4], [0, b - a],
        [a, b + 4], [a, b - 4], [-a, b], [a, b, b], [a], [], [str(a), b], [float(a), b], None, {"a": a},
        [len(body), len(body) + b - a], [a, b + len(body)]])
    write(os.path.join(d, WEIGHTS_NAME), join_st(header, body))
    case.detail = f"{key}: data_offsets {e['data_offsets']} (were [{a}, {b}])"


def m_header_entries(case, d, world):
    header, body = split_st(world.raw)
    key, e = _entry(case, header)
    what = case.rng.choice(["delete", "alias", "rename", "extra at end", "key not a dict", "unknown field"])
    if what == "delete":
        del header[key]
    elif what == "alias":  # a second key over the same bytes
        header[key[:-1] + "X"] = dict(e)
    elif what == "rename":
        header[key.replace("delora_", "lora_")] = header.pop(key)
    elif what == "extra at end":
        header[PREFIX + "model.layers.0.self_attn.k_proj.delora_A"] = {
            "dtype": "F32", "shape": [4, 32], "data_offsets": [len(body), len(body) + 512]}
        body += bytes(512)
    elif what == "key not a dict":
        header[key] = case.rng.choice([None, 5, "F32", [e["dtype"], e["shape"]]])
    else:
        e["extra"] = junk(case.rng)
    write(os.path.join(d, WEIGHTS_NAME), join_st(header, body))
    case.detail = f"{key}: {what}"


def m_garbage_file(case, d, world):
    what = case.rng.choice(["empty", "zeros", "random", "json config", "pickle", "torch.save zip", "only header",
                            "prefix only"])
    rnd = bytes(case.rng.randrange(256) for _ in range(case.rng.randint(1, 4096)))
    data = {"empty": b"", "zeros": bytes(case.rng.randint(1, 4096)), "random": rnd,
            "json config": open(os.path.join(d, CONFIG_NAME), "rb").read(),
            "pickle": pickle.dumps({"a": 1}), "torch.save zip": _torch_save_bytes(world),
            "only header": join_st({}, b""), "prefix only": world.raw[:8]}[what]
    write(os.path.join(d, WEIGHTS_NAME), data)
    case.detail = f"file replaced: {what} ({len(data)} bytes)"
    case.expect, case.match = ERROR, r"adapter_model\.safetensors"


def _torch_save_bytes(world):
    buf = io.BytesIO()
    torch.save(world.tensors, buf)
    return buf.getvalue()


# ---- mutations of the tensors (the file rewritten with safetensors) -------------------------------------------
def _save(d, tensors):
    save_file(tensors, os.path.join(d, WEIGHTS_NAME), metadata={"format": "pt"})


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
NONFLOAT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
                   torch.uint16, torch.uint32, torch.uint64]


def m_dtype_float(case, d, world):
    tensors = dict(world.tensors)
    keys = case.rng.sample(tensor_keys(world), case.rng.choice([1, 3, len(tensors)]))
    dt = case.rng.choice(FLOAT_DTYPES)
    for k in keys:
        tensors[k] = tensors[k].to(dt)
    _save(d, tensors)
    case.detail = f"{len(keys)} key(s) as {dt} (first {keys[0]})"
    case.expect = SAME if dt == torch.float64 else ORACLE  # fp32 values are exact in fp64


def m_dtype_nonfloat(case, d, world):
    tensors = dict(world.tensors)
    k = case.rng.choice(tensor_keys(world))
    dt = case.rng.choice(NONFLOAT_DTYPES)
    tensors[k] = (tensors[k] * 100).to(dt)
    _save(d, tensors)
    case.detail = f"{k} as {dt}"
    case.expect, case.match = ERROR, rf"{re.escape(repr(k))} has dtype {re.escape(str(dt))}; a floating-point"


def build_st(entries) -> bytes:
    """A safetensors file from (key, dtype string, shape, bytes) entries, offsets computed."""
    header, body, pos = {"__metadata__": {"format": "pt"}}, b"", 0
    for key, dtype, shape, data in entries:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        body += data
        pos += len(data)
    return join_st(header, body)


def st_entries(raw: bytes):
    header, body = split_st(raw)
    return [(k, e["dtype"], e["shape"], body[e["data_offsets"][0]:e["data_offsets"][1]])
            for k, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if "data_offsets" in kv[1]
                               else -1) if k != "__metadata__"]


def m_float4(case, d, world):
    """A floating dtype torch cannot cast: float4_e2m1fn_x2 (two values a byte; torch's shape halves the last
    dim). Either the same bytes (torch shape 4x the good one) or a torch shape equal to the good one."""
    entries = st_entries(world.raw)
    i = case.rng.randrange(len(entries))
    key, _, shape, data = entries[i]
    if case.index % 2:
        entries[i] = (key, "F4", shape[:-1] + [8 * shape[-1]], data)
        note = "same bytes"
    else:
        numel = math.prod(shape)
        entries[i] = (key, "F4", shape[:-1] + [2 * shape[-1]], bytes(case.rng.randrange(256) for _ in range(numel)))
        note = "torch shape equal to the expected one"
    write(os.path.join(d, WEIGHTS_NAME), build_st(entries))
    case.detail = f"{key}: F4 shape {entries[i][2]} ({note})"
    case.expect = ERROR


def m_nonfinite(case, d, world):
    tensors = {k: v.clone() for k, v in world.tensors.items()}
    keys = case.rng.sample(tensor_keys(world), case.rng.choice([1, 1, 2, 5]))
    vals = []
    for k in keys:
        flat = tensors[k].view(-1)
        for _ in range(case.rng.randint(1, 3)):
            pos = case.rng.randrange(flat.numel())
            v = case.rng.choice([float("nan"), float("inf"), -float("inf")])
            flat[pos] = v
            vals.append(f"{k.rsplit('.', 2)[-2]}.{k.rsplit('.', 1)[-1]}[{pos}]={v}")
        if case.rng.random() < 0.3:
            tensors[k] = tensors[k].to(case.rng.choice([torch.float16, torch.bfloat16, torch.float64]))
    _save(d, tensors)
    case.detail = ", ".join(vals)
    case.expect = ERROR
    case.match = rf"non-finite.*{re.escape(repr(sorted(keys)[0]))}"
    case.allow_nonfinite_too = True


def m_overflow_cast(case, d, world):
    tensors = dict(world.tensors)
    k = case.rng.choice(tensor_keys(world))
    t = tensors[k].double().clone()
    pos = case.rng.randrange(t.numel())
    t.view(-1)[pos] = case.rng.choice([1e39, -1e39, 1e300, -1e300, 3.5e38])
    tensors[k] = t
    _save(d, tensors)
    case.detail = f"{k} as float64 with {t.view(-1)[pos].item():g} at {pos} (overflows float32)"
    case.expect, case.match = ERROR, rf"non-finite.*{re.escape(repr(k))}"
    case.allow_nonfinite_too = True


def _extra_key(case, world):
    return case.rng.choice([
        PREFIX + "model.layers.0.self_attn.k_proj.delora_A", PREFIX + "model.layers.0.self_attn.q_proj.weight",
        PREFIX + "model.layers.0.self_attn.q_proj.base_layer.weight",
        PREFIX + "model.layers.0.self_attn.q_proj.delora_A.default", "model.layers.0.self_attn.q_proj.delora_A",
        PREFIX + "model.layers.7.self_attn.q_proj.delora_A", PREFIX + "lm_head.bias", PREFIX + "model.norm.weight",
        "", "x", "é中", "a" * 5000, PREFIX, PREFIX + "model.layers.0.self_attn.q_proj.delora_a",
        PREFIX + "model.layers.0.self_attn.q_proj.delora_A0"])


def m_extra_key(case, d, world):
    tensors = dict(world.tensors)
    extra = [_extra_key(case, world) for _ in range(case.rng.randint(1, 3))]
    for k in extra:
        tensors[k] = torch.randn(case.rng.choice([(4, 32), (1,), (32,), ()]))
    _save(d, tensors)
    case.detail = "extra keys " + ", ".join(repr(k[:80]) for k in extra)
    case.expect, case.match = ERROR, r"unexpected key"


def m_missing_key(case, d, world):
    tensors = dict(world.tensors)
    gone = case.rng.sample(tensor_keys(world), case.rng.choice([1, 1, 2, 8, len(tensors)]))
    for k in gone:
        del tensors[k]
    _save(d, tensors)
    case.detail = f"{len(gone)} key(s) dropped: {sorted(gone)[:3]}"
    case.expect = ERROR
    case.match = rf"missing key {re.escape(repr(sorted(gone)[0]))}" if len(gone) < len(world.tensors) else None


def m_wrong_shape(case, d, world):
    tensors = dict(world.tensors)
    k = case.rng.choice(tensor_keys(world))
    t = tensors[k]
    shapes = [(t.shape[0] + 1,) + tuple(t.shape[1:]), (max(t.shape[0] - 1, 0),) + tuple(t.shape[1:]),
              tuple(reversed(t.shape)), (t.numel(),), (1,) + tuple(t.shape), (), (0,) + tuple(t.shape[1:]),
              tuple(t.shape) + (1,)]
    shape = case.rng.choice([s for s in shapes if s != tuple(t.shape)])
    tensors[k] = torch.randn(shape)
    _save(d, tensors)
    case.detail = f"{k}: shape {shape} instead of {tuple(t.shape)}"
    case.expect = ERROR
    case.match = rf"{re.escape(repr(k))} has shape {re.escape(str(shape))}, expected {re.escape(str(tuple(t.shape)))}"


def m_values(case, d, world):
    tensors = dict(world.tensors)
    k = case.rng.choice(tensor_keys(world))
    what = case.rng.choice(["zeros", "x1e30", "denormal", "negated", "noise", "-0.0"])
    t = tensors[k]
    tensors[k] = {"zeros": torch.zeros_like(t), "x1e30": t * 1e30, "denormal": t * 1e-42, "negated": -t,
                  "noise": t + torch.randn(t.shape, generator=torch.Generator().manual_seed(case.seed)),
                  "-0.0": torch.full_like(t, -0.0)}[what]
    _save(d, tensors)
    case.detail = f"{k}: {what}"
    case.expect = LOADS


def m_pickle(case, d, world):
    """adapter_model.bin (a pickle that would create a marker file if unpickled) instead of / next to the
    safetensors file, or pickle bytes under the safetensors name."""
    marker = os.path.join(d, "UNPICKLED")
    evil = pickle.dumps(_Evil(marker))
    what = ["bin instead", "bin next to safetensors", "pickle named .safetensors",
            "torch.save named .safetensors"][case.index % 4]
    wpath = os.path.join(d, WEIGHTS_NAME)
    if what == "bin instead":
        os.remove(wpath)
        write(os.path.join(d, BIN_NAME), evil)
        case.expect, case.match = ERROR, r"adapter_model\.bin \(pickle\); delora_ext loads safetensors only"
    elif what == "bin next to safetensors":
        write(os.path.join(d, BIN_NAME), evil)
        case.expect = SAME
    elif what == "pickle named .safetensors":
        write(wpath, evil)
        case.expect, case.match = ERROR, r"adapter_model\.safetensors is not a valid safetensors file"
    else:
        write(wpath, _torch_save_bytes(world))
        case.expect, case.match = ERROR, r"adapter_model\.safetensors is not a valid safetensors file"
    case.detail = what


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def m_files(case, d, world):
    what = ["no config", "no weights", "config is a directory", "weights is a directory", "weights -> /dev/null",
            "config -> /dev/null", "config -> /dev/zero", "weights -> /dev/zero", "no directory",
            "empty config"][case.index % 10]
    cpath, wpath = os.path.join(d, CONFIG_NAME), os.path.join(d, WEIGHTS_NAME)
    case.expect = ERROR
    if what == "no config":
        os.remove(cpath)
        case.fnf_ok, case.match = True, r"no adapter_config\.json"
    elif what == "no weights":
        os.remove(wpath)
        case.fnf_ok, case.match = True, r"no adapter_model\.safetensors"
    elif what in ("config is a directory", "weights is a directory"):
        p = cpath if what.startswith("config") else wpath
        os.remove(p)
        os.mkdir(p)
    elif what.startswith("weights ->"):
        os.remove(wpath)
        os.symlink(what.split("-> ")[1], wpath)
    elif what.startswith("config ->"):
        os.remove(cpath)
        os.symlink(what.split("-> ")[1], cpath)
    elif what == "no directory":
        shutil.rmtree(d)
        os.mkdir(d)  # run_kind removes it afterwards; the adapter is one level down, absent
        os.rmdir(d)
        case.fnf_ok = True
    else:
        write(cpath, b"")
        case.match = r"adapter_config\.json is not valid JSON"
    case.detail = what


# ---- mutations of adapter_config.json ---------------------------------------------------------------------------
def _set_config(d, cfg):
    with open(os.path.join(d, CONFIG_NAME), "w") as f:
        json.dump(cfg, f)


NAN, INF = float("nan"), float("inf")

# (field, value, expectation, message regex); ("SAME", changed) = loads with the good outputs, config semantics
# changed (True) or not (False)
CONFIG_TABLE = [
    *[("r", v, ERROR, r"has shape \(4, 32\), expected \(" + str(v)) for v in (1, 2, 3, 5, 8, 16)],
    ("r", 2 ** 40, ERROR, r"expected \(1099511627776, 32\)"), ("r", 10 ** 30, ERROR, r"expected \(10{30}, 32\)"),
    *[("r", v, ERROR, r"`r` must be a positive integer") for v in
      (0, -1, -4, "4", "8", 4.0, 4.5, True, False, None, [4], {"r": 4}, NAN, INF)],
    ("delora_lambda", 15.0, (SAME, False), None), ("delora_lambda", 3, (SAME, True), None),
    ("delora_lambda", -2.5, (SAME, True), None),
    *[("delora_lambda", v, ERROR, r"delora_lambda") for v in
      ("15", None, [15], {"a": 1}, True, NAN, INF, -INF, 1e308, -1e39)],
    ("module_dropout", 0, (SAME, False), None), ("module_dropout", 0.1, (SAME, True), None),
    *[("module_dropout", v, ERROR, r"module_dropout") for v in (1.0, -0.1, 2, "0.1", None, NAN, INF, [0.1], True)],
    ("target_modules", ["q_proj", "v_proj"], (SAME, True), None),
    ("target_modules", r".*\.(q_proj|v_proj)", (SAME, True), None),
    ("target_modules", ["q_proj"], ERROR, r"unexpected key '.*v_proj\.delora_A'"),
    ("target_modules", "all-linear", ERROR, r"missing key '.*delora_A'"),
    ("target_modules", ["q_proj", "v_proj", "k_proj"], ERROR, r"missing key '.*k_proj\.delora_A'"),
    ("target_modules", ["nope"], ERROR, r"match no module"), ("target_modules", [], ERROR, r"match no module"),
    ("target_modules", "", ERROR, r"match no module"), ("target_modules", "q_proj|v_proj", ERROR, r"match no module"),
    ("target_modules", ["embed_tokens", "q_proj", "v_proj"], ERROR, r"embed_tokens"),
    *[("target_modules", v, ERROR, r"target_modules") for v in ("(", 5, {"q_proj": 1}, [1, 2], ["q_proj", None], True,
                                                                 "[")],
    ("exclude_modules", ["k_proj"], (SAME, True), None), ("exclude_modules", [], (SAME, True), None),
    ("exclude_modules", ["v_proj"], ERROR, r"unexpected key '.*v_proj"),
    ("exclude_modules", "model.layers.1.self_attn.q_proj", ERROR, r"unexpected key '.*layers\.1\.self_attn\.q_proj"),
    *[("exclude_modules", v, ERROR, r"exclude_modules") for v in ("(", 5, [None], {"a": 1}, True)],
    ("bias", "all", (SAME, True), None), ("bias", "delora_only", (SAME, True), None),
    *[("bias", v, ERROR, r"bias") for v in ("lora_only", None, 5, "", ["all"], True)],
    ("init_weights", False, (SAME, True), None),
    ("init_weights", "paper", ERROR, r"missing key '.*delora_A0'"),
    *[("init_weights", v, ERROR, r"init_weights") for v in ("gaussian", None, 0, 1, "true", [True], 1.0)],
    ("layers_to_transform", [0, 1], (SAME, True), None), ("layers_to_transform", [], (SAME, True), None),
    ("layers_to_transform", 0, ERROR, r"unexpected key '.*layers\.1\."),
    ("layers_to_transform", [1], ERROR, r"unexpected key '.*layers\.0\."),
    ("layers_to_transform", -1, ERROR, r"match no module"),
    *[("layers_to_transform", v, ERROR, r"layers_to_transform") for v in ("0", [0.5], [True], 1.0, {"0": 1}, [None])],
    ("layers_pattern", "layers", ERROR, r"layers_pattern"),
    ("rank_pattern", None, (SAME, False), None), ("rank_pattern", {"k_proj": 8}, (SAME, True), None),
    ("rank_pattern", {"q_proj": 4}, (SAME, True), None),
    ("rank_pattern", {"q_proj": 8}, ERROR, r"q_proj\.delora_A' has shape \(4, 32\), expected \(8, 32\)"),
    ("rank_pattern", {"q_proj": 2 ** 40}, ERROR, r"expected \(1099511627776, 32\)"),
    *[("rank_pattern", v, ERROR, r"rank_pattern") for v in
      ({"q_proj": "8"}, {"q_proj": 4.0}, {"q_proj": 0}, {"q_proj": -1}, {"(": 4}, [], "q_proj", {"q_proj": True},
       {"q_proj": None}, 5)],
    ("lambda_pattern", {"q_proj": 3.0}, (SAME, True), None),
    *[("lambda_pattern", v, ERROR, r"lambda_pattern") for v in
      ({"q_proj": "3"}, {"q_proj": NAN}, {"q_proj": INF}, {"q_proj": 1e308}, {"q_proj": None}, {"(": 1.0}, [1], "q_proj", {"q_proj": True})],
    ("modules_to_save", None, ERROR, r"unexpected key 'base_model\.model\.lm_head\.weight'"),
    ("modules_to_save", [], ERROR, r"unexpected key 'base_model\.model\.lm_head\.weight'"),
    ("modules_to_save", ["lm_head", "embed_tokens"], ERROR, r"missing key '.*embed_tokens\.weight'"),
    *[("modules_to_save", v, ERROR, r"modules_to_save") for v in ("lm_head", [5], ["("], {"lm_head": 1}, [None], True)],
    *[(f, v, (SAME, False), None) for f, v in
      [("task_type", "CAUSAL_LM"), ("task_type", 5), ("base_model_name_or_path", "/x"),
       ("base_model_name_or_path", [1, {}]), ("revision", "main"), ("revision", NAN), ("inference_mode", False),
       ("inference_mode", "yes"), ("auto_mapping", {"base_model_class": "X"}), ("peft_version", "0.17.0")]],
]


def m_config_field(case, d, world):
    field, value, expect, match = CONFIG_TABLE[case.index]
    cfg = dict(world.config)
    cfg[field] = value
    _set_config(d, cfg)
    case.detail = f"{field} = {value!r}"
    if isinstance(expect, tuple):
        case.expect, case.config_changed = expect
    else:
        case.expect, case.match, case.config_changed = ERROR, match, True


def m_config_layers_pattern(case, d, world):
    value, expect, match = [("layers", SAME, None), (["layers", "h"], SAME, None), ("(", ERROR, r"layers_pattern"),
                            (5, ERROR, r"layers_pattern"), ([None], ERROR, r"layers_pattern"),
                            ("blocks", ERROR, r"match no module")][case.index]
    cfg = dict(world.config, layers_to_transform=[0, 1], layers_pattern=value)
    _set_config(d, cfg)
    case.detail = f"layers_to_transform=[0, 1], layers_pattern={value!r}"
    case.expect, case.match, case.config_changed = expect, match, True


PEFT_FIELDS = ("r", "delora_lambda", "module_dropout", "target_modules", "exclude_modules", "bias", "init_weights",
               "layers_to_transform", "layers_pattern", "rank_pattern", "lambda_pattern", "modules_to_save")


def m_config_junk(case, d, world):
    """A random JSON value in a random field: any outcome, but a clear one."""
    cfg = dict(world.config)
    field = case.rng.choice(PEFT_FIELDS)
    cfg[field] = junk(case.rng)
    _set_config(d, cfg)
    case.detail = f"{field} = {str(cfg[field])[:100]}"
    case.expect, case.config_changed = EITHER, None


def m_config_missing_field(case, d, world):
    fields = sorted(world.config)
    field = fields[case.index % len(fields)]
    cfg = dict(world.config)
    del cfg[field]
    _set_config(d, cfg)
    case.detail = f"no {field!r}"
    case.config_changed = field in ("peft_type", "r", "modules_to_save")
    if field == "peft_type":
        case.expect, case.match = ERROR, r"peft_type None"
    elif field == "r":  # PEFT's default r=8
        case.expect, case.match = ERROR, r"expected \(8, 32\)"
    elif field == "modules_to_save":
        case.expect, case.match = ERROR, r"unexpected key 'base_model\.model\.lm_head\.weight'"
    else:  # every other field's default is the saved value, or the field is not DeLoRA's
        case.expect = SAME


def m_config_extra_field(case, d, world):
    cfg = dict(world.config)
    for _ in range(case.rng.randint(1, 4)):
        cfg[case.rng.choice(["use_dora", "lora_alpha", "x", "", "é", "R", "Target_Modules", "a" * 200])] = junk(case.rng)
    _set_config(d, cfg)
    case.detail = f"extra fields {sorted(set(cfg) - set(world.config))}"
    case.expect = SAME


def m_config_peft_type(case, d, world):
    value = ["LORA", "LOHA", "LOKR", "IA3", "delora", "DeLoRA", "", None, 5, ["DELORA"], "DELORA "][case.index]
    _set_config(d, dict(world.config, peft_type=value))
    case.detail = f"peft_type = {value!r}"
    case.expect, case.match = ERROR, r"peft_type .* not 'DELORA'"


def m_config_not_object(case, d, world):
    value = [[], "DELORA", 5, None, True, [world.config], "deep"][case.index]
    if value == "deep":  # nested deeper than Python's recursion limit
        write(os.path.join(d, CONFIG_NAME), b"[" * 100_000 + b"]" * 100_000)
        case.expect, case.match = ERROR, r"adapter_config\.json is not valid JSON"
    else:
        _set_config(d, value)
        case.expect, case.match = ERROR, r"adapter_config\.json.*JSON object"
    case.detail = f"config = {str(value)[:60]}"


CONFIG_DEFAULTS = {"r": 8, "delora_lambda": 15, "module_dropout": 0.0, "target_modules": None,
                   "exclude_modules": None, "bias": "none", "init_weights": True, "layers_to_transform": None,
                   "layers_pattern": None, "rank_pattern": {}, "lambda_pattern": {}, "modules_to_save": None,
                   "peft_type": None}  # PEFT's defaults for DeloraConfig's fields


def _semantics(cfg: dict) -> dict:
    return {f: cfg.get(f, default) for f, default in CONFIG_DEFAULTS.items()}


def _config_oracle(case, d, world):
    """A config byte mutation: refused if not JSON; the good outputs if DeLoRA's fields (defaults applied) are
    the good ones; otherwise any clear outcome."""
    try:
        with open(os.path.join(d, CONFIG_NAME), "rb") as f:
            got = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError):
        case.expect, case.match = ERROR, r"adapter_config\.json"
        return
    if isinstance(got, dict) and _semantics(got) == _semantics(world.config):
        case.expect = SAME
    else:
        case.expect, case.config_changed = EITHER, None


def m_config_truncate(case, d, world):
    text = open(os.path.join(world.good, CONFIG_NAME), "rb").read()
    cut = case.rng.randrange(len(text))
    write(os.path.join(d, CONFIG_NAME), text[:cut])
    case.detail = f"config truncated to {cut} of {len(text)} bytes"
    _config_oracle(case, d, world)


def m_config_flip(case, d, world):
    data = bytearray(open(os.path.join(world.good, CONFIG_NAME), "rb").read())
    case.detail = "config flips " + _flip(case, data, 0, len(data), case.rng.choice([1, 1, 2, 3]))
    if case.rng.random() < 0.15:
        data = bytearray(case.rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00"])) + data
        case.detail += f" + prefix {bytes(data[:3])!r}"
    write(os.path.join(d, CONFIG_NAME), bytes(data))
    _config_oracle(case, d, world)


# ---- the fuzz tests --------------------------------------------------------------------------------------------
KINDS = {  # kind -> (mutation, number of cases)
    "truncate": (m_truncate, n(30)),
    "append": (m_append, n(6)),
    "flip_prefix": (m_flip_prefix, n(15)),
    "prefix_value": (m_prefix_value, n(14)),
    "flip_header": (m_flip_header, n(40)),
    "header_whitespace": (m_header_whitespace, n(5)),
    "header_metadata": (m_header_metadata, n(8)),
    "header_dtype": (m_header_dtype, n(25)),
    "header_shape": (m_header_shape, n(25)),
    "header_offsets": (m_header_offsets, n(20)),
    "header_entries": (m_header_entries, n(12)),
    "garbage_file": (m_garbage_file, n(8)),
    "dtype_float": (m_dtype_float, n(12)),
    "dtype_nonfloat": (m_dtype_nonfloat, n(12)),
    "float4": (m_float4, 4),
    "nonfinite": (m_nonfinite, n(12)),
    "overflow_cast": (m_overflow_cast, n(5)),
    "extra_key": (m_extra_key, n(12)),
    "missing_key": (m_missing_key, n(10)),
    "wrong_shape": (m_wrong_shape, n(12)),
    "values": (m_values, n(6)),
    "pickle": (m_pickle, 4),
    "files": (m_files, 10),
    "config_field": (m_config_field, len(CONFIG_TABLE)),
    "config_layers_pattern": (m_config_layers_pattern, 6),
    "config_junk": (m_config_junk, n(30)),
    "config_missing_field": (m_config_missing_field, 19),
    "config_extra_field": (m_config_extra_field, n(4)),
    "config_peft_type": (m_config_peft_type, 11),
    "config_not_object": (m_config_not_object, 7),
    "config_truncate": (m_config_truncate, n(12)),
    "config_flip": (m_config_flip, n(25)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_fuzz(kind, world, tmp_path):
    mutate, count = KINDS[kind]
    run_kind(world, tmp_path, kind, mutate, count)


def test_pickle_was_never_unpickled(world, tmp_path):
    """The .bin next to a good safetensors file is ignored, not executed (the tripwires would also fire)."""
    d = tmp_path / "a"
    shutil.copytree(world.good, d)
    write(str(d / BIN_NAME), pickle.dumps(_Evil(str(d / "UNPICKLED"))))
    os.remove(d / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="adapter_model.bin"):
        delora_ext.load_adapter(copy.deepcopy(world.base), str(d))
    assert not (d / "UNPICKLED").exists()


@pytest.mark.parametrize("scenario", ["fresh", "reload"])
def test_nonfinite_values_refused_unless_allowed(scenario, world, tmp_path):
    """Non-finite adapter values would poison every output silently: refused (naming every bad key) before the
    model is touched, unless allow_nonfinite=True, which loads them as they are."""
    tensors = {k: v.clone() for k, v in world.tensors.items()}
    keys = sorted(tensors)
    bad = [keys[-1], keys[3], keys[0]]  # the last key too: an in-place load writes the others first
    tensors[bad[0]].view(-1)[0] = float("nan")
    tensors[bad[1]].view(-1)[-1] = float("inf")
    tensors[bad[2]] = tensors[bad[2]].double()
    tensors[bad[2]].view(-1)[1] = -1e300  # finite in the file, -inf once cast to the parameter's fp32
    d = str(tmp_path / "nf")
    shutil.copytree(world.good, d)
    _save(d, tensors)
    model = copy.deepcopy(world.models[scenario])
    before = fingerprint(model)
    with pytest.raises(ValueError) as e:
        delora_ext.load_adapter(model, d)
    msg = str(e.value)
    assert type(e.value) is ValueError and WEIGHTS_NAME in msg and "allow_nonfinite=True" in msg, msg
    assert all(repr(k) in msg for k in bad), msg
    assert not unchanged_problems(before, fingerprint(model))
    delora_ext.load_adapter(model, d, allow_nonfinite=True)  # loaded as they are
    for k in keys:
        got = _file_tensor_targets(model, k).detach()
        assert _nan_equal(got, tensors[k].float()), k
    assert torch.isnan(_file_tensor_targets(model, bad[0]).view(-1)[0])
    assert torch.isneginf(_file_tensor_targets(model, bad[2]).view(-1)[1])


def _vm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def _huge_files(world):
    header, body = split_st(world.raw)
    key = PREFIX + "model.layers.0.self_attn.q_proj.delora_A"
    out = {}
    h = copy.deepcopy(header)
    h[key]["shape"] = [2 ** 20, 2 ** 20]  # 2**40 elements, offsets kept
    out["2**40 elements, offsets kept"] = join_st(h, body)
    h = copy.deepcopy(header)
    a = h[key]["data_offsets"][0]
    h[key].update(shape=[2 ** 20, 2 ** 20], data_offsets=[a, a + 4 * 2 ** 40])  # and claims the bytes
    out["2**40 elements with matching offsets"] = join_st(h, body)
    h = {"__metadata__": {"format": "pt"}, key: {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 2 ** 42]}}
    out["only a 2**40-element tensor"] = join_st(h, b"")
    h = copy.deepcopy(header)
    h[key]["shape"] = [2 ** 31, 2 ** 31, 2 ** 31]
    out["2**93 elements (overflows 64 bits)"] = join_st(h, body)
    out["header length 2**40"] = struct.pack("<Q", 2 ** 40) + world.raw[8:]
    out["header length 2**64-1"] = struct.pack("<Q", 2 ** 64 - 1) + world.raw[8:]
    out["header length 100 MB + 1"] = struct.pack("<Q", 100_000_001) + world.raw[8:]
    h = copy.deepcopy(header)
    h[key]["shape"] = [2 ** 62, 0]
    out["[2**62, 0]: no elements, a huge dim"] = join_st(h, body)
    return out


def test_huge_declared_shapes_fail_fast_without_allocating(world, tmp_path):
    """A header that declares a 2**40-element tensor (or a 1 TB header) is refused from the header alone: run
    under an address-space limit of what the process has now + 1 GiB, each refusal must be a clear error within
    a few seconds, and the peak RSS must not grow."""
    files = _huge_files(world)
    dirs = {}
    for i, (what, data) in enumerate(files.items()):
        d = str(tmp_path / f"huge{i}")
        shutil.copytree(world.good, d)
        write(os.path.join(d, WEIGHTS_NAME), data)
        dirs[what] = d
    models = {what: copy.deepcopy(world.base) for what in files}
    befores = {what: fingerprint(m) for what, m in models.items()}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + 2 ** 30
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"RLIMIT_AS hard limit {hard} is below what this test needs")
    results = {}
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        try:  # the limit works: 8 GiB cannot be had
            torch.empty(2 ** 31, dtype=torch.float32).fill_(0)
            limited = False
        except (RuntimeError, MemoryError):
            limited = True
        for what, d in dirs.items():
            t0 = time.perf_counter()
            try:
                delora_ext.load_adapter(models[what], d)
                results[what] = (None, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 (judged below, outside the limit)
                results[what] = (e, time.perf_counter() - t0)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert limited, "the address-space limit did not hold: this test proves nothing"
    LOADS_COUNT["n"] += len(results)
    for what, (err, took) in results.items():
        assert err is not None, f"{what}: loaded"
        msg = f"{type(err).__name__}: {err}"
        assert type(err) is ValueError and WEIGHTS_NAME in str(err), f"{what}: {msg}"
        assert not re.search(r"alloc|memory", str(err), re.I), f"{what}: tried to allocate: {msg}"
        assert took < 5, f"{what}: took {took:.1f} s"
        assert not unchanged_problems(befores[what], fingerprint(models[what])), what
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grew < 256 * 1024, f"peak RSS grew by {grew} KiB"


def test_zz_enough_mutated_loads():
    """At least ~300 mutated loads per run (only checked when every fuzz kind ran)."""
    if LOADS_COUNT["kinds"] != set(KINDS) or ONLY_CASE is not None:
        pytest.skip("not every fuzz kind ran")
    assert LOADS_COUNT["n"] >= 300, LOADS_COUNT["n"]
    print(f"\n{LOADS_COUNT['n']} mutated loads")
