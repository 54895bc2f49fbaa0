"""Quantised base layers: how each supported kind is recognised, read back (dequantised) and written (requantised).

Supported, all ``nn.Linear`` subclasses or ``nn.Linear`` instances:

- bitsandbytes ``Linear4bit`` (nf4 and fp4, with or without double quantisation, any ``quant_storage``), including
  the layout bitsandbytes repacks a 4-bit weight into for inference on AVX512-BF16 CPUs;
- bitsandbytes ``Linear8bitLt`` holding an int8 weight (``has_fp16_weights=False``);
- an ``nn.Linear`` whose weight is a torchao tensor subclass with ``dequantize()`` (``Int8WeightOnlyConfig``,
  ``IntxWeightOnlyConfig``, ``Float8WeightOnlyConfig``, ... via ``torchao.quantization.quantize_``).

Neither library is imported here unless a layer of it is seen (then it is already imported), so without them
nothing changes. DeLoRA's w never needs a full fp32 copy of the weight: ``row_chunks`` yields it a block of rows
at a time where the format stores rows independently (bitsandbytes 4-bit when in_features is a multiple of the
block size, 8-bit always, torchao tensors that support row slicing); otherwise the weight is dequantised once in
its own dtype and handed out in row blocks from that. Merging (requantising, or into a dense layer) works on the
whole weight.
"""
from __future__ import annotations

import copy
import importlib
import math
import sys
from collections.abc import Iterator

import torch
from torch import nn

BNB_4BIT = "bitsandbytes Linear4bit"
BNB_8BIT = "bitsandbytes Linear8bitLt"
TORCHAO = "torchao"

SUPPORTED = ("bitsandbytes Linear4bit (nf4/fp4, with or without double quantisation), bitsandbytes Linear8bitLt "
             "(int8 weight, has_fp16_weights=False), and nn.Linear layers whose weight is a torchao tensor "
             "subclass with dequantize()")

_TENSOR_DEQUANTIZE = torch.Tensor.dequantize


def _from(cls: type, package: str) -> bool:
    """Whether ``cls`` or one of its bases is defined in ``package``."""
    return any(c.__module__.split(".", 1)[0] == package for c in cls.__mro__)


def _lib(name: str):
    return sys.modules.get(name) or importlib.import_module(name)


def is_quantized_weight(t) -> bool:
    """Whether ``t`` is a quantised tensor subclass (torchao, bitsandbytes, or any subclass with its own
    ``dequantize``), which the fused native op cannot read. Cheap: called on every forward of a linear base."""
    cls = type(t)
    if cls is nn.Parameter or cls is torch.Tensor:
        return False
    return (getattr(cls, "dequantize", _TENSOR_DEQUANTIZE) is not _TENSOR_DEQUANTIZE
            or _from(cls, "torchao") or _from(cls, "bitsandbytes"))


def kind(module: nn.Module) -> str | None:
    """``BNB_4BIT``, ``BNB_8BIT`` or ``TORCHAO`` for a supported quantised linear, None otherwise (a dense layer,
    or a quantised one that ``check`` refuses)."""
    if not isinstance(module, nn.Linear):
        return None
    if _from(type(module), "bitsandbytes"):
        bnb = _lib("bitsandbytes")
        if isinstance(module, bnb.nn.Linear4bit):
            return BNB_4BIT
        if isinstance(module, bnb.nn.Linear8bitLt):
            return BNB_8BIT
        return None
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and _from(type(w), "torchao") and callable(getattr(w, "dequantize", None)):
        return TORCHAO
    return None


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _bnb4_state(module: nn.Module):
    w = module.weight
    return getattr(w, "quant_state", None) or getattr(module, "quant_state", None)


