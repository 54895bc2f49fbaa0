"""DeLoRA on quantised base layers (bitsandbytes 4-bit and 8-bit, torchao), each against a dense twin: a plain
nn.Linear whose weight is the library's own full dequantisation of the quantised weight, carrying the same adapter
parameters. The quantised layers run their training forward (train mode), which is the one fine-tuning uses."""
from __future__ import annotations

import copy
import importlib
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import core, quant
from delora_ext.layer import DeLoRALinear

from helpers import DEVICES, rel_err
from tiny_models import batch, build, one_thread  # noqa: F401  (one_thread: autouse fixture)

# kind -> (library, what to build)
KINDS = {
    "nf4": ("bitsandbytes", {"quant_type": "nf4", "compress_statistics": False}),
    "nf4-dq": ("bitsandbytes", {"quant_type": "nf4", "compress_statistics": True}),
    "fp4": ("bitsandbytes", {"quant_type": "fp4", "compress_statistics": False}),
    "fp4-dq": ("bitsandbytes", {"quant_type": "fp4", "compress_statistics": True}),
    "int8": ("bitsandbytes", "8bit"),
    "ao-int8": ("torchao", lambda Q: Q.Int8WeightOnlyConfig(set_inductor_config=False)),
    "ao-intx4": ("torchao", lambda Q: Q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=Q.PerGroup(32))),
    "ao-fp8": ("torchao", lambda Q: Q.Float8WeightOnlyConfig(set_inductor_config=False)),
}
BNB4 = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
CASES = [pytest.param(k, d, id=f"{k}-{d}") for d in DEVICES for k in KINDS]


def need(lib: str):
    try:
        return importlib.import_module(lib)
    except Exception as e:  # noqa: BLE001 (ImportError, or a library that fails to load its native part)
        pytest.skip(f"{lib} is not available (install the extra: pip install 'delora_ext[quant]'): {e}")


def tol(kind: str, device: str) -> float:
    """Output tolerance against the dense twin. On CUDA bitsandbytes' Linear8bitLt also quantises the input to
    int8 in training (its CPU training forward dequantises the weight instead), so only there it is loose."""
    return 5e-2 if (kind == "int8" and device == "cuda") else 1e-5


def quantize_linear(lin: nn.Linear, kind: str, device: str, compute_dtype=torch.float32) -> nn.Module:
    lib, spec = KINDS[kind]
    m = need(lib)
    if lib == "bitsandbytes":
        cpu_lin = copy.deepcopy(lin).cpu()
        if spec == "8bit":
            q = m.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=0.0)
        else:
            q = m.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=compute_dtype, **spec)
        if spec != "8bit":
            q = q.to(lin.weight.dtype)  # quantised from the weight's own dtype (bf16 for a bf16 model)
        q.load_state_dict(cpu_lin.state_dict())
        return q.to(device)  # bitsandbytes quantises here
    Q = need("torchao.quantization")
    q = copy.deepcopy(lin).to(device)
    Q.quantize_(q, spec(Q))
    return q


def reference_weight(q: nn.Module, kind: str) -> torch.Tensor:
    """The library's own dequantisation of the whole weight, fp32 (independent of delora_ext.quant)."""
    if KINDS[kind][0] == "torchao":
        return q.weight.dequantize().float()
    F = importlib.import_module("bitsandbytes.functional")
    if kind == "int8":
        scb = q.weight.SCB if q.weight.SCB is not None else q.state.SCB
        return F.int8_vectorwise_dequant(q.weight.data, scb).float()
    return F.dequantize_4bit(q.weight.data, q.weight.quant_state).float()


def dense_twin(q: nn.Module, kind: str) -> nn.Linear:
    W = reference_weight(q, kind)
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=W.device)
    with torch.no_grad():
        lin.weight.copy_(W)
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
    return lin


def same_adapter(src: DeLoRALinear, dst: DeLoRALinear, name: str = "default") -> None:
    with torch.no_grad():
        for k in ("delora_A", "delora_B", "delora_lambda"):
            getattr(dst, k)[name].copy_(getattr(src, k)[name])


def layer_pair(kind, device, in_f=128, out_f=96, r=4, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f).to(device)
    q = quantize_linear(lin, kind, device)
    twin = dense_twin(q, kind)
    ql = DeLoRALinear(q, r=r, init_weights=False).train()
    dl = DeLoRALinear(twin, r=r, init_weights=False).train()
    same_adapter(ql, dl)
    return ql, dl


