"""Everything a model operation may change, captured so that a failed operation can be checked to have changed
nothing: every parameter and buffer (values bit for bit, dtype, device, requires_grad, object identity), every
module at every path (type, identity, train/eval mode), the DeLoRA layers' adapter state and the patch state,
including the modules_to_save originals and copies the model holds outside its module tree."""
from __future__ import annotations

import os

import torch
from torch import nn

from delora_ext.model import delora_layers, get_state


def _tensors(prefix: str, module: nn.Module) -> dict:
    out = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        out[f"{prefix}param:{n}"] = (id(p), p.dtype, p.device, p.requires_grad, _value(p))
    for n, b in module.named_buffers(remove_duplicate=False):
        out[f"{prefix}buffer:{n}"] = (id(b), b.dtype, b.device, b.requires_grad, _value(b))
    return out


def _value(t: torch.Tensor):
    return None if t.is_meta else t.detach().to("cpu", copy=True)


def _modules(prefix: str, module: nn.Module) -> list:
    return [(prefix + n, type(m), id(m), m.training) for n, m in module.named_modules(remove_duplicate=False)]


def capture(model: nn.Module) -> dict:
    state = get_state(model)
    snap = {
        "attrs": sorted(vars(model)),
        "modules": _modules("", model),
        "tensors": _tensors("", model),
        "layers": {n: (list(m.delora_A), list(m.delora_w_norm.keys()), list(m.delora_A0.keys()),
                       list(m.active_adapters), list(m.merged_adapters), sorted(m._merged_terms), dict(m.r),
                       dict(m.module_dropout), sorted(m._w_pending), m._disable_adapters,
                       getattr(m, "_merge_record_stale", lambda: None)())
                   for n, m in delora_layers(model).items()},
        "state": None,
    }
    if state is not None:
        outside = {}
        for path, orig in state.saved_originals.items():
            outside[f"original {path}"] = orig
        for path, copies in state.saved_copies.items():
            for name, twin in copies.items():
                outside[f"copy {path}[{name}]"] = twin
        snap["state"] = (
            list(state.configs), [repr(c) for c in state.configs.values()], list(state.active),
            list(state.requires_grad),
            {k: id(v) for k, v in state.saved_originals.items()},
            {k: {n: id(c) for n, c in v.items()} for k, v in state.saved_copies.items()},
        )
        for label, mod in outside.items():
            snap["modules"] += _modules(f"<{label}>.", mod)
            snap["tensors"].update(_tensors(f"<{label}>.", mod))
    return snap


def differences(before: dict, after: dict) -> list[str]:
    """What changed between two captures (empty: nothing)."""
    out = [f"{k} changed" for k in ("attrs", "modules", "layers", "state") if before[k] != after[k]]
    if list(before["tensors"]) != list(after["tensors"]):
        out.append(f"tensor names changed: {sorted(set(before['tensors']) ^ set(after['tensors']))[:4]}")
        return out
    for n, b in before["tensors"].items():
        a = after["tensors"][n]
        if a[:4] != b[:4]:
            out.append(f"{n}: identity, dtype, device or requires_grad changed")
        elif (a[4] is None) != (b[4] is None) or (a[4] is not None and not _bits_equal(a[4], b[4])):
            out.append(f"{n}: values changed")
    return out


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():  # bit for bit, NaNs and -0.0 included
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.int8}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def files(directory: str) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones too) with its bytes, and every folder (value None)."""
    out = {}
    for root, dirs, names in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = None
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = f.read()
    return out