def _bnb8_scb(module: nn.Module):
    """The row scales of a Linear8bitLt: on the weight until its first forward, on ``module.state`` after."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None)


def check(module: nn.Module, where: str, w_norm_given: bool = False) -> None:
    """Refuse a layer that is quantised in a way delora_ext does not support (TypeError) or not quantised yet
    (ValueError), naming ``where`` (the module path) and the layer's class. A dense layer passes. ``w_norm_given``:
    the caller supplies the column norms, so a plain non-floating weight (a custom quantised linear) may pass."""
    if not isinstance(module, nn.Linear):
        return
    cls = _qualname(module)
    k = kind(module)
    w = getattr(module, "weight", None)
    if k == BNB_4BIT:
        qs = _bnb4_state(module)
        if not getattr(w, "bnb_quantized", qs is not None) or qs is None:
            raise ValueError(f"{where} ({cls}) is not quantised yet: bitsandbytes quantises a Linear4bit when it "
                             f"is moved to its device (.to(device) / .cuda()); do that before adapting it")
        if tuple(qs.shape) != (module.out_features, module.in_features):
            raise TypeError(f"{where} ({cls}) holds a 4-bit weight quantised with shape {tuple(qs.shape)}, not "
                            f"(out_features, in_features) = {(module.out_features, module.in_features)}")
        return
    if k == BNB_8BIT:
        if getattr(getattr(module, "state", None), "has_fp16_weights", False):
            raise TypeError(f"{where} ({cls}) has has_fp16_weights=True: its weight is a float tensor that "
                            f"bitsandbytes requantises at every forward, a kind delora_ext does not adapt; "
                            f"supported: {SUPPORTED}")
        if w.dtype != torch.int8 or _bnb8_scb(module) is None:
            raise ValueError(f"{where} ({cls}) is not quantised yet: bitsandbytes quantises a Linear8bitLt when "
                             f"it is moved to its device (.to(device) / .cuda()); do that before adapting it")
        return
    if k == TORCHAO:
        if tuple(w.shape) != (module.out_features, module.in_features):
            raise TypeError(f"{where} ({cls}) has a {type(w).__name__} weight of shape {tuple(w.shape)}, not "
                            f"(out_features, in_features) = {(module.out_features, module.in_features)}")
        return
    if _from(type(module), "bitsandbytes"):
        raise TypeError(f"{where} ({cls}) is a bitsandbytes layer of a kind delora_ext does not adapt; "
                        f"supported: {SUPPORTED}")
    if isinstance(w, torch.Tensor) and is_quantized_weight(w):
        raise TypeError(f"{where} ({cls}) has a quantised weight of type {_qualname(w)} that delora_ext cannot "
                        f"dequantise; supported: {SUPPORTED}")
    if isinstance(w, torch.Tensor) and not w.is_floating_point() and not w_norm_given:
        raise TypeError(f"{where} ({cls}): the weight must be floating point to compute DeLoRA's column norms w, "
                        f"or of a quantised kind delora_ext reads (got a plain {w.dtype} tensor); supported: "
                        f"{SUPPORTED}. For a custom quantised layer pass `w_norm` (its pretrained column norms): "
                        f"DeLoRALinear(layer, w_norm=...)")


def describe(module: nn.Module) -> str:
    """A short description of a supported quantised layer, for messages."""
    k = kind(module)
    if k == BNB_4BIT:
        qs = _bnb4_state(module)
        dq = ", double quantisation" if (qs.nested or getattr(qs, "original_nested", False)) else ""
        return f"bitsandbytes {type(module).__name__} ({qs.quant_type}{dq}, blocksize {qs.blocksize})"
    if k == BNB_8BIT:
        return f"bitsandbytes {type(module).__name__} (int8, row-wise scales)"
    if k == TORCHAO:
        return f"nn.Linear with a torchao {type(module.weight).__name__} weight"
    return type(module).__name__


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the weight dequantises to (the dtype it was quantised from)."""
    k = kind(module)
    if k == BNB_4BIT:
        qs = _bnb4_state(module)
        return getattr(qs, "original_dtype", qs.dtype) if getattr(qs, "packing_format_for_cpu", False) else qs.dtype
    if k == BNB_8BIT:
        return torch.float32
    return module.weight.dtype


