"""Turning a model's linear layers into DeLoRA layers, and the adapter lifecycle on a whole model.

Modules are replaced per instance (never by patching a class). The original modules stay inside the DeLoRA
layers as ``base_layer``, so ``unpatch`` puts back the very same objects.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import quant
from .config import DeLoRAConfig, adapter_list, check_adapter_name, check_known
from .layer import STALE_CHOICES, DeLoRALinear, requantize_message, supported_base
from .model import (
    STATE_ATTR,
    PatchState,
    candidates,
    delora_layers,
    get_state,
    is_bias_name,
    modules_to_save_paths,
    note_data,
    parents,
    replace_module,
    require_state,
    targeted,
    transaction,
    unwrap,
)

__all__ = ["patch", "set_adapter", "delete_adapter", "disable_adapters", "merge", "unmerge", "merge_and_unload",
           "unpatch", "trainable_parameters", "STATE_ATTR", "get_state", "delora_layers", "unwrap"]

def _set_trainable(model: nn.Module, state: PatchState) -> None:
    """At the first patch, as PEFT's first injection: only the active adapters' parameters train (plus biases per
    each config's `bias`, and modules_to_save); everything else is frozen."""
    outside = list(state.saved_originals.values()) + [c for cs in state.saved_copies.values() for c in cs.values()]
    for mod in outside + [model]:  # the originals and the inactive copies are frozen, as in PEFT's wrapper
        for p in mod.parameters():
            p.requires_grad_(False)
    layers = delora_layers(model).values()
    for layer in layers:
        for n in layer.active_adapters:
            for store in (layer.delora_A, layer.delora_B, layer.delora_lambda):
                if n in store:
                    store[n].requires_grad_(True)
    for name in state.active:
        cfg = state.configs.get(name)
        if cfg is None:
            continue
        if cfg.bias == "all":  # as PEFT: parameters named `bias` exactly (not DeBERTa's q_bias / v_bias)
            for pname, p in model.named_parameters():
                if is_bias_name(pname):
                    p.requires_grad_(True)
        elif cfg.bias == "delora_only":
            for layer in layers:
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
        for mname, mod in modules_to_save_paths(model, cfg.modules_to_save).items():
            if name in state.saved_copies.get(mname, {}):
                for p in mod.parameters():
                    p.requires_grad_(True)


def _set_adapter_trainable(model: nn.Module, state: PatchState, only: str | None = None) -> None:
    """After the first patch (an adapter set, deleted, added or loaded), as PEFT: only the adapters' own
    parameters and modules_to_save copies change, the active adapters' training and the others' frozen; ``only``:
    just that (newly added) adapter's, as PEFT's inject_adapter puts back every flag that was there before. Every
    other parameter keeps its flag: one the user unfroze (a norm, a bias) goes on training."""
    active = set(state.active)
    for layer in delora_layers(model).values():
        for store in (layer.delora_A, layer.delora_B, layer.delora_lambda):
            for n, p in store.items():
                if only is None or n == only:
                    p.requires_grad_(n in active)
    _copies_trainable(state, active, None if only is None else (only,))


def _copies_trainable(state: PatchState, active, names=None) -> None:
    """The modules_to_save copies of the ``active`` adapters train, the others' are frozen; ``names``: only the
    copies of these adapters are set."""
    for copies in state.saved_copies.values():
        for n, twin in copies.items():
            if names is None or n in names:
                for p in twin.parameters():
                    p.requires_grad_(n in active)


def patch(model: nn.Module, config: DeLoRAConfig | None = None, adapter_name: str = "default", **kwargs) -> nn.Module:
    """Replace the targeted linear layers of ``model`` by ``DeLoRALinear`` and return ``model``.

    ``config`` is a ``DeLoRAConfig`` or PEFT's ``peft.DeloraConfig`` (or the fields as keyword arguments). On a
    patched model this adds adapter ``adapter_name`` (the same name with the same config is a no-op; with another
    config, an error); an added adapter is not active until ``set_adapter``. As PEFT: the first patch freezes
    everything but the active adapters' parameters (and biases per ``bias``); adding an adapter sets only the new
    adapter's flags, so a parameter the user unfroze keeps training. A module reachable at several paths is
    adapted at all of them (one layer). All-or-nothing: if anything fails, the model is left as it was.
    """
    check_adapter_name(adapter_name)
    inference = False
    if config is None:
        config = DeLoRAConfig(**kwargs)
    elif type(config).__name__ == "DeloraConfig" and type(config).__module__.startswith("peft."):
        # PEFT's own config: its fields, as its adapter file holds them, and its inference_mode (frozen adapter)
        inference = bool(getattr(config, "inference_mode", False))
        config = DeLoRAConfig.from_peft_dict(config.to_dict())
        if kwargs:
            config = dataclasses.replace(config, **kwargs)
    elif kwargs:
        config = dataclasses.replace(config, **kwargs)
    if not isinstance(config, DeLoRAConfig):
        raise TypeError(f"`config` must be a delora_ext.DeLoRAConfig or a peft.DeloraConfig, got "
                        f"{type(config).__module__}.{type(config).__name__}")
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        if state.configs[adapter_name] == config:
            return model
        raise ValueError(f"adapter {adapter_name!r} already exists on this model with a different config "
                         f"({state.configs[adapter_name]}); delete_adapter it first or pick another name")
    if state is not None and config.bias != "none":
        # as PEFT (BaseTuner._check_new_adapter_config): the biases are the model's own, shared by every adapter
        with_bias = [n for n, c in state.configs.items() if c.bias != "none"]
        if with_bias:
            raise ValueError(f"only one adapter may train biases (bias != 'none'): adapter {with_bias[0]!r} has "
                             f"bias={state.configs[with_bias[0]].bias!r}, so {adapter_name!r} needs bias='none'")
    found = targeted(model, config)
    to_wrap, to_extend = [], []
    for name, key, mod in found:
        if isinstance(mod, DeLoRALinear):
            to_extend.append((name, key, mod))
        elif supported_base(mod):
            quant.check(mod, f"target module {name!r}")  # a quantised kind delora_ext cannot read: refused here
            to_wrap.append((name, key, mod))
        else:  # as PEFT, for a list and for a regex alike
            raise TypeError(f"target module {key!r} is a {type(mod).__name__}; DeLoRA supports nn.Linear "
                            f"(and subclasses) and transformers' Conv1D")
    if not to_wrap and not to_extend:
        adaptable = [n for n, m in candidates(model) if n and (isinstance(m, DeLoRALinear) or supported_base(m))]
        more = f" ... ({len(adaptable)} in all)" if len(adaptable) > 12 else ""
        raise ValueError(f"no module matched target_modules={config.target_modules!r} "
                         f"(exclude_modules={config.exclude_modules!r}); the model's adaptable modules "
                         f"(nn.Linear, Conv1D) are: {adaptable[:12]}{more}")
    with transaction(model):
        first = state is None
        if first:
            state = PatchState(configs={}, requires_grad=[(n, p.requires_grad) for n, p in model.named_parameters()],
                               active=[adapter_name])
        activate = first or adapter_name in state.active
        where = parents(model)
        for name, key, mod in to_wrap:
            layer = DeLoRALinear.__new__(DeLoRALinear)
            rg = [(p, p.requires_grad) for p in mod.parameters()]
            try:
                DeLoRALinear.__init__(layer, mod, r=config.rank_for(key), delora_lambda=config.lambda_for(key),
                                      module_dropout=config.module_dropout, init_weights=config.init_weights,
                                      adapter_name=adapter_name)
            finally:
                for p, flag in rg:  # the constructor freezes the base; _set_trainable decides below
                    p.requires_grad_(flag)
            layer.train(mod.training)  # an eval() model stays in eval: no adapter dropout at inference
            if not activate:  # as PEFT, a layer reports the model's active adapters, also ones it lacks
                layer.active_adapters = list(state.active)
            replace_module(model, name, layer, where)
        for _name, key, layer in to_extend:
            layer.update_layer(adapter_name, r=config.rank_for(key), delora_lambda=config.lambda_for(key),
                               module_dropout=config.module_dropout, init_weights=config.init_weights,
                               activate=activate)
        for mname, mod in modules_to_save_paths(model, config.modules_to_save).items():
            original = state.saved_originals.setdefault(mname, mod)
            twin = copy.deepcopy(original)  # from the original, as PEFT's wrapper (not another adapter's copy)
            state.saved_copies.setdefault(mname, {})[adapter_name] = twin
            if activate:
                _install(model, mname, twin)
        state.configs[adapter_name] = config
        if first:
            setattr(model, STATE_ATTR, state)
            _set_trainable(model, state)
        else:
            _set_adapter_trainable(model, state, only=adapter_name)
        if inference:  # PEFT's inference_mode: the new adapter (and its modules_to_save copies) frozen
            require_grad(model, adapter_name, False)
    return model


def require_grad(model: nn.Module, adapter_name: str, flag: bool = True) -> None:
    """PEFT's set_requires_grad(adapter_name, flag): its DeLoRA parameters and its modules_to_save copies."""
    for layer in delora_layers(model).values():
        for store in (layer.delora_A, layer.delora_B, layer.delora_lambda):
            if adapter_name in store:
                store[adapter_name].requires_grad_(flag)
    for copies in get_state(model).saved_copies.values():
        if adapter_name in copies:
            for p in copies[adapter_name].parameters():
                p.requires_grad_(flag)


def set_adapter(model: nn.Module, adapter_names: str | Iterable[str]) -> None:
    """Make ``adapter_names`` the active adapters (several are summed) and, of the adapters, the only trainable
    ones; as PEFT's, every other parameter keeps its requires_grad.

    On a merged model this warns and unmerges first, as PEFT (the merged weights are of the old adapters).
    """
    model = unwrap(model)
    state = require_state(model)
    names = adapter_list(adapter_names)
    check_known(names, state.configs, "the model")
    installs = {}
    for path, copies in state.saved_copies.items():
        have = [n for n in names if n in copies]
        if len(have) > 1:  # as PEFT's ModulesToSaveWrapper
            raise ValueError(f"adapters {have} all have a modules_to_save copy of {path!r}; only one of them can be "
                             f"active at a time")
        installs[path] = copies[have[0]] if have else state.saved_originals[path]
    layers = delora_layers(model).values()
    with transaction(model, layers_only=True):
        if any(layer.merged for layer in layers):
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            unmerge(model)
        for layer in layers:  # as PEFT, every layer reports the model's active adapters (also ones it lacks)
            layer.active_adapters = list(names)
        for path, mod in installs.items():
            _install(model, path, mod)
        state.active = names
        _set_adapter_trainable(model, state)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter from every layer. A merged adapter is refused (unmerge it first), as PEFT.

    Deleting the only active adapter activates the first remaining one (sorted by name), with a warning, as PEFT.
    """
    model = unwrap(model)
    state = require_state(model)
    check_known([adapter_name], state.configs, "the model", "adapter_name")
    layers = [layer for layer in delora_layers(model).values() if adapter_name in layer.delora_A]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. "
                         f"Please unmerge them first.")
    with transaction(model):
        for layer in layers:
            layer._drop_adapter(adapter_name)
        for path, copies in list(state.saved_copies.items()):
            if copies.pop(adapter_name, None) is None:
                continue
            active = [n for n in state.active if n != adapter_name and n in copies]
            _install(model, path, copies[active[0]] if active else state.saved_originals[path])
            if not copies:
                del state.saved_copies[path], state.saved_originals[path]
        del state.configs[adapter_name]
        was_active = adapter_name in state.active
        state.active = [n for n in state.active if n != adapter_name]
        if was_active and not state.active and state.configs:
            # as PEFT (BaseTunerLayer.delete_adapter): the first remaining adapter becomes active, with a warning
            first = sorted(state.configs)[0]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{first}.", stacklevel=2)
            set_adapter(model, first)
        else:
            for layer in delora_layers(model).values():
                layer.active_adapters = list(state.active)
            if was_active:  # as PEFT's delete_adapter, which calls set_adapter only then
                _set_adapter_trainable(model, state)
        for layer in layers:  # as PEFT, a layer left without adapters reports none active
            if not len(layer.delora_A):
                layer.active_adapters = []


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model (merged adapters are unmerged first). Leaving it puts
    every layer back as it was (a layer disabled before stays disabled), and the modules_to_save copies back. The
    requires_grad flags follow PEFT's disable_adapter(): inside, the adapters and their modules_to_save copies are
    frozen; after, the active adapters and their copies train and the inactive ones are frozen."""
    outer, model = model, unwrap(model)
    state = require_state(model)
    for name in state.active:  # as PEFT: trained biases are the model's own, disabling does not undo them
        bias = state.configs[name].bias
        if bias != "none":
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce "
                          f"the same output as the base model would without adaption.", stacklevel=2)
    with transaction(model, layers_only=True):
        unmerge(model)
        layers = list(delora_layers(model).values())
        before = [(layer, layer.disable_adapters) for layer in layers]
        # modules_to_save: the original modules compute while disabled (as PEFT's ModulesToSaveWrapper)
        twins = {path: model.get_submodule(path) for path in state.saved_originals}
        for layer in layers:
            layer.enable_adapters(False)
        for path, original in state.saved_originals.items():
            _install(model, path, original)
        _copies_trainable(state, ())  # as PEFT's ModulesToSaveWrapper.enable_adapters(False)
    try:
        yield outer
    finally:
        with transaction(model, layers_only=True):
            for path, twin in twins.items():
                _install(model, path, twin)
            for layer, was_disabled in before:
                layer.enable_adapters(not was_disabled)
            _copies_trainable(state, state.active, state.active)  # enable_adapters(True): the active copies train


