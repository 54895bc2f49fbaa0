"""The only module that touches ``torch.ops.delora_ext``: loading the native library, fake (meta)
implementations for torch.compile, autograd, and the Python entry points the layer calls.

Autocast is handled natively (AutocastCPU/AutocastCUDA kernels in csrc/autocast.cpp): x, weight and bias
follow the autocast dtype, A, B, λ and w keep theirs, norms and s are always fp32, and each gradient comes back
in its parameter's dtype.
"""
from __future__ import annotations

import math
import os
import warnings

import torch

from . import reference as ref

__all__ = [
    "NATIVE",
    "native_error",
    "has_kernel",
    "build_info",
    "linear",
    "adapter",
    "merge_",
    "merge_many_",
    "delta_weight",
    "prep",
    "segmented_adapter_",
    "set_tuning",
    "tuning",
]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
REBUILD_CMD = f"pip install --no-build-isolation --no-deps --force-reinstall {os.path.dirname(_PKG_DIR)}"

NATIVE = False  # True when delora_ext._C is loaded and matches the running torch
native_error: str | None = None
_C = None


def _load_native() -> None:
    global NATIVE, native_error, _C
    stamp = os.path.join(_PKG_DIR, "_build_torch_version.txt")
    try:
        with open(stamp) as f:
            built_for = f.read().strip()
    except OSError:
        built_for = None
    if built_for is not None and built_for != torch.__version__:
        # Importing a library built against another torch can fail to link or, worse, load with a broken ABI.
        native_error = f"delora_ext._C was built for torch {built_for} but torch {torch.__version__} is running"
        return
    try:
        from . import _C as native  # noqa: F401  (registers torch.ops.delora_ext.*)
    except ImportError as e:
        native_error = f"delora_ext._C could not be imported ({e})"
        return
    info = native.build_info()
    if info["torch_version"] != torch.__version__:
        native_error = (f"delora_ext._C was built for torch {info['torch_version']} "
                        f"but torch {torch.__version__} is running")
        return
    _C = native
    NATIVE = True


_load_native()
_C_HAS_CUDA = NATIVE and bool(_C.build_info()["cuda"])  # asked once: has_kernel runs on every forward
if not NATIVE:
    warnings.warn(f"{native_error}; using the pure-PyTorch reference. Rebuild with: {REBUILD_CMD}",
                  RuntimeWarning, stacklevel=2)

# Layers use the CUDA kernels by default; DELORA_EXT_NATIVE_CUDA=0 routes CUDA tensors to the pure-PyTorch
# reference instead (a switch for bisecting a suspected kernel problem).
CUDA_LAYERS_NATIVE = os.environ.get("DELORA_EXT_NATIVE_CUDA", "1") != "0"


_TUNING_VALUES = {"gemm_order": ("base_first", "seeded"), "merge_kernel": ("rows", "tiled"),
                  "small_n": ("off", "on", "overlap"), "cpu_fused": ("off", "on", "always")}


def set_tuning(**switches: str) -> None:
    """Select kernel variants process-wide (for A/B benchmarks in one process):
    ``gemm_order`` "base_first" | "seeded" (the adapter term computed first and the base GEMM accumulating onto
    it, beta = 1), ``merge_kernel`` "rows" | "tiled" (CUDA merge kernel) and ``small_n`` "off" | "on" | "overlap"
    (CUDA forwards of at most 16 rows in two fused launches; overlap: the first on a side stream, concurrent with
    the base GEMM) and ``cpu_fused`` "on" (default) | "off" | "always" (CPU calls of small shapes compute the
    adapter part of a forward or backward in one fused pass instead of prep, skinny GEMMs and finalize; "always" at
    any size). No effect without the native ops."""
    for name, value in switches.items():  # every switch checked before any is set
        if name not in _TUNING_VALUES:
            raise ValueError(f"set_tuning: unknown switch {name!r}; expected one of {sorted(_TUNING_VALUES)}")
        if value not in _TUNING_VALUES[name]:
            raise ValueError(f"set_tuning: `{name}` must be one of {_TUNING_VALUES[name]}, got {value!r}")
    if not NATIVE:
        return
    if not hasattr(_C, "set_tuning"):
        raise RuntimeError(f"set_tuning: the native build predates kernel switches; rebuild with: {REBUILD_CMD}")
    for name, value in switches.items():
        _C.set_tuning(name, _TUNING_VALUES[name].index(value))


