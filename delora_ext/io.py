"""Adapter files in PEFT's format (safetensors only): saving, and loading with full validation.

Layout (as PEFT's ``save_pretrained``): ``<dir>/adapter_config.json`` + ``<dir>/adapter_model.safetensors`` for the
adapter named "default", ``<dir>/<name>/...`` for any other; tensor keys ``base_model.model.<module path>.delora_A``
(adapter name stripped), ``.delora_B``, ``.delora_lambda``, ``.delora_w_norm``; modules_to_save parameters as
``base_model.model.<module path>.<param>``; with bias="all" every bias and with bias="delora_only" the adapted
layers' biases, keyed as in the patched model (``<module path>.base_layer.bias`` for an adapted layer).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
import time
import warnings

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .config import (
    PAPER_PEFT_TYPE,
    PEFT_TYPE,
    DeLoRAConfig,
    adapter_list,
    check_adapter_name,
    check_known,
    check_peft_dict_types,
)
from .core import is_conv1d
from .layer import DeLoRALinear, supported_base
from .model import (
    delora_layers,
    get_state,
    is_bias_name,
    modules_to_save_paths,
    note_write,
    require_state,
    targeted,
    transaction,
    unwrap,
    warn_if_aliased,
)
from .patching import patch, require_grad

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PARAM_KEYS = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
PAPER_KEYS = ("delora_A0", "delora_B0", "delora_lambda0")


def _adapter_dir(directory: str, name: str) -> str:
    return directory if name == "default" else os.path.join(directory, name)


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
    return is_bias_name(key)


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


# safetensors metadata key: the fingerprint of the config the weights were saved with, so that a reader can tell a
# matching pair of files from a mix (a reader between a writer's two renames; an interrupted save). PEFT ignores it.
PAIR_KEY = "delora_ext.config_sha256"


def config_fingerprint(cfg: DeLoRAConfig) -> str:
    """sha256 of the fields that define the adapter, normalised (lists that are sets sorted, numbers as floats), so
    that the same config read back from its file has the same fingerprint."""
    d = {}
    for k in DeLoRAConfig.PEFT_FIELDS:
        v = getattr(cfg, k)
        if k in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(v, list):
            v = sorted(set(v))
        elif k in ("delora_lambda", "module_dropout"):
            v = float(v)
        elif k == "lambda_pattern":
            v = {p: float(x) for p, x in v.items()}
        d[k] = v
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _config_bytes(cfg: DeLoRAConfig) -> bytes:
    d = cfg.to_peft_dict()
    d["inference_mode"] = True
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_weights(tensors: dict, path: str, fingerprint: str) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)  # a new file's (``_new_file``); safetensors may write its own 0600
    save_file(tensors, path, metadata={"format": "pt", PAIR_KEY: fingerprint})
    os.chmod(path, mode)
    _fsync_file(path)


def _write_config(data: bytes, path: str) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(d: str) -> list[str]:
    """Create ``d`` and its missing parents; returns the ones created, outermost first."""
    missing = []
    p = os.path.abspath(d)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    created = []
    try:
        for p in reversed(missing):
            try:
                os.mkdir(p)
            except FileExistsError:  # another writer (every FSDP rank saves) made it meanwhile: not ours to remove
                if not os.path.isdir(p):
                    raise NotADirectoryError(f"cannot save to {d}: {p} exists and is not a directory") from None
                continue
            created.append(p)
    except BaseException:
        for p in reversed(created):
            _quietly(os.rmdir, p)
        raise
    return created


def _new_file(d: str, name: str) -> str:
    """A new empty file in ``d`` under a unique temporary name, with the permissions ``open`` gives a new file
    (0666 less the umask, as PEFT's files get; ``mkstemp``'s 0600 would hide the adapter from other users)."""
    while True:
        path = os.path.join(d, f".tmp-{secrets.token_hex(8)}-{name}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return path
        except FileExistsError:
            continue


def _backup(path: str) -> str | None:
    """A second name for the file at ``path`` (a hard link, or a copy where links are not supported), to put it
    back should the save fail after ``path`` was replaced; None if there is no file."""
    if not os.path.lexists(path):
        return None
    fd, bak = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".old-", suffix=os.path.basename(path))
    os.close(fd)
    os.unlink(bak)
    try:
        os.link(path, bak)
    except OSError:
        import shutil
        shutil.copy2(path, bak)
    return bak


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


FOLDER_LOCK_WAIT_S = 10.0  # the longest a save or a load waits for the other side's folder lock


@contextlib.contextmanager
def _folder_lock(d: str, exclusive: bool):
    """An advisory lock of folder ``d`` (``flock`` on the folder itself, so no lock file is left in it): exclusive
    while a save renames its files in, shared while a load reads a config and its weights. Yields whether the lock
    is held: not where the platform or file system has no ``flock`` (Windows, some network file systems) or it was
    not granted within ``FOLDER_LOCK_WAIT_S``; then the reader's fingerprint check is what pairs the files."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield False
        return
    try:
        held, deadline, pause = False, time.monotonic() + FOLDER_LOCK_WAIT_S, 0.0005
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, mode)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.02)
            except OSError:  # the file system does not support it
                break
        yield held
    finally:
        os.close(fd)  # releases the lock


