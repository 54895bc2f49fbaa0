"""``python -m delora_ext bench``: the CPU benchmark (bench/bench_cpu.py in the source tree) plus a PNG plot.

The benchmark script lives in ``bench/`` beside its recorded results; this entry point runs it from a source
checkout (the README's install is editable) and then draws the step-time ratios with matplotlib.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_cpu.py")
VARIANTS = (("ours", "delora_ext"), ("peft_delora", "PEFT DeLoRA"), ("peft_lora", "PEFT LoRA"),
            ("ref", "reference"))


def _load_script():
    if not os.path.isfile(SCRIPT):
        raise SystemExit(f"delora-ext bench: {SCRIPT} not found; the benchmark runs from a source checkout "
                         f"(pip install --no-build-isolation -e .)")
    spec = importlib.util.spec_from_file_location("delora_bench_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["delora_bench_cpu"] = mod
    spec.loader.exec_module(mod)
    return mod


def plot(result_json: str, png: str) -> str:
    """Bar chart of step time / frozen nn.Linear step per configuration (x requires grad), one bar per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(result_json) as f:
        res = json.load(f)
    rows = [r for r in res["rows"] if r["mode"] == "x_grad"]
    if not rows:  # --only host: no step table to draw
        return None
    labels = [f"N={r['N']}\n{r['in']}×{r['out']}\nr={r['r']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    width = 0.8 / len(VARIANTS)
    for i, (key, name) in enumerate(VARIANTS):
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], [r[key]["ratio_to_frozen"] for r in rows],
               width, label=name)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0.8, max(1.5, max(r[k]["ratio_to_frozen"] for r in rows for k, _ in VARIANTS) + 0.1))
    ax.axhline(1.10, color="gray", lw=0.8, ls="--", label="target 1.10× (headline)")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("step time / frozen nn.Linear step")
    env = res["environment"]
    ax.set_title(f"DeLoRA training step on CPU (fp32, {env['nproc']} cores, {env['date'][:10]})", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mod = _load_script()
    rc = mod.main(argv)
    out = None
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    if out:
        result = out[:-3] if out.endswith(".md") else out[:-5] if out.endswith(".json") else out
        result += ".json"
    else:
        found = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "cpu-*.json")), key=os.path.getmtime)
        result = found[-1] if found else None
    if result and os.path.isfile(result) and not any(a in ("-h", "--help") for a in argv):
        try:
            png = plot(result, result[: -len(".json")] + ".png")
            if png:
                print(f"plot: {png}", file=sys.stderr)
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return rc
