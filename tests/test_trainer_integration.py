"""Trainer and TRL jobs: DeLoRACallback on patch()ed models, SFTTrainer(peft_config=DeloraConfig) on the native
ops, resume_from_checkpoint, param_groups, the per-layer figures, and the examples, on a tiny Llama built from a
config with a tokenizer built in memory and an in-memory dataset."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="the Trainer integration needs transformers")
datasets = pytest.importorskip("datasets", reason="the Trainer tests build in-memory datasets (pip install datasets)")
pytest.importorskip("tokenizers", reason="the tests build a tokenizer in memory (tokenizers)")

import delora_ext  # noqa: E402
from delora_ext import training  # noqa: E402

from helpers import assert_close, requires_native  # noqa: E402
from tiny_models import one_thread  # noqa: E402,F401

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)
import _tiny  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
FULL_COPY = "holds a full copy of the model"


def _peft():
    return pytest.importorskip("peft", reason="PEFT is needed for this test")


def _dp():
    _peft()
    return pytest.importorskip("delora_ext.peft")


def _trl():
    return pytest.importorskip("trl", reason="TRL is needed for the SFTTrainer tests (pip install trl)")


@pytest.fixture(autouse=True)
def peft_factory_restored():
    yield
    if "delora_ext.peft" in sys.modules:
        sys.modules["delora_ext.peft"].disable()


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny.tokenizer()


@pytest.fixture(scope="module")
def lm_dataset(tokenizer):
    ds = datasets.Dataset.from_dict({"text": _tiny.texts(16)})
    return ds.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


class Probe(transformers.TrainerCallback):
    """Records the logs it receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _args(out, steps, **kw):
    kw.setdefault("save_steps", 2)
    return transformers.TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                                          logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2,
                                          **kw)


def _patched(dropout=0.1):
    model = _tiny.llama()
    delora_ext.patch(model, target_modules=TARGETS, r=4, init_weights=False, module_dropout=dropout)
    return model


def _train_patched(out, steps, tokenizer, ds, resume=None, callbacks=(), attach=True, lambda_lr=5e-2):
    model = _patched()
    opt = torch.optim.AdamW(delora_ext.param_groups(model, 1e-2, lambda_lr=lambda_lr, weight_decay=0.01))
    trainer = transformers.Trainer(model=model, args=_args(out, steps), train_dataset=ds, optimizers=(opt, None),
                                   data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
                                   callbacks=list(callbacks))
    if attach:
        delora_ext.attach_callback(trainer)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return model, trainer, [str(w.message) for w in rec]


def _adapter_tensors(model):
    return {k: v for k, v in model.state_dict().items() if ".delora_" in k}