# ---- layers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,device", CASES)
def test_layer_matches_dense_twin(kind, device):
    ql, dl = layer_pair(kind, device)
    assert quant.kind(ql.base_layer) is not None and not core.plain_forward(ql.base_layer)
    assert rel_err(ql.delora_w_norm["default"], dl.delora_w_norm["default"]) <= 1e-6
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 128, generator=g).to(device)
    xq, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yq, yd = ql(xq), dl(xd)
    assert yq.dtype == yd.dtype == torch.float32
    assert rel_err(yq, yd) <= tol(kind, device)
    with torch.no_grad():  # the adapter's own contribution agrees tightly whatever the base kernel does
        assert rel_err(yq - ql.base_layer(x), yd - dl.base_layer(x)) <= 1e-5
    gy = torch.randn(yq.shape, generator=g).to(device)
    yq.backward(gy)
    yd.backward(gy)
    for k in ("delora_A", "delora_B", "delora_lambda"):
        assert rel_err(getattr(ql, k)["default"].grad, getattr(dl, k)["default"].grad) <= max(1e-5, tol(kind, device)), k
    assert rel_err(xq.grad, xd.grad) <= tol(kind, device)  # dx: the library's backward through the base + ours
    assert all(p.grad is None for p in ql.base_layer.parameters())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", [(200, 128), (200, 96)], ids=["aligned", "unaligned"])
def test_w_is_reduced_over_row_blocks(kind, shape, monkeypatch):
    """w over blocks of rows (4-bit with in_features not a multiple of the block size: one dequantisation, then
    blocks) agrees with the dense twin's; bit for bit, since both reduce over the same blocks."""
    monkeypatch.setattr(core, "NORM_CHUNK_ROWS", 64)
    out_f, in_f = shape
    torch.manual_seed(1)
    q = quantize_linear(nn.Linear(in_f, out_f), kind, "cpu")
    if kind in BNB4:
        assert quant.chunked(q, 64) == (in_f % q.weight.quant_state.blocksize == 0)
    elif kind == "int8" or kind.startswith("ao-"):
        assert quant.chunked(q, 64)
    w = DeLoRALinear(q, r=2).delora_w_norm["default"]
    expected = core.column_norms(reference_weight(q, kind))
    assert w.dtype == torch.float32 and torch.equal(w, expected)
    assert torch.equal(quant.dequantize(q), reference_weight(q, kind))


def _largest_allocation(fn) -> tuple[int, int]:
    """(largest single CPU allocation, peak running sum of allocations) while ``fn`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    tag = torch._C._profiler._EventType.Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        n = stack.pop()
        if n.tag == tag and str(n.extra_fields.device).startswith("cpu"):
            events.append((n.start_time_ns, int(n.extra_fields.alloc_size)))
        stack.extend(n.children)
    run = peak = 0
    for _, b in sorted(events):
        run += b
        peak = max(peak, run)
    return max((b for _, b in events), default=0), peak


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8", "ao-int8"])
def test_w_never_holds_a_full_fp32_copy(kind):
    torch.manual_seed(2)
    q = quantize_linear(nn.Linear(256, 4096), kind, "cpu")
    full_fp32 = 4096 * 256 * 4
    largest, peak = _largest_allocation(lambda: quant.column_norms(q, core.NORM_CHUNK_ROWS))
    assert largest < full_fp32 / 2 and peak < full_fp32, (largest, peak, full_fp32)


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
def test_saved_activations_stay_n_by_r(kind):
    """What the adapter adds to autograd's saved tensors is the N×r projection (plus r-sized norms)."""
    ql, _ = layer_pair(kind, "cpu", r=4)
    x = torch.randn(64, 128, requires_grad=True)

    def saved(fn):
        skip = {id(t) for t in [x, *ql.parameters(), *ql.buffers()]}
        total = []

        def pack(t):
            if id(t) not in skip:
                total.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x).sum().backward()
        return sum(total)

    extra = saved(ql) - saved(ql.base_layer)
    assert 64 * 4 * 4 <= extra <= 64 * 4 * 4 + 16 * 4 * 4, extra