def tuning() -> dict:
    """The kernel variants in use (see set_tuning); empty without the native ops."""
    if not NATIVE or not hasattr(_C, "tuning"):
        return {}
    return {name: _TUNING_VALUES[name][v] for name, v in dict(_C.tuning()).items()}


def _tuning_from_env() -> None:
    """DELORA_EXT_GEMM_ORDER / _MERGE_KERNEL / _SMALL_N / _CPU_FUSED: a value name, or its index."""
    for name, choices in _TUNING_VALUES.items():
        value = os.environ.get(f"DELORA_EXT_{name.upper()}", "").strip().lower()
        if value in [str(i) for i in range(len(choices))]:
            value = choices[int(value)]
        if value:
            try:
                set_tuning(**{name: value})
            except ValueError as e:
                raise RuntimeError(f"DELORA_EXT_{name.upper()}: {e}") from None


_tuning_from_env()


def build_info() -> dict:
    """Torch version, compiled kernels (cpu / cuda with arch list) and the CUDA toolkit used for the build."""
    info = {"native": NATIVE, "running_torch": torch.__version__, "error": native_error}
    if NATIVE:
        b = dict(_C.build_info())
        info.update(
            built_for_torch=b["torch_version"],
            kernels=["cpu"] + (["cuda"] if b["cuda"] else []),
            cuda_archs=b["cuda_archs"] or None,
            cuda_toolkit=b["cuda_toolkit"] or None,
            cuda_kernels_used_by_layers=bool(b["cuda"]) and CUDA_LAYERS_NATIVE,
            tuning=tuning(),
        )
    return info


def has_kernel(device: torch.device | str) -> bool:
    """Whether layers route tensors on ``device`` through the native ops."""
    if isinstance(device, torch.device):
        dev = device.type
    else:
        dev = device if device == "cpu" or device == "cuda" else torch.device(device).type
    if not NATIVE:
        return False
    if dev == "cpu":
        return True
    if dev == "cuda":
        return _C_HAS_CUDA and CUDA_LAYERS_NATIVE
    return False


