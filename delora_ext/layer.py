"""DeLoRA layers, laid out as PEFT's: ``DeLoRALayer`` holds the per-adapter containers and their lifecycle,
``DeLoRALinear`` adds the forward and merging for a linear base layer."""
from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import core, inference, ops, quant
from .config import adapter_list, check_adapter_name, check_known, check_lambda, check_module_dropout
from .core import is_conv1d

STALE_CHOICES = ("raise", "discard", "subtract")


class MergeRecord:
    """Which weight merged adapters were written into, and its version counter then.

    The weight is held by a plain reference, not a weak one: ``torch.utils.swap_tensors`` (module conversions and
    ``load_state_dict`` under ``torch.__future__.set_swap_module_params_on_conversion(True)``) refuses a tensor
    that has a weak reference. A weight replaced while merged is so kept alive until the merge is resolved
    (``unmerge(stale=...)``); it is the one state every operation refuses until then.

    A copy of the layer (``copy.deepcopy``) records the copied weight at its own version; an unpickled layer
    (``torch.load`` of a whole model) adopts the weight it finds at the first check. A record that was stale stays
    stale in both."""

    __slots__ = ("_weight", "_version", "_stale")

    def __init__(self, weight: torch.Tensor | None, stale: bool = False):
        self._weight = weight
        self._version = weight._version if weight is not None else None
        self._stale = stale

    def stale_for(self, weight: torch.Tensor) -> bool:
        if self._stale:
            return True
        if self._weight is None:  # unpickled: the weight found now is the one loaded with it
            self._weight, self._version = weight, weight._version
            return False
        if self._weight is not weight or weight._version != self._version:
            self._stale, self._weight = True, None  # stale for good; the old weight is not kept alive for it
        return self._stale

    def _was_stale(self) -> bool:
        return self._stale or (self._weight is not None and self._weight._version != self._version)

    def __deepcopy__(self, memo):
        import copy
        if self._weight is None or self._was_stale():
            return MergeRecord(None, stale=self._stale or self._weight is not None)
        return MergeRecord(copy.deepcopy(self._weight, memo))  # the copied layer's weight (the same object in memo)

    def __reduce__(self):
        return MergeRecord, (None, self._was_stale())

_RESOLVE_LOCK = threading.RLock()


def _note_write(t: torch.Tensor, after_restore=None) -> None:
    """Tell a running model operation (``delora_ext.model.transaction``) that ``t`` is about to be written in place,
    so that it can put the old values back should the operation fail later."""
    from .model import note_write  # model imports this module
    note_write(t, after_restore)