def _write_pairs(pairs: list[tuple[str, dict, bytes, str]]) -> None:
    """Write (directory, tensors, config bytes, fingerprint) pairs: all or nothing.

    Every file is first written in full under a temporary name beside its destination; then, per adapter, the
    weights and then the config are renamed into place (each rename atomic), under an exclusive lock of each folder
    (``_folder_lock``) that ``load_adapter`` takes shared while it reads the two files; where locks are not
    available, a reader seeing the new weights beside the old config notices from the fingerprint and reads again.
    If anything fails, the
    files already replaced are put back from their backups and every temporary file and new folder is removed:
    the directory is as before.
    """
    created: list[str] = []
    staged: list[tuple[str, str]] = []  # (destination, temporary file), in commit order
    backups: list[str] = []
    replaced: list[tuple[str, str | None]] = []  # (destination, its backup)
    try:
        for d, tensors, cfg_bytes, fingerprint in pairs:
            created += _makedirs(d)
            for name, write in ((WEIGHTS_NAME, lambda p, t=tensors, f=fingerprint: _write_weights(t, p, f)),
                                (CONFIG_NAME, lambda p, c=cfg_bytes: _write_config(c, p))):
                dest = os.path.join(d, name)
                if os.path.isdir(dest):
                    raise IsADirectoryError(f"cannot save the adapter: {dest} is a directory")
                tmp = _new_file(d, name)
                staged.append((dest, tmp))
                write(tmp)
        with contextlib.ExitStack() as locks:  # readers (load_adapter) of these folders wait while they are a mix
            for d in sorted({os.path.dirname(dest) for dest, _ in staged}):
                locks.enter_context(_folder_lock(d, exclusive=True))
            for dest, tmp in staged:
                bak = _backup(dest)
                if bak is not None:
                    backups.append(bak)
                os.replace(tmp, dest)
                replaced.append((dest, bak))
    except BaseException:
        for dest, bak in reversed(replaced):
            if bak is not None:
                _quietly(os.replace, bak, dest)
            else:
                _quietly(os.unlink, dest)
        for _, tmp in staged:
            _quietly(os.unlink, tmp)
        for bak in backups:
            _quietly(os.unlink, bak)
        for d in reversed(created):
            _quietly(os.rmdir, d)
        raise
    for bak in backups:  # committed: the old files go (a failure here is not the save's)
        try:
            os.unlink(bak)
        except OSError:
            pass


def check_directory(fn: str, directory) -> str:
    """``directory`` as a str path, or a TypeError naming it (os.fspath's own error names neither)."""
    try:
        return os.fspath(directory)
    except TypeError:
        raise TypeError(f"{fn}: `directory` must be a path (str or os.PathLike), got "
                        f"{type(directory).__name__}") from None


