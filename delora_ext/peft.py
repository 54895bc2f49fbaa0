"""PEFT's own DeLoRA models on delora_ext's native ops.

    import delora_ext.peft
    delora_ext.peft.enable()                  # every PEFT DeloraLinear built from now on runs on our ops
    model = peft.get_peft_model(base, peft.DeloraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    delora_ext.peft.accelerate(peft_model)    # or convert a PeftModel built before enable()

The layers stay PEFT's: ``NativeDeloraLinear`` is a subclass of ``peft.tuners.delora.DeloraLinear`` that keeps
every container, name, buffer and method of PEFT's layer (so ``save_pretrained``, ``merge_and_unload``,
``set_adapter``, multiple adapters, ``modules_to_save`` and the adapter files are exactly PEFT's) and overrides
only ``forward``, ``merge``, ``unmerge`` and ``get_delta_weight`` with calls into ``delora_ext.core``, the same
functions ``DeLoRALinear`` uses.

Wherever PEFT's semantics cannot be honoured exactly, the layer runs PEFT's own code instead and warns once with
the reason: a PEFT version outside the tested range or whose layer layout differs from the one pinned here, a
quantised or tensor-subclass base weight, mixed-batch ``adapter_names``, a device without native kernels, and
the like.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings

import torch
from torch import nn

try:
    import peft as _peft
    from peft.tuners.delora import layer as _peft_layer
    from peft.tuners.delora import model as _peft_model
except ImportError as e:  # pragma: no cover - exercised only without PEFT
    raise ImportError(f"delora_ext.peft needs PEFT with DeLoRA (peft >= 0.18): pip install 'delora_ext[peft]' "
                      f"({e})") from e

from . import core, ops

__all__ = ["NativeDeloraLinear", "enable", "disable", "is_enabled", "accelerate", "backend_problem",
           "TESTED_PEFT_VERSIONS"]

PeftDeloraLinear = _peft_layer.DeloraLinear
PeftDeloraLayer = _peft_layer.DeloraLayer
DeloraModel = _peft_model.DeloraModel

# (major, minor) range, inclusive, whose DeloraLinear forward/merge math and layout tests/test_peft_backend.py
# pins (0.18 to 0.21 share them: only the constructor's signature changed).
TESTED_PEFT_VERSIONS = ((0, 18), (0, 21))

# What the subclass relies on in PEFT's layer; tests/test_peft_backend.py pins each against the installed PEFT.
ADAPTER_LAYER_NAMES = ("delora_A", "delora_B", "delora_lambda")
OTHER_PARAM_NAMES = ("r", "delora_dropout", "delora_w_norm")
NORM_EPS = 1e-4  # PEFT's clamp of ‖A_k‖ and ‖B_:,k‖ (reference.NORM_EPS, the one the native ops use)

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_FLOAT_WEIGHTS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_lock = threading.RLock()
_warned: set[str] = set()
_problem: list = []  # [reason or None] once checked
_original_factory = DeloraModel.__dict__["_create_new_module"]


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(f"delora_ext.peft: {message}", UserWarning, stacklevel=3)


def _version(v: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _layout_problem() -> str | None:
    """What differs between the installed PEFT's DeLoRA layer and the layout the subclass was written for."""
    if tuple(getattr(PeftDeloraLayer, "adapter_layer_names", ())) != ADAPTER_LAYER_NAMES:
        return f"DeloraLayer.adapter_layer_names is {getattr(PeftDeloraLayer, 'adapter_layer_names', None)!r}"
    if tuple(getattr(PeftDeloraLayer, "other_param_names", ())) != OTHER_PARAM_NAMES:
        return f"DeloraLayer.other_param_names is {getattr(PeftDeloraLayer, 'other_param_names', None)!r}"
    for name in ("forward", "merge", "unmerge", "get_delta_weight", "update_layer", "_compute_delta"):
        if not callable(getattr(PeftDeloraLinear, name, None)):
            return f"DeloraLinear has no {name}()"
    if not callable(getattr(_peft_layer, "check_adapters_to_merge", None)):
        return "peft.tuners.delora.layer has no check_adapters_to_merge"
    return None