# ---- patch() + Trainer + DeLoRACallback ---------------------------------------------------------------
@requires_native
def test_patched_trainer_checkpoints_hold_the_adapter_and_resume_bit_exactly(tmp_path, tokenizer, lm_dataset):
    m4, tr4, warned = _train_patched(tmp_path / "a", 4, tokenizer, lm_dataset)
    for step in (2, 4):
        ckpt = tmp_path / "a" / f"checkpoint-{step}"
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert sum(FULL_COPY in w for w in warned) == 1  # two checkpoints with model.safetensors, one warning
    msg = next(w for w in warned if FULL_COPY in w)
    assert "model.safetensors" in msg and "delora_ext.peft.enable()" in msg and "get_peft_model" in msg
    # the adapter of checkpoint-4 is the trained one, for delora_ext and for PEFT
    loaded = delora_ext.load_adapter(_tiny.llama(), str(tmp_path / "a" / "checkpoint-4"))
    a, b = _adapter_tensors(m4), _adapter_tensors(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    m4.eval()
    with torch.no_grad():
        want = m4(input_ids=ids).logits
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(_tiny.llama(), str(tmp_path / "a" / "checkpoint-4")).eval()
    with torch.no_grad():
        assert_close(pm(input_ids=ids).logits, want, 1e-5, "PEFT reading checkpoint-4")
    # 2 + 2 steps == 4 steps, bit for bit (module dropout on: its seeds come from the restored RNG state)
    m2, tr2, _ = _train_patched(tmp_path / "b", 4, tokenizer, lm_dataset, resume=str(tmp_path / "a" / "checkpoint-2"))
    s4, s2 = m4.state_dict(), m2.state_dict()
    assert s4.keys() == s2.keys() and all(torch.equal(s4[k], s2[k]) for k in s4)
    loss = {h["step"]: h["loss"] for h in tr4.state.log_history if "loss" in h}
    loss2 = {h["step"]: h["loss"] for h in tr2.state.log_history if "loss" in h}
    assert loss2 == loss and len(loss) == 4  # steps 1-2 from the checkpoint's trainer state, 3-4 recomputed


@requires_native
def test_figures_reach_log_history_and_the_callbacks_after_it(tmp_path, tokenizer, lm_dataset):
    """Trainer.log copies `logs` into state.log_history before the callbacks run: the callback puts its figures
    into both, so they reach log_history and every callback after it, but not one before it (attach_callback
    puts it before the logging integrations)."""
    early, late = Probe(), Probe()
    cb = delora_ext.DeLoRACallback()
    model, trainer, _ = _train_patched(tmp_path / "a", 2, tokenizer, lm_dataset, callbacks=[early, cb, late],
                                       attach=False)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 2 and all("delora/dw_over_bound_max" in h for h in history)
    assert all("delora/lambda_mean" in lg for lg in late.logs if "loss" in lg)
    assert not any("delora/lambda_mean" in lg for lg in early.logs)
    # the last figures describe the trained model (logged after the optimizer step of step 2)
    rows = training.layer_figures(model)
    assert len(rows) == 4 and {r["layer"] for r in rows} == set(delora_ext.patching.delora_layers(model))
    last = history[-1]
    worst = max(rows, key=lambda r: r["ratio"])
    assert last["delora/worst_layer"] == worst["layer"]
    assert last["delora/dw_over_bound_max"] == pytest.approx(worst["ratio"], rel=1e-12)
    assert last["delora/lambda_min"] == pytest.approx(min(r["lambda"] for r in rows), rel=1e-12)
    assert 0 < last["delora/dw_over_bound_mean"] <= last["delora/dw_over_bound_max"] <= 1.0
    # attached: a probe registered before it (as TensorBoard/W&B are) now sees them too
    early2 = Probe()
    _train_patched(tmp_path / "b", 1, tokenizer, lm_dataset, callbacks=[early2])
    assert "delora/lambda_mean" in early2.logs[0]


# ---- the per-layer figures ------------------------------------------------------------------------------
@requires_native
@pytest.mark.parametrize("kind", ["patch", "peft"])
def test_layer_figures_equal_an_independent_computation(kind):
    torch.manual_seed(0)
    model = _tiny.llama()
    if kind == "patch":
        delora_ext.patch(model, target_modules=TARGETS, r=3, init_weights=False, delora_lambda=2.0,
                         lambda_pattern={"v_proj": -4.0})
        layers = delora_ext.patching.delora_layers(model)
    else:
        peft = _peft()
        model = peft.get_peft_model(model, peft.DeloraConfig(r=3, target_modules=TARGETS, init_weights=False,
                                                             delora_lambda=2.0, lambda_pattern={"v_proj": -4.0}))
        layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "DeloraLinear"}
    rows = training.layer_figures(model)
    assert [r["layer"] for r in rows] == list(layers) and len(rows) == 4
    for row in rows:
        layer = layers[row["layer"]]
        dw = layer.get_delta_weight("default").double()
        lam = layer.delora_lambda["default"].item()
        bound = abs(lam) * layer.delora_w_norm["default"].max().item()
        assert row["lambda"] == pytest.approx(lam) and row["bound"] == pytest.approx(bound, rel=1e-6)
        assert row["dw_norm"] == pytest.approx(dw.norm().item(), rel=1e-5)
        assert 0.0 < row["ratio"] <= 1.0 + 1e-6
    summary = training.figures_summary(rows, per_layer=True)
    assert summary["delora/lambda_min"] == pytest.approx(-4.0) and summary["delora/lambda_max"] == pytest.approx(2.0)
    assert f"delora/default/{rows[0]['layer']}/ratio" in summary


