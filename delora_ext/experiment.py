"""``python -m delora_ext experiment``: learning-rate robustness and forgetting of DeLoRA, LoRA and DoRA.

A tiny Llama-architecture model (built from a config, no download) is pre-trained fully on task A (reverse a
sequence), then fine-tuned on task B (sort it, cued by a separator of its own) with DeLoRA (PEFT's init and the
paper's), PEFT LoRA and PEFT DoRA, each at its base learning rate times each multiple, with the same steps and
data order. Per run it records the task-B accuracy (learning), the task-A accuracy (forgetting), Σ‖W − W₀‖_F over
the adapted layers and, for DeLoRA, its bound Σ|λ|·max_j w_j. Writes experiment.json and experiment.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import statistics
import time
import warnings

import torch

from .demo import ReverseTask, _loss

METHODS = ("DeLoRA", "DeLoRA (paper init)", "LoRA", "DoRA")
MULTIPLES = (0.5, 1, 2, 4, 8, 16)
EVAL_SEED = 1_000_003  # the evaluation sets are the same for every run and never drawn from the training stream


class SortTask(ReverseTask):
    """Sequences "x_1 … x_L SEP_B sorted(x)": task B, on task A's inputs but with its own separator."""

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        return x.sort(1).values


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run depends on besides method, learning rate and seed."""

    hidden: int = 64
    layers: int = 2
    length: int = 6           # symbols per prompt
    n_sym: int = 32           # symbols; the vocabulary adds task A's and task B's separators
    batch: int = 32
    pretrain_lr: float = 3e-3
    pretrain_max_steps: int = 3000
    pretrain_target: float = 0.99  # task-A token accuracy at which pre-training stops
    steps: int = 300          # fine-tuning steps
    r: int = 8
    delora_lambda: float = 15.0
    lora_lr: float = 1e-3     # LoRA's and DoRA's base lr; DeLoRA's is 10x (PEFT's DeLoRA docs: 10-100x)
    eval_n: int = 512

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"Setup: `{f.name}` must be a positive integer, got {v!r}")
            if f.type == "float" and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Setup: `{f.name}` must be a positive finite number, got {v!r}")
        if self.hidden % 8:
            raise ValueError(f"Setup: `hidden` must be a multiple of 8 (4 heads of even width), got {self.hidden}")

    def base_lr(self, method: str) -> float:
        return self.lora_lr * (10 if method.startswith("DeLoRA") else 1)

    def tasks(self, seed: int) -> tuple[ReverseTask, SortTask]:
        vocab = self.n_sym + 2
        return (ReverseTask(vocab, self.length, seed, n_sym=self.n_sym, sep=self.n_sym),
                SortTask(vocab, self.length, seed, n_sym=self.n_sym, sep=self.n_sym + 1))


def _model(setup: Setup, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=setup.n_sym + 2, hidden_size=setup.hidden, intermediate_size=2 * setup.hidden,
                      num_hidden_layers=setup.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2 * setup.length + 2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


@torch.no_grad()
def accuracy(model, ids: torch.Tensor, length: int) -> float:
    """Token accuracy on the answer half (greedy, teacher-forced), as the demo measures it."""
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids).logits
    model.train(was_training)
    return (logits[:, length:-1].argmax(-1) == ids[:, length + 1:]).float().mean().item()


def _train(model, task, steps: int, batch: int, lr: float, device) -> bool:
    """AdamW, 10 % linear warm-up then linear decay, gradients clipped to norm 1 (transformers' Trainer
    defaults apart from the warm-up). Returns False if the loss stopped being finite (training stops there)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    model.train()
    for _ in range(steps):
        ids, labels = task.batch(batch, device)
        loss = _loss(model, ids, labels)
        if not torch.isfinite(loss):
            return False
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return True


