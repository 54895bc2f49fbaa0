#!/usr/bin/env python
"""Supervised fine-tuning with TRL's SFTTrainer and a PEFT DeLoRA adapter, on delora_ext's kernels.

    python examples/trl_sft_peft.py --model Qwen/Qwen2.5-0.5B --data train.jsonl --output-dir runs/sft
    python examples/trl_sft_peft.py --tiny --output-dir /tmp/sft          # offline, in seconds

The one change to a stock TRL script is ``delora_ext.peft.enable()`` before the trainer builds the PEFT model:
the model stays a ``peft.PeftModel`` (TRL's and transformers' PEFT handling, adapter-only checkpoints, PEFT's files)
while every DeLoRA layer runs on delora_ext's native ops. ``--lambda-lr`` trains λ at its own learning rate (the
DeLoRA authors' recipe) through ``delora_ext.param_groups``. ``--data`` is a JSON-lines file with a "text" field;
without it a small built-in corpus is used. ``--resume`` continues from a checkpoint-N/ folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a causal LM: hub id or local path (AutoModelForCausalLM)")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama and an in-memory tokenizer")
    ap.add_argument("--data", help="JSON-lines file with a 'text' field (default: a built-in toy corpus)")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--delora-lambda", type=float, default=15.0)
    ap.add_argument("--module-dropout", type=float, default=0.0)
    ap.add_argument("--target-modules", nargs="+", default=None, help="default: all-linear")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lambda-lr", type=float, default=None, help="learning rate of λ (default: --lr)")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--save-steps", type=int, default=50)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", default=None, help="a checkpoint-N/ folder to resume from")
    return ap.parse_args(argv)


def load_texts(path: str | None) -> list[str]:
    if path is None:
        import _tiny
        return _tiny.texts(64)
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    import datasets
    import peft
    import torch
    import trl

    import delora_ext
    import delora_ext.peft

    delora_ext.peft.enable()  # PEFT's DeloraLinear built from here on runs on delora_ext's ops

    if args.tiny:
        import _tiny
        model, tokenizer = _tiny.llama(args.seed), _tiny.tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = datasets.Dataset.from_dict({"text": load_texts(args.data)})

    config = peft.DeloraConfig(r=args.r, delora_lambda=args.delora_lambda, module_dropout=args.module_dropout,
                               target_modules=args.target_modules or "all-linear", task_type="CAUSAL_LM")
    sft = trl.SFTConfig(output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.lr,
                        weight_decay=args.weight_decay, per_device_train_batch_size=args.batch_size,
                        max_length=args.max_length, save_steps=args.save_steps, logging_steps=args.logging_steps,
                        seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available(),
                        dataset_text_field="text")
    trainer = trl.SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=config)
    if args.lambda_lr is not None:  # the trainer built the PeftModel: give it λ's own learning rate
        trainer.optimizer = torch.optim.AdamW(
            delora_ext.param_groups(trainer.model, args.lr, lambda_lr=args.lambda_lr, weight_decay=args.weight_decay))
    delora_ext.attach_callback(trainer)  # λ and ‖ΔW‖/bound in the logs
    trainer.train(resume_from_checkpoint=args.resume)
    final = os.path.join(args.output_dir, "adapter")
    trainer.model.save_pretrained(final)
    layers = {type(m).__name__ for m in trainer.model.modules() if isinstance(m, delora_ext.peft.PeftDeloraLinear)}
    print(f"DeLoRA layers: {sorted(layers)}; adapter written to {final}")
    return {"trainer": trainer, "adapter_dir": final, "layer_classes": layers}


if __name__ == "__main__":
    main()
