"""The learning-rate robustness experiment (``python -m delora_ext experiment``) on a grid small enough for a test:
its outputs' schema, DeLoRA's bound per layer, and its weight-change figures against independent fp64 math."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from delora_ext import experiment as E  # noqa: E402
from delora_ext import reference as ref  # noqa: E402
from delora_ext.patching import delora_layers  # noqa: E402

SMALL = E.Setup(hidden=32, layers=1, length=4, n_sym=8, batch=16, pretrain_lr=1e-2, pretrain_max_steps=2000,
                pretrain_target=0.9, steps=25, eval_n=128)
MULTS = (1, 16)
SEEDS = (0, 1)
N_LAYERS = 7 * SMALL.layers  # q, k, v, o, gate, up, down: "all-linear" without lm_head


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    logs = []
    rows = E.run(str(out), SMALL, seeds=SEEDS, multiples=MULTS, log=logs.append)
    return out, rows, logs


def test_outputs_and_schema(sweep):
    out, rows, _ = sweep
    assert json.loads((out / "experiment.json").read_text()) == rows
    assert (out / "experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pre, runs = rows[0], rows[1:]
    assert pre["method"] == "pretrained" and pre["old_task"] >= SMALL.pretrain_target and pre["weight_norm"] > 0
    assert sorted((r["method"], r["lr_mult"], r["seed"]) for r in runs) == sorted(
        (m, x, s) for m in E.METHODS for x in MULTS for s in SEEDS)
    for r in runs:
        assert {"method", "lr", "seed", "new_task", "old_task", "delta_norm", "diverged"} <= set(r)
        assert r["lr"] == pytest.approx(SMALL.base_lr(r["method"]) * r["lr_mult"])
        assert 0.0 <= r["new_task"] <= 1.0 and 0.0 <= r["old_task"] <= 1.0
        assert r["diverged"] or r["delta_norm"] > 0  # every method moved the weights
        assert ("bound" in r) == r["method"].startswith("DeLoRA")
    assert SMALL.base_lr("DeLoRA") == pytest.approx(10 * SMALL.base_lr("LoRA"))
    assert E.table(rows).count("\n") == 1 + 1 + len(E.METHODS) * len(MULTS)


def test_delora_update_stays_within_its_bound_in_every_layer(sweep):
    _, rows, _ = sweep
    delora = [r for r in rows if "bound" in r]
    assert len(delora) == 2 * len(MULTS) * len(SEEDS)
    for r in delora:
        assert len(r["layers"]) == N_LAYERS
        for name, layer in r["layers"].items():
            assert 0 < layer["delta"] <= layer["bound"] * (1 + 1e-6), (r["method"], r["lr_mult"], name, layer)
        assert r["delta_norm"] == pytest.approx(sum(v["delta"] for v in r["layers"].values()))
        assert r["bound"] == pytest.approx(sum(v["bound"] for v in r["layers"].values()))
        assert r["lambda"] == pytest.approx(sum(abs(v["lambda"]) for v in r["layers"].values()) / N_LAYERS)


def test_pretrained_model_is_cached(sweep):
    out, rows, logs = sweep
    assert any("pre-trained on task A" in line for line in logs)
    logs2 = []
    state, acc = E.pretrain(SMALL, str(out), "cpu", logs2.append)
    assert "cached" in logs2[0] and acc == rows[0]["old_task"]
    assert len(list(out.glob("pretrained-*.pt"))) == 1 and not list(out.glob("*.tmp*"))
    model = E._model(SMALL, "cpu")
    model.load_state_dict(state)  # the cache holds the whole model
    eval_a = SMALL.tasks(E.EVAL_SEED)[0].batch(SMALL.eval_n, "cpu")[0]
    assert E.accuracy(model, eval_a, SMALL.length) == acc


def _f64(t):
    return t.detach().to(torch.float64)


@pytest.mark.parametrize("method", E.METHODS)
def test_weight_change_matches_fp64_reference(sweep, method):
    """‖W − W₀‖ per layer against fp64 math written from the methods' definitions (DeLoRA: B diag(s) A diag(w),
    minus the frozen initial term for paper init; LoRA: scaling·BA; DoRA: m ⊙ (W₀ + scaling·BA)/‖row‖ − W₀)."""
    out, _, _ = sweep
    state, _ = E.pretrain(SMALL, str(out), "cpu", lambda *_: None)
    model, finished = E.fine_tune(state, SMALL, method, SMALL.base_lr(method) * 4, 0, "cpu")
    assert finished
    expect, bound = {}, {}
    if method.startswith("DeLoRA"):
        for name, layer in delora_layers(model).items():
            w = _f64(layer.delora_w_norm["default"])
            d = ref.delta_weight_ref(*map(_f64, (layer.delora_A["default"], layer.delora_B["default"],
                                                 layer.delora_lambda["default"])), w)
            if method.endswith("(paper init)"):
                d = d - ref.delta_weight_ref(*map(_f64, (layer.delora_A0["default"], layer.delora_B0["default"],
                                                         layer.delora_lambda0["default"])), w)
            w0 = _f64(state[f"{name}.weight"])
            torch.testing.assert_close(w, torch.linalg.vector_norm(w0, dim=0), rtol=1e-6, atol=0)  # pre-trained w
            expect[name] = d.norm().item()
            lam0 = layer.delora_lambda0["default"].item() if method.endswith("(paper init)") else 0.0
            bound[name] = (abs(layer.delora_lambda["default"].item()) + abs(lam0)) * w0.norm(dim=0).max().item()
    else:
        for name, m in model.base_model.model.named_modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                w0 = _f64(state[f"{name}.weight"])
                ba = m.scaling["default"] * _f64(m.lora_B["default"].weight) @ _f64(m.lora_A["default"].weight)
                if method == "DoRA":
                    mag = _f64(m.lora_magnitude_vector["default"].weight)
                    v = w0 + ba
                    ba = mag[:, None] * v / v.norm(dim=1, keepdim=True) - w0
                expect[name] = ba.norm().item()
    got = E.weight_change(model, method, state)
    assert sorted(got) == sorted(expect) and len(got) == N_LAYERS
    for name in got:
        # fp32 weights: a merged PEFT weight carries W₀'s rounding (~6e-8·‖W₀‖), more than ‖ΔW‖'s own precision
        tol = 1e-5 if method.startswith("DeLoRA") else 1e-6 * state[f"{name}.weight"].norm().item()
        assert got[name]["delta"] == pytest.approx(expect[name], rel=1e-5, abs=tol), name
        if bound:
            assert got[name]["bound"] == pytest.approx(bound[name], rel=1e-6), name
            assert got[name]["delta"] <= got[name]["bound"]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="`methods`"):
        E.run(None, SMALL, methods=("QLoRA",))
    with pytest.raises(ValueError, match="`multiples`"):
        E.run(None, SMALL, multiples=(0,))
    with pytest.raises(ValueError, match="`seeds`"):
        E.run(None, SMALL, seeds=())
    with pytest.raises(ValueError, match="`method`"):
        E.fine_tune({}, SMALL, "QLoRA", 1e-3, 0, "cpu")
    with pytest.raises(SystemExit):
        E.main(["--multiples", "1,x"])
    with pytest.raises(SystemExit):
        E.main(["--seeds", "0"])
    for bad in ({"steps": 0}, {"hidden": 30}, {"lora_lr": float("nan")}, {"batch": 2.0}):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            E.Setup(**bad)
    # a target that cannot be reached: a clear error and no cache file
    never = E.Setup(**{**SMALL.__dict__, "pretrain_max_steps": 50, "pretrain_target": 1.01})
    with pytest.raises(RuntimeError, match="pretrain_target"):
        E.pretrain(never, str(tmp_path), "cpu", lambda *_: None)
    assert not list(tmp_path.iterdir())


def test_command_is_registered(capsys):
    from delora_ext.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["experiment", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out


def test_plot_tolerates_diverged_runs(tmp_path):
    rows = [{"method": "pretrained", "lr_mult": 0.0, "lr": 0.0, "seed": 0, "new_task": 0.1, "old_task": 0.99,
             "delta_norm": 0.0, "diverged": False, "weight_norm": 10.0},
            {"method": "LoRA", "lr_mult": 1, "lr": 1e-3, "seed": 0, "new_task": 0.5, "old_task": 0.5,
             "delta_norm": 3.0, "diverged": False},
            {"method": "LoRA", "lr_mult": 2, "lr": 2e-3, "seed": 0, "new_task": 0.03, "old_task": 0.03,
             "delta_norm": None, "diverged": True}]
    E.plot_rows(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0
    assert "1 diverged" in E.table(rows) and "nan" in E.table(rows)
    assert math.isnan(E._stats(rows[2:], "delta_norm")[0])
