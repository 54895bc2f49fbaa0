"""Adapter files in PEFT's format (safetensors only): saving, and loading with full validation.

Layout (as PEFT's ``save_pretrained``): ``<dir>/adapter_config.json`` + ``<dir>/adapter_model.safetensors`` for the
adapter named "default", ``<dir>/<name>/...`` for any other; tensor keys ``base_model.model.<module path>.delora_A``
(adapter name stripped), ``.delora_B``, ``.delora_lambda``, ``.delora_w_norm``; modules_to_save parameters as
``base_model.model.<module path>.<param>``; with bias="all" every bias and with bias="delora_only" the adapted
layers' biases, keyed as in the patched model (``<module path>.base_layer.bias`` for an adapted layer).
"""
from __future__ import annotations

import json
import os
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DeLoRAConfig, check_adapter_name, check_known, check_peft_dict_types, matches
from .core import is_conv1d
from .layer import DeLoRALinear, supported_base
from .model import candidates, delora_layers, get_state, modules_to_save_paths, require_state, resolve_targets, unwrap
from .patching import patch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PARAM_KEYS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
PAPER_KEYS = ("delora_A0", "delora_B0", "delora_lambda0")


def _adapter_dir(directory: str, name: str) -> str:
    return directory if name == "default" else os.path.join(directory, name)