def _self_check() -> str | None:
    """Run PEFT's own forward, backward, merge and ΔW on a tiny fp64 layer beside ours; the reason if they differ.
    Catches a PEFT whose math changed under an unchanged layout. The global RNG is left as it was."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        torch.manual_seed(0)
        holder = nn.Module()
        holder.lin = nn.Linear(6, 5, dtype=torch.float64, device="cpu")
        cfg = _peft.DeloraConfig(r=2, delora_lambda=3.0, target_modules=["lin"], init_weights=False)
        holder = _peft.inject_adapter_in_model(cfg, holder)
        layer = holder.lin
        if not isinstance(layer, PeftDeloraLinear):  # (a NativeDeloraLinear once enable() is in force)
            return f"PEFT built a {type(layer).__name__} instead of DeloraLinear"
        layer.__class__ = PeftDeloraLinear
        for store in (layer.delora_A, layer.delora_B, layer.delora_lambda):
            store["default"].data = store["default"].data.double()
        layer.delora_w_norm["default"] = layer.delora_w_norm["default"].double()
        x = torch.randn(3, 6, dtype=torch.float64)
        params = [layer.delora_A["default"], layer.delora_B["default"], layer.delora_lambda["default"]]
        W = layer.base_layer.weight
        results = []
        for native in (False, True):
            xi = x.clone().requires_grad_()
            if native:
                layer.__class__ = NativeDeloraLinear
                terms = layer._forward_terms(xi, {}, check_backend=False)
                if not terms:
                    return "the layer PEFT built cannot run on the native ops"
                y = core.forward(layer.base_layer, xi, terms)
                adapter = terms[0][:4]
                delta = core.delta_weight([adapter])
                merged = W.detach().clone()
                core.apply_delta(merged, [adapter], [1.0])
                layer.__class__ = PeftDeloraLinear
            else:
                y = PeftDeloraLinear.forward(layer, xi)
                delta = PeftDeloraLinear.get_delta_weight(layer, "default").detach()
                merged = W.detach() + delta
            grads = torch.autograd.grad(y.square().sum(), [xi, *params])
            results.append([y.detach(), *grads, delta, merged])
    labels = ("output", "dx", "dA", "dB", "dλ", "ΔW", "merged weight")
    for label, a, b in zip(labels, *results):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-12):
            return f"the installed PEFT's DeLoRA {label} differs from delora_ext's (a changed formula)"
    return None


def backend_problem() -> str | None:
    """Why PEFT's DeLoRA layers cannot run on delora_ext's ops in this process (None when they can): a PEFT
    version outside ``TESTED_PEFT_VERSIONS``, a layer layout other than the pinned one, or a failed self-check.
    Checked once per process."""
    if _problem:  # the forward's path: no lock (torch.compile traces it)
        return _problem[0]
    with _lock:
        if not _problem:
            _problem.append(_check_backend())
        return _problem[0]


def _check_backend() -> str | None:
    if not ops.NATIVE:
        return f"delora_ext's native library is not loaded ({ops.native_error})"
    v = _version(getattr(_peft, "__version__", ""))
    lo, hi = TESTED_PEFT_VERSIONS
    if v is None or not lo <= v <= hi:
        return (f"PEFT {getattr(_peft, '__version__', '?')} is outside the tested range "
                f"{lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}")
    why = _layout_problem()
    if why:
        return f"unknown PEFT DeLoRA layer layout ({why})"
    try:
        return _self_check()
    except Exception as e:  # noqa: BLE001 (anything PEFT raises means its layer is not the one we know)
        return f"the self-check against PEFT's layer failed ({type(e).__name__}: {e})"


def _fallback(key: str, why: str) -> None:
    _warn_once(key, f"running PEFT's own DeloraLinear code instead of delora_ext's ops: {why}. "
                    f"Results are PEFT's; only the speed-up is lost")


_kernels: dict[str, bool] = {}


def _has_kernel(device_type: str) -> bool:
    """ops.has_kernel per device type, asked once (its answer is fixed at import)."""
    ok = _kernels.get(device_type)
    if ok is None:
        ok = _kernels[device_type] = ops.has_kernel(device_type)
    return ok


class NativeDeloraLinear(PeftDeloraLinear):
    """PEFT's ``DeloraLinear`` running its forward, backward, merge, unmerge and ``get_delta_weight`` on
    delora_ext's native ops (through ``delora_ext.core``). Containers, names, buffers, files and every other
    method are PEFT's; ``repr`` is PEFT's too. Built by PEFT after ``enable()``, or converted by ``accelerate()``.
    """

    def _get_name(self) -> str:
        return PeftDeloraLinear.__name__

    # ---- what can run natively ----------------------------------------------------------------------
    # These run on every forward, so the common case is a few attribute reads and comparisons; the messages are
    # built only when something is off.
    def _base_problem(self, base: nn.Module) -> tuple[str, str] | None:
        if not isinstance(base, nn.Linear):
            return "layout_base", f"unknown PEFT DeLoRA layer layout (base layer is a {type(base).__name__})"
        W, bias = base.weight, base.bias
        if type(W) not in _PLAIN_TENSORS or W.dtype not in _FLOAT_WEIGHTS or (
                bias is not None and type(bias) not in _PLAIN_TENSORS):
            return "quantised", (f"a quantised or tensor-subclass base weight ({type(base).__name__} with a "
                                 f"{type(W).__name__} of dtype {W.dtype}) is not supported yet")
        return None

    def _adapter(self, name: str):
        """(A, B, λ, w) of adapter ``name``, or (key, reason) why PEFT's code must handle it."""
        try:
            A, B, lam = self.delora_A[name], self.delora_B[name], self.delora_lambda[name]
            w, r = self.delora_w_norm[name], self.r[name]
        except (KeyError, AttributeError, TypeError) as e:
            return "layout_containers", (f"unknown PEFT DeLoRA layer layout (adapter {name!r}: "
                                         f"{type(e).__name__}: {e})")
        plain = _PLAIN_TENSORS
        if type(A) not in plain or type(B) not in plain or type(lam) not in plain or type(w) not in plain:
            return "subclass", f"adapter {name!r} has tensor-subclass parameters ({type(A).__name__})"
        in_f = self.in_features
        if A.shape != (r, in_f) or B.shape != (self.out_features, r) or lam.shape != (1,) or w.shape != (in_f,):
            return "layout_shapes", (f"unknown PEFT DeLoRA layer layout (adapter {name!r}: r={r}, A "
                                     f"{tuple(A.shape)}, B {tuple(B.shape)}, λ {tuple(lam.shape)}, w {tuple(w.shape)})")
        if w.requires_grad:
            return "w_grad", f"adapter {name!r}'s delora_w_norm requires grad (the native ops treat w as constant)"
        if not (A.is_floating_point() and B.is_floating_point() and lam.is_floating_point() and w.is_floating_point()):
            return "dtype", f"adapter {name!r} has non-floating parameters"
        return A, B, lam, w

    def _forward_terms(self, x: torch.Tensor, kwargs: dict, check_backend: bool = True):
        """The terms core.forward adds, or None after warning why PEFT's forward runs instead."""
        if check_backend:
            why = _problem[0] if _problem else backend_problem()
            if why is not None:
                _fallback("backend", why)
                return None
        if kwargs and "adapter_names" in kwargs:
            _fallback("adapter_names", "mixed-batch `adapter_names` is PEFT's own feature")
            return None
        bad = self._base_problem(self.base_layer)
        if bad is None and not x.is_floating_point():
            bad = "x_dtype", f"`x` has dtype {x.dtype}"
        dev = x.device
        if bad is None and not _has_kernel(dev.type):
            bad = f"device_{dev.type}", f"no native kernel for {dev.type} tensors"
        if bad is not None:
            _fallback(*bad)
            return None
        adapters = self._adapters(self.active_adapters)
        if adapters is None:
            return None
        terms = []
        drops = self.delora_dropout
        for name, got in adapters:
            drop = drops[name] if name in drops else None
            if type(drop) is nn.Identity:
                p = 0.0
            elif type(drop) is nn.Dropout:
                p = float(drop.p) if drop.training else 0.0
            else:
                _fallback("layout_dropout", f"unknown PEFT DeLoRA layer layout (dropout of {name!r} is "
                                            f"{type(drop).__name__})")
                return None
            if got[0].device != dev:  # PEFT moves an adapter's tensors together
                _fallback("device", f"adapter {name!r} is on {got[0].device}, the input on {dev}")
                return None
            terms.append((*got, p))
        return terms

    # ---- PEFT's methods on our ops --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:  # the base layer alone: PEFT's code (it unmerges if disabled)
            return super().forward(x, *args, **kwargs)
        terms = self._forward_terms(x, kwargs)
        if terms is None:
            return super().forward(x, *args, **kwargs)
        previous_dtype = x.dtype
        return core.forward(self.base_layer, x, terms, *args, **kwargs).to(previous_dtype)

    def _merge_problem(self) -> bool:
        """Whether merge/unmerge/get_delta_weight must be PEFT's (warned once)."""
        why = backend_problem()
        if why is not None:
            _fallback("backend", why)
            return True
        bad = self._base_problem(self.get_base_layer())
        if bad is not None:
            _fallback(*bad)
            return True
        return False

    def _adapters(self, names: list[str]):
        """[(name, (A, B, λ, w))] for the names present, or None when PEFT's code must run (warned)."""
        out = []
        for name in names:
            if name not in self.delora_A:
                continue
            got = self._adapter(name)
            if isinstance(got[0], str):
                _fallback(*got)
                return None
            out.append((name, got))
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """PEFT's merge (same checks, warnings, order and errors): W += ΔW of each adapter in turn, computed and
        added in one native pass per adapter (no out×in temporary unless ``safe_merge``)."""
        if self._merge_problem():
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = _peft_layer.check_adapters_to_merge(self, adapter_names)
        if not names:
            return
        plan = self._adapters(names)
        if plan is None:
            return super().merge(safe_merge=safe_merge, adapter_names=names)
        W = self.get_base_layer().weight
        for name, adapter in plan:
            with torch.no_grad():
                if safe_merge:
                    new = W.data.clone()
                    core.apply_delta(new, [adapter], [1.0])
                    if not torch.isfinite(new).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                    W.data.copy_(new)
                else:
                    core.apply_delta(W.data, [adapter], [1.0])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """PEFT's unmerge: W −= the current ΔW of every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self._merge_problem():
            return super().unmerge()
        plan = self._adapters(list(self.merged_adapters))
        if plan is None:
            return super().unmerge()
        adapters = dict(plan)
        W = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in adapters:
                with torch.no_grad():
                    core.apply_delta(W.data, [adapters[name]], [-1.0])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW of ``adapter``, (out, in), in the adapter's dtype; differentiable like PEFT's."""
        if adapter not in self.delora_A or adapter not in self.delora_B:
            raise ValueError(f"Adapter {adapter} not found.")
        if backend_problem() is not None:
            _fallback("backend", backend_problem())
            return super().get_delta_weight(adapter)
        got = self._adapter(adapter)
        if isinstance(got[0], str) or not _has_kernel(got[0].device.type):
            if isinstance(got[0], str):
                _fallback(*got)
            return super().get_delta_weight(adapter)
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in got])
        return core.delta_weight([got], grad=True).to(dtype)


