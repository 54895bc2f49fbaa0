"""What delora_ext keeps on a patched model, and how the model's DeLoRA layers and targets are found.

The model operations (``patching``), the adapter files (``io``) and the LoRA export all read a patched model
through this module.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import gc
import warnings

import torch
from torch import nn

from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, DeLoRAConfig, is_module_to_save, matches
from .layer import DeLoRALayer, DeLoRALinear, supported_base

STATE_ATTR = "_delora_ext_state"


@dataclasses.dataclass
class PatchState:
    """What delora_ext keeps on a patched model (as the attribute ``_delora_ext_state``)."""

    configs: dict  # adapter name -> DeLoRAConfig
    # (parameter name, requires_grad before the first patch): by name, not by Parameter object, since to_empty(),
    # overwrite_module_params_on_conversion or FSDP2 replace the objects (their flags would go to stale copies)
    requires_grad: list
    active: list
    # modules_to_save: path -> the original module. The model holds a trained copy instead (as PEFT's
    # ModulesToSaveWrapper), so a tied weight (T5's lm_head is the input embedding) is not trained in place.
    saved_originals: dict = dataclasses.field(default_factory=dict)
    # path -> {adapter name: its trained copy}; one copy per adapter, as PEFT's wrapper. The model holds the active
    # adapter's copy at `path` (the original when no active adapter has one).
    saved_copies: dict = dataclasses.field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The patched model inside the wrappers training code holds it by: torch.compile's OptimizedModule
    (``_orig_mod``; its submodule paths all start with ``_orig_mod.``), DistributedDataParallel and DataParallel
    (``module``; they do not expose the model's attributes, so the patch state would not be found). FSDP2's
    ``fully_shard`` keeps the model object itself (its parameters become DTensors, see ``_full``)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def get_state(model: nn.Module) -> PatchState | None:
    return getattr(model, STATE_ATTR, None)


def delora_layers(model: nn.Module) -> dict[str, DeLoRALinear]:
    """Module path -> DeLoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DeLoRALinear)}


def warn_if_aliased(model: nn.Module, what: str) -> None:
    """Warn when a DeLoRA layer is reachable at several paths: delora_ext adapts it at all of them, PEFT at the
    first one only, so the file ``what`` writes computes differently in PEFT (the other paths there without it)."""
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, DeLoRALinear):
            paths.setdefault(id(m), []).append(n)
    many = [p for p in paths.values() if len(p) > 1]
    if many:
        warnings.warn(f"{what}: layer {many[0][0]!r} is also reachable at {many[0][1:]} ({len(many)} such layers); "
                      f"PEFT adapts a module at its first path only, so in PEFT the other paths compute without "
                      f"the adapter", stacklevel=3)


def modules_to_save_paths(model: nn.Module, modules_to_save) -> dict[str, nn.Module]:
    """Path -> module selected by ``modules_to_save`` (PEFT's plain-suffix rule), outermost only, never a DeLoRA
    layer or anything inside one."""
    out: dict[str, nn.Module] = {}
    if not modules_to_save:
        return out
    inside: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, DeLoRALinear):
            inside.append(name)
        elif is_module_to_save(name, modules_to_save):
            out[name] = mod
            inside.append(name)
    return out


def resolve_targets(model: nn.Module, config: DeLoRAConfig):
    tm = config.target_modules
    if tm is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"`target_modules` is None and there is no default for model_type {model_type!r}; "
                             f"pass target_modules (names, a regex, or 'all-linear')")
        return DEFAULT_TARGET_MODULES[model_type]
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        names = [n for n, m in model.named_modules() if supported_base(m) or isinstance(m, DeLoRALinear)]
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None:
            names = [n for n in names if model.get_submodule(n) is not out_emb]
        return names
    return tm