if NATIVE:
    _ops = torch.ops.delora_ext

    def _opmath(A: torch.Tensor) -> torch.dtype:
        return torch.float64 if A.dtype == torch.float64 else torch.float32

    def _rows(x: torch.Tensor, in_features: int) -> int:
        return math.prod(x.shape[:-1])  # not numel // in_features: in_features may be 0

    def _one_device(op: str, **tensors) -> None:
        """The real kernels' device check, in the fake kernels too: one meta tensor among CPU/CUDA ones sends the
        call to the Meta key, whose fake kernel would otherwise return uninitialised CPU/CUDA outputs (or, for
        the merges, do nothing) instead of an error."""
        named = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
        named += [(f"{n}[{i}]", t) for n, ts in tensors.items() if isinstance(ts, (list, tuple))
                  for i, t in enumerate(ts) if isinstance(t, torch.Tensor)]
        ref_name, ref_t = named[0]
        for n, t in named[1:]:
            torch._check(t.device == ref_t.device, lambda n=n, t=t: f"delora_ext::{op}: `{n}` is on {t.device} but "
                                                                     f"`{ref_name}` is on {ref_t.device}")

    # The fake kernels check what the real ones check (csrc/delora_ops.cpp: check_adapter, check_input, ...), with
    # the same messages: a shape the real kernel refuses must not trace (or run on meta) into a wrong output shape.
    def _sizes(t) -> str:
        return f"[{', '.join(str(n) for n in t.shape)}]"

    def _check_float(op, name, t):
        torch._check(t.is_floating_point(), lambda: f"delora_ext::{op}: `{name}` must be a floating-point tensor, "
                                                    f"got dtype {t.dtype}")

    def _check_adapter(op, A, B, lam, w):
        for name, t in (("A", A), ("B", B), ("lam", lam), ("w", w)):
            _check_float(op, name, t)
        torch._check(A.dim() == 2, lambda: f"delora_ext::{op}: `A` must be 2-D (r, in_features), got shape "
                                           f"{_sizes(A)}")
        r, in_f = A.shape
        torch._check(r > 0, lambda: f"delora_ext::{op}: `A` must have r > 0 rows, got shape {_sizes(A)}")
        torch._check(B.dim() == 2 and B.shape[1] == r, lambda: f"delora_ext::{op}: `B` must be 2-D (out_features, r) "
                                                               f"with r = {r}, got shape {_sizes(B)}")
        torch._check(lam.numel() == 1, lambda: f"delora_ext::{op}: `lam` must hold exactly one element, got shape "
                                               f"{_sizes(lam)}")
        torch._check(w.dim() == 1 and w.shape[0] == in_f, lambda: f"delora_ext::{op}: `w` must have shape ({in_f},), "
                                                                  f"got {_sizes(w)}")
        return r, in_f, B.shape[0]

    _X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def _check_input(op, x, in_f):
        torch._check(x.dtype in _X_DTYPES, lambda: f"delora_ext::{op}: `x` must have dtype float32, float64, "
                                                   f"bfloat16 or float16, got {x.dtype}")
        torch._check(x.dim() >= 1 and x.shape[-1] == in_f, lambda: f"delora_ext::{op}: `x` must have last dimension "
                                                                   f"in_features = {in_f}, got shape {_sizes(x)}")

    def _check_dropout(op, p, seed):
        torch._check(0.0 <= p < 1.0, lambda: f"delora_ext::{op}: `dropout_p` must be in [0, 1), got {p}")
        if p > 0.0:
            torch._check(seed is not None, lambda: f"delora_ext::{op}: `seed` is required when dropout_p > 0")
            torch._check(seed.dtype == torch.int64 and seed.numel() == 1,
                         lambda: f"delora_ext::{op}: `seed` must be an int64 tensor with one element, got dtype "
                                 f"{seed.dtype} and shape {_sizes(seed)}")

    def _check_weight(op, weight, out_f, in_f, x=None):
        if x is None:
            _check_float(op, "weight", weight)
        torch._check(weight.dim() == 2 and weight.shape[0] == out_f and weight.shape[1] == in_f,
                     lambda: f"delora_ext::{op}: `weight` must have shape ({out_f}, {in_f}), got {_sizes(weight)}")
        if x is not None:
            torch._check(weight.dtype == x.dtype, lambda: f"delora_ext::{op}: `x` has dtype {x.dtype} but `weight` "
                                                          f"has dtype {weight.dtype} (they must match, as for nn.Linear)")

    @torch.library.register_fake("delora_ext::prep")
    def _prep_fake(A, B, lam, w):
        _one_device("prep", A=A, B=B, lam=lam, w=w)
        _check_adapter("prep", A, B, lam, w)
        r = A.shape[0]
        om = _opmath(A)
        return A.new_empty(A.shape, dtype=om), A.new_empty(r, dtype=om), A.new_empty(r, dtype=om), A.new_empty(r, dtype=om)

    def _fwd_fake(x, out_features, A):
        r, in_f = A.shape
        om = _opmath(A)
        y = x.new_empty((*x.shape[:-1], out_features))
        u = x.new_empty((_rows(x, in_f), r))
        return y, u, A.new_empty(r, dtype=om), A.new_empty(r, dtype=om), A.new_empty(r, dtype=om)

    @torch.library.register_fake("delora_ext::linear_fwd")
    def _linear_fwd_fake(x, weight, bias, A, B, lam, w, dropout_p, seed):
        op = "linear_fwd"
        _one_device(op, x=x, weight=weight, bias=bias, A=A, B=B, lam=lam, w=w, seed=seed)
        r, in_f, out_f = _check_adapter(op, A, B, lam, w)
        _check_input(op, x, in_f)
        _check_weight(op, weight, out_f, in_f, x)
        if bias is not None:
            torch._check(bias.dim() == 1 and bias.shape[0] == out_f,
                         lambda: f"delora_ext::{op}: `bias` must have shape ({out_f},), got {_sizes(bias)}")
            torch._check(bias.dtype == x.dtype, lambda: f"delora_ext::{op}: `bias` has dtype {bias.dtype} but `x` "
                                                        f"has dtype {x.dtype}")
        _check_dropout(op, dropout_p, seed)
        return _fwd_fake(x, weight.shape[0], A)

    @torch.library.register_fake("delora_ext::adapter_fwd")
    def _adapter_fwd_fake(x, A, B, lam, w, dropout_p, seed):
        op = "adapter_fwd"
        _one_device(op, x=x, A=A, B=B, lam=lam, w=w, seed=seed)
        r, in_f, out_f = _check_adapter(op, A, B, lam, w)
        _check_input(op, x, in_f)
        _check_dropout(op, dropout_p, seed)
        return _fwd_fake(x, B.shape[0], A)

    @torch.library.register_fake("delora_ext::linear_bwd")
    def _linear_bwd_fake(grad_y, x, weight, A, B, lam, w, u, s, a_norm, b_norm, dropout_p, seed, output_mask):
        op = "linear_bwd"
        _one_device(op, x=x, grad_y=grad_y, weight=weight, A=A, B=B, lam=lam, w=w, u=u, s=s,
                    a_norm=a_norm, b_norm=b_norm, seed=seed)
        r, in_f, out_f = _check_adapter(op, A, B, lam, w)
        _check_input(op, x, in_f)
        n = _rows(x, in_f)
        torch._check(grad_y.dim() >= 1 and grad_y.shape[-1] == out_f and _rows(grad_y, out_f) == n,
                     lambda: f"delora_ext::{op}: `grad_y` must have shape (..., {out_f}) with as many rows as `x`, "
                             f"got {_sizes(grad_y)} for x of shape {_sizes(x)}")
        torch._check(grad_y.dtype == x.dtype, lambda: f"delora_ext::{op}: `grad_y` has dtype {grad_y.dtype} but `x` "
                                                      f"has dtype {x.dtype}")
        torch._check(u.dim() == 2 and u.shape[0] == n and u.shape[1] == r,
                     lambda: f"delora_ext::{op}: `u` must have shape ({n}, {r}), got {_sizes(u)}")
        _check_float(op, "u", u)
        for name, t in (("s", s), ("a_norm", a_norm), ("b_norm", b_norm)):
            torch._check(t.dim() == 1 and t.shape[0] == r,
                         lambda name=name, t=t: f"delora_ext::{op}: `{name}` must have shape ({r},), got {_sizes(t)}")
            _check_float(op, name, t)
        if weight is not None:
            _check_weight(op, weight, out_f, in_f, x)
        _check_dropout(op, dropout_p, seed)

        def pick(flag, like):
            return torch.empty_like(like, memory_format=torch.contiguous_format) if flag else like.new_empty(0)

        return pick(output_mask[0], x), pick(output_mask[1], A), pick(output_mask[2], B), pick(output_mask[3], lam)

    @torch.library.register_fake("delora_ext::merge_")
    def _merge_fake(weight, A, B, lam, w, alpha):
        _one_device("merge_", weight=weight, A=A, B=B, lam=lam, w=w)
        r, in_f, out_f = _check_adapter("merge_", A, B, lam, w)
        _check_weight("merge_", weight, out_f, in_f)
        return None

    @torch.library.register_fake("delora_ext::merge_many_")
    def _merge_many_fake(weight, A, B, lam, w, alpha):
        op = "merge_many_"
        _one_device(op, weight=weight, A=A, B=B, lam=lam, w=w)
        n = len(A)
        torch._check(n >= 1, lambda: f"delora_ext::{op}: `A` must hold at least one adapter, got an empty list")
        torch._check(len(B) == n and len(lam) == n and len(w) == n and len(alpha) == n,
                     lambda: f"delora_ext::{op}: `A`, `B`, `lam`, `w` and `alpha` must have the same length, got "
                             f"{n}, {len(B)}, {len(lam)}, {len(w)}, {len(alpha)}")
        dims = [_check_adapter(op, A[i], B[i], lam[i], w[i]) for i in range(n)]
        for i, d in enumerate(dims):
            torch._check(d[1] == dims[0][1] and d[2] == dims[0][2],
                         lambda i=i, d=d: f"delora_ext::{op}: adapter {i} is (out, in) = ({d[2]}, {d[1]}) but adapter 0 "
                                          f"is ({dims[0][2]}, {dims[0][1]})")
            torch._check(_opmath(A[i]) == _opmath(A[0]),
                         lambda i=i: f"delora_ext::{op}: `A[{i}]` has dtype {A[i].dtype} but `A[0]` has dtype "
                                     f"{A[0].dtype} (all adapters must compute in the same precision)")
        _check_weight(op, weight, dims[0][2], dims[0][1])
        return None

    @torch.library.register_fake("delora_ext::delta_weight")
    def _delta_weight_fake(A, B, lam, w):
        _one_device("delta_weight", A=A, B=B, lam=lam, w=w)
        _check_adapter("delta_weight", A, B, lam, w)
        return A.new_empty((B.shape[0], A.shape[1]), dtype=_opmath(A))

    # Autograd: C++ autograd.Functions at the Autograd key (csrc/autograd.cpp), not register_autograd
    # (its Python wrapper would add host time to every layer and step).

    # The overloads themselves: calling the packet resolves the overload on every call.
    _linear_fwd = _ops.linear_fwd.default
    _adapter_fwd = _ops.adapter_fwd.default