# ---- installing ---------------------------------------------------------------------------------------
def _native_factory(*args, **kwargs):
    module = _original_factory.__func__(*args, **kwargs)
    if type(module) is PeftDeloraLinear:
        module.__class__ = NativeDeloraLinear
    return module


def enable() -> None:
    """From now on every DeloraLinear that PEFT builds in this process (``get_peft_model``,
    ``PeftModel.from_pretrained``, ``add_adapter``, ``load_adapter``, ``inject_adapter_in_model``, TRL's
    ``peft_config``) is a ``NativeDeloraLinear``. Idempotent. Installs on DeloraModel's layer factory, so a model
    built earlier keeps PEFT's layers (convert it with ``accelerate``); warns once if this PEFT cannot be
    accelerated (its layers then run PEFT's code)."""
    with _lock:
        DeloraModel._create_new_module = staticmethod(_native_factory)
    why = backend_problem()
    if why is not None:
        _fallback("backend", why)


def disable() -> None:
    """PEFT builds its own DeloraLinear again from now on (layers already built keep their class). Idempotent."""
    with _lock:
        DeloraModel._create_new_module = _original_factory


def is_enabled() -> bool:
    return DeloraModel.__dict__.get("_create_new_module") is not _original_factory


def accelerate(model):
    """Turn every PEFT ``DeloraLinear`` of ``model`` (a ``peft.PeftModel``) into a ``NativeDeloraLinear`` in place
    (only the class changes: parameters, buffers, hooks and state are untouched) and return ``model``."""
    if not isinstance(model, _peft.PeftModel):
        raise TypeError(f"`model` must be a peft.PeftModel (from get_peft_model or PeftModel.from_pretrained), "
                        f"got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, PeftDeloraLinear)]
    if not layers:
        kinds = sorted({type(c).__name__ for c in model.peft_config.values()}) if hasattr(model, "peft_config") else []
        raise ValueError(f"`model` has no PEFT DeLoRA layers (adapters: {', '.join(kinds) or 'none'}); "
                         f"accelerate() converts DeloraConfig adapters")
    for m in layers:
        if type(m) is PeftDeloraLinear:
            m.__class__ = NativeDeloraLinear
        elif not isinstance(m, NativeDeloraLinear):
            _warn_once(f"subclass_{type(m).__name__}", f"left {type(m).__name__} (a subclass of PEFT's "
                                                       f"DeloraLinear) as it is: its semantics are unknown")
    why = backend_problem()
    if why is not None:
        _fallback("backend", why)
    return model
