"""Training helpers: optimizer parameter groups with λ's own learning rate, per-layer λ and ‖ΔW‖ figures, and
``DeLoRACallback`` for Hugging Face ``Trainer`` jobs on ``patch()``ed models.

Everything here works on both kinds of DeLoRA model: one patched by ``delora_ext.patch`` and a PEFT model
(``peft.get_peft_model`` with a ``DeloraConfig``, accelerated or not). transformers is imported only when
``DeLoRACallback`` is first used.
"""
from __future__ import annotations

import math
import os
import warnings
from numbers import Real

import torch
from torch import nn

from . import core

# DeLoRACallback (resolved on first use, as it needs transformers) is not in __all__
__all__ = ["param_groups", "layer_figures", "figures_summary", "attach_callback"]

LOG_PREFIX = "delora/"
# files transformers writes for a full (non-adapter) copy of a model
FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def _delora_layers(model: nn.Module):
    """(path, layer) of every DeLoRA layer: delora_ext's and PEFT's alike (both keep λ in a ParameterDict
    ``delora_lambda`` keyed by adapter name)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "delora_lambda", None), nn.ParameterDict) and hasattr(m, "delora_A")]


def _number(value, name: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"`{name}` must be a finite number ≥ 0{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def param_groups(model: nn.Module, lr: float, lambda_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for a DeLoRA model, the authors' recipe: every DeLoRA λ in a group of its own
    with learning rate ``lambda_lr`` (default ``lr``) and no weight decay; every other trainable parameter (A, B,
    trained biases, modules_to_save) with ``lr`` and ``weight_decay``. Each trainable parameter is in exactly one
    group; frozen ones in none. Empty groups are left out. Works for ``patch()``ed and PEFT models.

        opt = torch.optim.AdamW(delora_ext.param_groups(model, lr=2e-4, lambda_lr=2e-3, weight_decay=0.01))
    """
    lr = _number(lr, "lr")
    lambda_lr = _number(lambda_lr, "lambda_lr", allow_none=True)
    weight_decay = _number(weight_decay, "weight_decay")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    layers = _delora_layers(model)
    if not layers:
        raise ValueError("`model` has no DeLoRA layers: patch() it with delora_ext or wrap it with "
                         "peft.get_peft_model(model, peft.DeloraConfig(...)) first")
    lambdas = {id(p) for _, m in layers for p in m.delora_lambda.values()}
    trainable = [p for p in model.parameters() if p.requires_grad]  # each Parameter once, tied ones too
    if not trainable:
        raise ValueError("`model` has no trainable parameters (are the adapters active and is the model not in "
                         "inference mode?)")
    lam = [p for p in trainable if id(p) in lambdas]
    rest = [p for p in trainable if id(p) not in lambdas]
    groups = []
    if rest:
        groups.append({"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "delora"})
    if lam:
        groups.append({"params": lam, "lr": lr if lambda_lr is None else lambda_lr, "weight_decay": 0.0,
                       "name": "delora_lambda"})
    return groups


# ---- figures ------------------------------------------------------------------------------------------
def _adapter_tensors(layer, name: str):
    """(A, B, λ, w) of adapter ``name`` of a delora_ext or PEFT layer."""
    return layer.delora_A[name], layer.delora_B[name], layer.delora_lambda[name], layer.delora_w_norm[name]


def layer_figures(model: nn.Module, adapters: str | list[str] | None = None) -> list[dict]:
    """Per DeLoRA layer and adapter: ``lambda`` (λ), ``dw_norm`` (‖ΔW‖_F), ``bound`` (|λ|·max_j w_j, which
    ‖ΔW‖_F never exceeds) and ``ratio`` (‖ΔW‖_F / bound, in [0, 1]; 0 when the bound is 0), plus ``layer`` (the
    module path) and ``adapter``. ``adapters``: default each layer's active adapters. For a paper-init adapter
    the figures are those of its trained term (A, B, λ), whose bound they state.

    ‖ΔW‖_F comes from the exact LoRA factors ΔW = B' A' (``core.folded``) as the sum of (B'ᵀB') ⊙ (A'A'ᵀ), r×r
    work instead of an out×in product; one host sync for the whole model.
    """
    wanted = [adapters] if isinstance(adapters, str) else adapters
    rows, stats = [], []
    with torch.no_grad():
        for path, layer in _delora_layers(model):
            names = list(layer.active_adapters) if wanted is None else list(wanted)
            for name in names:
                if name not in layer.delora_A:
                    continue
                if callable(getattr(layer, "resolve_w", None)) and getattr(layer, "_w_pending", None):
                    layer.resolve_w()
                A, B, lam, w = _adapter_tensors(layer, name)
                Af, Bs = core.folded([(A, B, lam, w)])
                Af, Bs = Af.double(), Bs.double()
                dw = ((Bs.t() @ Bs) * (Af @ Af.t())).sum().clamp_min(0).sqrt()
                bound = lam.detach().double().abs().reshape(()) * w.detach().double().max()
                stats.append(torch.stack([lam.detach().double().reshape(()), dw, bound]).cpu())
                rows.append({"layer": path, "adapter": name})
    if not rows:
        return []
    values = torch.stack(stats).tolist()
    for row, (lam, dw, bound) in zip(rows, values):
        row.update({"lambda": lam, "dw_norm": dw, "bound": bound, "ratio": dw / bound if bound > 0 else 0.0})
    return rows


def figures_summary(rows: list[dict], per_layer: bool = False) -> dict:
    """Flat ``delora/...`` scalars for a Trainer's logs: λ mean/min/max, ‖ΔW‖_F/bound mean/max, and the
    worst layer (highest ‖ΔW‖_F/bound: the closest to its bound) with its λ and ratio; keys carry the adapter name
    when more than one adapter is reported. ``per_layer``: also ``delora/<adapter>/<layer>/lambda`` and ``/ratio``
    for every layer."""
    out: dict = {}
    by_adapter: dict[str, list[dict]] = {}
    for row in rows:
        by_adapter.setdefault(row["adapter"], []).append(row)
    for name, rs in by_adapter.items():
        p = LOG_PREFIX if len(by_adapter) == 1 else f"{LOG_PREFIX}{name}/"
        lams = [r["lambda"] for r in rs]
        ratios = [r["ratio"] for r in rs]
        worst = max(rs, key=lambda r: r["ratio"])
        out.update({
            f"{p}lambda_mean": sum(lams) / len(lams), f"{p}lambda_min": min(lams), f"{p}lambda_max": max(lams),
            f"{p}dw_over_bound_mean": sum(ratios) / len(ratios), f"{p}dw_over_bound_max": worst["ratio"],
            f"{p}worst_layer": worst["layer"], f"{p}worst_layer_lambda": worst["lambda"],
            f"{p}worst_layer_dw_norm": worst["dw_norm"],
        })
        if per_layer:
            for r in rs:
                out[f"{LOG_PREFIX}{name}/{r['layer']}/lambda"] = r["lambda"]
                out[f"{LOG_PREFIX}{name}/{r['layer']}/ratio"] = r["ratio"]
    return out


# ---- the Trainer callback -------------------------------------------------------------------------------
def _file_bytes(directory: str, names) -> dict[str, int]:
    out = {}
    for n in names:
        path = os.path.join(directory, n)
        if os.path.isfile(path):
            out[n] = os.path.getsize(path)
    shards = [f for f in os.listdir(directory) if f.startswith("model-") and f.endswith(".safetensors")]
    for f in shards:
        out[f] = os.path.getsize(os.path.join(directory, f))
    return out


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def _make_callback_class():
    try:
        from transformers import TrainerCallback
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    except ImportError as e:
        raise ImportError(f"DeLoRACallback needs transformers: pip install transformers ({e})") from None

    from .io import save_adapter
    from .model import get_state, unwrap

    class DeLoRACallback(TrainerCallback):
        """A transformers ``TrainerCallback`` for DeLoRA training jobs.

        - On every checkpoint of a ``patch()``ed model it writes the adapters in PEFT's format into
          ``checkpoint-N/`` (``adapter_config.json`` + ``adapter_model.safetensors``, other adapters in
          subfolders), so ``delora_ext.load_adapter(model, "checkpoint-N")`` and PEFT can read it. (A PEFT model's
          checkpoints hold its adapter already: Trainer saves it.)
        - It warns once when a checkpoint also holds a full copy of the model (base weights included), and says how
          to avoid that.
        - With ``log_figures`` it adds per-layer λ and ‖ΔW‖_F / bound figures to the Trainer's training logs
          (``delora/...`` keys, see ``figures_summary``): into the ``logs`` every later callback receives and into
          ``state.log_history``. Logging integrations (TensorBoard, W&B, ...) see them when they run after this
          callback: use ``attach_callback(trainer)`` (or put it before them in ``trainer.callback_handler``).

        Args:
            save_adapter: write the adapter into each checkpoint (``patch()``ed models).
            log_figures: add the figures to each training log.
            per_layer: also log λ and the ratio of every layer (many keys on a large model).
        """

        def __init__(self, save_adapter: bool = True, log_figures: bool = True, per_layer: bool = False):
            for name, v in (("save_adapter", save_adapter), ("log_figures", log_figures), ("per_layer", per_layer)):
                if not isinstance(v, bool):
                    raise TypeError(f"`{name}` must be a bool, got {v!r}")
            self.save_adapter = save_adapter
            self.log_figures = log_figures
            self.per_layer = per_layer
            self._warned_full_copy = False

        def on_save(self, args, state, control, model=None, **kwargs):
            ckpt = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if model is None or not os.path.isdir(ckpt):
                return
            inner = unwrap(model)
            patched = get_state(inner) is not None
            sharded = any(callable(getattr(p, "full_tensor", None)) for p in inner.parameters())
            if patched and self.save_adapter and (state.is_world_process_zero or sharded):
                # FSDP2-sharded parameters are gathered by a collective: every rank takes part then
                paper = [n for n, c in get_state(inner).configs.items() if c.init_weights == "paper"]
                save_adapter(inner, ckpt, for_peft=not paper)
            if state.is_world_process_zero and not self._warned_full_copy:
                full = _file_bytes(ckpt, FULL_MODEL_FILES)
                if full:
                    self._warned_full_copy = True
                    adapter = _file_bytes(ckpt, ["adapter_model.safetensors"])
                    warnings.warn(
                        f"{ckpt} holds a full copy of the model ({', '.join(full)}: "
                        f"{_mib(sum(full.values()))}, base weights included) beside the adapter "
                        f"({_mib(sum(adapter.values())) if adapter else 'not written'}): Trainer saves the whole "
                        f"state_dict of a model that is not a peft.PeftModel, and every checkpoint will. To write "
                        f"adapter-only checkpoints, train it as a PEFT model on delora_ext's kernels: call "
                        f"delora_ext.peft.enable(), then peft.get_peft_model(model, peft.DeloraConfig(...)) (or "
                        f"pass peft_config= to TRL's SFTTrainer); resume_from_checkpoint then reloads the adapter "
                        f"alone.", UserWarning, stacklevel=2)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not self.log_figures or logs is None or model is None or "loss" not in logs:
                return
            figures = figures_summary(layer_figures(unwrap(model)), self.per_layer)
            if not figures:
                return
            # Trainer.log appended {**logs, "step": ...} to log_history before the callbacks ran
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and all(k in last for k in logs):
                last.update(figures)
            logs.update(figures)

    DeLoRACallback.__module__ = __name__
    DeLoRACallback.__qualname__ = "DeLoRACallback"
    return DeLoRACallback


_callback_class = None


def __getattr__(name: str):
    global _callback_class
    if name == "DeLoRACallback":
        if _callback_class is None:
            _callback_class = _make_callback_class()
        return _callback_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attach_callback(trainer, callback=None):
    """Put ``callback`` (default: a new ``DeLoRACallback()``) into ``trainer``'s callbacks right after
    transformers' DefaultFlowCallback, before the logging integrations, so TensorBoard, W&B and the others receive
    its figures; returns the callback. A DeLoRACallback already on the trainer is replaced."""
    cls = __getattr__("DeLoRACallback")
    if callback is None:
        callback = cls()
    if not isinstance(callback, cls):
        raise TypeError(f"`callback` must be a DeLoRACallback, got {type(callback).__name__}")
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not isinstance(getattr(handler, "callbacks", None), list):
        raise TypeError(f"`trainer` must be a transformers Trainer (with a callback_handler), got "
                        f"{type(trainer).__name__}")
    handler.callbacks[:] = [c for c in handler.callbacks if not isinstance(c, cls)]
    from transformers.trainer_callback import DefaultFlowCallback
    at = next((i + 1 for i, c in enumerate(handler.callbacks) if isinstance(c, DefaultFlowCallback)), 0)
    handler.callbacks.insert(at, callback)
    return callback