def _span(t: torch.Tensor):
    """(storage, first byte, end byte) of the memory ``t`` can touch, or None (no elements, no storage)."""
    if t.numel() == 0 or t.is_meta:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without a plain storage
        return None
    extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return (t.device, ptr), start, start + extent * t.element_size()


def _check_unshared(model: nn.Module, layers: list[tuple[str, DeLoRALinear]]) -> None:
    """Refuse to merge into a base weight whose memory another module of the model also uses (a tied output
    embedding, two Linears sharing one weight): the merge would silently change that module too."""
    if not layers:
        return
    owners: dict = {}
    for mpath, mod in model.named_modules():
        for pname, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            span = _span(t) if isinstance(t, torch.Tensor) else None
            if span is not None:
                owners.setdefault(span[0], []).append((span[1], span[2], f"{mpath}.{pname}" if mpath else pname,
                                                        mod))
    for path, layer in layers:
        span = _span(layer.base_layer.weight)
        if span is None:
            continue
        for lo, hi, name, mod in owners.get(span[0], []):
            if mod is not layer.base_layer and lo < span[2] and span[1] < hi:
                raise ValueError(f"cannot merge into {path!r}: its base weight shares memory with {name!r} (tied "
                                 f"weights), so merging would change that module too; untie them first (e.g. "
                                 f"give {path}.base_layer.weight its own copy), or keep the adapter unmerged")