# ---- reading ------------------------------------------------------------------------------------------------
def _bnb4_unpacked(module: nn.Module):
    """(flat uint8 data, QuantState) of a Linear4bit in bitsandbytes' standard layout. A weight repacked for CPU
    inference (AVX512-BF16) is unpacked from copies, keeping the bf16 block scales that repacked forward uses."""
    F = _lib("bitsandbytes.functional")
    qs = _bnb4_state(module)
    data = module.weight.data
    if getattr(qs, "packing_format_for_cpu", False):
        inverse = getattr(F, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise TypeError(f"{describe(module)}: this bitsandbytes version repacked the weight for CPU inference "
                            f"but offers no way to unpack it")
        N, K = qs.shape
        absmax = qs.absmax.float().t().reshape(-1)  # repacked: (K / blocksize, N) bf16
        qweight, _ = inverse(data.clone(), copy.deepcopy(qs))
        qs = F.QuantState(absmax=absmax, shape=torch.Size((N, K)), dtype=weight_dtype(module),
                          blocksize=qs.blocksize, quant_type=qs.quant_type, code=qs.code)
        data = qweight
    return data.view(torch.uint8).reshape(-1), qs


def _bnb4_chunks(module: nn.Module, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    F = _lib("bitsandbytes.functional")
    data, qs = _bnb4_unpacked(module)
    N, K = qs.shape
    bs = qs.blocksize
    if K % bs or N <= rows:
        # blocks straddle rows: bitsandbytes' CPU kernel then indexes them per tile, so row blocks would not
        # reproduce the full dequantisation bit for bit; dequantise once instead
        yield from _split(F.dequantize_4bit(data, qs), rows)
        return
    absmax = qs.absmax
    if qs.nested:  # as bitsandbytes' dequantize_4bit: the block scales are themselves 8-bit quantised
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax += qs.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    per_row = K // bs
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        sub = F.QuantState(absmax=absmax[r0 * per_row:r1 * per_row], shape=torch.Size((r1 - r0, K)),
                           dtype=qs.dtype, blocksize=bs, quant_type=qs.quant_type, code=qs.code)
        yield r0, F.dequantize_4bit(data[r0 * K // 2:r1 * K // 2], sub)


def _bnb8_chunks(module: nn.Module, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    F = _lib("bitsandbytes.functional")
    CB, SCB = module.weight.data, _bnb8_scb(module)
    for r0 in range(0, CB.shape[0], rows):
        r1 = min(CB.shape[0], r0 + rows)
        yield r0, F.int8_vectorwise_dequant(CB[r0:r1], SCB[r0:r1].to(CB.device))


def _torchao_chunks(module: nn.Module, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    w = module.weight
    N = w.shape[0]
    if N > rows:
        try:
            first = w[0:rows].dequantize()
        except (NotImplementedError, RuntimeError, TypeError, AttributeError, IndexError):
            first = None  # this subclass cannot be sliced by rows
        if first is not None and tuple(first.shape) == (rows, w.shape[1]):
            yield 0, first
            first = None  # not held while the next block is dequantised
            for r0 in range(rows, N, rows):
                yield r0, w[r0:r0 + rows].dequantize()
            return
    yield from _split(w.dequantize(), rows)


def _split(W: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    for i, chunk in enumerate(W.split(rows, dim=0)):
        yield i * rows, chunk


def chunked(module: nn.Module, rows: int) -> bool:
    """Whether ``row_chunks`` dequantises block by block (True) or the whole weight once (False)."""
    k = kind(module)
    if module.out_features <= rows:
        return True
    if k == BNB_4BIT:
        qs = _bnb4_state(module)
        return module.in_features % qs.blocksize == 0
    if k == BNB_8BIT:
        return True
    try:
        return tuple(module.weight[0:1].dequantize().shape) == (1, module.in_features)
    except (NotImplementedError, RuntimeError, TypeError, AttributeError, IndexError):
        return False


def row_chunks(module: nn.Module, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, dequantised rows) of the (out, in) weight, ``rows`` rows at a time (the last may be shorter),
    in the dtype the format dequantises to, exactly as the layer's own dequantisation gives them."""
    k = kind(module)
    if k == BNB_4BIT:
        return _bnb4_chunks(module, rows)
    if k == BNB_8BIT:
        return _bnb8_chunks(module, rows)
    if k == TORCHAO:
        return _torchao_chunks(module, rows)
    raise TypeError(f"{type(module).__name__} is not a supported quantised layer")


def column_norms(module: nn.Module, rows: int) -> torch.Tensor:
    """w_j = ‖W₀[:, j]‖₂ of the dequantised weight, fp32, reduced over blocks of ``rows`` rows: the same
    reduction as ``core.column_norms`` of the dense dequantised weight (bit for bit when the blocks coincide)."""
    sq = None
    for r0, chunk in row_chunks(module, rows):
        c = chunk.detach().to(torch.float32)
        del chunk  # one block alive at a time
        if r0 == 0 and c.shape[0] == module.out_features:
            return torch.linalg.vector_norm(c, dim=0)
        part = c.square().sum(0)
        del c
        sq = part if sq is None else sq.add_(part)
    return sq.sqrt()


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole dequantised (out, in) weight in ``dtype`` (one full copy; for merging into a dense layer)."""
    (_, W), = row_chunks(module, max(1, module.out_features))
    return W.to(dtype)


# ---- writing ------------------------------------------------------------------------------------------------
def _torchao_config(module: nn.Module, config):
    """The torchao config that requantises ``module``'s weight: ``config`` if given, else the one its weight
    type implies (int8 weight-only, per row or per tensor)."""
    if config is not None and config is not True:
        base = getattr(_lib("torchao.core.config"), "AOBaseConfig", None)
        if base is not None and not isinstance(config, base):
            raise TypeError(f"`requantize` must be True or a torchao config (e.g. Int8WeightOnlyConfig()), "
                            f"got {config!r}")
        return config
    w = module.weight
    Q = _lib("torchao.quantization")
    if type(w).__name__ == "Int8Tensor" and getattr(w, "act_quant_kwargs", None) is None:
        bs = list(getattr(w, "block_size", []))
        if bs == [1, w.shape[1]]:
            return Q.Int8WeightOnlyConfig(granularity=Q.PerRow(), set_inductor_config=False)
        if bs == list(w.shape):
            return Q.Int8WeightOnlyConfig(granularity=Q.PerTensor(), set_inductor_config=False)
    raise ValueError(f"cannot tell which torchao config produced this {type(w).__name__} weight; pass it: "
                     f"merge(..., requantize=<the torchao config, e.g. IntxWeightOnlyConfig(...)>)")


def check_requantize(module: nn.Module, requantize) -> None:
    """Refuse, before anything is written, a ``requantize=`` that cannot requantise ``module``: a torchao config
    for a bitsandbytes layer, or True for a torchao weight whose config cannot be told from the weight."""
    if kind(module) == TORCHAO:
        _torchao_config(module, requantize)
    elif requantize is not True:
        raise TypeError(f"`requantize` must be True for a {describe(module)} layer (it requantises with its own "
                        f"settings); a config object applies to torchao weights only, got {requantize!r}")


def requantize(module: nn.Module, target: torch.Tensor, config=None):
    """A new quantised weight for ``module`` holding ``target`` ((out, in), fp32), built without touching
    ``module``; returns ``install``, a function that puts it in place and returns an ``undo`` that restores the
    previous one exactly. ``config``: the torchao config to requantise with (inferred for int8 weight-only)."""
    k = kind(module)
    dtype = weight_dtype(module)
    old_weight = module.weight
    if k == BNB_4BIT:
        bnb = _lib("bitsandbytes")
        qs = _bnb4_state(module)
        new = bnb.nn.Params4bit(target.to(dtype), requires_grad=False, blocksize=qs.blocksize,
                                compress_statistics=bool(qs.nested or getattr(qs, "original_nested", False)),
                                quant_type=qs.quant_type, quant_storage=getattr(old_weight, "quant_storage",
                                                                                torch.uint8),
                                module=None).to(old_weight.device)
        old_state = getattr(module, "quant_state", None)

        def install():
            new.module = module
            module.weight = new
            module.quant_state = new.quant_state

            def undo():
                module.weight = old_weight
                module.quant_state = old_state
            return undo
        return install
    if k == BNB_8BIT:
        bnb = _lib("bitsandbytes")
        new = bnb.nn.Int8Params(target.to(torch.float16).cpu(), requires_grad=False,
                                has_fp16_weights=False).to(old_weight.device)
        state = module.state
        old_cb, old_scb = state.CB, state.SCB

        def install():
            module.weight = new
            state.reset_grads()  # the next forward takes CB/SCB from the new weight (as PEFT's LoRA merge)

            def undo():
                module.weight = old_weight
                state.CB, state.SCB = old_cb, old_scb
            return undo
        return install
    if k == TORCHAO:
        cfg = _torchao_config(module, config)
        quantize_ = _lib("torchao.quantization").quantize_
        with torch.device("meta"):
            holder = nn.Linear(module.in_features, module.out_features, bias=False)
        holder.weight = nn.Parameter(target.to(dtype), requires_grad=False)
        quantize_(holder, cfg)
        new = holder.weight

        def install():
            module.weight = new

            def undo():
                module.weight = old_weight
            return undo
        return install
    raise TypeError(f"{type(module).__name__} is not a supported quantised layer")


def rounding_error(module: nn.Module, target: torch.Tensor, rows: int) -> dict:
    """How far ``module``'s dequantised weight is from ``target`` (fp32, (out, in)), block by block:
    Frobenius norm and max |·| of the difference, and ‖target‖_F."""
    diff_sq, tgt_sq, mx = 0.0, 0.0, 0.0
    for r0, chunk in row_chunks(module, rows):
        t = target[r0:r0 + chunk.shape[0]]
        d = chunk.to(torch.float32) - t
        diff_sq += float(d.double().square().sum())
        tgt_sq += float(t.double().square().sum())
        mx = max(mx, float(d.abs().max())) if d.numel() else mx
    return {"fro": math.sqrt(diff_sq), "max_abs": mx, "target_fro": math.sqrt(tgt_sq)}
