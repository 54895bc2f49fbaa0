"""The mutations of the adapter-file fuzz tests (test_adapter_fuzz.py): of the safetensors bytes, of the tensors,
and of adapter_config.json. Each takes (case, adapter directory, world) and returns what it did."""
from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import re
import shutil
import struct

import torch
from safetensors.torch import save_file

from delora_ext.io import CONFIG_NAME, WEIGHTS_NAME

from fuzz_harness import (
    BIN_NAME,
    EITHER,
    ERROR,
    LOADS,
    ORACLE,
    PREFIX,
    SAME,
    join_st,
    junk,
    split_st,
    tensor_keys,
    write,
)
from tiny_models import one_thread  # noqa: F401  (autouse: the model tests run single-threaded)


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
    # reinterpret the same bytes: last dim scaled to fit
    if isinstance(new, str) and new in ST_DTYPES and case.rng.random() < 0.7:
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
def save_tensors(d, tensors):
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
    save_tensors(d, tensors)
    case.detail = f"{len(keys)} key(s) as {dt} (first {keys[0]})"
    case.expect = SAME if dt == torch.float64 else ORACLE  # fp32 values are exact in fp64


def m_dtype_nonfloat(case, d, world):
    tensors = dict(world.tensors)
    k = case.rng.choice(tensor_keys(world))
    dt = case.rng.choice(NONFLOAT_DTYPES)
    tensors[k] = (tensors[k] * 100).to(dt)
    save_tensors(d, tensors)
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
    save_tensors(d, tensors)
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
    save_tensors(d, tensors)
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
    save_tensors(d, tensors)
    case.detail = "extra keys " + ", ".join(repr(k[:80]) for k in extra)
    case.expect, case.match = ERROR, r"unexpected key"


def m_missing_key(case, d, world):
    tensors = dict(world.tensors)
    gone = case.rng.sample(tensor_keys(world), case.rng.choice([1, 1, 2, 8, len(tensors)]))
    for k in gone:
        del tensors[k]
    save_tensors(d, tensors)
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
    save_tensors(d, tensors)
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
    save_tensors(d, tensors)
    case.detail = f"{k}: {what}"
    case.expect = LOADS


def m_pickle(case, d, world):
    """adapter_model.bin (a pickle that would create a marker file if unpickled) instead of / next to the
    safetensors file, or pickle bytes under the safetensors name."""
    marker = os.path.join(d, "UNPICKLED")
    evil = pickle.dumps(Evil(marker))
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


class Evil:
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
      ({"q_proj": "3"}, {"q_proj": NAN}, {"q_proj": INF}, {"q_proj": 1e308}, {"q_proj": None}, {"(": 1.0}, [1],
       "q_proj", {"q_proj": True})],
    # without modules_to_save the file's lm_head.weight is the output embedding PEFT's save_embedding_layers
    # writes: loaded into the model's lm_head (as PEFT's load_state_dict does), the same outputs
    ("modules_to_save", None, (SAME, True), None), ("modules_to_save", [], (SAME, True), None),
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
    elif field == "modules_to_save":  # lm_head.weight loads as the output embedding (see CONFIG_TABLE)
        case.expect = SAME
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


