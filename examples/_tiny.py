"""A tiny Llama built from a config, a word-level tokenizer built in memory and a toy corpus, so every example
runs offline in seconds (``--tiny``). Nothing here is downloaded."""
from __future__ import annotations

WORDS = ("the a one two three four cat dog bird fish sat ran flew swam on in under over mat log tree pond "
         "red blue green small big quick slow and then is was").split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
VOCAB_SIZE = 64


def tokenizer():
    """A PreTrainedTokenizerFast over WORDS (whitespace pre-tokenizer, word-level model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def llama(seed: int = 0, bias: bool = False):
    """A 2-layer Llama of width 32 with random weights (dropout off); ``bias``: attention and MLP biases."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def texts(n: int = 32, seed: int = 0) -> list[str]:
    """n short sentences over WORDS, reproducible."""
    import random
    rng = random.Random(seed)
    subjects, verbs, places = WORDS[4:8], WORDS[8:12], WORDS[16:21]
    out = []
    for _ in range(n):
        out.append(f"the {rng.choice(WORDS[23:27])} {rng.choice(subjects)} {rng.choice(verbs)} "
                   f"{rng.choice(WORDS[12:16])} the {rng.choice(places)}")
    return out
