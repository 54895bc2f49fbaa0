"""The command line: `python -m delora_ext info|demo` (the README's main command runs the demo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "delora_ext", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_info_prints_build_info():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["running_torch"] == torch.__version__ and "native" in info


def test_demo_trains_saves_reloads_and_merges(tmp_path):
    out = _run("demo", "--steps", "40", "--batch", "16", "--out", str(tmp_path / "adapter"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    before = float(text.split("eval loss before fine-tuning: ")[1].split()[0])
    after = float(text.split("eval loss after fine-tuning: ")[1].split()[0])
    assert after < before
    assert "exceeds the bound" not in text and "-> OK" in text
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_demo_fine_tunes_a_local_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    out = _run("demo", "--model", str(tmp_path / "ckpt"), "--steps", "30", "--batch", "16", "--r", "4",
               "--targets", "q_proj,v_proj", "--lr", "1e-2")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "patched 4 layers" in out.stdout


def test_bad_subcommand_is_refused():
    out = _run("nonsense")
    assert out.returncode != 0 and "invalid choice" in out.stderr


def test_bench_quick_writes_tables_and_plot(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out = _run("bench", "--quick", "--no-profile", "--repeats", "3", "--warmup", "1", "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for suffix in (".md", ".json", ".png"):
        assert (tmp_path / f"b{suffix}").stat().st_size > 0
    res = json.loads((tmp_path / "b.json").read_text())
    row = res["rows"][0]
    assert row["ours"]["median_ms"] > 0 and row["frozen"]["median_ms"] > 0