def pretrain(setup: Setup, cache_dir: str | None, device, log=print) -> tuple[dict, float]:
    """Train the whole model on task A until its accuracy reaches ``setup.pretrain_target``; returns the
    state dict and that accuracy. Cached in ``cache_dir`` under a name keyed by every setting it depends on."""
    keys = ("hidden", "layers", "length", "n_sym", "batch", "pretrain_lr", "pretrain_max_steps", "pretrain_target")
    key = json.dumps({k: getattr(setup, k) for k in keys}, sort_keys=True)
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"pretrained-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt")
        if os.path.exists(path):
            saved = torch.load(path, map_location=device, weights_only=True)
            log(f"pre-trained model: {path} (task-A accuracy {saved['accuracy']:.3f}, cached)")
            return saved["state_dict"], saved["accuracy"]
    torch.manual_seed(0)
    model = _model(setup, device)
    task_a = setup.tasks(0)[0]
    eval_a = setup.tasks(EVAL_SEED)[0].batch(setup.eval_n, device)[0]
    t0, acc, step = time.perf_counter(), 0.0, 0
    opt = torch.optim.AdamW(model.parameters(), lr=setup.pretrain_lr, weight_decay=0.0)
    model.train()
    while step < setup.pretrain_max_steps:
        for _ in range(50):
            ids, labels = task_a.batch(setup.batch, device)
            opt.zero_grad(set_to_none=True)
            _loss(model, ids, labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        step += 50
        acc = accuracy(model, eval_a, setup.length)
        if acc >= setup.pretrain_target:
            break
    else:
        raise RuntimeError(f"pre-training reached task-A accuracy {acc:.3f} in `pretrain_max_steps`="
                           f"{setup.pretrain_max_steps} steps, below `pretrain_target`={setup.pretrain_target}")
    log(f"pre-trained on task A: accuracy {acc:.3f} after {step} steps ({time.perf_counter() - t0:.1f} s)")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"state_dict": state, "accuracy": acc}, tmp)
        os.replace(tmp, path)  # a half-written cache file is never picked up
    return state, acc