# The direct entry points of eager calls: the op through its typed dispatcher handle, y alone returned (torch.ops
# builds a boxed argument stack and wraps all five outputs). Not while torch.compile traces (it sees only torch.ops)
# nor where a __torch_function__ override or mode applies to the arguments (torch.ops honours them, they would not).
# None with a native build that predates them.
_direct_linear = getattr(_C, "linear", None)
_direct_adapter = getattr(_C, "adapter", None)
_has_torch_function = torch._C._has_torch_function_variadic
_is_compiling = torch.compiler.is_compiling


def _seed_for(x: torch.Tensor, dropout_p: float):
    """The dropout mask's seed, drawn from torch's generator on x's device (so CUDA graphs replay fresh masks);
    None, and no tensor made, without dropout."""
    if dropout_p <= 0.0:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)


_warned: set[str] = set()


def _reference_for(x: torch.Tensor) -> bool:
    """Whether the reference computes for tensors on ``x``'s device (warned once per device type). A CPU or CUDA
    tensor's device type is read from its flags: building a torch.device costs more than the rest of the check."""
    dev = "cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type
    if has_kernel(dev):
        return False
    if dev not in _warned:
        _warned.add(dev)
        warnings.warn(f"delora_ext: no native kernel for {dev} tensors "
                      f"({native_error or 'not enabled for this device'}); using the PyTorch reference",
                      RuntimeWarning, stacklevel=4)
    return True


