"""Adapter files from strangers: seeded fuzzing of ``load_adapter``.

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
kind (the case seed is seed base * 100000 + index), and ``DELORA_FUZZ_CASE=<index>`` limits it to one case.
``DELORA_FUZZ_SCALE=<float>`` scales the random case counts.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import re
import resource
import shutil
import struct
import time

import pytest
import torch

import delora_ext
from delora_ext.io import WEIGHTS_NAME

from fuzz_harness import (  # noqa: F401  (fixtures)
    BIN_NAME,
    LOADS_COUNT,
    ONLY_CASE,
    PREFIX,
    UnpicklingAttempted,
    file_tensor_targets,
    fingerprint,
    join_st,
    n,
    nan_equal,
    no_unpickling,
    run_kind,
    split_st,
    unchanged_problems,
    world,
    write,
)
from fuzz_mutators import (
    CONFIG_TABLE,
    Evil,
    m_append,
    m_config_extra_field,
    m_config_field,
    m_config_flip,
    m_config_junk,
    m_config_layers_pattern,
    m_config_missing_field,
    m_config_not_object,
    m_config_peft_type,
    m_config_truncate,
    m_dtype_float,
    m_dtype_nonfloat,
    m_extra_key,
    m_files,
    m_flip_header,
    m_flip_prefix,
    m_float4,
    m_garbage_file,
    m_header_dtype,
    m_header_entries,
    m_header_metadata,
    m_header_offsets,
    m_header_shape,
    m_header_whitespace,
    m_missing_key,
    m_nonfinite,
    m_overflow_cast,
    m_pickle,
    m_prefix_value,
    m_truncate,
    m_values,
    m_wrong_shape,
    save_tensors,
)
from tiny_models import one_thread  # noqa: F401  (autouse: the model tests run single-threaded)


def test_tripwires_are_armed(no_unpickling):
    with pytest.raises(UnpicklingAttempted):
        torch.load(io.BytesIO(b"x"))
    with pytest.raises(UnpicklingAttempted):
        pickle.loads(pickle.dumps(1))
    with pytest.raises(UnpicklingAttempted):
        pickle.Unpickler(io.BytesIO(b"x"))
    no_unpickling.clear()


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
    write(str(d / BIN_NAME), pickle.dumps(Evil(str(d / "UNPICKLED"))))
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
    save_tensors(d, tensors)
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
        got = file_tensor_targets(model, k).detach()
        assert nan_equal(got, tensors[k].float()), k
    assert torch.isnan(file_tensor_targets(model, bad[0]).view(-1)[0])
    assert torch.isneginf(file_tensor_targets(model, bad[2]).view(-1)[1])


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