def save_adapter(model, directory: str, adapter_names: list[str] | None = None, for_peft: bool = True,
                 save_embedding_layers: bool = False) -> None:
    """Save adapters in PEFT's format (loadable by ``peft.PeftModel.from_pretrained`` when ``for_peft``).

    ``for_peft=False`` also saves paper-init adapters, with their frozen initial update under extra keys
    (``.delora_A0``, ``.delora_B0``, ``.delora_lambda0``) that only delora_ext reads; their config's ``peft_type``
    is "DELORA_PAPER_INIT", which PEFT refuses (as "DELORA" it would load the file without the frozen term).

    ``save_embedding_layers=True`` also writes the model's input and output embeddings (transformers'
    ``get_input_embeddings`` / ``get_output_embeddings``; an adapted one's base layer) into every adapter's file,
    as PEFT's ``save_pretrained(save_embedding_layers=True)``: for a vocabulary resized or embeddings changed
    during fine-tuning. PEFT's default, "auto", also does so whenever ``lm_head`` is targeted; here it is asked for.

    All or nothing: everything is computed and written under temporary names before any file is replaced, so a
    failed save leaves the directory as it was, and a concurrent ``load_adapter`` (another thread or process) reads
    the old or the new adapter, never one's config with the other's weights.

    ``model`` may be wrapped (torch.compile, DDP). On an FSDP2-sharded model call it on every rank: the shards are
    gathered (a collective) and every rank writes the same files (atomically).
    """
    directory = check_directory("save_adapter", directory)
    model = unwrap(model)
    state = require_state(model)
    if for_peft:
        warn_if_aliased(model, "save_adapter")
    names = list(state.configs) if adapter_names is None else adapter_list(adapter_names)
    check_known(names, state.configs, "the model")
    for n in names:
        check_adapter_name(n)
    if not isinstance(save_embedding_layers, bool):
        raise TypeError(f"save_adapter: `save_embedding_layers` must be True or False, got {save_embedding_layers!r}")
    embeddings = {}
    if save_embedding_layers:
        embeddings = {f"{PREFIX}{path}.{k}": _full(t) for path, mod in _embedding_modules(model).items()
                      for k, t in mod.state_dict().items()}
        if not embeddings:
            raise ValueError("save_adapter: save_embedding_layers=True but `model` has no input or output embedding "
                             "(transformers' get_input_embeddings / get_output_embeddings)")
    pairs = []
    for n in names:  # everything that can fail before a file is written
        cfg = state.configs[n]
        tensors = adapter_state_dict(model, n, for_peft)
        for k, t in embeddings.items():  # an adapter's own modules_to_save copy of lm_head keeps its key
            tensors.setdefault(k, t)
        pairs.append((_adapter_dir(directory, n), untied(tensors), _config_bytes(cfg), config_fingerprint(cfg)))
    _write_pairs(pairs)


MAX_CONFIG_BYTES = 16 * 2 ** 20  # a config is a few KB; a larger (or endless, e.g. /dev/zero) file is refused