class BufferDict(nn.Module):
    """Persistent buffers keyed by adapter name (state_dict keys ``<name>.<adapter>``), like PEFT's BufferDict."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=True)

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()


def supported_base(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class DeLoRALayer:
    """The per-adapter state of a DeLoRA layer and its lifecycle (create, delete, activate, enable), as PEFT's
    ``DeloraLayer``: subclasses add the forward and merging for their kind of base layer.

    Containers, keyed by adapter name: ``delora_A`` (r, in), ``delora_B`` (out, r), ``delora_lambda`` (1,)
    (parameters, fp32, on the base weight's device); persistent buffers ``delora_w_norm`` (in,) = the column norms
    of the base weight, in fp32, taken when the adapter is created; for the paper's init the frozen initial
    adapter ``delora_A0``/``delora_B0``/``delora_lambda0``; plain dicts ``r`` and ``module_dropout``.
    """

    # containers holding trainable adapter parameters (PEFT's adapter_layer_names)
    adapter_layer_names = ("delora_A", "delora_B", "delora_lambda")
    # the other per-adapter containers (PEFT's other_param_names); every name in both tuples is keyed by adapter
    other_param_names = ("r", "module_dropout", "delora_w_norm", "delora_A0", "delora_B0", "delora_lambda0")
    # the tensors of one adapter, in the order the ops take them, and its paper-init frozen term
    adapter_tensor_names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    frozen_tensor_names = ("delora_A0", "delora_B0", "delora_lambda0")

    def _init_adapter_state(self, base_layer: nn.Module) -> None:
        if not supported_base(base_layer):
            raise TypeError(f"`base_layer` must be an nn.Linear (or subclass) or transformers' Conv1D, "
                            f"got {type(base_layer).__name__}")
        quant.check(base_layer, "`base_layer`", w_norm_given=True)
        self.base_layer = base_layer
        if is_conv1d(base_layer):
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = BufferDict()
        self.delora_A0 = BufferDict()  # paper init: the frozen initial adapter, subtracted (see update_layer)
        self.delora_B0 = BufferDict()
        self.delora_lambda0 = BufferDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        # name -> the (A, B, λ, w) [+ paper init's frozen term] that merge added to the weight, so unmerge subtracts
        # exactly that even if the parameters changed meanwhile (an optimizer step with zero gradients, weight
        # decay, a manual edit): subtracting the new ΔW would leave ΔW_old − ΔW_new in the base weight for good.
        self._merged_terms: dict[str, list[tuple]] = {}
        # (the base weight, its version counter) when the merged adapters were last written into it: a
        # weight replaced (load_state_dict(assign=True), assignment) or rewritten (load_state_dict) since then may
        # not hold their ΔW, and unmerging would subtract it from a weight it was never added to.
        self._merge_record: MergeRecord | None = None
        self._w_pending: set[str] = set()  # adapters whose w waits for the base weight to leave the meta device
        self._load_w_keys: set[str] = set()
        self._requantized: set[str] = set()  # adapters merge(requantize=True) put into a quantised base weight
        self._requant_undo: list = []  # restores the weights a model-wide requantising merge replaced, until it ends
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models such as T5 read ``module.weight.dtype``; PEFT passes it through too)."""
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def weight_oi(self) -> torch.Tensor:
        """The base weight as (out, in) (a transposed view for Conv1D, whose weight is stored (in, out))."""
        return core.weight_oi(self.base_layer)

    @property
    def quant_kind(self) -> str | None:
        """The kind of quantised base layer (``delora_ext.quant``), None for a dense one."""
        return quant.kind(self.base_layer)

    def _base_column_norms(self) -> torch.Tensor:
        """fp32 column norms of the base weight as it is now; of the dequantised W₀ for a quantised base."""
        if self.quant_kind is not None:
            return quant.column_norms(self.base_layer, core.NORM_CHUNK_ROWS)
        return core.column_norms(self.weight_oi())

    def _check_known(self, names: Iterable[str], arg: str = "adapter_names") -> None:
        check_known(names, self.delora_A, "this layer", arg)

    # ---- adapters ----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, delora_lambda: float = 15.0, module_dropout: float = 0.0,
                     init_weights: bool | str = True, w_norm: torch.Tensor | None = None,
                     activate: bool = True) -> None:
        """Create adapter ``adapter_name`` (and make it active unless ``activate=False``).

        ``init_weights``: True (PEFT): B = 0; False: B random; ``"paper"``: A and B random and the initial update
        subtracted as a frozen second low-rank term (buffers ``delora_A0/B0/lambda0``), so W is never modified and
        the output is unchanged at step 0. ``w_norm`` (in,) overrides the column norms, required when the base
        weight is not floating point. w is taken from the unmerged base weight; on the meta device it is computed
        once the real weight arrives (first forward, merge or state_dict load), never guessed.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.delora_A:
            raise ValueError(f"`adapter_name`: adapter {adapter_name!r} already exists in this layer")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        lam = check_lambda(delora_lambda)
        p = check_module_dropout(module_dropout)
        if init_weights not in (True, False, "paper"):
            raise ValueError(f"`init_weights` must be True, False or 'paper', got {init_weights!r}")
        if self.merged_adapters and w_norm is None:  # w is taken from the weight minus the merged ΔW
            self._check_merge_record("add an adapter to")
        weight = self.base_layer.weight
        dev = weight.device
        quantized = self.quant_kind is not None
        if w_norm is not None:
            w_norm = torch.as_tensor(w_norm)
            if w_norm.shape != (self.in_features,) or not w_norm.is_floating_point():
                raise ValueError(f"`w_norm` must be a floating tensor of shape ({self.in_features},), "
                                 f"got {w_norm.dtype} {tuple(w_norm.shape)}")
            if w_norm.is_meta:
                raise ValueError("`w_norm` is on the meta device; it must hold the column norms' values")
            if not bool(torch.isfinite(w_norm).all()):
                raise ValueError("`w_norm` has non-finite values (NaN or ±Inf); column norms are finite")
            w = w_norm.detach().to(device=dev, dtype=torch.float32).clone()
        elif quantized and dev.type != "meta":
            w = self._column_norms_unmerged()
        elif not weight.is_floating_point() and not quantized:
            raise TypeError(f"`base_layer.weight` must be floating point to compute DeLoRA's column norms w "
                            f"(got dtype {weight.dtype}); pass `w_norm` (the pretrained weight's column norms)")
        elif dev.type == "meta":
            w = torch.empty(self.in_features, device=dev, dtype=torch.float32)
        else:
            w = self._column_norms_unmerged()
        A = torch.empty(r, self.in_features, device=dev, dtype=torch.float32)
        B = torch.empty(self.out_features, r, device=dev, dtype=torch.float32)
        if dev.type != "meta":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if init_weights is True:
                nn.init.zeros_(B)
            else:
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.r[adapter_name] = r
        self.module_dropout[adapter_name] = p
        self.delora_A[adapter_name] = nn.Parameter(A)
        self.delora_B[adapter_name] = nn.Parameter(B)
        self.delora_lambda[adapter_name] = nn.Parameter(torch.full((1,), lam, device=dev, dtype=torch.float32))
        self.delora_w_norm[adapter_name] = w
        if init_weights == "paper":
            self.delora_A0[adapter_name] = A.detach().clone()
            self.delora_B0[adapter_name] = B.detach().clone()
            self.delora_lambda0[adapter_name] = torch.full((1,), lam, device=dev, dtype=torch.float32)
        if w_norm is None and dev.type == "meta":
            self._w_pending.add(adapter_name)
        if activate and adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def _column_norms_unmerged(self) -> torch.Tensor:
        """fp32 column norms of the pretrained weight: the current weight minus whatever is merged into it."""
        with torch.no_grad():
            if not self.merged_adapters:
                return self._base_column_norms()
            W = quant.dequantize(self.base_layer) if self.quant_kind is not None else self.weight_oi()
            unmerged = W.detach().to(torch.float32).clone()
            self._apply_delta(unmerged, list(self.merged_adapters), -1.0, merged=True)
            return core.column_norms(unmerged)

    def resolve_w(self) -> None:
        """Compute w for adapters created while the base weight was on the meta device."""
        if not self._w_pending:
            return
        with _RESOLVE_LOCK:  # two threads running the first forward: one computes, the other sees it done
            if not self._w_pending:
                return
            weight = self.base_layer.weight
            if weight.device.type == "meta":
                raise RuntimeError("DeLoRALinear: the base weight is still on the meta device; load the real "
                                   "weights (or an adapter file carrying delora_w_norm) before running or merging")
            w = self._base_column_norms()
            for name in sorted(self._w_pending):
                for store in self._stores(self.adapter_layer_names):
                    if store[name].device.type == "meta":
                        raise RuntimeError(f"DeLoRALinear: adapter {name!r} parameters are still on the meta device")
                self.delora_w_norm[name] = w.to(weight.device).clone()
            self._w_pending.clear()

    @staticmethod
    def _after_load(module: DeLoRALayer, incompatible_keys) -> None:
        # A state_dict that carries delora_w_norm settles w; otherwise compute it once the real weight is here.
        module._w_pending -= module._load_w_keys
        module._load_w_keys = set()
        # Only once the adapter parameters are real too: base weights loaded first (assign=True) must not fail
        # the load; w stays pending until the adapter arrives (or resolve_w raises at the first forward/merge).
        if module._w_pending and module.base_layer.weight.device.type != "meta" and not any(
                store[n].device.type == "meta" for n in module._w_pending
                for store in module._stores(module.adapter_layer_names)):
            module.resolve_w()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_w_keys = {n for n in self.delora_w_norm.keys() if f"{prefix}delora_w_norm.{n}" in state_dict}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _stores(self, names: Iterable[str]) -> list:
        return [getattr(self, n) for n in names]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. A merged adapter is refused (unmerge it first), as PEFT's model-level delete_adapter.
        If it was the only active adapter, the first remaining one (sorted by name) becomes active, with a warning,
        as PEFT's layer."""
        self._check_known([adapter_name], "adapter_name")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) [{adapter_name!r}] while they are merged. "
                             f"Please unmerge them first.")
        was_active = adapter_name in self.active_adapters
        self._drop_adapter(adapter_name)
        if was_active and not self.active_adapters and len(self.delora_A):
            first = sorted(self.delora_A.keys())[0]
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                          f"{first}.", stacklevel=2)
            self.set_adapter(first)

    def _drop_adapter(self, adapter_name: str) -> None:
        for store in self._stores(self.adapter_layer_names + self.other_param_names):
            if adapter_name in store:
                del store[adapter_name]
        self._w_pending.discard(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` the active adapters (several are summed); as PEFT's layer, their parameters then
        require grad and every other adapter's do not."""
        names = adapter_list(adapter_names)
        self._check_known(names)
        for store in self._stores(self.adapter_layer_names):
            for n in store.keys():
                store[n].requires_grad_(n in names)
        self.active_adapters = names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """As PEFT's: a DeLoRA adapter is exactly a LoRA adapter (rank r, or 2r for the paper's init); see
        ``delora_ext.export_lora``."""
        return True

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters on or off (off: the output is the base layer's; merged adapters are unmerged). As
        PEFT's, it sets the adapters' requires_grad: off freezes them all, on makes the active ones train."""
        if not enabled and self.merged:
            self.unmerge()
        active = set(self.active_adapters) if enabled else ()
        for store in (self.delora_A, self.delora_B, self.delora_lambda):
            for n, p in store.items():
                p.requires_grad_(n in active)
        self._disable_adapters = not enabled

    def _params(self, name: str):
        """(A, B, λ, w) of adapter ``name``."""
        return tuple(getattr(self, k)[name] for k in self.adapter_tensor_names)

    def _params0(self, name: str):
        """The frozen initial adapter of a paper-init adapter, (A₀, B₀, λ₀, w)."""
        return tuple(getattr(self, k)[name] for k in self.frozen_tensor_names) + (self.delora_w_norm[name],)

    def _terms(self, name: str) -> list[tuple]:
        """(A, B, λ, w) of ``name`` and, for paper init, its frozen initial term (subtracted)."""
        return [self._params(name)] + ([self._params0(name)] if name in self.delora_A0 else [])

    def _check_finite(self, names: list[str], action: str) -> None:
        """Refuse to ``action`` (merge/unmerge) adapters with a non-finite parameter: one NaN/Inf in A, B, λ or w
        would turn a whole row or column of the base weight into NaN for good (unmerge cannot undo it).
        One host sync for all of them; merging is not on the training path. An unmerge subtracts what merge
        added (``_merged_terms``, checked then), so only adapters without that record are checked for it."""
        if action == "unmerge":
            self._check_unmergeable(names)
            names = [n for n in names if n not in self._merged_terms]
        keys = self.adapter_tensor_names + self.frozen_tensor_names
        named = [(f"{k}[{n!r}]", getattr(self, k)[n]) for n in names for k in keys if n in getattr(self, k)]
        if not named:
            return
        with torch.no_grad():
            # One flag for all of them (3 kernels and one sync on a GPU); per tensor only to name a bad one.
            if bool(torch.isfinite(torch.cat([t.detach().reshape(-1) for _, t in named])).all()):
                return
            flags = [bool(torch.isfinite(t).all()) for _, t in named]
        bad = [label for (label, _), ok in zip(named, flags) if not ok]
        if bad:
            hint = (" (w holds the base weight's column norms: the base weight has non-finite columns)"
                    if any(b.startswith("delora_w_norm") for b in bad) else "")
            raise ValueError(f"cannot {action}: {', '.join(bad)} has non-finite values{hint}; "
                             f"the base weight was left unchanged")

    def _check_unmergeable(self, names: list[str]) -> None:
        """Refuse to unmerge what ``merge(requantize=True)`` put into a quantised weight: requantising rounded
        W₀ + ΔW, so subtracting ΔW would not give W₀ back."""
        requantized = [n for n in names if n in self._requantized]
        if requantized:
            raise ValueError(f"cannot unmerge adapter(s) {requantized}: merge(requantize=True) requantised "
                             f"W₀ + ΔW into the {quant.describe(self.base_layer)} base, which rounded it, so W₀ "
                             f"cannot be recovered; reload the base model to undo the merge (merge_and_unload"
                             f"(model) keeps the requantised layers)")

    def _apply_delta(self, W: torch.Tensor, names: list[str], alpha: float, merged: bool = False) -> None:
        """W += alpha · Σ (ΔW − ΔW₀) over ``names`` in place, for the (out, in) view W, in one pass (one rounding
        per element, also for several adapters and paper init's frozen term). ``merged``: the terms merge
        recorded for these adapters (the current parameters for one without a record)."""
        terms, alphas = [], []
        for name in names:
            ts = self._merged_terms.get(name) if merged else None
            for i, term in enumerate(ts if ts is not None else self._terms(name)):  # [adapter, frozen term]
                terms.append(term)
                alphas.append(alpha if i == 0 else -alpha)
        core.apply_delta(W, terms, alphas)

    def get_delta_weight(self, adapter: str = "default") -> torch.Tensor:
        """ΔW of ``adapter`` (minus its frozen initial update for paper init): (out, in), fp32."""
        if adapter not in self.delora_A:
            raise ValueError(f"Adapter {adapter} not found.")
        if self._w_pending:
            self.resolve_w()
        terms = self._terms(adapter)
        return core.delta_weight(terms, [1.0, -1.0][:len(terms)])


def requantize_message(stats: list[dict], paths: list[str] | None = None) -> str:
    """The warning a requantising merge gives: the measured rounding error of the requantised W₀ + ΔW."""
    rel = [s["fro"] / s["target_fro"] if s["target_fro"] else 0.0 for s in stats]
    vs_delta = [s["fro"] / s["delta_fro"] if s["delta_fro"] else math.inf for s in stats]
    worst = max(range(len(stats)), key=lambda i: rel[i])
    where = f" (worst: {paths[worst]!r}, {stats[worst]['layer']})" if paths else f" ({stats[worst]['layer']})"
    many = f"{len(stats)} layers; " if len(stats) > 1 else ""
    return (f"merge(requantize=True) requantised W₀ + ΔW into the quantised base weight, which rounds it: "
            f"{many}rounding error ‖requantised − (W₀ + ΔW)‖_F / ‖W₀ + ΔW‖_F = {rel[worst]:.3e}, "
            f"{vs_delta[worst]:.3g}× ‖ΔW‖_F, max |error| {max(s['max_abs'] for s in stats):.3e}{where}. "
            f"The merged model's outputs differ from the adapter's by this rounding, and the merge cannot be "
            f"unmerged; merge_and_unload(model, dtype=...) keeps W₀ + ΔW exactly in a dense layer instead.")


class DeLoRALinear(DeLoRALayer, nn.Module):
    """A frozen ``nn.Linear`` plus DeLoRA adapters: y = x Wᵀ + b + Σ_active ((x_d ⊙ w) Aᵀ ⊙ s) Bᵀ.

    Args:
        base_layer: the ``nn.Linear`` (or subclass) or transformers ``Conv1D`` to adapt; its parameters are frozen.
        r: rank (> 0).
        delora_lambda: initial λ, the bound on ‖ΔW‖_F / max_j w_j (default 15, as PEFT).
        module_dropout: dropout probability on the adapter input during training (PEFT's ``module_dropout``).
        init_weights: True (PEFT's default): A kaiming-uniform, B = 0, so the output equals the base output;
            False: B kaiming-uniform too; ``"paper"``: the paper's init (see ``update_layer``).
        adapter_name: key of the adapter in the containers (state_dict keys ``delora_A.<adapter_name>``, ...).
        w_norm: (in,) column norms to use instead of the base weight's.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, delora_lambda: float = 15.0, module_dropout: float = 0.0,
                 init_weights: bool | str = True, adapter_name: str = "default",
                 w_norm: torch.Tensor | None = None) -> None:
        nn.Module.__init__(self)
        flags = [(p, p.requires_grad) for p in base_layer.parameters()]
        try:
            self._init_adapter_state(base_layer)  # freezes the base layer
            self.register_load_state_dict_post_hook(DeLoRALayer._after_load)
            self.update_layer(adapter_name, r, delora_lambda, module_dropout, init_weights, w_norm=w_norm)
        except BaseException:  # a refused argument leaves the user's base layer as it was
            for p, flag in flags:
                p.requires_grad_(flag)
            raise

    # ---- forward -----------------------------------------------------------------------------------
    # Cached folded factors (delora_ext.inference): the forward when no graph is recorded, and paper init's frozen
    # term in training. False: always the native ops.
    inference_cache = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Containers and the base weight are read through _modules / _parameters: nn.Module.__getattr__ and
        # ParameterDict lookups were most of the host time of a small-batch forward.
        m = self._modules
        base = m["base_layer"]
        try:
            bad_shape = x.shape[-1] != self.in_features
        except IndexError:  # a 0-dim x
            bad_shape = True
        if bad_shape:
            raise ValueError(f"DeLoRALinear: `x` must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        fused = False
        operands = core.linear_operands(base)  # (W, bias) when the fused op may stand in for base's forward
        if operands is not None:
            W = operands[0]
            if not (x.is_cpu and W.is_cpu) and x.device != W.device:  # a wrapped forward may move W itself
                raise RuntimeError(f"DeLoRALinear: `x` is on {x.device} but the layer's weight is on {W.device}")
            fused = not args and not kwargs and W.is_floating_point()
        if self._disable_adapters:
            if self.merged_adapters:  # as PEFT: a disabled layer computes as its base, so a merge is taken back
                with _RESOLVE_LOCK:  # once: a second thread's forward waits, then finds it unmerged
                    if self.merged_adapters:
                        self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged_adapters:
            return base(x, *args, **kwargs)
        plan = inference.active_plan(self)
        if plan is not None:
            if self._w_pending:
                self.resolve_w()
            return inference.mixed_forward(self, plan, x, operands if fused else None, args, kwargs)
        known = m["delora_A"]._parameters
        names = self.active_adapters
        if len(names) != 1 or names[0] not in known:
            names = [n for n in names if n in known]
        if not names:
            return base(x, *args, **kwargs)
        if known[names[0]].is_meta and not x.is_meta:
            raise RuntimeError(
                f"DeLoRALinear: adapter {names[0]!r} has its tensors on the meta device but `x` is on {x.device}. "
                f"If the model was offloaded with accelerate (cpu_offload, disk_offload, a device_map with offloading), "
                f"pass preload_module_classes=['DeLoRALinear'] so each layer's adapter tensors are loaded with it "
                f"(they live in ParameterDicts, which are never called, so their own offload hooks never run)")
        if self._w_pending:
            self.resolve_w()
        if (not torch.is_grad_enabled() and inference.cache_applies(x) and self.inference_cache
                and not (self.training and any(self.module_dropout[n] > 0.0 for n in names))):
            y = inference.cached_forward(self, x, names, operands if fused else None, args, kwargs)
            if y is not None:
                return y
        if fused:
            frozen = m["delora_A0"]._buffers
            if not frozen and len(names) == 1:  # the usual case, one op call and no term list built
                n = names[0]
                return ops.linear(x, W, operands[1], known[n], m["delora_B"]._parameters[n],
                                  m["delora_lambda"]._parameters[n],
                                  m["delora_w_norm"]._buffers[n], self.module_dropout[n] if self.training else 0.0)
            if frozen and self.inference_cache and inference.frozen_terms_apply(x):
                paper = [n for n in names if n in frozen]
                if paper:
                    y = core.fused_forward(base, x, self._forward_terms(names, with_frozen=False))
                    return inference.add_frozen_terms(self, y, x, paper)
            return core.fused_forward(base, x, self._forward_terms(names))
        return core.forward(base, x, self._forward_terms(names), *args, **kwargs)

    def _forward_terms(self, names: list[str], with_frozen: bool = True) -> list[core.Term]:
        """The terms the forward adds for ``names``: each adapter with its dropout (in training), and (unless
        ``with_frozen=False``) a paper-init adapter's frozen initial update with −λ₀. That one stands for a change of W
        (the paper's W ← W₀ − ΔW₀), so it sees no dropout and carries no gradient."""
        m = self._modules
        pA, pB, pL = m["delora_A"]._parameters, m["delora_B"]._parameters, m["delora_lambda"]._parameters
        bw, frozen = m["delora_w_norm"]._buffers, m["delora_A0"]._buffers
        dropout = self.module_dropout if self.training else None
        terms = []
        for name in names:
            w = bw[name]
            terms.append((pA[name], pB[name], pL[name], w, dropout[name] if dropout is not None else 0.0))
            if with_frozen and name in frozen:
                terms.append((frozen[name], m["delora_B0"]._buffers[name], -m["delora_lambda0"]._buffers[name], w,
                              0.0))
        return terms

    def clear_inference_cache(self) -> None:
        """Drop the cached folded factors (needed only after writing adapter tensors through ``.data``)."""
        inference.clear_inference_cache(self)

    # ---- merge -------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None, requantize=False) -> None:
        """Add the adapters' ΔW to the base weight in place (default: the active adapters).

        Adapters with a non-finite A, B, λ or w are refused before anything is written. ``safe_merge=True``
        merges into a copy first and raises if the result is not finite (overflow in the weight's dtype),
        leaving the weight untouched (costs one out×in temporary, as PEFT's). Adapters already merged are
        skipped with a warning.

        A quantised base layer (bitsandbytes, torchao) is refused unless ``requantize``: True (or, for torchao,
        the config to requantise with) dequantises W₀, adds ΔW in fp32 and requantises in place, with a warning
        giving the measured rounding error. That merge cannot be unmerged. ``merge_and_unload(model, dtype=...)``
        gives dense layers holding W₀ + ΔW instead.
        """
        names, checked = self._merge_plan(safe_merge, adapter_names, keep_checked=True, requantize=requantize)
        stats = self._merge_commit(names, checked, requantize=requantize)
        self._requant_undo = []
        if stats is not None:
            warnings.warn(requantize_message([stats]), stacklevel=2)

    def _merge_plan(self, safe_merge: bool, adapter_names: list[str] | None,
                    keep_checked: bool = False, requantize=False) -> tuple[list[str], torch.Tensor | None]:
        """Every check of ``merge``, nothing written: (the adapters to merge, the checked merged copy or None).
        With ``safe_merge`` it merges into a temporary copy and checks that; ``keep_checked`` returns the copy for
        ``_merge_commit`` to write. A model-wide merge drops it (one temporary per layer at a time) and the commit
        recomputes the same deterministic result in place."""
        if adapter_names is None:  # the model's active adapters, which this layer may not all have (as PEFT)
            names = [n for n in self.active_adapters if n in self.delora_A]
        else:
            names = adapter_list(adapter_names)
            self._check_known(names)
        if self.merged_adapters:
            self._check_merge_record("merge more adapters into")
        names = [n for n in names if n not in self.merged_adapters]
        if self.merged_adapters:  # PEFT's check_adapters_to_merge, word for word
            if names:
                warnings.warn(f"Already following adapters were merged {','.join(self.merged_adapters)}. "
                              f"You are now additionally merging {','.join(names)}.", stacklevel=2)
            else:
                warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        if not names:
            return names, None
        if self.quant_kind is not None:
            return names, self._quantized_plan(names, safe_merge, keep_checked, requantize)
        weight = self.base_layer.weight
        if not weight.is_floating_point():
            raise TypeError(f"cannot merge into a base weight of dtype {weight.dtype}; merging needs a floating "
                            f"point weight")
        if self._w_pending:
            self.resolve_w()
        try:
            self._check_finite(names, "merge")
        except ValueError as e:
            if not safe_merge:
                raise
            raise ValueError(f"NaNs detected in the merged weights ({e}). The adapter(s) "
                             f"{', '.join(map(repr, names))} seem to be broken") from None
        if safe_merge:
            with torch.no_grad():
                new = self.weight_oi().detach().clone()
                self._apply_delta(new, names, 1.0)
                if not bool(torch.isfinite(new).all()):
                    which = ", ".join(repr(n) for n in names)
                    why = ("the base weight already had non-finite values"
                           if not bool(torch.isfinite(self.weight_oi()).all())
                           else f"ΔW of adapter(s) {which} overflows {new.dtype} when added")
                    raise ValueError(f"NaNs detected in the merged weights ({why}). The adapter(s) {which} seem to "
                                     f"be broken; the base weight was left unchanged")
                return names, (new if keep_checked else None)
        return names, None

    def _quantized_plan(self, names: list[str], safe_merge: bool, keep_checked: bool, requantize):
        if self._disable_adapters and requantize not in (None, False):
            raise ValueError("cannot merge(requantize=True) into a disabled layer: a disabled layer computes as its "
                             "base, so its forward takes a merge back, and a requantised merge cannot be unmerged; "
                             "enable the adapters first")
        if requantize is None or requantize is False:
            raise TypeError(f"cannot merge into a quantised base layer ({quant.describe(self.base_layer)}) in "
                            f"place: its weight would have to be requantised, which rounds W₀ + ΔW. Use "
                            f"merge_and_unload(model, dtype=torch.bfloat16) (or another dtype) for dense layers "
                            f"holding the dequantised W₀ + ΔW, or merge(..., requantize=True) to requantise "
                            f"(not unmergeable)")
        quant.check_requantize(self.base_layer, requantize)
        if self._w_pending:
            self.resolve_w()
        self._check_finite(names, "merge")
        if not safe_merge:
            return None
        target = self._quantized_target(names)
        if not bool(torch.isfinite(target).all()):
            raise ValueError(f"NaNs detected in the merged weights (W₀ + ΔW of adapter(s) "
                             f"{', '.join(map(repr, names))} is not finite); the base weight was left unchanged")
        return target if keep_checked else None

    def _quantized_target(self, names: list[str]) -> torch.Tensor:
        """W₀ + ΔW of ``names`` in fp32: the dequantised base weight (one full fp32 copy) plus ΔW in one pass."""
        with torch.no_grad():
            W = quant.dequantize(self.base_layer, torch.float32)
            self._apply_delta(W, names, 1.0)
            return W

    def _signed_terms(self, names: list[str]) -> tuple[list[tuple], list[float]]:
        """The (A, B, λ, w) terms of ``names`` with their signs: +1, and −1 for a paper-init frozen term."""
        terms, alphas = [], []
        for name in names:
            for i, term in enumerate(self._terms(name)):
                terms.append(term)
                alphas.append(1.0 if i == 0 else -1.0)
        return terms, alphas

    def _delta_fro(self, names: list[str]) -> float:
        """‖Σ ΔW‖_F of ``names`` from the folded factors, ‖B'A'‖²_F = tr((B'ᵀB')(A'A'ᵀ)), without forming ΔW."""
        A, B = (t.double() for t in core.folded(*self._signed_terms(names)))
        return math.sqrt(max(float(((B.t() @ B) * (A @ A.t())).sum()), 0.0))

    def _merge_quantized(self, names: list[str], target: torch.Tensor | None, requantize) -> dict:
        with torch.no_grad():
            target = self._quantized_target(names) if target is None else target
            install = quant.requantize(self.base_layer, target, config=requantize)
            undo = install()
            try:
                stats = quant.rounding_error(self.base_layer, target, core.NORM_CHUNK_ROWS)
                stats.update(delta_fro=self._delta_fro(names), layer=quant.describe(self.base_layer))
            except BaseException:
                undo()
                raise
        self._requant_undo.append((undo, list(names)))
        self._requantized.update(names)
        return stats

    def _rollback_merge(self, names: list[str]) -> None:
        """Undo a merge that a model-wide merge committed before a later layer failed: put back the quantised
        weight a requantising merge replaced (exactly), or unmerge a dense one."""
        if not self._requant_undo:
            self.unmerge(names)
            return
        for undo, done in reversed(self._requant_undo):
            undo()
            for n in done:
                self.merged_adapters.remove(n)
                self._merged_terms.pop(n, None)
                self._requantized.discard(n)
        self._requant_undo = []
        self._resync_merge_record()

    def _merge_commit(self, names: list[str], checked: torch.Tensor | None = None, requantize=False):
        """Write the merge ``_merge_plan`` checked; for a quantised base, the rounding error it measured."""
        if names and self.quant_kind is not None:
            stats = self._merge_quantized(names, checked, requantize)
            for n in names:
                self._merged_terms[n] = [tuple(t.detach().clone() for t in term) for term in self._terms(n)]
            self.merged_adapters.extend(names)
            self._resync_merge_record()
            return stats
        if names:
            _note_write(self.base_layer.weight, self._resync_merge_record)
            with torch.no_grad():
                if checked is not None:
                    self.weight_oi().copy_(checked)
                else:
                    self._apply_delta(self.weight_oi(), names, 1.0)
                for n in names:  # what was added, for unmerge
                    self._merged_terms[n] = [tuple(t.detach().clone() for t in term) for term in self._terms(n)]
        self.merged_adapters.extend(names)
        self._resync_merge_record()
        return None

    def __getstate__(self):
        # pickling and deepcopy: check the record against the layer's current weight first, which marks it stale
        # for good if the weight was replaced (the record alone cannot see that); its copies then are stale too
        self._merge_record_stale()
        return super().__getstate__()

    def _apply(self, fn, recurse=True):
        """Module conversions (``to``, ``double``, ``cuda``, ...) convert the merged weight, they do not rewrite it:
        the merge record follows the converted weight (a new Parameter where torch overwrites or swaps parameters
        on conversion), and a record already stale stays stale."""
        if self._merge_record is None or not recurse:
            return super()._apply(fn, recurse)
        stale = self._merge_record_stale()
        try:
            return super()._apply(fn, recurse)
        finally:
            self._merge_record = MergeRecord(None, stale=True) if stale else MergeRecord(self.base_layer.weight)

    def _resync_merge_record(self) -> None:
        """Record the weight the merged adapters are now in (after a merge or unmerge wrote it, or a failed model
        operation restored it)."""
        self._merge_record = MergeRecord(self.base_layer.weight) if self.merged_adapters else None

    def _merge_record_stale(self) -> bool:
        rec = self._merge_record
        if not self.merged_adapters or rec is None:
            return False
        return rec.stale_for(self.base_layer.weight)

    def _check_merge_record(self, action: str) -> None:
        if self._merge_record_stale():
            raise ValueError(
                f"cannot {action} this layer: its base weight was replaced or rewritten (load_state_dict, assignment, "
                f"an in-place edit) after adapters {self.merged_adapters} were merged into it, so it is unknown "
                f"whether it still holds their ΔW. unmerge(stale='discard') forgets the merge and keeps the weight as "
                f"it is (it holds the pretrained values); unmerge(stale='subtract') subtracts the merged ΔW from it "
                f"(it holds merged values, e.g. a state_dict saved while merged)")

    def unmerge(self, adapter_names: list[str] | None = None, stale: str = "raise") -> None:
        """Subtract merged adapters' ΔW from the base weight (default: all, in reverse merge order).

        ``stale``: what to do when the base weight was replaced or rewritten since the merge (load_state_dict,
        assignment): "raise" (default) refuses; "discard" forgets the merge and leaves the weight as it is;
        "subtract" subtracts the merged ΔW from it anyway.
        """
        if stale not in STALE_CHOICES:
            raise ValueError(f"`stale` must be one of {STALE_CHOICES}, got {stale!r}")
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if adapter_names is None:
            names = list(reversed(self.merged_adapters))
        else:
            wanted = adapter_list(adapter_names)
            self._check_known(wanted)
            names = [n for n in reversed(self.merged_adapters) if n in wanted]
        was_stale = self._merge_record_stale()
        if stale == "raise":
            self._check_merge_record("unmerge")
        elif stale == "discard" and was_stale:
            names_left = [n for n in self.merged_adapters if n not in names]
            if names_left:
                raise ValueError(f"`stale`='discard' forgets every merged adapter of a layer at once; "
                                 f"{names_left} would stay merged")
            self.merged_adapters.clear()
            self._merged_terms.clear()
            self._merge_record = None
            return
        self._check_finite(names, "unmerge")
        if names:  # a failed model operation that restores a stale weight leaves it stale
            _note_write(self.base_layer.weight, None if was_stale else self._resync_merge_record)
            with torch.no_grad():
                self._apply_delta(self.weight_oi(), names, -1.0, merged=True)
        for n in names:
            self.merged_adapters.remove(n)
            self._merged_terms.pop(n, None)
        self._resync_merge_record()

    def _merged_dense(self, dtype: torch.dtype, adapter_names: list[str] | None = None,
                      safe_merge: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` of ``dtype`` holding the dequantised base weight plus ΔW of the adapters to merge
        (default: the active ones; those merged already are in the weight), for ``merge_and_unload(dtype=...)``.
        Built a block of rows at a time in fp32 and cast once; this layer is not changed."""
        if adapter_names is None:  # the model's active adapters, which this layer may not all have
            names = [n for n in self.active_adapters if n in self.delora_A]
        else:
            names = adapter_list(adapter_names)
            self._check_known(names)
        names = [n for n in names if n not in self.merged_adapters]
        if names and self._w_pending:
            self.resolve_w()
        self._check_finite(names, "merge")
        terms, alphas = self._signed_terms(names)
        base = self.base_layer
        with torch.no_grad():
            A, B = core.folded(terms, alphas) if terms else (None, None)
            W = None
            for r0, chunk in quant.row_chunks(base, core.NORM_CHUNK_ROWS):
                rows = chunk.to(torch.float32 if A is None else A.dtype)  # fp64 adapters: fp64 (model.double())
                if A is not None:
                    rows = torch.addmm(rows, B[r0:r0 + rows.shape[0]].to(rows.device), A.to(rows.device))
                if W is None:
                    W = torch.empty(self.out_features, self.in_features, dtype=dtype, device=rows.device)
                W[r0:r0 + rows.shape[0]] = rows
            if safe_merge and not bool(torch.isfinite(W).all()):
                raise ValueError(f"NaNs detected in the merged weights (W₀ + ΔW of adapter(s) "
                                 f"{', '.join(map(repr, names))} is not finite in {dtype}); the model was left "
                                 f"unchanged")
            with torch.device("meta"):
                dense = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
            dense.weight = nn.Parameter(W, requires_grad=False)
            if base.bias is not None:
                dense.bias = nn.Parameter(base.bias.detach().to(device=W.device, dtype=dtype).clone(),
                                          requires_grad=False)
        dense.train(base.training)
        return dense

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.r[n]}, dropout={self.module_dropout[n]}"
                        f"{', paper init' if n in self.delora_A0 else ''})" for n in self.delora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ads}], "
                f"active={self.active_adapters}, merged={self.merged_adapters}, "
                f"disabled={self._disable_adapters}")