def merge(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None,
          requantize=False) -> None:
    """Merge adapters (default: the active ones) into every DeLoRA layer's weight, in place.

    All-or-nothing: every layer is checked first (unknown or repeated adapter, non-float weight, a weight shared with
    another module, non-finite adapter parameters, and with ``safe_merge`` a non-finite merged weight), and only
    then are the weights written. Should writing itself fail (out of memory, ...), the weights written so far are
    restored bit for bit (from copies taken as each is written, on the CPU, dropped when the call returns).

    Quantised base layers (``delora_ext.quant``) are refused, naming the first, unless ``requantize``: True (or,
    for torchao, the config to requantise with) requantises W₀ + ΔW into them, with one warning giving the
    measured rounding error, and cannot be unmerged. ``merge_and_unload(model, dtype=...)`` gives dense layers.
    """
    model = unwrap(model)
    state = require_state(model)
    if adapter_names is not None:
        adapter_names = adapter_list(adapter_names)
        check_known(adapter_names, state.configs, "the model")
    _merge(model, safe_merge, adapter_names, requantize)


def _merge(model: nn.Module, safe_merge: bool, adapter_names: list[str] | None, requantize,
           skip: frozenset = frozenset()) -> None:
    plans: list[tuple[str, DeLoRALinear, list[str]]] = []
    for path, layer in delora_layers(model).items():
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.delora_A]
        if names == [] or path in skip:
            continue
        try:
            names = layer._merge_plan(safe_merge, names, requantize=requantize)[0]
        except (TypeError, ValueError) as e:  # a quantised or non-float base, a broken adapter: say which layer
            raise type(e)(f"layer {path!r}: {e}") from None
        if names:
            plans.append((path, layer, names))
    _check_unshared(model, [(path, layer) for path, layer, _ in plans])
    done: list[tuple[DeLoRALinear, list[str]]] = []
    stats, paths = [], []
    with transaction(model, layers_only=True):  # restores dense weights bit for bit should a later layer fail
        try:
            for path, layer, names in plans:
                st = layer._merge_commit(names, requantize=requantize)
                done.append((layer, names))
                if st is not None:
                    stats.append(st)
                    paths.append(path)
        except BaseException:
            for layer, names in reversed(done):
                if layer._requant_undo:  # a requantised weight: the quantised one it replaced goes back exactly
                    layer._rollback_merge(names)
            raise
        finally:
            for layer, _ in done:
                layer._requant_undo = []  # the replaced quantised weights were kept only for that rollback
    if stats:
        warnings.warn(requantize_message(stats, paths), stacklevel=3)