def test_ratio_never_exceeds_the_bound():
    """‖ΔW‖_F ≤ |λ|·max_j w_j for any A, B (the norm clamps only shrink s), including tiny and zero columns."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        r, i, o = (int(v) for v in torch.randint(1, 12, (3,), generator=g))
        model = nn.Sequential(nn.Linear(i, o))
        delora_ext.patch(model, target_modules=["0"], r=r, init_weights=False,
                         delora_lambda=float(torch.randn(1, generator=g) * 10))
        layer = model[0]
        with torch.no_grad():
            scale = 10 ** float(torch.randint(-6, 3, (1,), generator=g))
            layer.delora_A["default"].copy_(torch.randn(r, i, generator=g) * scale)
            layer.delora_B["default"].copy_(torch.randn(o, r, generator=g))
            if trial % 3 == 0:
                layer.delora_A["default"][0].zero_()
        (row,) = training.layer_figures(model)
        assert row["ratio"] <= 1.0 + 1e-6, row


# ---- param_groups ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["patch", "peft"])
def test_param_groups_partition_the_trainable_parameters(kind):
    model = _tiny.llama(bias=True)
    cfg = dict(r=4, target_modules=TARGETS, bias="all", modules_to_save=["lm_head"])
    if kind == "patch":
        delora_ext.patch(model, **cfg)
    else:
        peft = _peft()
        model = peft.get_peft_model(model, peft.DeloraConfig(**cfg))
    groups = delora_ext.param_groups(model, 1e-3, lambda_lr=5e-2, weight_decay=0.1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))
    rest, lam = groups
    assert rest["lr"] == 1e-3 and rest["weight_decay"] == 0.1 and lam["lr"] == 5e-2 and lam["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".delora_lambda." in names[id(p)] for p in lam["params"]) and len(lam["params"]) == 4
    assert not any(".delora_lambda." in names[id(p)] for p in rest["params"])
    assert any("lm_head" in names[id(p)] for p in rest["params"]) and any(names[id(p)].endswith("bias")
                                                                          for p in rest["params"])
    assert delora_ext.param_groups(model, 1e-3)[1]["lr"] == 1e-3  # lambda_lr defaults to lr


def test_param_groups_give_lambda_its_learning_rate_in_a_step():
    model = _patched(dropout=0.0)
    opt = torch.optim.SGD(delora_ext.param_groups(model, 1e-3, lambda_lr=0.5, weight_decay=0.1))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    layer = delora_ext.patching.delora_layers(model)["model.layers.0.self_attn.q_proj"]
    lam, A = layer.delora_lambda["default"], layer.delora_A["default"]
    lam0, A0, glam, gA = lam.detach().clone(), A.detach().clone(), lam.grad.clone(), A.grad.clone()
    opt.step()
    assert torch.allclose(lam, lam0 - 0.5 * glam, rtol=0, atol=1e-7)  # no weight decay on λ
    assert torch.allclose(A, A0 - 1e-3 * (gA + 0.1 * A0), rtol=0, atol=1e-7)


def test_param_groups_bad_input():
    model = _patched()
    for kw, match in ((dict(lr=-1.0), "`lr` must be a finite number ≥ 0"), (dict(lr="1e-3"), "`lr`"),
                      (dict(lr=True), "`lr`"), (dict(lr=1e-3, lambda_lr=float("nan")), "`lambda_lr`"),
                      (dict(lr=1e-3, weight_decay=-0.1), "`weight_decay`")):
        with pytest.raises(ValueError, match=match):
            delora_ext.param_groups(model, **kw)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        delora_ext.param_groups("model", 1e-3)
    with pytest.raises(ValueError, match="`model` has no DeLoRA layers"):
        delora_ext.param_groups(_tiny.llama(), 1e-3)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="`model` has no trainable parameters"):
        delora_ext.param_groups(model, 1e-3)


def test_callback_bad_input(tmp_path, tokenizer, lm_dataset):
    with pytest.raises(TypeError, match="`save_adapter` must be a bool"):
        delora_ext.DeLoRACallback(save_adapter="yes")
    with pytest.raises(TypeError, match="`trainer` must be a transformers Trainer"):
        delora_ext.attach_callback(object())
    trainer = transformers.Trainer(model=_patched(), args=_args(tmp_path, 1), train_dataset=lm_dataset)
    with pytest.raises(TypeError, match="`callback` must be a DeLoRACallback"):
        delora_ext.attach_callback(trainer, Probe())
    first = delora_ext.attach_callback(trainer)
    second = delora_ext.attach_callback(trainer)  # replaces, never two of them
    kinds = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert kinds.count("DeLoRACallback") == 1 and second is not first and kinds[1] == "DeLoRACallback"


# ---- TRL SFTTrainer with peft_config on the native ops ------------------------------------------------------
def _sft(out, steps, tokenizer, resume=None, native=True, dropout=0.1, callbacks=(), bf16=True):
    """TRL's defaults train in bf16 autocast (on the CPU too) with gradient checkpointing."""
    trl, peft, dp = _trl(), _peft(), _dp()
    (dp.enable if native else dp.disable)()
    args = trl.SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                         logging_steps=1, report_to=[], use_cpu=True, seed=0, learning_rate=1e-2, max_length=16,
                         dataset_text_field="text", bf16=bf16)
    cfg = peft.DeloraConfig(r=4, target_modules=TARGETS, module_dropout=dropout, init_weights=False)
    trainer = trl.SFTTrainer(model=_tiny.llama(), args=args, processing_class=tokenizer, peft_config=cfg,
                             train_dataset=datasets.Dataset.from_dict({"text": _tiny.texts(16)}),
                             callbacks=list(callbacks))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return trainer, [str(w.message) for w in rec]