def _open_regular(path: str, what: str):
    """``path`` opened for reading if it is a regular file: a FIFO would block forever, a device never end."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise ValueError(f"{path} is {kind}; {what} must be a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _read_config(d: str) -> tuple[DeLoRAConfig, tuple]:
    """The config in ``d`` and the identity of the file it was read from."""
    path = os.path.join(d, CONFIG_NAME)
    try:
        with _open_regular(path, "an adapter config") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
            ident = _identity(os.fstat(f.fileno()))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d}") from None
    except OSError as e:  # no permission, ...
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
        if raw.get("peft_type") in (PEFT_TYPE, PAPER_PEFT_TYPE):
            check_peft_dict_types(raw)
        return DeLoRAConfig.from_peft_dict(raw), ident
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's bytes (already validated by the safetensors loader): an 8-byte
    little-endian header length, then the JSON header."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n].decode("utf-8")).get("__metadata__") or {}
    return dict(meta) if isinstance(meta, dict) else {}


def _read_tensors(d: str) -> tuple[dict[str, torch.Tensor], dict, tuple]:
    """The tensors of ``<d>/adapter_model.safetensors``, its metadata and the identity of the file read.

    The file is read once, through one descriptor, and parsed from those bytes: safetensors' ``safe_open`` opens the
    path again for the tensor data, so a file replaced between its two opens gave the metadata (and with it the
    config fingerprint) of one save and the tensors of another."""
    path = os.path.join(d, WEIGHTS_NAME)
    if not os.path.lexists(path):
        if os.path.exists(os.path.join(d, "adapter_model.bin")):
            raise ValueError(f"{d} holds adapter_model.bin (pickle); delora_ext loads safetensors only")
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {d}")
    try:
        with _open_regular(path, "adapter weights") as f:
            ident = _identity(os.fstat(f.fileno()))
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {d}") from None
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        tensors = load_safetensors(data)
        meta = _safetensors_metadata(data)
    except Exception as e:  # noqa: BLE001 (SafetensorError, and torch's errors on headers it cannot represent,
        # e.g. TypeError for a dimension >= 2**63: whatever the reader refuses, the file is invalid)
        raise ValueError(f"{path} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta, ident


PAIR_WAIT_S = 10.0  # the longest a save in progress (its temporary config beside the new weights) is waited for


def _save_in_progress(d: str) -> bool:
    """A save is between its renames: its temporary config (written before the weights are renamed into place,
    renamed itself last) is in the directory."""
    try:
        return any(n.startswith(".tmp-") and n.endswith(CONFIG_NAME) for n in os.listdir(d))
    except OSError:
        return False


def _read_pair(d: str) -> tuple[DeLoRAConfig, dict[str, torch.Tensor]]:
    """The config and tensors of the adapter in ``d``, from one save. The two files are read under a shared lock of
    the folder, which ``save_adapter`` holds exclusively while it renames its files in, so they come from one save.
    Weights written by ``save_adapter`` also carry their config's fingerprint: a mismatch read under the lock, or
    one that stays (the same two files read twice with no save in progress in between) where there is no lock, is
    the files' own state (the config edited by hand since, or a save killed between its renames) and is loaded as it
    is, with a warning, and validated as any file; a mismatch without the lock is read again until it goes."""
    deadline, last, pause = time.monotonic() + PAIR_WAIT_S, None, 0.001
    while True:
        with _folder_lock(d, exclusive=False) as locked:
            cfg, cfg_id = _read_config(d)
            tensors, meta, weights_id = _read_tensors(d)
        saved_with = meta.get(PAIR_KEY)
        if saved_with is None or saved_with == config_fingerprint(cfg):  # no fingerprint: PEFT's files
            return cfg, tensors
        files = None if _save_in_progress(d) else (cfg_id, weights_id)
        if locked or (files is not None and files == last) or time.monotonic() > deadline:
            warnings.warn(f"{os.path.join(d, WEIGHTS_NAME)} was saved with another {CONFIG_NAME} than the one in {d} "
                          f"(the config was edited since, or a save was interrupted); loading the files as they are",
                          stacklevel=3)
            return cfg, tensors
        last = files
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


REQUIRED, OPTIONAL = "required", "optional"


def _expected(model, cfg: DeLoRAConfig, adapter_name: str) -> dict[str, tuple[tuple, str]]:
    """key -> (shape, kind) of what a file may hold for ``cfg`` on ``model``, without touching the model.

    kind: REQUIRED (must be in the file) or OPTIONAL (loaded if present: biases beyond those ``cfg.bias`` trains).
    """
    exp: dict[str, tuple[tuple, str]] = {}
    wrap, adapted = set(), set()
    for path, key, mod in targeted(model, cfg):
        if isinstance(mod, DeLoRALinear) or supported_base(mod):
            adapted.add(path)
            if not isinstance(mod, DeLoRALinear):
                wrap.add(path)
        if isinstance(mod, DeLoRALinear):
            if adapter_name in mod.delora_A:
                r = mod.r[adapter_name]
            else:
                r = cfg.rank_for(key)
            in_f, out_f = mod.in_features, mod.out_features
        elif supported_base(mod):
            r = cfg.rank_for(key)
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
    for mpath, mod in _embedding_modules(model).items():
        if mpath in wrap:  # targeted by this config: PEFT saves its base layer
            mpath = f"{mpath}.base_layer"
        for pname, t in mod.state_dict().items():
            exp.setdefault(f"{PREFIX}{mpath}.{pname}", (tuple(t.shape), OPTIONAL))
    return exp


def _embedding_modules(model) -> dict:
    """path -> module of the model's input and output embeddings (transformers' ``get_input_embeddings`` and
    ``get_output_embeddings``; an adapted one's base layer), whose state PEFT's
    ``save_pretrained(save_embedding_layers=...)`` writes beside the adapter, for a resized vocabulary or a
    targeted ``lm_head``; loading puts those values into the model as PEFT's ``load_state_dict`` does."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            emb = fn() if callable(fn) else None
        except (AttributeError, NotImplementedError):  # a model class without that embedding
            emb = None
        if isinstance(emb, torch.nn.Module):
            found.append(emb)
    out = {}
    if found:
        for path, m in model.named_modules():
            if any(m is e for e in found):
                out.update({f"{path}.base_layer": m.base_layer} if isinstance(m, DeLoRALinear) else {path: m})
    return out


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