@pytest.mark.parametrize("kind", ["nf4", "ao-int8"])
def test_the_fused_base_gemm_is_never_used(kind, monkeypatch):
    """The native fused linear reads the weight as a dense tensor: a quantised base runs its own forward."""
    ql, dl = layer_pair(kind, "cpu")

    def refuse(*a, **k):
        raise AssertionError("ops.linear called on a quantised base")
    monkeypatch.setattr(delora_ext.ops, "linear", refuse)
    x = torch.randn(3, 128)
    assert rel_err(ql(x), dl.base_layer(x) + delora_ext.ops.adapter(x, *dl._params("default"))) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_compute_dtype_other_than_the_adapters(device):
    """Linear4bit computing in bf16 under fp32 inputs, and the whole layer under autocast: the adapter term is
    computed as on a dense layer (its own dtype, or autocast's), the base as bitsandbytes does."""
    need("bitsandbytes")
    torch.manual_seed(3)
    lin = nn.Linear(128, 96).to(device)
    q = quantize_linear(lin, "nf4", device, compute_dtype=torch.bfloat16)
    twin = dense_twin(q, "nf4")
    ql, dl = DeLoRALinear(q, r=4, init_weights=False).train(), DeLoRALinear(twin, r=4, init_weights=False).train()
    same_adapter(ql, dl)
    x = torch.randn(5, 128, device=device)
    with torch.no_grad():
        yq = ql(x)
        assert yq.dtype == torch.float32
        assert rel_err(yq - q(x), dl(x) - twin(x)) <= 1e-5
        assert rel_err(yq, dl(x)) <= 2e-2  # the bf16 base GEMM
        with torch.autocast(device, dtype=torch.bfloat16):
            ya, yd = ql(x), dl(x)  # Linear4bit casts its output back to x's dtype, autocast's linear does not
        assert ya.dtype == torch.float32 and yd.dtype == torch.bfloat16
        assert rel_err(ya, yd) <= 2e-2


def test_w_norm_overrides_the_dequantised_norms():
    need("bitsandbytes")
    q = quantize_linear(nn.Linear(128, 96), "nf4", "cpu")
    w = torch.rand(128, dtype=torch.float64) + 0.5
    layer = DeLoRALinear(q, r=4, w_norm=w)
    assert layer.delora_w_norm["default"].dtype == torch.float32
    assert torch.equal(layer.delora_w_norm["default"], w.float())