def candidates(model: nn.Module):
    """(path, module) pairs a config can target: DeLoRA layers and bare linear layers outside them. A module reachable
    at several paths (``m.c = m.a``) is listed once, under its first path; ``module_paths`` gives all of them."""
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, DeLoRALinear):
            inside.append(name)
        yield name, mod


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path the module is reachable at (outside DeLoRA layers), first path first."""
    out: dict[int, list[str]] = {}
    inside: list[str] = []
    for name, mod in model.named_modules(remove_duplicate=False):
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, DeLoRALinear):
            inside.append(name)
        out.setdefault(id(mod), []).append(name)
    return out


def parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) holding it, outside DeLoRA layers' ``base_layer`` slot."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        if isinstance(parent, DeLoRALinear):
            continue
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name))
    return out


def replace_module(model: nn.Module, path: str, new: nn.Module, where=None) -> None:
    """Put ``new`` wherever the module at ``path`` is (every path it is reachable at, so an aliased module is
    replaced at all of them, not adapted at one and left plain at the other)."""
    old = model.get_submodule(path)
    spots = (where if where is not None else parents(model)).get(id(old), [])
    if not spots:  # the model itself
        raise ValueError(f"cannot replace {path!r}: it is not a submodule of the model")
    for parent, name in spots:
        setattr(parent, name, new)


def targeted(model: nn.Module, config: DeLoRAConfig) -> list[tuple[str, str, nn.Module]]:
    """(path, matched path, module) of every module ``config`` targets: a module matches if any path it is
    reachable at matches (PEFT's rules per path); path is its first path, the matched one keys rank/λ patterns."""
    targets = resolve_targets(model, config)
    paths = module_paths(model)
    out = []
    for name, mod in candidates(model):
        if not name:
            continue
        key = next((p for p in paths.get(id(mod), [name]) if p and matches(config, p, targets)), None)
        if key is not None:
            out.append((name, key, mod))
    return out


_ADAPTER_CONTAINERS = DeLoRALayer.adapter_tensor_names + DeLoRALayer.frozen_tensor_names


def is_bias_name(key: str) -> bool:
    """A parameter/state_dict key of a bias: named ``bias`` exactly, as PEFT's bias="all" selects them (not
    DeBERTa's ``q_bias``), and not the tensor of an adapter named "bias" (``....delora_A.bias``)."""
    parent, _, last = key.rpartition(".")
    return last == "bias" and parent.rpartition(".")[2] not in _ADAPTER_CONTAINERS


def require_state(model: nn.Module) -> PatchState:
    state = get_state(model)
    if state is None:
        raise ValueError("`model` has not been patched by delora_ext.patch")
    return state


# ---- all-or-nothing model operations -------------------------------------------------------------------------
_TX: contextvars.ContextVar = contextvars.ContextVar("delora_ext_transaction", default=None)


class _Box:
    """A container in a snapshot: the very object and a copy of its contents (snapshots of its items)."""

    __slots__ = ("value", "contents")

    def __init__(self, value, contents):
        self.value, self.contents = value, contents


def _snap(value, seen: set):
    """A snapshot of ``value``: dicts, lists and sets as ``_Box`` (recursively), anything else as itself. Restoring
    puts the very same container objects back with their old contents. A container met a second time (shared, or
    holding itself) is copied once."""
    if not isinstance(value, (dict, list, set)) or id(value) in seen:
        return value
    seen.add(id(value))
    if isinstance(value, dict):
        return _Box(value, [(k, _snap(v, seen)) for k, v in value.items()])
    if isinstance(value, list):
        return _Box(value, [_snap(v, seen) for v in value])
    return _Box(value, set(value))


def _snap_vars(module: nn.Module, seen: set) -> _Box:
    """``_snap`` of a module's attributes, but its hook dicts by reference only: no model operation adds or removes
    hooks, and copying a dozen of them per module made a snapshot of a large model slow."""
    d = vars(module)
    return _Box(d, [(k, v if "hook" in k else _snap(v, seen)) for k, v in d.items()])


def _unsnap(snap):
    if not isinstance(snap, _Box):
        return snap
    value, contents = snap.value, snap.contents
    if isinstance(value, dict):
        items = [(k, _unsnap(s)) for k, s in contents]
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [_unsnap(s) for s in contents]
    else:
        value.clear()
        value.update(contents)
    return value


class Undo:
    """Everything a model operation may change, to put back exactly when it fails part-way: which module sits where
    (every module's submodule dict) and every module's train/eval mode; all attributes of the model itself, of the
    DeLoRA layers (and everything inside them) and of the modules_to_save originals and copies (parameter, buffer
    and adapter dicts and lists, flags); the patch state; every parameter's requires_grad; and, noted before they
    happen, in-place writes to existing tensors (their values are copied first; to the CPU for accelerator tensors,
    so that a merge does not need twice the device memory) and ``.data`` swaps."""

    def __init__(self, model: nn.Module, layers_only: bool = False):
        self.model = model
        state = get_state(model)
        mods = {id(m): m for m in model.modules()}
        deep = {id(model): model}  # the modules whose every attribute an operation may change
        for m in mods.values():
            if isinstance(m, DeLoRALinear):
                # layers_only: an operation that adds or removes no adapter (set_adapter, merge, unmerge) changes the
                # layers' own state but not their containers, unless a pending w is settled on the way
                inner = [m] if layers_only and not m._w_pending else m.modules()
                deep.update((id(sub), sub) for sub in inner)
        if state is not None:
            outside = list(state.saved_originals.values())
            outside += [c for copies in state.saved_copies.values() for c in copies.values()]
            for top in outside:
                subs = {id(sub): sub for sub in top.modules()}
                mods.update(subs)
                deep.update(subs)
        seen: set = set()
        gc_was_on = gc.isenabled()
        gc.disable()  # tens of thousands of small objects: a collection over a large model's heap would dominate
        try:
            self._vars = [_snap_vars(m, seen) for m in deep.values()]
            # elsewhere an operation only puts other modules in place (a parent's submodule dict) and sets modes
            self._children = [(m._modules, list(m._modules.items())) for i, m in mods.items() if i not in deep]
            self._modes = [(m, m.training) for m in mods.values()]
            self._state = _snap(vars(state), seen) if state is not None else None
        finally:
            if gc_was_on:
                gc.enable()
        tensors = {}
        for m in mods.values():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is not None:
                    tensors[id(t)] = t
        self._flags = [(t, t.requires_grad) for t in tensors.values()]
        self._known = set(tensors)  # the tensors are held by _flags, so their ids cannot be reused meanwhile
        self._log: list = []
        self._backed: set[int] = set()
        self._after: list = []

    def write(self, t: torch.Tensor, after_restore=None) -> None:
        """``t`` is about to be written in place; ``after_restore`` is called once its old values are back."""
        if after_restore is not None:
            self._after.append(after_restore)
        if id(t) not in self._known or id(t) in self._backed or t.is_meta:
            return  # created by this operation (dropped on failure) or already copied
        with torch.no_grad():
            backup = t.detach().to("cpu", copy=True)
        self._backed.add(id(t))
        self._log.append(("values", t, backup))

    def data(self, t: torch.Tensor) -> None:
        """``t.data`` is about to be replaced."""
        self._log.append(("data", t, t.data))
        self._backed.discard(id(t))

    def rollback(self) -> list[BaseException]:
        errors = []
        for snap in self._vars:  # a module's attribute dict: attributes added since go, the others come back
            _unsnap(snap)
        for children, items in self._children:
            children.clear()
            children.update(items)
        for m, mode in self._modes:
            m.training = mode
        if self._state is not None:
            _unsnap(self._state)
        for kind, t, old in reversed(self._log):
            try:
                if kind == "data":
                    t.data = old
                else:
                    with torch.no_grad():
                        t.copy_(old)
            except Exception as e:  # noqa: BLE001 (restore everything else regardless)
                errors.append(e)
        for t, flag in self._flags:
            t.requires_grad_(flag)
        for fn in dict.fromkeys(self._after):  # e.g. a layer re-records its weight's version counter
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        return errors


@contextlib.contextmanager
def transaction(model: nn.Module, layers_only: bool = False):
    """Run a model operation all-or-nothing: on any exception (also KeyboardInterrupt) the model is put back as
    it was. Nested operations on the same model join the outer one. ``layers_only``: the operation adds or removes
    no adapter (a cheaper snapshot, see ``Undo``)."""
    outer = _TX.get()
    if outer is not None and outer.model is model:
        yield outer
        return
    undo = Undo(model, layers_only)
    token = _TX.set(undo)
    try:
        yield undo
    except BaseException as e:
        errors = undo.rollback()
        for err in errors:
            e.add_note(f"delora_ext: restoring the model after this error also failed: {err!r}")
        raise
    finally:
        _TX.reset(token)


def note_write(t: torch.Tensor, after_restore=None) -> None:
    """Called before an in-place write to ``t`` (a merge, a load): a running operation keeps the old values."""
    undo = _TX.get()
    if undo is not None:
        undo.write(t, after_restore)


def note_data(t: torch.Tensor) -> None:
    """Called before ``t.data`` is replaced (a module converted to follow the model's device/dtype)."""
    undo = _TX.get()
    if undo is not None:
        undo.data(t)