def _check_fits_existing(model, cfg: DeLoRAConfig, adapter_name: str, cpath: str) -> None:
    """Loading into an existing adapter (as PEFT's load_adapter does) needs the file's adapter to have the same
    layout: the same layers, the paper-init term on the same ones, the same modules_to_save."""
    state = get_state(model)
    layers = delora_layers(model)
    have = {p for p, layer in layers.items() if adapter_name in layer.delora_A}
    found = targeted(model, cfg)
    for _, key, m in found:  # a config patch() would refuse is refused here too
        if not (isinstance(m, DeLoRALinear) or supported_base(m)):
            raise ValueError(f"{cpath}: target module {key!r} is a {type(m).__name__}; DeLoRA supports nn.Linear "
                             f"(and subclasses) and transformers' Conv1D")
    want = {p for p, _, m in found}

    def differ(what, a, b):
        only_model, only_file = sorted(a - b), sorted(b - a)
        return ValueError(f"{cpath}: adapter {adapter_name!r} exists on the model with {what} other than this file's "
                          f"(only on the model: {only_model[:4]}, only in the file: {only_file[:4]}); "
                          f"delete_adapter it first or load under another name")
    if have != want:
        raise differ("layers", have, want)
    paper_have = {p for p in have if adapter_name in layers[p].delora_A0}
    paper_want = want if cfg.init_weights == "paper" else set()
    if paper_have != paper_want:
        raise differ("paper-init layers", paper_have, paper_want)
    saved_have = {p for p, c in state.saved_copies.items() if adapter_name in c}
    saved_want = set(modules_to_save_paths(model, cfg.modules_to_save)) - want
    if saved_have != saved_want:
        raise differ("modules_to_save", saved_have, saved_want)


def _tensor_at(module, dotted: str) -> torch.Tensor:
    """The parameter or buffer object itself at ``dotted`` inside ``module`` (state_dict() gives detached aliases)."""
    sub, _, name = dotted.rpartition(".")
    owner = module.get_submodule(sub) if sub else module
    t = owner._parameters.get(name)
    return t if t is not None else owner._buffers[name]