@pytest.fixture
def counted(monkeypatch):
    """Calls of the native fused op and of PEFT's eager DeloraLinear.forward."""
    dp = _dp()
    calls = {"native": 0, "peft": 0}
    native, eager = delora_ext.ops.linear, dp.PeftDeloraLinear.forward

    def count_native(*a, **k):
        calls["native"] += 1
        return native(*a, **k)

    def count_eager(self, *a, **k):
        calls["peft"] += 1
        return eager(self, *a, **k)
    assert dp.backend_problem() is None  # the self-check has run (it calls PEFT's forward once)
    monkeypatch.setattr(delora_ext.ops, "linear", count_native)
    monkeypatch.setattr(dp.PeftDeloraLinear, "forward", count_eager)
    return calls


@requires_native
def test_sft_trainer_with_peft_config_trains_on_native_ops_and_resumes(tmp_path, tokenizer, counted):
    dp = _dp()
    probe = Probe()
    trainer, warned = _sft(tmp_path / "a", 4, tokenizer, callbacks=[delora_ext.DeLoRACallback(), probe])
    peft = _peft()
    assert isinstance(trainer.model, peft.PeftModel)
    layers = [m for m in trainer.model.modules() if isinstance(m, dp.PeftDeloraLinear)]
    assert len(layers) == 4 and all(type(m) is dp.NativeDeloraLinear for m in layers)
    assert counted["native"] >= 4 * 4 and counted["peft"] == 0
    for step in (2, 4):  # adapter-only checkpoints, PEFT's files
        files = set(os.listdir(tmp_path / "a" / f"checkpoint-{step}"))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        assert not files & set(training.FULL_MODEL_FILES)
    assert not any(FULL_COPY in w for w in warned) and not any("delora_ext.peft:" in w for w in warned)
    assert any("delora/lambda_mean" in lg for lg in probe.logs)  # the figures work for PEFT models too
    # 2 + 2 == 4, bit for bit
    resumed, _ = _sft(tmp_path / "b", 4, tokenizer, resume=str(tmp_path / "a" / "checkpoint-2"))
    s4, s2 = trainer.model.state_dict(), resumed.model.state_dict()
    assert s4.keys() == s2.keys() and all(torch.equal(s4[k], s2[k]) for k in s4)
    # the checkpoint's adapter loads into delora_ext and into PEFT (eager) alike
    ckpt = str(tmp_path / "a" / "checkpoint-4")
    mine = delora_ext.load_adapter(_tiny.llama(), ckpt).eval()
    dp.disable()
    theirs = peft.PeftModel.from_pretrained(_tiny.llama(), ckpt).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(mine(input_ids=ids).logits, theirs(input_ids=ids).logits, 1e-5, "checkpoint-4")