@pytest.mark.parametrize("kind", ["nf4-dq", "ao-int8"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_base(kind, device):
    """A bf16 model quantised (QLoRA's setting: bf16 weights, bf16 compute, bf16 activations), fp32 adapters:
    w from the bf16-valued dequantisation, the output as the dense bf16 twin's within bf16 rounding."""
    torch.manual_seed(8)
    lin = nn.Linear(128, 96).to(device=device, dtype=torch.bfloat16)
    q = quantize_linear(lin, kind, device, compute_dtype=torch.bfloat16)
    if kind in BNB4:
        assert q.weight.quant_state.dtype == torch.bfloat16
    twin = dense_twin(q, kind).to(torch.bfloat16)
    assert torch.equal(twin.weight.float(), reference_weight(q, kind))  # dequantised values are bf16 values
    ql, dl = DeLoRALinear(q, r=4, init_weights=False).train(), DeLoRALinear(twin, r=4, init_weights=False).train()
    same_adapter(ql, dl)
    assert torch.equal(ql.delora_w_norm["default"], dl.delora_w_norm["default"])
    x = torch.randn(6, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    yq, yd = ql(x), dl(x)
    assert yq.dtype == torch.bfloat16 and rel_err(yq, yd) <= 1e-2
    yq.float().square().sum().backward()
    assert ql.delora_A["default"].grad.dtype == torch.float32


# ---- models ---------------------------------------------------------------------------------------------------
def quantized_llama(kind, device, seed=0):
    """A tiny Llama with every decoder linear quantised, and its dense twin (same model, dequantised weights)."""
    dense = build("llama", seed).to(device)
    qmodel = copy.deepcopy(dense)
    for path, mod in list(qmodel.named_modules()):
        if isinstance(mod, nn.Linear) and path != "lm_head":
            parent, _, child = path.rpartition(".")
            q = quantize_linear(mod, kind, device)
            setattr(qmodel.get_submodule(parent), child, q)
            with torch.no_grad():
                dense.get_submodule(path).weight.copy_(reference_weight(q, kind))
    return qmodel.train(), dense.train()


def patched_pair(kind, device, **cfg):
    qmodel, dense = quantized_llama(kind, device)
    cfg = {"r": 4, "target_modules": "all-linear", "init_weights": False, **cfg}
    torch.manual_seed(11)
    delora_ext.patch(qmodel, **cfg)
    delora_ext.patch(dense, **cfg)
    for path, layer in delora_ext.patching.delora_layers(qmodel).items():
        same_adapter(layer, dense.get_submodule(path))
    return qmodel, dense


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, also of quantised tensor subclasses (compared through their dequantisation)."""
    if quant.is_quantized_weight(a):
        return type(a) is type(b) and torch.equal(a.dequantize(), b.dequantize())
    return torch.equal(a, b)


def inputs(device):
    return {k: v.to(device) for k, v in batch("llama").items()}


@pytest.mark.parametrize("kind,device", CASES)
def test_model_matches_dense_twin(kind, device):
    qmodel, dense = patched_pair(kind, device)
    layers = delora_ext.patching.delora_layers(qmodel)
    assert len(layers) == 14 and all(quant.kind(m.base_layer) is not None for m in layers.values())
    for path, layer in layers.items():
        assert rel_err(layer.delora_w_norm["default"], dense.get_submodule(path).delora_w_norm["default"]) <= 1e-6
    yq, yd = qmodel(**inputs(device)).logits, dense(**inputs(device)).logits
    assert rel_err(yq, yd) <= tol(kind, device)
    g = torch.randn(yq.shape, generator=torch.Generator().manual_seed(4)).to(device)
    yq.backward(g)
    yd.backward(g)
    grads_q = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    grads_d = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert set(grads_q) == set(grads_d) and all(re.search(r"delora_(A|B|lambda)\.", n) for n in grads_q)
    # norm-wise per kind of parameter, over all layers: a layer's λ gradient alone is a sum that cancels to a
    # tiny value, where the base GEMMs' last-bit differences show up amplified
    for kind_re in ("delora_A", "delora_B", "delora_lambda"):
        names = [n for n in grads_q if f".{kind_re}." in n]
        cat = lambda grads, names=names: torch.cat([grads[n].reshape(-1) for n in names])  # noqa: E731
        assert rel_err(cat(grads_q), cat(grads_d)) <= max(1e-5, tol(kind, device)), kind_re
    assert all(p.grad is None for p in qmodel.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind,device", CASES)
def test_three_steps_change_only_the_adapters(kind, device):
    qmodel, _ = patched_pair(kind, device)
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = qmodel(**inputs(device)).logits.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = qmodel.state_dict()
    assert list(after) == list(before)
    changed = {k for k in before if not _equal(before[k], after[k])}
    adapter = {k for k in before if re.search(r"\.delora_(A|B|lambda)\.default$", k)}
    assert changed == adapter, sorted(changed ^ adapter)[:5]


@pytest.mark.parametrize("kind,device", CASES)
def test_save_load_round_trip(kind, device, tmp_path):
    qmodel, _ = patched_pair(kind, device)
    with torch.no_grad():
        for layer in delora_ext.patching.delora_layers(qmodel).values():
            layer.delora_lambda["default"].add_(0.5)  # not the init value
    delora_ext.save_adapter(qmodel, str(tmp_path))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(re.search(r"\.delora_(A|B|lambda|w_norm)$", k) for k in keys)  # no base weight
    fresh, _ = quantized_llama(kind, device)
    delora_ext.load_adapter(fresh, str(tmp_path))
    src, dst = qmodel.state_dict(), fresh.state_dict()
    for k, v in src.items():
        if "delora_" in k:
            assert torch.equal(dst[k], v), k
    with torch.no_grad():
        assert torch.equal(fresh(**inputs(device)).logits, qmodel(**inputs(device)).logits)


@pytest.mark.parametrize("kind,device", CASES)
def test_merge_and_unload_to_dense(kind, device):
    qmodel, _ = patched_pair(kind, device)
    paths = list(delora_ext.patching.delora_layers(qmodel))
    with torch.no_grad():
        y = qmodel(**inputs(device)).logits
    delora_ext.merge_and_unload(qmodel, dtype=torch.float32)
    assert not hasattr(qmodel, delora_ext.patching.STATE_ATTR)
    for p in paths:
        m = qmodel.get_submodule(p)
        assert type(m) is nn.Linear and m.weight.dtype == torch.float32 and not m.weight.requires_grad
    with torch.no_grad():
        assert rel_err(qmodel(**inputs(device)).logits, y) <= tol(kind, device)


@pytest.mark.parametrize("kind", ["nf4-dq", "int8", "ao-int8"])
def test_merge_and_unload_bf16_holds_w0_plus_delta(kind):
    qmodel, dense = patched_pair(kind, "cpu")
    expected = {}
    for path, layer in delora_ext.patching.delora_layers(dense).items():
        expected[path] = layer.base_layer.weight.detach() + layer.get_delta_weight("default")
    delora_ext.merge_and_unload(qmodel, dtype=torch.bfloat16)
    for path, W in expected.items():
        m = qmodel.get_submodule(path)
        assert type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
        assert rel_err(m.weight, W) <= 3e-3  # W₀ + ΔW, rounded once to bf16


@pytest.mark.parametrize("kind", ["nf4", "int8", "ao-int8"])
def test_default_merge_is_refused_and_changes_nothing(kind):
    qmodel, _ = patched_pair(kind, "cpu")
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    for call in (lambda: delora_ext.merge(qmodel), lambda: delora_ext.merge_and_unload(qmodel)):
        with pytest.raises(TypeError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*quantised.*"
                                            r"merge_and_unload\(model, dtype="):
            call()
    layer = qmodel.get_submodule("model.layers.0.mlp.up_proj")
    with pytest.raises(TypeError, match="requantize=True"):
        layer.merge()
    after = qmodel.state_dict()
    assert hasattr(qmodel, delora_ext.patching.STATE_ATTR) and list(after) == list(before)
    assert all(_equal(after[k], v) for k, v in before.items())
    assert not any(m.merged for m in delora_ext.patching.delora_layers(qmodel).values())


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8", "ao-int8"])
def test_requantizing_merge(kind):
    qmodel, dense = patched_pair(kind, "cpu")
    layers = delora_ext.patching.delora_layers(qmodel)
    targets = {p: quant.dequantize(layer.base_layer) + layer.get_delta_weight("default") for p, layer in layers.items()}
    with torch.no_grad():
        y_adapter = qmodel(**inputs("cpu")).logits
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        delora_ext.merge(qmodel, requantize=True)
    msgs = [str(w.message) for w in ws if "requantize=True" in str(w.message)]
    assert len(msgs) == 1, msgs
    # the warning reports the worst measured rounding error, checked here independently
    errs = {}
    for p, layer in layers.items():
        W = reference_weight(layer.base_layer, kind)
        errs[p] = (W - targets[p]).norm().item() / targets[p].norm().item()
    reported = float(re.search(r"‖_F = ([0-9.e+-]+),", msgs[0]).group(1))
    assert math.isclose(reported, max(errs.values()), rel_tol=1e-3), (reported, max(errs.values()))
    assert f"{len(layers)} layers" in msgs[0] and max(errs, key=errs.get) in msgs[0]
    assert all(layer.merged and quant.kind(layer.base_layer) is not None for layer in layers.values())
    with torch.no_grad():  # the merged model computes the requantised W₀ + ΔW: close to, not equal to, the adapter
        y_merged = qmodel(**inputs("cpu")).logits
        assert 0 < rel_err(y_merged, y_adapter) < 0.5
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    for call in (lambda: delora_ext.unmerge(qmodel), lambda: layers["model.layers.1.mlp.down_proj"].unmerge(),
                 lambda: delora_ext.unpatch(qmodel)):
        with pytest.raises(ValueError, match="cannot unmerge.*requantize=True.*reload the base model"):
            call()
    assert all(_equal(qmodel.state_dict()[k], v) for k, v in before.items())
    cls = {p: type(layer.base_layer) for p, layer in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already merged"
        delora_ext.merge_and_unload(qmodel)  # keeps the requantised layers
    assert {p: type(qmodel.get_submodule(p)) for p in cls} == cls
    with torch.no_grad():
        assert torch.equal(qmodel(**inputs("cpu")).logits, y_merged)


def test_a_failed_requantizing_merge_puts_every_weight_back(monkeypatch):
    need("bitsandbytes")
    qmodel, _ = patched_pair("nf4", "cpu")
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    real, calls = quant.requantize, []

    def failing(module, target, config=None):
        calls.append(module)
        if len(calls) == 5:
            raise MemoryError("simulated")
        return real(module, target, config)
    monkeypatch.setattr(quant, "requantize", failing)
    with pytest.raises(MemoryError):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            delora_ext.merge(qmodel, requantize=True)
    after = qmodel.state_dict()
    assert list(after) == list(before) and all(_equal(after[k], v) for k, v in before.items())
    assert not any(m.merged for m in delora_ext.patching.delora_layers(qmodel).values())


def test_paper_init_and_two_adapters_on_a_quantized_base():
    need("bitsandbytes")
    torch.manual_seed(6)
    q = quantize_linear(nn.Linear(128, 96), "nf4-dq", "cpu")
    twin = dense_twin(q, "nf4-dq")
    ql, dl = DeLoRALinear(q, r=4, init_weights="paper"), DeLoRALinear(twin, r=4, init_weights="paper")
    for layer in (ql, dl):
        layer.update_layer("other", r=2, init_weights=False)
        layer.set_adapter(["default", "other"])
    for k in ("delora_A", "delora_B", "delora_lambda", "delora_A0", "delora_B0", "delora_lambda0"):
        for n in list(getattr(ql, k).keys()):
            with torch.no_grad():
                getattr(dl, k)[n].copy_(getattr(ql, k)[n])
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert rel_err(ql(x), dl(x)) <= 1e-5
        assert rel_err(ql._merged_dense(torch.float32)(x), dl(x)) <= 1e-5


# ---- bad input -------------------------------------------------------------------------------------------------
class _OddQuantTensor(torch.Tensor):
    """A tensor subclass with its own dequantize(): a quantised weight of a kind delora_ext does not know."""

    def dequantize(self):
        return self.as_subclass(torch.Tensor).float()


class _Int8Linear(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight.float(), self.bias)


def _bnb_fp16_weights():
    bnb = need("bitsandbytes")
    return bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=True)


def _odd_tensor():
    lin = nn.Linear(32, 32)
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(_OddQuantTensor), requires_grad=False)
    return lin


def _int8_plain():
    lin = _Int8Linear(32, 32)
    lin.weight = nn.Parameter(torch.randint(-8, 8, (32, 32), dtype=torch.int8), requires_grad=False)
    return lin


@pytest.mark.parametrize("make,cls", [(_odd_tensor, "Linear"), (_int8_plain, "_Int8Linear"),
                                      (_bnb_fp16_weights, "Linear8bitLt")], ids=["subclass", "int8", "bnb-fp16"])
def test_unknown_quantized_kind_is_a_type_error_naming_the_module(make, cls):
    model = build("llama")
    path = "model.layers.1.self_attn.v_proj"
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, make())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=rf"{re.escape(path)!s}.*{cls}"):
        delora_ext.patch(model, r=2, target_modules=["q_proj", "v_proj"])
    assert not hasattr(model, delora_ext.patching.STATE_ATTR)
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert all(_equal(after[k], v) for k, v in before.items())


def test_a_layer_not_quantized_yet_is_refused():
    bnb = need("bitsandbytes")
    model = build("llama")
    model.model.layers[0].mlp.up_proj = bnb.nn.Linear4bit(32, 64, quant_type="nf4")  # not moved to a device
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj'.*not quantised yet"):
        delora_ext.patch(model, r=2, target_modules=["up_proj"])
    assert not hasattr(model, delora_ext.patching.STATE_ATTR)


def test_requantize_argument_is_checked_before_anything_changes():
    need("torchao")
    qmodel, _ = patched_pair("ao-intx4", "cpu")
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj'.*pass it: merge\(\.\.\., "
                                         r"requantize=<the torchao config"):
        delora_ext.merge(qmodel, requantize=True)  # intx: the config cannot be told from the weight
    with pytest.raises(TypeError, match="`requantize` must be True or a torchao config"):
        delora_ext.merge(qmodel, requantize="yes")
    after = qmodel.state_dict()
    assert all(_equal(after[k], v) for k, v in before.items())
    Q = need("torchao.quantization")
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        delora_ext.merge(qmodel, requantize=Q.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                   granularity=Q.PerGroup(32)))
    assert any("requantize=True" in str(w.message) for w in ws)
    assert all(type(m.base_layer.weight).__name__ == "IntxUnpackedToInt8Tensor"
               for m in delora_ext.patching.delora_layers(qmodel).values())


def test_merge_and_unload_dtype_is_checked():
    need("bitsandbytes")
    qmodel, _ = patched_pair("nf4", "cpu")
    with pytest.raises(TypeError, match="`dtype`"):
        delora_ext.merge_and_unload(qmodel, dtype=torch.int8)
    with pytest.raises(ValueError, match="not both"):
        delora_ext.merge_and_unload(qmodel, dtype=torch.float32, requantize=True)
    assert hasattr(qmodel, delora_ext.patching.STATE_ATTR)


# ---- bitsandbytes' CPU inference layout, and the libraries' absence ------------------------------------------------
def test_bnb_cpu_inference_repacking_is_read():
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight at the first eval forward without grad (block
    scales rounded to bf16). The repacked weight still dequantises: to W₀ up to that rounding."""
    need("bitsandbytes")
    torch.manual_seed(7)
    q = quantize_linear(nn.Linear(128, 64), "nf4-dq", "cpu")
    W_train = reference_weight(q, "nf4-dq")
    layer = DeLoRALinear(q, r=4, init_weights=False).eval()
    w = layer.delora_w_norm["default"].clone()
    with torch.no_grad():
        layer(torch.randn(3, 128))
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack the weight on this CPU (no AVX512-BF16)")
    assert rel_err(quant.dequantize(q), W_train) <= 5e-3
    assert torch.equal(layer.delora_w_norm["default"], w)  # w is taken once, when the adapter is created
    dense = layer._merged_dense(torch.float32)
    assert rel_err(dense.weight, W_train + layer.get_delta_weight()) <= 5e-3


def test_without_the_libraries_nothing_is_imported():
    """delora_ext never imports bitsandbytes or torchao itself: a dense model patches, trains and merges with
    both blocked."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; sys.modules['torchao'] = None\n"
        "import torch, delora_ext\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))\n"
        "delora_ext.patch(m, r=2, target_modules=['0', '2'], init_weights=False)\n"
        "m(torch.randn(3, 8)).sum().backward()\n"
        "delora_ext.merge_and_unload(m, dtype=torch.bfloat16)\n"
        "assert type(m[0]) is torch.nn.Linear and m[0].weight.dtype == torch.float32\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(delora_ext.__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_a_requantizing_merge_into_a_disabled_layer_is_refused():
    """A disabled layer computes as its base, so its forward takes a merge back; a requantised merge cannot be taken
    back, so it is refused on a disabled layer (the layer would otherwise raise on every forward)."""
    qmodel, _ = patched_pair("ao-int8", "cpu")
    layer = next(iter(delora_ext.patching.delora_layers(qmodel).values()))
    layer.enable_adapters(False)
    before = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge\(requantize=True\) into a disabled layer"):
        layer.merge(requantize=True)
    assert not layer.merged and all(_equal(qmodel.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        qmodel(**inputs("cpu"))


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_and_unload_to_dense_drops_the_transformers_quantization_config(bits, tmp_path):
    """A model loaded with from_pretrained(quantization_config=...) keeps is_quantized, hf_quantizer and
    config.quantization_config; once merge_and_unload(dtype=...) has left no quantised weight they go, as after
    transformers' dequantize(), so save_pretrained + from_pretrained gives back the dense merged model instead of
    quantising the merged weights again."""
    need("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    build("llama").save_pretrained(str(tmp_path / "base"))
    q = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32) if bits == 4
         else transformers.BitsAndBytesConfig(load_in_8bit=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=q,
                                                              device_map="cpu", dtype=torch.float32)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # the repack bug of bitsandbytes 0.50 (docs/quantized.md)
    assert model.is_quantized
    delora_ext.patch(model, r=4, target_modules="all-linear", init_weights=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    delora_ext.merge_and_unload(model, dtype=torch.float32)
    assert not model.is_quantized and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    # bitsandbytes' CPU int8 inference forward also quantises the input, the dense merged layer does not
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-4 if bits == 4 else 1e-2)
    model.save_pretrained(str(tmp_path / "merged"))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert all(type(m) is nn.Linear for n, m in back.named_modules() if n.endswith(("_proj", "lm_head")))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, merged, rtol=0, atol=1e-6)