def unmerge(model: nn.Module, stale: str = "raise") -> None:
    """Unmerge every merged adapter of every layer (all-or-nothing).

    ``stale``: for a layer whose base weight was replaced or rewritten after the merge (load_state_dict,
    assignment): "raise" (default) refuses before any weight is written; "discard" forgets the merge and keeps the
    weight as it is (it holds the pretrained values); "subtract" subtracts the merged ΔW anyway (it holds merged
    values, e.g. a state_dict saved while merged).
    """
    if stale not in STALE_CHOICES:
        raise ValueError(f"`stale` must be one of {STALE_CHOICES}, got {stale!r}")
    model = unwrap(model)
    require_state(model)
    layers = [(path, layer) for path, layer in delora_layers(model).items() if layer.merged]
    for path, layer in layers:  # every layer is checked before any weight is written
        try:
            if stale == "raise":
                layer._check_merge_record("unmerge")
            if stale != "discard" or not layer._merge_record_stale():
                layer._check_finite(list(layer.merged_adapters), "unmerge")
        except ValueError as e:
            raise ValueError(f"{path!r}: {e}") from None
    with transaction(model, layers_only=True):
        for _, layer in layers:
            layer.unmerge(stale=stale)


def _install(model: nn.Module, path: str, mod: nn.Module) -> None:
    """Put ``mod`` (a modules_to_save original or copy, kept outside the module tree) at ``path``, converted first
    to the device/dtype of the module it replaces (the model's .to()/.half() since it was taken out), and in its
    train/eval mode (the model's .train()/.eval() since)."""
    current = model.get_submodule(path)
    if mod is not current:
        _follow(mod, current)
        replace_module(model, path, mod)