@requires_native
def test_sft_on_native_ops_trains_like_peft_eager(tmp_path, tokenizer):
    dp = _dp()
    native, _ = _sft(tmp_path / "n", 3, tokenizer, native=True, dropout=0.0, bf16=False)
    eager, _ = _sft(tmp_path / "e", 3, tokenizer, native=False, dropout=0.0, bf16=False)
    assert all(type(m) is dp.PeftDeloraLinear for m in eager.model.modules() if isinstance(m, dp.PeftDeloraLinear))
    ln = [h["loss"] for h in native.state.log_history if "loss" in h]
    le = [h["loss"] for h in eager.state.log_history if "loss" in h]
    assert len(ln) == 3 and ln == pytest.approx(le, rel=1e-5)
    pn, pe = dict(native.model.named_parameters()), dict(eager.model.named_parameters())
    for n, p in pe.items():
        if p.requires_grad:
            assert_close(pn[n], p, 1e-5, n)


# ---- the examples -------------------------------------------------------------------------------------------
@requires_native
def test_examples_train_and_export_on_a_tiny_model(tmp_path):
    _trl()
    _dp()
    import export_lora
    import trainer_patch_callback
    import trl_sft_peft
    common = ["--tiny", "--r", "4", "--max-steps", "4", "--save-steps", "2", "--logging-steps", "2",
              "--max-length", "16", "--lr", "1e-2"]
    sft = trl_sft_peft.main(common + ["--output-dir", str(tmp_path / "sft"), "--lambda-lr", "5e-2"])
    assert sft["layer_classes"] == {"NativeDeloraLinear"}
    assert (tmp_path / "sft" / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "sft" / "checkpoint-4" / "model.safetensors").exists()
    groups = {g["name"]: g for g in sft["trainer"].optimizer.param_groups}  # param_groups' optimizer was used
    assert groups.keys() == {"delora", "delora_lambda"}
    assert groups["delora"]["initial_lr"] == 1e-2 and groups["delora_lambda"]["initial_lr"] == 5e-2
    patched = trainer_patch_callback.main(common + ["--output-dir", str(tmp_path / "patch")])
    assert (tmp_path / "patch" / "checkpoint-4" / "adapter_config.json").is_file()
    assert os.path.isfile(os.path.join(patched["adapter_dir"], "adapter_model.safetensors"))
    for name, src in (("sft", tmp_path / "sft" / "checkpoint-4"), ("patch", tmp_path / "patch" / "checkpoint-4"),
                      ("final", tmp_path / "patch" / "adapter")):
        out = export_lora.main(["--tiny", "--adapter", str(src), "--out", str(tmp_path / "lora" / name), "--check"])
        assert out["rel_diff"] < 1e-5, (src, out)
    cfg = (tmp_path / "lora" / "sft" / "adapter_config.json").read_text()
    assert '"peft_type": "LORA"' in cfg
