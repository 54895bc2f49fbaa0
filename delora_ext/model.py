"""What delora_ext keeps on a patched model, and how the model's DeLoRA layers and targets are found.

The model operations (``patching``), the adapter files (``io``) and the LoRA export all read a patched model
through this module.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, DeLoRAConfig, is_module_to_save
from .layer import DeLoRALinear, supported_base

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
    """(path, module) pairs a config can target: DeLoRA layers and bare linear layers outside them."""
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, DeLoRALinear):
            inside.append(name)
        yield name, mod


def require_state(model: nn.Module) -> PatchState:
    state = get_state(model)
    if state is None:
        raise ValueError("`model` has not been patched by delora_ext.patch")
    return state