def _follow(original: nn.Module, twin: nn.Module) -> None:
    """Give ``original``'s tensors the device and floating dtype of the same-named tensors of ``twin`` (its trained
    copy in the model), and each submodule the train/eval mode of ``twin``'s. PEFT keeps the original inside the
    model, so model.to()/.half()/.eval() reaches it too; here it is outside the module tree, so it follows when it
    goes back into the model."""
    theirs = dict(twin.named_parameters())
    theirs.update(twin.named_buffers())
    with torch.no_grad():
        for name, t in list(original.named_parameters()) + list(original.named_buffers()):
            o = theirs.get(name)
            if o is None:
                continue
            dtype = o.dtype if t.is_floating_point() and o.is_floating_point() else t.dtype
            if t.device != o.device or t.dtype != dtype:
                note_data(t)
                t.data = t.data.to(device=o.device, dtype=dtype)
    modes = {name: m.training for name, m in twin.named_modules()}
    for name, m in original.named_modules():
        m.training = modes.get(name, twin.training)


def _restore(model: nn.Module, state: PatchState, keep_saved_copies: bool) -> None:
    where = parents(model)
    for name, layer in delora_layers(model).items():
        replace_module(model, name, layer.base_layer, where)
    if not keep_saved_copies:
        for name, original in state.saved_originals.items():
            _install(model, name, original)
    params = dict(model.named_parameters())
    for name, flag in state.requires_grad:
        if name in params:
            params[name].requires_grad_(flag)
    delattr(model, STATE_ATTR)


