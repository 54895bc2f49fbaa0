"""Tiny real transformers architectures (built from configs, never downloaded) for the model-level tests.

Every model has 2 layers of width 32 and a 64-token vocabulary, dropout off, and runs in eval mode, so a forward
takes about a millisecond and outputs are deterministic.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from delora_ext.layer import DeLoRALinear, supported_base

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "gpt2", "bert", "t5"]
PEFT_ARCHS = ["llama", "bert", "t5"]  # PEFT's DeLoRA refuses transformers' Conv1D (GPT-2)

# Module-list names (for layers_pattern) and each architecture's output embedding (excluded by "all-linear").
LAYERS_PATTERN = {"llama": "layers", "gpt2": "h", "bert": "layer", "t5": "block"}
OUTPUT_EMBEDDING = {"llama": "lm_head", "gpt2": "lm_head", "bert": "cls.predictions.decoder", "t5": "lm_head"}


def all_linear(arch: str) -> dict:
    """patch() keyword arguments that adapt every linear layer but the output embedding."""
    return {"target_modules": "all-linear"}


def all_linear_paths(model: nn.Module, arch: str) -> list[str]:
    return [n for n in linear_paths(model) if n != OUTPUT_EMBEDDING[arch]]


def tiny_config(arch: str):
    t = transformers
    if arch == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if arch == "gpt2":
        return t.GPT2LMHeadModel, t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                               eos_token_id=0)
    if arch == "bert":
        return t.BertForMaskedLM, t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if arch == "t5":
        return t.T5ForConditionalGeneration, t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                        num_decoder_layers=2, num_heads=4, dropout_rate=0.0,
                                                        decoder_start_token_id=0)
    if arch == "deberta":  # DeBERTa v1: fused in_proj, and q_bias / v_bias parameters that are not named `bias`
        return t.DebertaForMaskedLM, t.DebertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0)
    if arch == "deberta-v2":
        return t.DebertaV2ForMaskedLM, t.DebertaV2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         max_position_embeddings=16, hidden_dropout_prob=0.0,
                                                         attention_probs_dropout_prob=0.0)
    if arch == "roberta-cls":  # a sequence classifier: its head is the usual modules_to_save
        return t.RobertaForSequenceClassification, t.RobertaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=20, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raise ValueError(arch)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: with several intra-op threads on a busy 2-core machine every 16x32 GEMM pays for
    OpenMP spin-waits (measured 100x slower), so the model tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(arch: str, seed: int = 0) -> nn.Module:
    cls, cfg = tiny_config(arch)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def build_meta(arch: str) -> nn.Module:
    cls, cfg = tiny_config(arch)
    with torch.device("meta"):
        return cls(cfg).eval()


def batch(arch: str, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    kw = {"input_ids": ids}
    if arch == "t5":
        kw["decoder_input_ids"] = torch.randint(0, 64, (2, 5), generator=g)
    return kw


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    return model(**batch(arch)).logits


def outputs(model: nn.Module, arch: str) -> torch.Tensor:
    """The model's logits on ``batch(arch)``, without autograd."""
    with torch.no_grad():
        return logits(model, arch)


class Wrap(nn.Module):
    """A one-layer model around ``lin`` (as ``.lin``), for PEFT's get_peft_model."""

    def __init__(self, lin: nn.Module):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def train(model: nn.Module, arch: str, steps: int = 3, lr: float = 1e-2) -> tuple[float, float]:
    """A few AdamW steps on MSE(logits, fixed random target); returns (loss before, loss after)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        target = torch.randn(logits(model, arch).shape, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        loss = (logits(model, arch) - target).square().mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append((logits(model, arch) - target).square().mean().item())
    return losses[0], losses[-1]


def delora_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, DeLoRALinear)]


def linear_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if supported_base(m)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def module_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor], what: str = "") -> None:
    after = model.state_dict()
    assert list(after) == list(before), f"{what}: state_dict keys changed"
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{what}: {k} changed"


def base_key(model: nn.Module, key: str) -> str:
    """The key a plain (unpatched) model's state_dict entry has in the patched ``model``'s state_dict."""
    mod_path, _, pname = key.rpartition(".")
    layers = set(delora_paths(model))
    return f"{mod_path}.base_layer.{pname}" if mod_path in layers else key


def peft_layers(peft_model) -> dict:
    """PEFT DeLoRA layers of a PeftModel, keyed by the module path inside the base model."""
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
            if hasattr(m, "delora_A") and hasattr(m, "base_layer") and not isinstance(m, DeLoRALinear)}


def peft_model_for(base: nn.Module, **cfg):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(copy.deepcopy(base), peft.DeloraConfig(**cfg))


def expected_by_suffix(model: nn.Module, names) -> list[str]:
    return [n for n in linear_paths(model) if n.rsplit(".", 1)[-1] in names]


def expected_by_regex(model: nn.Module, regex: str) -> list[str]:
    return [n for n in linear_paths(model) if re.fullmatch(regex, n)]


__all__ = ["ARCHS", "PEFT_ARCHS", "LAYERS_PATTERN", "OUTPUT_EMBEDDING", "all_linear", "all_linear_paths",
           "assert_state_equal", "base_key", "batch", "build", "build_meta", "delora_paths", "expected_by_regex",
           "expected_by_suffix", "linear_paths", "logits", "module_types", "one_thread", "peft_layers",
           "peft_model_for", "snapshot", "tiny_config", "train"]
