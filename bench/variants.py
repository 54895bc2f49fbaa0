"""The layers both benchmarks compare, built from one nn.Linear template (shared by bench_cpu.py and
bench_gpu.py): frozen base, ours, PEFT's DeLoRA and LoRA of the same rank, and the pure-PyTorch reference."""
from __future__ import annotations

import copy

import torch
from torch import nn


class _Wrap(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


class RefDeLoRA(nn.Module):
    """The pure-PyTorch reference as a layer: linear_ref with the same parameters as ours."""

    def __init__(self, base: nn.Linear, A, B, lam, w):
        super().__init__()
        from delora_ext.reference import linear_ref
        self._linear_ref = linear_ref
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.delora_A = nn.Parameter(A.detach().clone())
        self.delora_B = nn.Parameter(B.detach().clone())
        self.delora_lambda = nn.Parameter(lam.detach().clone())
        self.register_buffer("delora_w_norm", w.detach().clone())

    def forward(self, x):
        b = self.base_layer
        return self._linear_ref(x, b.weight, b.bias, self.delora_A, self.delora_B, self.delora_lambda,
                                self.delora_w_norm)


def frozen(template: nn.Linear) -> nn.Linear:
    lin = copy.deepcopy(template)
    for p in lin.parameters():
        p.requires_grad_(False)
    return lin


def _fp32_adapters(layer: nn.Module) -> None:
    """Keep every trainable adapter parameter in fp32 (PEFT's autocast_adapter_dtype does so already)."""
    for p in layer.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def build_ours(template: nn.Linear, r: int):
    import delora_ext
    return delora_ext.DeLoRALinear(copy.deepcopy(template), r=r, init_weights=False)


def build_peft_delora(template: nn.Linear, r: int, ours, fp32_adapters: bool = False):
    """(PEFT's DeloraLinear with ours's values, the PeftModel that owns it). Keep the model only as long as the
    layer (storing it on the layer would make a module cycle)."""
    import peft
    model = peft.get_peft_model(_Wrap(copy.deepcopy(template)),
                                peft.DeloraConfig(r=r, target_modules=["lin"], init_weights=False))
    layer = model.base_model.model.lin
    if fp32_adapters:
        _fp32_adapters(layer)
    with torch.no_grad():  # the same values as ours, so outputs and gradients can be compared
        for name in ("delora_A", "delora_B", "delora_lambda"):
            getattr(layer, name)["default"].copy_(getattr(ours, name)["default"])
        layer.delora_w_norm["default"].copy_(ours.delora_w_norm["default"])
    return layer, model


def build_peft_native(template: nn.Linear, r: int, ours, fp32_adapters: bool = False):
    """PEFT's DeloraLinear converted by delora_ext.peft.accelerate (PEFT's containers and semantics on our ops),
    with ours's values; and the PeftModel that owns it."""
    import delora_ext.peft
    layer, model = build_peft_delora(template, r, ours, fp32_adapters)
    delora_ext.peft.accelerate(model)
    assert type(layer) is delora_ext.peft.NativeDeloraLinear
    return layer, model


def build_peft_lora(template: nn.Linear, r: int, fp32_adapters: bool = False):
    """(PEFT's LoRA layer of rank r, alpha = r, random B, the PeftModel that owns it)."""
    import peft
    model = peft.get_peft_model(_Wrap(copy.deepcopy(template)),
                                peft.LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], init_lora_weights=False))
    layer = model.base_model.model.lin
    if fp32_adapters:
        _fp32_adapters(layer)
    return layer, model


def build_ref(template: nn.Linear, ours):
    return RefDeLoRA(copy.deepcopy(template), ours.delora_A["default"], ours.delora_B["default"],
                     ours.delora_lambda["default"], ours.delora_w_norm["default"])