def merge_and_unload(model: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None,
                     dtype: torch.dtype | None = None, requantize=False) -> nn.Module:
    """Merge the adapters and put plain modules (with the merged weights) back; returns ``model``.

    Quantised base layers need one of: ``dtype``, which replaces each by a plain ``nn.Linear`` of that dtype
    holding the dequantised W₀ + ΔW (computed in fp32, cast once; dense layers keep their own dtype), or
    ``requantize`` (see ``merge``), which keeps the quantised layers with W₀ + ΔW requantised into them. A
    transformers model left with no quantised weight loses its quantisation config, as after its ``dequantize()``.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"`dtype` must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if dtype is not None and requantize not in (None, False):
        raise ValueError("pass either `dtype` (dense merged layers) or `requantize` (requantised ones), not both")
    outer, model = model, unwrap(model)
    state = require_state(model)
    if adapter_names is not None:
        adapter_names = adapter_list(adapter_names)
        check_known(adapter_names, state.configs, "the model")
    dense = {}
    if dtype is not None:  # built (and checked) before anything changes; the model holds them once unloaded
        for path, layer in delora_layers(model).items():
            if layer.quant_kind is None:
                continue
            names = None if adapter_names is None else [n for n in adapter_names if n in layer.delora_A]
            try:
                dense[path] = (layer, layer._merged_dense(dtype, names, safe_merge))
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {path!r}: {e}") from None
    with transaction(model):
        _merge(model, safe_merge, adapter_names, requantize, skip=frozenset(dense))
        _restore(model, state, keep_saved_copies=True)  # the trained modules_to_save stay, as PEFT's
        for path, (layer, linear) in dense.items():
            old = layer.base_layer
            linear.weight.requires_grad_(old.weight.requires_grad)  # the flags _restore gave the original back
            if linear.bias is not None:
                linear.bias.requires_grad_(old.bias.requires_grad)
            replace_module(model, path, linear)
    if dense:
        _drop_quantization_config(model)
    return outer


def _drop_quantization_config(model: nn.Module) -> None:
    """A transformers model loaded quantised keeps ``is_quantized``, ``hf_quantizer`` and
    ``config.quantization_config``: once no quantised weight is left, they are removed as transformers'
    ``dequantize()`` removes them, so ``save_pretrained`` does not write a quantisation config that would quantise
    the merged dense weights again on ``from_pretrained``."""
    if not getattr(model, "is_quantized", False) or any(quant.is_quantized_weight(p) for p in model.parameters()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
        return
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def unpatch(model: nn.Module, stale: str = "raise") -> nn.Module:
    """Put the original modules back (unmerging first; ``stale`` as for ``unmerge``); their weights are
    bit-identical if nothing was merged."""
    outer, model = model, unwrap(model)
    state = require_state(model)
    with transaction(model):
        unmerge(model, stale=stale)
        _restore(model, state, keep_saved_copies=False)
    return outer


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
