#!/usr/bin/env python
"""Export a trained DeLoRA adapter as a plain PEFT LoRA adapter, for serving stacks that load LoRA only.

    python examples/export_lora.py --model meta-llama/Llama-3.2-1B --adapter runs/sft/checkpoint-100 --out runs/lora
    python examples/export_lora.py --tiny --adapter /tmp/sft/checkpoint-4 --out /tmp/lora --check

``--adapter`` is any folder in PEFT's DeLoRA format: a checkpoint-N/ of either example, or a ``save_pretrained``
/ ``save_adapter`` folder. DeLoRA's update ΔW = (B ⊙ s)(A ⊙ w) is a rank-r LoRA with folded factors, so the export
is exact (lora_alpha = r, scaling 1). ``--check`` loads the exported LoRA with PEFT into a fresh copy of the base
model and compares its logits with the DeLoRA model's. The LoRA folder then serves like any other, e.g.
``vllm serve <model> --enable-lora --lora-modules name=<out>``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="the base model the adapter was trained on: hub id or local path")
    src.add_argument("--tiny", action="store_true", help="the tiny random Llama of the other examples")
    ap.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    ap.add_argument("--out", required=True, help="folder for the LoRA adapter")
    ap.add_argument("--check", action="store_true", help="compare PEFT-LoRA logits with the DeLoRA model's")
    ap.add_argument("--seed", type=int, default=0, help="--tiny: the seed the training example used")
    return ap.parse_args(argv)


def base_model(args):
    if args.tiny:
        import _tiny
        return _tiny.llama(args.seed)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    import torch

    import delora_ext

    model = delora_ext.load_adapter(base_model(args).eval(), args.adapter, is_trainable=False)
    delora_ext.export_lora(model, args.out)
    print(f"LoRA adapter written to {args.out}")
    result = {"out": args.out}
    if args.check:
        import peft
        lora = peft.PeftModel.from_pretrained(base_model(args).eval(), args.out)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = model(input_ids=ids).logits, lora(input_ids=ids).logits
        rel = ((got - want).norm() / want.norm()).item()
        print(f"relative difference of the logits, PEFT LoRA vs DeLoRA: {rel:.2e}")
        result["rel_diff"] = rel
    return result


if __name__ == "__main__":
    main()