def _adapter_reference(x, A, B, lam, w, dropout_p: float):
    x_d = torch.nn.functional.dropout(x, dropout_p) if dropout_p > 0 else x
    return ref.adapter_ref(x_d, A, B, lam, w)


def linear(x, weight, bias, A, B, lam, w, dropout_p: float = 0.0):
    """The whole adapted layer, y = x Wᵀ + bias + DeLoRA(x), through the native op (autograd-aware).

    x: (..., in); weight: (out, in) in x's dtype; bias: (out,) or None; A: (r, in); B: (out, r); lam: (1,);
    w: (in,). ``dropout_p`` > 0 applies DeLoRA's module dropout to the adapter input (pass 0 in eval).
    Returns y: (..., out) in x's dtype.
    """
    if not (NATIVE and x.is_cpu) and _reference_for(x):  # CPU kernels are always built: no call for them
        y = torch.nn.functional.linear(x, weight, bias)
        return y + _adapter_reference(x, A, B, lam, w, dropout_p).to(y.dtype)
    p = float(dropout_p)
    seed = None if p == 0.0 else _seed_for(x, p)
    if _direct_linear is not None and not _is_compiling() and not _has_torch_function(x, weight, bias, A, B, lam, w):
        return _direct_linear(x, weight, bias, A, B, lam, w, p, seed)
    return _linear_fwd(x, weight, bias, A, B, lam, w, p, seed)[0]


def adapter(x, A, B, lam, w, dropout_p: float = 0.0):
    """The DeLoRA term alone, ((x_d ⊙ w) Aᵀ ⊙ s) Bᵀ: (..., out) in x's dtype, for non-Linear bases."""
    if not (NATIVE and x.is_cpu) and _reference_for(x):
        return _adapter_reference(x, A, B, lam, w, dropout_p)
    p = float(dropout_p)
    seed = None if p == 0.0 else _seed_for(x, p)
    if _direct_adapter is not None and not _is_compiling() and not _has_torch_function(x, A, B, lam, w):
        return _direct_adapter(x, A, B, lam, w, p, seed)
    return _adapter_fwd(x, A, B, lam, w, p, seed)[0]