def atomic_write(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _full(t: torch.Tensor) -> torch.Tensor:
    """``t``'s whole value as a plain CPU tensor. An FSDP2-sharded parameter (a DTensor) is all-gathered first:
    a collective, so on an FSDP2 model every rank must call save_adapter / adapter_state_dict."""
    if callable(getattr(t, "full_tensor", None)):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous()


def untied(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share storage with an earlier one (tied weights, e.g. BERT's decoder bias):
    safetensors refuses to write shared tensors."""
    seen, out = set(), {}
    for k, t in tensors.items():
        ptr = (t.device, t.untyped_storage().data_ptr())
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def adapter_modules_to_save(model, cfg: DeLoRAConfig, adapter_name: str | None = None):
    """Path -> module of ``cfg.modules_to_save``; with ``adapter_name``, that adapter's own trained copy (the
    model holds only the active adapter's)."""
    found = modules_to_save_paths(model, cfg.modules_to_save)
    state = get_state(model)
    if adapter_name is not None and state is not None:
        found = {p: state.saved_copies.get(p, {}).get(adapter_name, m) for p, m in found.items()}
    return found


def _is_bias_key(key: str) -> bool:
    """A state_dict key of a bias (``....bias``), not an adapter tensor of an adapter named "bias"."""
    parent, _, last = key.rpartition(".")
    return last == "bias" and parent.rpartition(".")[2] not in PARAM_KEYS + PAPER_KEYS


def bias_tensors(model, cfg: DeLoRAConfig, adapter_name: str) -> dict[str, torch.Tensor]:
    """The biases ``cfg.bias`` trains, keyed as in the patched model's state_dict; PEFT saves them with the adapter:
    bias="all": every bias of the model; "delora_only": the base-layer biases of the adapter's layers."""
    if cfg.bias == "none":
        return {}
    sd = model.state_dict()
    if cfg.bias == "all":
        keys = [k for k in sd if _is_bias_key(k)]
    else:
        keys = [f"{p}.base_layer.bias" for p, layer in delora_layers(model).items() if adapter_name in layer.delora_A]
    return {k: sd[k] for k in keys if k in sd}


def adapter_state_dict(model, adapter_name: str = "default", for_peft: bool = True) -> dict[str, torch.Tensor]:
    """The tensors ``save_adapter`` writes for one adapter, keyed as PEFT keys them (CPU, contiguous).

    ``model`` may be wrapped (torch.compile, DDP); with FSDP2 call it on every rank (sharded tensors are gathered).
    """
    model = unwrap(model)
    state = require_state(model)
    check_known([adapter_name], state.configs, "the model", "adapter_name")
    out: dict[str, torch.Tensor] = {}
    for path, layer in delora_layers(model).items():
        if adapter_name not in layer.delora_A:
            continue
        if adapter_name in layer.delora_A0 and for_peft:
            raise ValueError(f"adapter {adapter_name!r} uses the paper's init (a frozen initial update in "
                             f"{path}.delora_A0/B0/lambda0) which PEFT cannot represent; save with "
                             f"for_peft=False (loads in delora_ext only) or use export_lora (exact, rank 2r)")
        layer.resolve_w()
        keys = PARAM_KEYS + (PAPER_KEYS if adapter_name in layer.delora_A0 else ())
        for k in keys:
            t = getattr(layer, k)[adapter_name]
            out[f"{PREFIX}{path}.{k}"] = _full(t)
    for mpath, mod in adapter_modules_to_save(model, state.configs[adapter_name], adapter_name).items():
        for pname, p in mod.state_dict().items():
            out[f"{PREFIX}{mpath}.{pname}"] = _full(p)
    for k, t in bias_tensors(model, state.configs[adapter_name], adapter_name).items():
        out.setdefault(f"{PREFIX}{k}", _full(t))  # a bias inside a modules_to_save module: the adapter's copy
    return out


def save_adapter(model, directory: str, adapter_names: list[str] | None = None, for_peft: bool = True) -> None:
    """Save adapters in PEFT's format (loadable by ``peft.PeftModel.from_pretrained`` when ``for_peft``).

    ``for_peft=False`` also saves paper-init adapters, with their frozen initial update under extra keys
    (``.delora_A0``, ``.delora_B0``, ``.delora_lambda0``) that only delora_ext reads.

    ``model`` may be wrapped (torch.compile, DDP). On an FSDP2-sharded model call it on every rank: the shards are
    gathered (a collective) and every rank writes the same files (atomically).
    """
    model = unwrap(model)
    state = require_state(model)
    names = list(state.configs) if adapter_names is None else list(adapter_names)
    payloads = {n: (untied(adapter_state_dict(model, n, for_peft)), state.configs[n])
                for n in names}  # fail before writing
    for n, (tensors, cfg) in payloads.items():
        d = _adapter_dir(directory, n)
        os.makedirs(d, exist_ok=True)
        cfg_dict = cfg.to_peft_dict()
        cfg_dict["inference_mode"] = True
        atomic_write(os.path.join(d, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(os.path.join(d, CONFIG_NAME),
                     lambda p: open(p, "w").write(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n"))


MAX_CONFIG_BYTES = 16 * 2 ** 20  # a config is a few KB; a larger (or endless, e.g. /dev/zero) file is refused


def _read_config(d: str) -> DeLoRAConfig:
    path = os.path.join(d, CONFIG_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}") from None
    except OSError as e:  # a directory, a device, no permission, ...
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not an adapter config")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise ValueError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: adapter config must be a JSON object, got {type(raw).__name__}")
    try:
        if raw.get("peft_type") == "DELORA":
            check_peft_dict_types(raw)
        return DeLoRAConfig.from_peft_dict(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _read_tensors(d: str) -> dict[str, torch.Tensor]:
    path = os.path.join(d, WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(d, "adapter_model.bin")):
            raise ValueError(f"{d} holds adapter_model.bin (pickle); delora_ext loads safetensors only")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {d}")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (SafetensorError, OSError, and torch's errors on headers it cannot
        # represent, e.g. TypeError for a dimension >= 2**63: whatever the reader refuses, the file is invalid)
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None


REQUIRED, OPTIONAL = "required", "optional"


def _expected(model, cfg: DeLoRAConfig, adapter_name: str) -> dict[str, tuple[tuple, str]]:
    """key -> (shape, kind) of what a file may hold for ``cfg`` on ``model``, without touching the model.

    kind: REQUIRED (must be in the file) or OPTIONAL (loaded if present: biases beyond those ``cfg.bias`` trains).
    """
    state = get_state(model)
    targets = resolve_targets(model, cfg)
    exp: dict[str, tuple[tuple, str]] = {}
    wrap, adapted = set(), set()
    for path, mod in candidates(model):
        if not path or not matches(cfg, path, targets):
            continue
        if isinstance(mod, DeLoRALinear) or supported_base(mod):
            adapted.add(path)
            if not isinstance(mod, DeLoRALinear):
                wrap.add(path)
        if isinstance(mod, DeLoRALinear):
            if adapter_name in mod.delora_A:
                r = mod.r[adapter_name]
            else:
                r = cfg.rank_for(path)
            in_f, out_f = mod.in_features, mod.out_features
        elif supported_base(mod):
            r = cfg.rank_for(path)
            # in/out_features, not weight.shape: a bitsandbytes 4-bit weight is stored packed, (out·in/2, 1)
            out_f, in_f = (mod.weight.shape[1], mod.weight.shape[0]) if is_conv1d(mod) else (mod.out_features,
                                                                                              mod.in_features)
        else:
            continue
        shapes = {"delora_A": (r, in_f), "delora_B": (out_f, r), "delora_lambda": (1,), "delora_w_norm": (in_f,)}
        if cfg.init_weights == "paper":
            shapes.update(delora_A0=(r, in_f), delora_B0=(out_f, r), delora_lambda0=(1,))
        for k, shp in shapes.items():
            exp[f"{PREFIX}{path}.{k}"] = (tuple(shp), REQUIRED)
    to_save = adapter_modules_to_save(model, cfg)
    for mpath, mod in to_save.items():
        if mpath in adapted:  # adapted by this config, so never a modules_to_save copy (as patch)
            continue
        for pname, p in mod.state_dict().items():
            exp[f"{PREFIX}{mpath}.{pname}"] = (tuple(p.shape), REQUIRED)
    if cfg.bias != "none":
        for k, t in model.state_dict().items():
            if not _is_bias_key(k):
                continue
            mpath, _, pname = k.rpartition(".")
            if mpath in wrap:  # the key this bias will have once its module is wrapped
                mpath = f"{mpath}.base_layer"
            trained = cfg.bias == "all" or (mpath.endswith(".base_layer") and mpath[:-len(".base_layer")] in adapted)
            key = f"{PREFIX}{mpath}.{pname}"
            if exp.get(key, (None, None))[1] != REQUIRED:
                exp[key] = (tuple(t.shape), REQUIRED if trained else OPTIONAL)
    return exp


def _peft_wrapper_copy(model, cfg: DeLoRAConfig, key: str) -> bool:
    """Whether ``key`` is a bias PEFT's bias="all" also writes from inside its modules_to_save wrapper
    (``<module>.modules_to_save[.<adapter>].<...>.bias``, ``<module>.original_module.<...>.bias``): the trained
    values are in the file under ``<module>.<...>.bias`` too, so these copies are accepted and not loaded."""
    if cfg.bias != "all" or not key.startswith(PREFIX) or not _is_bias_key(key):
        return False
    k = key[len(PREFIX):]
    return any(k.startswith(f"{m}.modules_to_save.") or k.startswith(f"{m}.original_module.")
               for m in adapter_modules_to_save(model, cfg))


def _dest_dtype(model, sd: dict, key: str, adapter_name: str) -> torch.dtype:
    """The dtype the tensor under ``key`` will be stored in once loaded, found without touching the model."""
    path, _, attr = key[len(PREFIX):].rpartition(".")
    if attr in PARAM_KEYS + PAPER_KEYS:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            layer = None
        if (isinstance(layer, DeLoRALinear) and attr in ("delora_A", "delora_B", "delora_lambda")
                and adapter_name in getattr(layer, attr)):  # overwritten in place
            return getattr(layer, attr)[adapter_name].dtype
        return torch.float32  # new adapter parameters, w and the paper-init buffers are fp32
    k = key[len(PREFIX):]
    if k not in sd:  # the base-layer bias of a layer that the patch is about to wrap
        mpath, _, pname = k.rpartition(".")
        k = f"{mpath.removesuffix('.base_layer')}.{pname}"
    return sd[k].dtype if k in sd else torch.float32


def load_adapter(model, directory: str, adapter_name: str = "default", is_trainable: bool = True,
                 allow_nonfinite: bool = False):
    """Load an adapter saved by ``save_adapter`` or by PEFT (``save_pretrained``) into ``model``; returns it.

    ``is_trainable=False`` freezes every parameter (inference, as PEFT's ``inference_mode``).
    ``directory`` holds ``adapter_config.json`` and ``adapter_model.safetensors``. The model is patched with the
    file's config if it does not have ``adapter_name`` yet. Biases the config trains (``bias`` "all" or
    "delora_only") are part of the adapter and loaded with it. Everything (config, every key, shape, dtype and
    value) is checked before the model is touched: on any error (a ``ValueError``, or ``FileNotFoundError`` when a
    file is absent) the model is exactly as before and the message names the file and the first offending key or
    field. Floating tensors of another dtype are cast to the parameter's dtype; integer, bool and complex tensors
    are refused. Non-finite values (NaN, ±Inf, also a finite value that overflows when cast, e.g. 1e300 in a
    float64 file) are refused, naming the keys, since they would make every output NaN/Inf; ``allow_nonfinite=True``
    loads them as they are. Nothing is ever unpickled (an ``adapter_model.bin`` is refused). ``model`` may be
    wrapped (torch.compile, DDP; the wrapper is returned); loading into an FSDP2-sharded model is not supported
    (load first, then shard).
    """
    check_adapter_name(adapter_name)
    wrapper, model = model, unwrap(model)
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    cfg = _read_config(directory)
    tensors = _read_tensors(directory)
    state = get_state(model)
    if state is not None and adapter_name in state.configs and state.configs[adapter_name] != cfg:
        raise ValueError(f"{cpath}: adapter {adapter_name!r} exists on the model with another config; "
                         f"delete_adapter it first or load under another name")
    merged = [p for p, layer in delora_layers(model).items() if adapter_name in layer.merged_adapters]
    if merged:  # new values under a merged ΔW: the weight would keep the old ΔW and unmerge subtract the new
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[0]!r}"
                         f"{f' and {len(merged) - 1} more layers' if len(merged) > 1 else ''}; unmerge it "
                         f"before loading {directory} into it")
    try:
        expected = _expected(model, cfg, adapter_name)
    except (TypeError, ValueError, re.error) as e:
        raise ValueError(f"{cpath}: this config cannot be applied to the model ({e})") from None
    if not any(k.endswith(".delora_A") for k in expected):
        raise ValueError(f"{cpath}: target_modules={cfg.target_modules!r} match no module of this model")
    for k in sorted(expected):
        if k not in tensors and expected[k][1] == REQUIRED:
            raise ValueError(f"{wpath}: missing key {k!r}")
    sd = model.state_dict()
    values, nonfinite = {}, []  # key -> the tensor cast to its destination dtype (still on the CPU)
    for k in sorted(tensors):
        if k not in expected:
            if _peft_wrapper_copy(model, cfg, k):
                continue
            raise ValueError(f"{wpath}: unexpected key {k!r} (not part of this adapter on this model)")
        t = tensors[k]
        dtype = _dest_dtype(model, sd, k, adapter_name)
        # integer buffers of modules_to_save (BatchNorm's num_batches_tracked) load only as their own dtype
        if not (t.is_floating_point() if dtype.is_floating_point else t.dtype == dtype):
            raise ValueError(f"{wpath}: key {k!r} has dtype {t.dtype}; "
                             f"{'a floating-point tensor' if dtype.is_floating_point else dtype} is required")
        if tuple(t.shape) != expected[k][0]:
            raise ValueError(f"{wpath}: key {k!r} has shape {tuple(t.shape)}, expected {expected[k][0]}")
        try:
            values[k] = t.to(dtype)
        except Exception as e:  # noqa: BLE001 (torch cannot convert some float dtypes, e.g. float4_e2m1fn_x2)
            raise ValueError(f"{wpath}: key {k!r} has dtype {t.dtype}, which torch cannot convert to {dtype} "
                             f"({type(e).__name__})") from None
        if not allow_nonfinite and not bool(torch.isfinite(values[k]).all()):
            nonfinite.append(k)
    if nonfinite:
        more = f" and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else ""
        raise ValueError(f"{wpath}: non-finite values (NaN or ±Inf, in the file or after casting to the parameter's "
                         f"dtype) in key(s) {', '.join(map(repr, nonfinite[:8]))}{more}; they would make every "
                         f"output non-finite. Pass allow_nonfinite=True to load them anyway")
    others = [k for k in values if k[len(PREFIX):].rpartition(".")[2] not in PARAM_KEYS + PAPER_KEYS]
    if others and any(t.is_meta for t in model.state_dict().values()):
        # modules_to_save copies of modules on the meta device could not take the file's values in place
        raise ValueError(f"{wpath}: key {others[0]!r} (modules_to_save) cannot load into a model with tensors on "
                         f"the meta device; materialize the model first (e.g. load_state_dict(..., assign=True))")
    try:
        patch(model, cfg, adapter_name=adapter_name)
    except (TypeError, ValueError) as e:  # patch is all-or-nothing: the model is as it was
        raise type(e)(f"{cpath}: this config cannot be applied to the model ({e})") from None
    layers = delora_layers(model)
    copies = {p: c[adapter_name] for p, c in get_state(model).saved_copies.items() if adapter_name in c}
    with torch.no_grad():
        for k, t in values.items():
            path, _, attr = k[len(PREFIX):].rpartition(".")
            if attr in PARAM_KEYS + PAPER_KEYS and path in layers:
                layer = layers[path]
                store = getattr(layer, attr)
                dst = store[adapter_name]
                if attr in PAPER_KEYS or attr == "delora_w_norm":
                    dev = t.device if dst.is_meta else dst.device  # a meta model takes the file's values as they are
                    store[adapter_name] = t.to(device=dev, dtype=torch.float32).clone()
                elif dst.is_meta:  # a model patched on the meta device: the file's values become the parameter
                    store[adapter_name] = torch.nn.Parameter(t.clone(), requires_grad=dst.requires_grad)
                else:
                    dst.copy_(t)
                if attr == "delora_w_norm":
                    layer._w_pending.discard(adapter_name)
            else:
                rel = k[len(PREFIX):]
                own = [p for p in copies if rel.startswith(p + ".")]
                if own:  # this adapter's own modules_to_save copy (the model may hold another adapter's)
                    dst = copies[own[0]].state_dict()[rel[len(own[0]) + 1:]]
                else:
                    mpath, _, pname = rel.rpartition(".")
                    dst = model.get_submodule(mpath).state_dict()[pname] if mpath else model.state_dict()[pname]
                dst.copy_(t)
    if not is_trainable:  # inference: nothing trains, as PEFT's inference_mode
        for p in model.parameters():
            p.requires_grad_(False)
    return wrapper