def load_adapter(model, directory: str, adapter_name: str = "default", is_trainable: bool = True,
                 allow_nonfinite: bool = False):
    """Load an adapter saved by ``save_adapter`` or by PEFT (``save_pretrained``) into ``model``; returns it.

    ``directory`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` (regular files). The model is
    patched with the file's config if it does not have ``adapter_name`` yet; if it has, the file's values are loaded
    into that adapter, as PEFT's ``load_adapter`` does (its config is kept; the file must have the same layers and
    shapes). ``is_trainable`` (as PEFT): True makes a newly added adapter's parameters require grad (also when it is
    not the active one); False loads for inference (PEFT's ``inference_mode``): a new adapter is frozen (and, on a
    model not patched before, every parameter, as PEFT's ``from_pretrained``) and the model is put in eval mode.
    As PEFT, no other parameter's requires_grad changes on a patched model. Biases the config trains (``bias`` "all" or
    "delora_only") are part of the adapter and loaded with it. The input and output embeddings PEFT writes beside an
    adapter (``save_pretrained(save_embedding_layers=True)``, and by default when ``lm_head`` is targeted) are put
    into the model, as PEFT's ``from_pretrained`` does. Everything (config, every key, shape, dtype and
    value) is checked before the model is touched, and should the load fail later the model is put back: on any
    error (a ``ValueError``, or ``FileNotFoundError`` when a file is absent) the model is exactly as before and the
    message names the file and the first offending key or field. Floating tensors of another dtype are cast to the
    parameter's dtype; integer, bool and complex tensors are refused. Non-finite values (NaN, ±Inf, also a finite
    value that overflows when cast, e.g. 1e300 in a float64 file) are refused, naming the keys, since they would
    make every output NaN/Inf; ``allow_nonfinite=True`` loads them as they are. Nothing is ever unpickled (an
    ``adapter_model.bin`` is refused). ``model`` may be wrapped (torch.compile, DDP; the wrapper is returned);
    loading into an FSDP2-sharded model is not supported (load first, then shard).
    """
    directory = check_directory("load_adapter", directory)
    check_adapter_name(adapter_name)
    wrapper, model = model, unwrap(model)
    cpath, wpath = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    cfg, tensors = _read_pair(directory)
    state = get_state(model)
    existing = state is not None and adapter_name in state.configs
    first = state is None  # the load patches the model: PEFT's first injection
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
    if existing:
        _check_fits_existing(model, cfg, adapter_name, cpath)
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
    if existing and state.configs[adapter_name] != cfg:
        ours = state.configs[adapter_name]
        theirs_k, ours_k = dict(cfg._key()), dict(ours._key())
        fields = [f for f in DeLoRAConfig.PEFT_FIELDS if theirs_k[f] != ours_k[f]]
        warnings.warn(f"{cpath}: loading the file's values into the existing adapter {adapter_name!r}, whose config "
                      f"is kept (as PEFT's load_adapter); the file's config differs in {fields}", stacklevel=2)
    with transaction(model):
        if not existing:
            try:
                patch(model, cfg, adapter_name=adapter_name)
            except (TypeError, ValueError) as e:  # patch is all-or-nothing: the model is as it was
                raise ValueError(f"{cpath}: this config cannot be applied to the model ({e})") from None
        _copy_values(model, values, adapter_name)
        if existing:
            if not is_trainable:
                model.eval()
        elif is_trainable:  # as PEFT 0.21's load_adapter: the new adapter trains, active or not
            require_grad(model, adapter_name)
        else:  # inference, as PEFT's inference_mode: the new adapter is frozen (with the rest of a fresh model)
            if first:
                for p in model.parameters():
                    p.requires_grad_(False)
            else:
                require_grad(model, adapter_name, False)
            model.eval()
    return wrapper


def _copy_values(model, values: dict[str, torch.Tensor], adapter_name: str) -> None:
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
                    note_write(dst)
                    dst.copy_(t)
                if attr == "delora_w_norm":
                    layer._w_pending.discard(adapter_name)
            else:
                rel = k[len(PREFIX):]
                own = [p for p in copies if rel.startswith(p + ".")]
                if own:  # this adapter's own modules_to_save copy (the model may hold another adapter's)
                    dst = _tensor_at(copies[own[0]], rel[len(own[0]) + 1:])
                else:
                    dst = _tensor_at(model, rel)
                note_write(dst)
                dst.copy_(t)
