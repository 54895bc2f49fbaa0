"""``DeLoRALinear``: an ``nn.Linear`` with one or more DeLoRA adapters, laid out as PEFT's ``DeloraLinear``."""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from . import ops
from . import reference as ref

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


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


def _check_lambda(value, name: str = "delora_lambda") -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {v}")
    return v


class DeLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus DeLoRA adapters: y = x Wᵀ + b + Σ_active ((x_d ⊙ w) Aᵀ ⊙ s) Bᵀ.

    Args:
        base_layer: the ``nn.Linear`` (or subclass) to adapt; its parameters are frozen.
        r: rank (> 0).
        delora_lambda: initial λ, the bound on ‖ΔW‖_F / max_j w_j (default 15, as PEFT).
        module_dropout: dropout probability on the adapter input during training (PEFT's ``module_dropout``).
        init_weights: True (PEFT's default): A kaiming-uniform, B = 0, so the output equals the base output;
            False: B kaiming-uniform too.
        adapter_name: key of the adapter in the containers (state_dict keys ``delora_A.<adapter_name>``, ...).

    Parameters (per adapter, fp32, on the base weight's device): ``delora_A[name]`` (r, in),
    ``delora_B[name]`` (out, r), ``delora_lambda[name]`` (1,); persistent buffer ``delora_w_norm[name]`` (in,)
    = column norms of the base weight, computed in fp32 when the adapter is created.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, delora_lambda: float = 15.0, module_dropout: float = 0.0,
                 init_weights: bool = True, adapter_name: str = "default") -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"`base_layer` must be an nn.Linear (or subclass), got {type(base_layer).__name__}")
        if not base_layer.weight.is_floating_point():
            raise TypeError(f"`base_layer.weight` must be floating point to compute DeLoRA's column norms w, "
                            f"got dtype {base_layer.weight.dtype}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        self.delora_A = nn.ParameterDict()
        self.delora_B = nn.ParameterDict()
        self.delora_lambda = nn.ParameterDict()
        self.delora_w_norm = BufferDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.update_layer(adapter_name, r, delora_lambda, module_dropout, init_weights)

    # ---- adapters ----------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, r: int, delora_lambda: float = 15.0, module_dropout: float = 0.0,
                     init_weights: bool = True) -> None:
        """Create adapter ``adapter_name`` and make it active. w is taken from the unmerged base weight."""
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"`adapter_name` must be a non-empty string, got {adapter_name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r!r}")
        lam = _check_lambda(delora_lambda)
        p = float(module_dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"`module_dropout` must be in [0, 1), got {module_dropout!r}")
        weight = self.base_layer.weight
        dev = weight.device
        A = torch.empty(r, self.in_features, device=dev, dtype=torch.float32)
        B = torch.empty(self.out_features, r, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(B)
        else:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        with torch.no_grad():
            w = ref.column_norms_ref(weight)
            if self.merged_adapters and dev.type != "meta":
                # Take w from the pretrained weight, not one that already carries merged adapters.
                unmerged = weight.detach().to(torch.float32).clone()
                for name in self.merged_adapters:
                    unmerged -= self.get_delta_weight(name).to(torch.float32)
                w = ref.column_norms_ref(unmerged)
        self.r[adapter_name] = r
        self.module_dropout[adapter_name] = p
        self.delora_A[adapter_name] = nn.Parameter(A)
        self.delora_B[adapter_name] = nn.Parameter(B)
        self.delora_lambda[adapter_name] = nn.Parameter(torch.full((1,), lam, device=dev, dtype=torch.float32))
        self.delora_w_norm[adapter_name] = w
        if adapter_name not in self.active_adapters:
            self.active_adapters.append(adapter_name)

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make ``adapter_names`` the active adapters (several are summed)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for n in names:
            if n not in self.delora_A:
                raise ValueError(f"`adapter_names`: unknown adapter {n!r}; this layer has {list(self.delora_A)}")
        self.active_adapters = names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the adapters on or off (off: the output is the base layer's; merged adapters are unmerged)."""
        if not enabled and self.merged:
            self.unmerge()
        self._disable_adapters = not enabled

    def _params(self, name: str):
        return (self.delora_A[name], self.delora_B[name], self.delora_lambda[name], self.delora_w_norm[name])

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if x.shape[-1] != self.in_features:
            raise ValueError(f"DeLoRALinear: `x` must have last dimension in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        if x.device != base.weight.device:
            raise RuntimeError(f"DeLoRALinear: `x` is on {x.device} but the layer's weight is on {base.weight.device}")
        if self._disable_adapters or self.merged:
            return base(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.delora_A]
        if not names:
            return base(x, *args, **kwargs)
        native = ops.has_kernel(x.device)
        if not native:
            _warn_once(f"ref-{x.device.type}", f"delora_ext: no native kernel for {x.device.type} tensors "
                       f"({ops.native_error or 'not enabled for this device'}); using the PyTorch reference")
        plain = type(base).forward is nn.Linear.forward and not args and not kwargs
        y = None
        for i, name in enumerate(names):
            A, B, lam, w = self._params(name)
            p = self.module_dropout[name] if self.training else 0.0
            if native and i == 0 and plain:
                y = ops.linear(x, base.weight, base.bias, A, B, lam, w, p)
                continue
            if y is None:
                y = base(x, *args, **kwargs)
            if native:
                y = y + ops.adapter(x, A, B, lam, w, p).to(y.dtype)
            else:
                x_d = nn.functional.dropout(x, p) if p > 0 else x
                y = y + ref.adapter_ref(x_d, A, B, lam, w).to(y.dtype)
        return y

    # ---- merge -------------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str = "default") -> torch.Tensor:
        """ΔW of ``adapter``: (out, in), fp32."""
        if adapter not in self.delora_A:
            raise ValueError(f"Adapter {adapter} not found.")
        with torch.no_grad():
            return ops.delta_weight(*self._params(adapter))

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' ΔW to the base weight in place (default: the active adapters).

        ``safe_merge=True`` merges into a copy first and raises if the result is not finite, leaving the weight
        untouched (costs one out×in temporary, as PEFT's). Adapters already merged are skipped with a warning.
        """
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        for n in names:
            if n not in self.delora_A:
                raise ValueError(f"`adapter_names`: unknown adapter {n!r}; this layer has {list(self.delora_A)}")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"Already following adapters were merged {','.join(already)}. "
                          f"You are now additionally merging {','.join(n for n in names if n not in already)}.")
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        for n in names:
            if not bool(torch.isfinite(self.delora_lambda[n]).all()):
                raise ValueError(f"delora_lambda[{n!r}] is not finite ({self.delora_lambda[n].item()}); refusing to merge")
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe_merge:
                new = weight.detach().clone()
                for n in names:
                    ops.merge_(new, *self._params(n), alpha=1.0)
                    if not bool(torch.isfinite(new).all()):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {n} seems to be broken")
                weight.copy_(new)
            else:
                for n in names:
                    ops.merge_(weight, *self._params(n), alpha=1.0)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Subtract every merged adapter's ΔW from the base weight, in reverse merge order."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        with torch.no_grad():
            while self.merged_adapters:
                n = self.merged_adapters.pop()
                ops.merge_(self.base_layer.weight, *self._params(n), alpha=-1.0)

    def extra_repr(self) -> str:
        ads = ", ".join(f"{n}(r={self.r[n]}, dropout={self.module_dropout[n]})" for n in self.delora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ads}], "
                f"active={self.active_adapters}, merged={self.merged_adapters}, "
                f"disabled={self._disable_adapters}")