def _check_writable(op: str, weight) -> None:
    """A weight whose elements share memory (an expanded view: stride 0) cannot be written element by element."""
    if isinstance(weight, torch.Tensor) and torch._debug_has_internal_overlap(weight) == 1:
        raise ValueError(f"delora_ext::{op}: `weight` has elements that share memory (an expanded or otherwise "
                         f"self-overlapping view, strides {tuple(weight.stride())}); merging writes every element, so "
                         f"it needs a weight of its own (e.g. weight.clone())")


def merge_(weight, A, B, lam, w, alpha: float = 1.0) -> None:
    """weight += alpha · ΔW in place (no out×in temporary); alpha = -1 unmerges."""
    _check_writable("merge_", weight)
    with torch.no_grad():
        if has_kernel(weight.device):
            _ops.merge_(weight, A, B, lam, w, float(alpha))
        else:
            for name, t in (("A", A), ("B", B), ("lam", lam), ("w", w)):  # as the native op (meta adds would no-op)
                if t.device != weight.device:
                    raise RuntimeError(f"delora_ext::merge_: `{name}` is on {t.device} but `weight` is on "
                                       f"{weight.device}")
            weight.add_(ref.delta_weight_ref(A, B, lam, w).to(weight.dtype), alpha=alpha)


def merge_many_(weight, adapters, alphas) -> None:
    """weight += Σ alpha_i · ΔW_i in place, all in one pass over the weight (one rounding per element).

    ``adapters``: a list of (A, B, lam, w) tuples; ``alphas``: one float per adapter.
    """
    adapters = [tuple(a) for a in adapters]
    alphas = [float(a) for a in alphas]
    if len(adapters) != len(alphas):
        raise ValueError(f"`alphas` must have one entry per adapter: {len(adapters)} adapters, {len(alphas)} alphas")
    if any(len(a) != 4 for a in adapters):
        raise ValueError("`adapters` must be a list of (A, B, lam, w) tuples")
    if not adapters:
        return
    _check_writable("merge_many_", weight)
    with torch.no_grad():
        if has_kernel(weight.device):
            A, B, lam, w = (list(t) for t in zip(*adapters))
            _ops.merge_many_(weight, A, B, lam, w, alphas)
        else:
            total = sum(alpha * ref.delta_weight_ref(*ad).to(torch.float64) for ad, alpha in zip(adapters, alphas))
            weight.copy_(weight.to(torch.float64) + total)


def delta_weight(A, B, lam, w) -> torch.Tensor:
    """ΔW = (B ⊙ s)(A ⊙ w), (out, in), fp32 (fp64 for fp64 adapters)."""
    if has_kernel(A.device):
        return _ops.delta_weight(A, B, lam, w)
    om = torch.float64 if A.dtype == torch.float64 else torch.float32
    return ref.delta_weight_ref(A.to(om), B.to(om), lam.to(om), w.to(om))


def prep(A, B, lam, w):
    """(A ⊙ w, s, raw row norms of A, raw column norms of B), in fp32 (fp64 for fp64 adapters)."""
    if has_kernel(A.device):
        return _ops.prep(A, B, lam, w)
    om = torch.float64 if A.dtype == torch.float64 else torch.float32
    return ref.prep_ref(A.to(om), B.to(om), lam.to(om), w.to(om))


# ---- mixed batches: the segmented op (csrc/segmented.cpp) ------------------------------------------------------
# False for a build that predates the op (the mixed-batch code then keeps to its other strategies).
HAS_SEGMENTED = NATIVE and hasattr(torch.ops.delora_ext, "segmented_adapter_")

