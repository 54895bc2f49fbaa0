"""``python -m delora_ext demo``: fine-tune a small causal LM with DeLoRA end to end, on generated data.

Default: a Llama-architecture model built from a config (no download) learns to reverse token sequences
("a b c d SEP d c b a"). With ``--model PATH`` a local transformers checkpoint is fine-tuned on the same task
(its vocabulary's first ids serve as symbols). Runs on the GPU when there is one.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch


def _build_model(args, device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    else:
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    return model.to(device)


class ReverseTask:
    """Sequences "x_1 … x_L SEP x_L … x_1" over ``n_sym`` symbols; the loss counts the reversed half only.

    Subclasses change the answer (``answer``); ``n_sym`` and ``sep`` let several tasks share one vocabulary.
    """

    def __init__(self, vocab: int, length: int = 8, seed: int = 0, n_sym: int | None = None, sep: int | None = None):
        self.n_sym = min(vocab - 1, 48) if n_sym is None else n_sym
        self.sep = self.n_sym if sep is None else sep
        self.length = length
        self.gen = torch.Generator().manual_seed(seed)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)

    def batch(self, n: int, device):
        x = torch.randint(0, self.n_sym, (n, self.length), generator=self.gen)
        sep = torch.full((n, 1), self.sep)
        ids = torch.cat([x, sep, self.answer(x)], 1)
        labels = ids.clone()
        labels[:, : self.length + 1] = -100  # learn the answer, not the random prompt
        return ids.to(device), labels.to(device)


def _loss(model, ids, labels):
    return model(input_ids=ids, labels=labels).loss


def main(argv=None) -> int:
    from tqdm import tqdm

    import delora_ext

    p = argparse.ArgumentParser(prog="delora-ext demo", description=__doc__)
    p.add_argument("--model", help="local transformers causal-LM checkpoint folder (default: a tiny Llama from a config)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lam", type=float, default=15.0, help="initial λ (delora_lambda)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--init", default="peft", choices=["peft", "random", "paper"], help="adapter initialisation")
    p.add_argument("--out", help="where to save the adapter (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    print(f"delora_ext {delora_ext.__version__}: {delora_ext.build_info()}")
    base = _build_model(args, device).eval()
    pristine = copy.deepcopy(base)
    task = ReverseTask(base.config.vocab_size, seed=args.seed)
    eval_ids, eval_labels = task.batch(256, device)

    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    init = {"peft": True, "random": False, "paper": "paper"}[args.init]
    model = delora_ext.patch(base, target_modules=targets, r=args.r, delora_lambda=args.lam, init_weights=init)
    trainable, total = delora_ext.trainable_parameters(model)
    n_layers = len(delora_ext.patching.delora_layers(model))
    print(f"patched {n_layers} layers; trainable {trainable:,} of {total:,} parameters "
          f"({100 * trainable / total:.2f} %)")
    with torch.no_grad():
        loss0 = _loss(model, eval_ids, eval_labels).item()
    print(f"eval loss before fine-tuning: {loss0:.4f} (uniform guess: {math.log(base.config.vocab_size):.4f})")

    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    bar = tqdm(range(args.steps), desc="fine-tuning", unit="step", dynamic_ncols=True, mininterval=1.0)
    for _ in bar:
        ids, labels = task.batch(args.batch, device)
        with amp:
            loss = _loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tokens += ids.numel()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=eval_ids).logits
        loss1 = _loss(model, eval_ids, eval_labels).item()
        pred = logits[:, task.length:-1].argmax(-1)
        acc = (pred == eval_ids[:, task.length + 1:]).float().mean().item()
    print(f"eval loss after fine-tuning: {loss1:.4f}  (token accuracy on the reversed half: {100 * acc:.1f} %)")

    print(f"\n{'layer':44s} {'r':>3s} {'λ':>9s} {'‖ΔW‖_F':>10s} {'bound |λ|·max w':>16s}")
    for name, layer in delora_ext.patching.delora_layers(model).items():
        lam = layer.delora_lambda["default"].item()
        dw = layer.get_delta_weight().norm().item()
        bound = abs(lam) * layer.delora_w_norm["default"].max().item()
        flag = "" if dw <= bound * (1 + 1e-5) else "  <-- exceeds the bound!"
        print(f"{name:44s} {layer.r['default']:3d} {lam:9.4f} {dw:10.4f} {bound:16.4f}{flag}")

    out = args.out or tempfile.mkdtemp(prefix="delora-demo-")
    delora_ext.save_adapter(model, out, for_peft=args.init != "paper")
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
    print(f"\nsaved the adapter to {out} ({size / 1024:.1f} KiB)")
    reloaded = delora_ext.load_adapter(copy.deepcopy(pristine), out).eval()
    with torch.no_grad():
        err_reload = (reloaded(input_ids=eval_ids).logits - logits).abs().max().item()
        delora_ext.merge_and_unload(reloaded)
        err_merge = (reloaded(input_ids=eval_ids).logits - logits).abs().max().item()
    scale = logits.abs().max().item()
    ok = err_reload <= 1e-5 * scale and err_merge <= 1e-4 * scale
    print(f"reloaded into a fresh model: max |Δlogits| = {err_reload:.2e}; after merge_and_unload: {err_merge:.2e} "
          f"(logits up to {scale:.2f}) -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok and loss1 < loss0 else 1
