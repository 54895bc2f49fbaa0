#!/usr/bin/env python
"""A Hugging Face Trainer job on a model adapted with ``delora_ext.patch``, with ``DeLoRACallback``.

    python examples/trainer_patch_callback.py --model meta-llama/Llama-3.2-1B --output-dir runs/patch
    python examples/trainer_patch_callback.py --tiny --output-dir /tmp/patch          # offline, in seconds

``delora_ext.param_groups`` gives λ its own learning rate and no weight decay; ``delora_ext.attach_callback``
adds the callback so that every checkpoint-N/ also holds the adapter in PEFT's format (load it with
``delora_ext.load_adapter(model, "checkpoint-N")`` or ``peft.PeftModel.from_pretrained``) and the training logs
carry λ and ‖ΔW‖_F / bound per layer. Trainer still writes the whole model into each checkpoint (the callback
warns once); ``examples/trl_sft_peft.py`` shows the adapter-only route.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
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


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    import datasets
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
    from trl_sft_peft import load_texts

    import delora_ext

    if args.tiny:
        import _tiny
        model, tokenizer = _tiny.llama(args.seed), _tiny.tokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    delora_ext.patch(model, target_modules=args.target_modules, r=args.r, delora_lambda=args.delora_lambda,
                     module_dropout=args.module_dropout)
    texts = datasets.Dataset.from_dict({"text": load_texts(args.data)})
    dataset = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
                        remove_columns=["text"])
    optimizer = torch.optim.AdamW(delora_ext.param_groups(model, args.lr, lambda_lr=args.lambda_lr,
                                                          weight_decay=args.weight_decay))
    targs = TrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps,
                              per_device_train_batch_size=args.batch_size, save_steps=args.save_steps,
                              logging_steps=args.logging_steps, seed=args.seed, report_to=[],
                              use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, optimizers=(optimizer, None),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    delora_ext.attach_callback(trainer)
    trainer.train(resume_from_checkpoint=args.resume)
    final = os.path.join(args.output_dir, "adapter")
    delora_ext.save_adapter(model, final)
    print(f"adapter written to {final}; checkpoints: "
          f"{sorted(d for d in os.listdir(args.output_dir) if d.startswith('checkpoint-'))}")
    return {"trainer": trainer, "model": model, "adapter_dir": final}


if __name__ == "__main__":
    main()