if HAS_SEGMENTED:
    @torch.library.register_fake("delora_ext::segmented_adapter_")
    def _segmented_fake(y, x, rows_adapter, A, Bt, sa):
        op = "segmented_adapter_"
        _one_device(op, y=y, x=x, rows_adapter=rows_adapter, A=A, Bt=Bt, sa=[s for s in sa if s is not None])
        _check_float(op, "x", x)
        torch._check(x.dim() == 2, lambda: f"delora_ext::{op}: `x` must be 2-D (N, in_features), got shape "
                                           f"{_sizes(x)}")
        n, in_f = x.shape
        om = torch.float64 if x.dtype == torch.float64 else torch.float32
        k = len(A)
        torch._check(k >= 1, lambda: f"delora_ext::{op}: `A` must hold at least one adapter, got an empty list")
        torch._check(len(Bt) == k and len(sa) == k, lambda: f"delora_ext::{op}: `A`, `Bt` and `sa` must have the "
                                                            f"same length, got {k}, {len(Bt)}, {len(sa)}")
        torch._check(y.dim() == 2, lambda: f"delora_ext::{op}: `y` must be 2-D (N, out_features), got shape "
                                           f"{_sizes(y)}")
        out_f = y.shape[1]
        torch._check(y.shape[0] == n, lambda: f"delora_ext::{op}: `y` must have as many rows as `x` ({n}), got "
                                              f"shape {_sizes(y)}")
        torch._check(y.dtype == x.dtype, lambda: f"delora_ext::{op}: `y` has dtype {y.dtype} but `x` has dtype "
                                                 f"{x.dtype} (they must match)")
        torch._check(y.is_contiguous(), lambda: f"delora_ext::{op}: `y` must be contiguous (it is updated in place), "
                                                f"got strides {tuple(y.stride())}")
        torch._check(rows_adapter.dtype == torch.int64 and rows_adapter.dim() == 1 and rows_adapter.shape[0] == n,
                     lambda: f"delora_ext::{op}: `rows_adapter` must be an int64 tensor of shape ({n},) (one adapter "
                             f"index per row of `x`), got dtype {rows_adapter.dtype} and shape {_sizes(rows_adapter)}")
        for i, (a, b, s) in enumerate(zip(A, Bt, sa)):
            torch._check(a.dtype == om, lambda i=i, a=a: f"delora_ext::{op}: `A[{i}]` must have dtype {om} (the "
                                                         f"opmath dtype of x's {x.dtype}), got {a.dtype}")
            torch._check(a.dim() == 2 and a.shape[0] >= 1 and a.shape[1] == in_f,
                         lambda i=i, a=a: f"delora_ext::{op}: `A[{i}]` must be 2-D (r, in_features) with r > 0 and "
                                          f"in_features = {in_f}, got shape {_sizes(a)}")
            r = a.shape[0]
            torch._check(b.dtype == om, lambda i=i, b=b: f"delora_ext::{op}: `Bt[{i}]` must have dtype {om}, got "
                                                         f"{b.dtype}")
            torch._check(b.dim() == 2 and b.shape[0] == r and b.shape[1] == out_f,
                         lambda i=i, b=b, r=r: f"delora_ext::{op}: `Bt[{i}]` must have shape ({r}, {out_f}) (r of "
                                               f"A[{i}], out_features of y), got {_sizes(b)}")
            if s is not None:
                torch._check(s.dtype == om and s.dim() == 1 and s.shape[0] == r,
                             lambda i=i, s=s, r=r: f"delora_ext::{op}: `sa[{i}]` must be a {om} tensor of shape "
                                                   f"({r},), got dtype {s.dtype} and shape {_sizes(s)}")
        return None

    _segmented = torch.ops.delora_ext.segmented_adapter_.default


def segmented_adapter_(y, x, rows_adapter, A, Bt, sa) -> None:
    """y += each row's own adapter term, in place: for row n with k = rows_adapter[n] (int64; -1: none),
    y[n] += ((x[n] A[k]ᵀ) ⊙ sa[k]) Bt[k], in one pass over the batch, accumulated in fp32 (fp64 for fp64 x) and
    rounded once into y.

    y: (N, out) contiguous, x's dtype; x: (N, in); A[k]: (r_k, in), Bt[k]: (r_k, out), sa[k]: (r_k,) or None, all
    in the opmath dtype (float32; float64 for fp64 x). No autograd. On CUDA an index outside [-1, K) is a
    device-side assertion; on CPU a RuntimeError naming ``rows_adapter``."""
    if not HAS_SEGMENTED:
        why = native_error or "built before it existed"
        raise RuntimeError(f"segmented_adapter_: the native build has no segmented op ({why}); rebuild with: "
                           f"{REBUILD_CMD}")
    _segmented(y, x, rows_adapter, A, Bt, sa)