def fine_tune(state: dict, setup: Setup, method: str, lr: float, seed: int, device):
    """A fresh copy of the pre-trained model, adapted with ``method`` and trained on task B.
    Returns (model, finished) where finished is False if the loss stopped being finite."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    model = _model(setup, device)
    model.load_state_dict(state)
    torch.manual_seed(seed)  # adapter init
    if method.startswith("DeLoRA"):
        import delora_ext

        cfg = delora_ext.DeLoRAConfig(r=setup.r, delora_lambda=setup.delora_lambda, target_modules="all-linear",
                                      init_weights="paper" if method.endswith("(paper init)") else True)
        model = delora_ext.patch(model, cfg)
    else:
        import peft

        with warnings.catch_warnings():  # transformers' deprecation notice for an attribute PEFT reads
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.get_peft_model(model, peft.LoraConfig(r=setup.r, target_modules="all-linear",
                                                               use_dora=method == "DoRA"))
    finished = _train(model, setup.tasks(seed)[1], setup.steps, setup.batch, lr, device)
    return model, finished


@torch.no_grad()
def weight_change(model, method: str, state: dict) -> dict:
    """Per adapted layer: ‖W − W₀‖_F and, for DeLoRA, its bound and λ. PEFT models are merged (in place, the
    model is done with) and compared with the pre-trained weights; DeLoRA layers report get_delta_weight.
    Paper init subtracts its frozen initial update ΔW₀, so its bound is (|λ| + |λ₀|)·max w."""
    layers = {}
    if method.startswith("DeLoRA"):
        from .patching import delora_layers

        for name, layer in delora_layers(model).items():
            lam = layer.delora_lambda["default"].item()
            lam0 = layer.delora_lambda0["default"].item() if "default" in layer.delora_lambda0 else 0.0
            w_max = layer.delora_w_norm["default"].max().item()
            layers[name] = {"delta": layer.get_delta_weight().norm().item(), "bound": (abs(lam) + abs(lam0)) * w_max,
                            "lambda": lam}
    else:
        from peft.tuners.lora import LoraLayer

        names = [n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
        merged = model.merge_and_unload()
        for name in names:
            w = merged.get_submodule(name).weight
            layers[name] = {"delta": (w.float() - state[f"{name}.weight"].float()).norm().item()}
    return layers


def _finite(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN


def run_one(state: dict, setup: Setup, method: str, mult: float, seed: int, evals, device) -> dict:
    lr = setup.base_lr(method) * mult
    model, finished = fine_tune(state, setup, method, lr, seed, device)
    eval_a, eval_b = evals
    row = {"method": method, "lr_mult": mult, "lr": lr, "seed": seed,
           "new_task": accuracy(model, eval_b, setup.length), "old_task": accuracy(model, eval_a, setup.length),
           "diverged": not finished}
    layers = weight_change(model, method, state)
    row["delta_norm"] = _finite(sum(v["delta"] for v in layers.values()))
    if method.startswith("DeLoRA"):
        row["bound"] = _finite(sum(v["bound"] for v in layers.values()))
        row["lambda"] = _finite(statistics.fmean(abs(v["lambda"]) for v in layers.values()))
        row["layers"] = {k: {kk: _finite(vv) for kk, vv in v.items()} for k, v in layers.items()}
    return row


def run(out: str | None, setup: Setup = Setup(), seeds=(0,), multiples=MULTIPLES, methods=METHODS,
        device="cpu", plot: bool = True, log=print) -> list[dict]:
    """The whole sweep; writes ``out``/experiment.json (and .png with ``plot``) when ``out`` is given."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"`methods` must be drawn from {METHODS}, got {m!r}")
    if not seeds or not multiples or any(not (x > 0) for x in multiples):
        raise ValueError(f"`seeds` must be non-empty and `multiples` positive numbers, got {seeds!r}, {multiples!r}")
    device = torch.device(device)
    state, _ = pretrain(setup, out, device, log)
    task_a, task_b = setup.tasks(EVAL_SEED)
    evals = (task_a.batch(setup.eval_n, device)[0], task_b.batch(setup.eval_n, device)[0])
    model = _model(setup, device)
    model.load_state_dict(state)
    # Σ‖W₀‖_F over the layers every method adapts ("all-linear": every Linear but the output layer), for scale
    w0 = sum(m.weight.norm().item() for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head")
    rows = [{"method": "pretrained", "lr_mult": 0.0, "lr": 0.0, "seed": 0, "delta_norm": 0.0, "diverged": False,
             "new_task": accuracy(model, evals[1], setup.length), "old_task": accuracy(model, evals[0], setup.length),
             "weight_norm": w0}]
    log(f"pre-trained model: task A {rows[0]['old_task']:.3f}, task B {rows[0]['new_task']:.3f}, "
        f"Σ‖W₀‖_F over the adapted layers {w0:.2f}")
    t0 = time.perf_counter()
    for method in methods:
        for mult in multiples:
            for seed in seeds:
                row = run_one(state, setup, method, mult, seed, evals, device)
                rows.append(row)
                log(f"  {method:20s} lr x{mult:<4g} seed {seed}: task B {row['new_task']:.3f}  "
                    f"task A {row['old_task']:.3f}  ‖ΔW‖ {_fmt(row['delta_norm'])}"
                    f"{'  (diverged)' if row['diverged'] else ''}  [{time.perf_counter() - t0:.0f} s]")
    if out:
        os.makedirs(out, exist_ok=True)
        _write_json(rows, os.path.join(out, "experiment.json"))
        if plot:
            plot_rows(rows, os.path.join(out, "experiment.png"))
    return rows


def _write_json(rows, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _fmt(x, spec=".2f"):
    return "nan" if x is None else format(x, spec)


def _groups(rows):
    """{method: {lr_mult: [rows over seeds]}}, pre-trained row left out."""
    g = {}
    for r in rows:
        if r["method"] != "pretrained":
            g.setdefault(r["method"], {}).setdefault(r["lr_mult"], []).append(r)
    return g


def _stats(rows, key):
    """(median, min, max) over seeds, NaN where a run has no value (diverged)."""
    v = [r.get(key) for r in rows]
    v = [math.nan if x is None else x for x in v]
    return statistics.median(v), min(v), max(v)


def table(rows) -> str:
    """Medians over seeds, with the seeds' range (min–max) where there are several."""
    head = (f"{'method':20s} {'lr x':>5s} {'lr':>9s} {'task B':>19s} {'task A':>19s} {'Σ‖ΔW‖':>21s} "
            f"{'bound':>8s} {'|λ|':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["method"] == "pretrained":
            lines.append(f"{'pre-trained':20s} {'':>5s} {'':>9s} {r['new_task']:19.3f} {r['old_task']:19.3f} "
                         f"{'Σ‖W₀‖ ' + format(r['weight_norm'], '.2f'):>21s}")

    def cell(rs, key, spec, width, spread=True):
        med, lo, hi = _stats(rs, key)
        s = format(med, spec) if len(rs) == 1 or not spread else f"{med:{spec}} ({lo:{spec}}–{hi:{spec}})"
        return f"{s:>{width}s}"

    for method, by_mult in _groups(rows).items():
        for mult, rs in by_mult.items():
            line = (f"{method:20s} {mult:5g} {rs[0]['lr']:9.2e} {cell(rs, 'new_task', '.3f', 19)} "
                    f"{cell(rs, 'old_task', '.3f', 19)} {cell(rs, 'delta_norm', '.2f', 21)}")
            if "bound" in rs[0]:
                line += f" {cell(rs, 'bound', '.2f', 8, False)} {cell(rs, 'lambda', '.2f', 6, False)}"
            div = sum(r["diverged"] for r in rs)
            lines.append(line + (f"  ({div} diverged)" if div else ""))
    return "\n".join(lines)


def plot_rows(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    pre = next((r for r in rows if r["method"] == "pretrained"), None)
    panels = (("new_task", "task B accuracy (learning)"), ("old_task", "task A accuracy (forgetting)"),
              ("delta_norm", "Σ ‖W − W₀‖_F over adapted layers"))
    for i, (method, by_mult) in enumerate(_groups(rows).items()):
        color = f"C{i}"
        xs = sorted(by_mult)
        for ax, (key, _) in zip(axes, panels):
            med, lo, hi = zip(*(_stats(by_mult[x], key) for x in xs))
            ax.plot(xs, med, "o-", color=color, label=method)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            if key == "delta_norm" and "bound" in by_mult[xs[0]][0]:
                ax.plot(xs, [_stats(by_mult[x], "bound")[0] for x in xs], "--", color=color,
                        label=f"{method}: its bound")
    for ax, (key, title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate / method's base learning rate")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if key != "delta_norm":
            ax.set_ylim(-0.02, 1.02)
            if pre:
                ax.axhline(pre[key], color="gray", ls=":", label="pre-trained model")
        else:
            ax.set_yscale("log")
            if pre and "weight_norm" in pre:
                ax.axhline(pre["weight_norm"], color="gray", ls=":", label="Σ ‖W₀‖_F (pre-trained weights)")
    base = {m: r["lr"] / r["lr_mult"] for m, by in _groups(rows).items() for r in next(iter(by.values()))}
    fig.suptitle("base learning rates: " + ", ".join(f"{m} {lr:.1e}" for m, lr in base.items()), fontsize=10)
    handles, labels = axes[2].get_legend_handles_labels()
    if pre:
        handles.append(axes[1].get_legend_handles_labels()[0][-1])
        labels.append("pre-trained model (accuracy panels)")
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = dict(steps=120)


def _multiples(text: str) -> tuple:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or not all(v > 0 and math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return vals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="delora-ext experiment", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one seed and 120 steps (about 2-3 minutes on 2 CPU cores)")
    p.add_argument("--out", default="delora-experiment",
                   help="folder for experiment.json, experiment.png and the cached pre-trained model")
    p.add_argument("--seeds", type=int, help="number of fine-tuning seeds (default: 1 with --quick, else 3)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default: 120 with --quick, else 300)")
    p.add_argument("--multiples", type=_multiples, default=MULTIPLES,
                   help="learning-rate multiples of each method's base lr (default: 0.5,1,2,4,8,16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the model is so small that more threads mostly add synchronisation)")
    args = p.parse_args(argv)
    missing = [m for m in ("transformers", "peft", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        p.error(f"the experiment needs {', '.join(missing)}: pip install 'delora_ext[experiment]'")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    for name, v in (("--seeds", n_seeds), ("--steps", args.steps), ("--threads", args.threads)):
        if v is not None and v < 1:
            p.error(f"{name} must be at least 1, got {v}")
    setup = Setup(**(QUICK if args.quick else {}))
    if args.steps is not None:
        setup = dataclasses.replace(setup, steps=args.steps)
    torch.set_num_threads(args.threads)
    print(f"setup: {setup}")
    t0 = time.perf_counter()
    rows = run(args.out, setup, seeds=tuple(range(n_seeds)), multiples=args.multiples, device=args.device)
    print()
    print(table(rows))
    print(f"\nwrote {os.path.join(args.out, 'experiment.json')} and experiment.png ({time.perf_counter() - t0:.0f} s)")
    excess = [(r["method"], r["lr_mult"], r["seed"], name) for r in rows for name, layer in r.get("layers", {}).items()
              if layer["delta"] is not None and layer["delta"] > layer["bound"] * (1 + 1e-5)]
    for e in excess:
        print("DeLoRA update above its bound |λ|·max w: {} lr x{:g} seed {} layer {}".format(*e))
    return 1 if excess else 0
