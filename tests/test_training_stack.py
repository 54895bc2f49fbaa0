"""delora_ext inside the tools production training jobs use, on CPU: torch.compile (fullgraph), autocast,
activation (gradient) checkpointing, DDP and FSDP2 over gloo, and transformers' Trainer with an adapter round trip.

Every test runs on the tiny Llama of tiny_models.py with every linear layer but lm_head adapted and
``init_weights=False`` (B random too), so the adapter changes outputs and each of its parameters gets a gradient.

The distributed tests launch 2 worker processes that run this file as a script (``--dist-worker``); each launch
has a hard deadline after which the workers' process groups are killed, so a hung collective cannot hang CI.
They, and the last test, also save the adapter from what a training script holds: a DDP wrapper, an FSDP2-sharded
model (every rank), a torch.compile wrapper.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import delora_ext
from delora_ext import DeLoRALinear

from helpers import CUDA, rel_err
from tiny_models import (
    build,
    one_thread,  # noqa: F401  (autouse: the model tests run single-threaded)
    snapshot,
)

R = 4
ADAPTER_KINDS = ("delora_A", "delora_B", "delora_lambda")


def patched_llama(seed: int = 0, adapter_seed: int = 1, **kw) -> nn.Module:
    """Tiny Llama, every linear layer but lm_head adapted, B random (a non-trivial adapter at step 0)."""
    model = build("llama", seed)
    torch.manual_seed(adapter_seed)  # kaiming init of A and B draws from the global generator
    cfg = dict(r=R, target_modules="all-linear", init_weights=False)
    cfg.update(kw)
    return delora_ext.patch(model, **cfg)


def token_batch(n: int = 2, seq: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss (mean over the predicted tokens)."""
    return model(input_ids=ids, labels=ids).loss


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_grads(model: nn.Module, loss_fn) -> dict[str, torch.Tensor]:
    """Gradients of the trainable (adapter) parameters after one backward of loss_fn()."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    assert grads and all(g is not None for g in grads.values())
    return grads


def kind_err(actual: dict, expected: dict, kind: str) -> float:
    """Relative error of all tensors of one parameter kind (e.g. every delora_B), concatenated."""
    keys = [k for k in expected if f".{kind}." in k]
    assert keys, kind
    return rel_err(torch.cat([actual[k].flatten() for k in keys]), torch.cat([expected[k].flatten() for k in keys]))


def assert_grads_close(actual: dict, expected: dict, tol: float, what: str) -> None:
    """Every gradient within ``tol`` relative. A scalar dλ is a sum of r per-rank terms that can cancel by ~100x,
    so its fp32 rounding scales with the terms, not the sum: dλ's are held to ``tol`` relative to the largest
    |dλ| in the model instead of their own size."""
    assert list(actual) == list(expected)
    lam_keys = [k for k in expected if ".delora_lambda." in k]
    lam_scale = max((expected[k].abs().max().item() for k in lam_keys), default=0.0)
    bad = {k: (rel_err(actual[k], expected[k]) if k not in lam_keys else
               (actual[k] - expected[k]).abs().max().item() / max(lam_scale, 1e-30)) for k in expected}
    bad = {k: e for k, e in bad.items() if e > tol}
    assert not bad, f"{what}: {len(bad)} gradients off by more than {tol:.0e}: {sorted(bad.items())[:5]}"


# ---- torch.compile ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["eval", "train-dropout"])
def test_torch_compile_fullgraph_matches_eager(dropout, device):
    """The whole patched model compiles as one graph with the default inductor backend (fullgraph=True raises on
    any graph break; transformers' Llama itself needs nothing set for that), and the native op stays in the graph
    as a custom op, once per adapted layer (its fake kernel and registered autograd let Dynamo and AOTAutograd
    trace it). Logits and every adapter gradient equal eager within 1e-5.

    train-dropout: module dropout on in train mode. Inductor normally generates its own random numbers, so the
    per-call dropout seed the layer draws (torch.randint) would differ from eager; with inductor's
    ``fallback_random`` it draws from torch's generator as eager does, and compiled must then equal eager exactly
    as in eval mode: the seed reaches the native forward and backward inside the graph and is drawn anew on
    every call (a seed baked into the graph as a constant would give every step the same mask)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device visible")
    model = patched_llama(module_dropout=dropout).train(dropout > 0).to(device)
    ids = token_batch().to(device)
    # CUDA: inductor's fused kernels for the rest of the model (norms, softmax) round differently from eager's
    tol = 1e-5 if device == "cpu" else 1e-4
    n_layers = len([m for m in model.modules() if isinstance(m, DeLoRALinear)])
    graphs = []

    def inductor_recording_graph(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def seeded(fn, seed):
        torch.manual_seed(seed)
        return fn(input_ids=ids, labels=ids)

    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):
            compiled = torch.compile(model, fullgraph=True, backend=inductor_recording_graph)
            model.zero_grad(set_to_none=True)
            out = seeded(compiled, 5)
            out.loss.backward()
            y_comp = out.logits.detach()
            g_comp = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
            y_comp_other = seeded(compiled, 6).logits.detach()  # with grad on, as above: no recompile
        with torch.no_grad():
            y_eager = seeded(model, 5).logits
            y_eager_other = seeded(model, 6).logits
        g_eager = adapter_grads(model, lambda: seeded(model, 5).loss)
    finally:
        torch._dynamo.reset()

    assert len(graphs) == 1, f"{len(graphs)} graphs: the model was recompiled"
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    fused = sum(t in (torch.ops.delora_ext.linear_fwd, torch.ops.delora_ext.linear_fwd.default) for t in targets)
    assert fused == n_layers, f"{fused} delora_ext::linear_fwd calls in the graph, expected {n_layers}"
    assert rel_err(y_comp, y_eager) <= tol, rel_err(y_comp, y_eager)
    assert rel_err(y_comp_other, y_eager_other) <= tol, rel_err(y_comp_other, y_eager_other)
    if dropout:
        assert rel_err(y_comp_other, y_comp) > 1e-2, "the same dropout mask on two calls"
    else:
        assert torch.equal(y_comp_other, y_comp)
    assert_grads_close(g_comp, g_eager, tol, "compiled vs eager")


# ---- autocast --------------------------------------------------------------------------------------------
AUTOCAST_CASES = [("cpu", torch.bfloat16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]


def _output_dtypes(model: nn.Module, types, device: str, dtype: torch.dtype, ids) -> dict[str, torch.dtype]:
    seen: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: seen.__setitem__(name, out.dtype))
             for n, m in model.named_modules() if type(m) in types]
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("device,dtype", AUTOCAST_CASES, ids=[f"{d}-{str(t)[6:]}" for d, t in AUTOCAST_CASES])
def test_autocast_keeps_fp32_adapter_and_matches_fp32_within_pytorchs_own_error(device, dtype, monkeypatch):
    """Under autocast the adapted layers output the autocast dtype exactly where the plain nn.Linear layers do,
    A/B/λ/w stay fp32 (gradients and optimizer step too), and the adapter gradients' error against an fp32 run
    is within 2x of PyTorch's own error under the same autocast. That budget is the larger of
    (a) the plain model's (every nn.Linear but lm_head trainable) weight-gradient error and
    (b) the same DeLoRA adapter computed by plain PyTorch ops (nn.Linear base + F.linear adapter: delora_ext's
        pure-PyTorch reference path), per parameter kind.
    (b) is the like-for-like budget: an adapter gradient passes through two low-precision GEMMs (u = x A'ᵀ, then
    g B'), dW through one. Measured on CPU in bf16: (a) 0.50 %, (b) 0.65 / 0.65 / 0.99 % for A / B / λ, ours
    0.77 / 0.67 / 1.17 % (over other seeds ours 0.7-1.1 %, PEFT's eager DeLoRA 0.7-1.7 %, plain Linear 0.5-0.6 %)."""
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device visible")
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ids = token_batch().to(device)
    model = patched_llama().to(device)
    plain = build("llama").to(device)  # the same base weights, not patched

    # outputs: the autocast dtype wherever the plain model's Linear layers produce it (every layer but lm_head)
    plain_dt = _output_dtypes(plain, (nn.Linear,), device, dtype, ids)
    ours_dt = _output_dtypes(model, (DeLoRALinear,), device, dtype, ids)
    assert set(ours_dt) == set(plain_dt) - {"lm_head"}
    assert ours_dt == {n: plain_dt[n] for n in ours_dt}
    assert set(ours_dt.values()) == {dtype}

    def low_loss(m):
        with torch.autocast(device, dtype=dtype):
            return lm_loss(m, ids)

    g32 = adapter_grads(model, lambda: lm_loss(model, ids))
    glow = adapter_grads(model, lambda: low_loss(model))
    for n, p in trainable(model).items():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n

    # (a) the plain model, its linear weights trainable
    for n, p in plain.named_parameters():
        p.requires_grad_(n.endswith("_proj.weight"))
    p32 = adapter_grads(plain, lambda: lm_loss(plain, ids))
    plow = adapter_grads(plain, lambda: low_loss(plain))
    err_plain = rel_err(
        torch.cat([g.flatten() for g in plow.values()]), torch.cat([g.flatten() for g in p32.values()]))
    # (b) the same adapter through plain PyTorch ops: the layer's reference path (no native kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no native kernel ... using the PyTorch reference"
        monkeypatch.setattr(delora_ext.ops, "has_kernel", lambda device: False)
        r32 = adapter_grads(model, lambda: lm_loss(model, ids))
        rlow = adapter_grads(model, lambda: low_loss(model))
        monkeypatch.undo()
    assert_grads_close(g32, r32, 1e-5, "fp32: native vs reference")  # same model, same math

    for kind in ADAPTER_KINDS:
        ours, ref_err = kind_err(glow, g32, kind), kind_err(rlow, r32, kind)
        assert 0 < ours <= 2 * max(err_plain, ref_err), \
            f"{kind}: error vs fp32 {ours:.2e}; reference path {ref_err:.2e}, plain Linear {err_plain:.2e}"

    # an optimizer step keeps the fp32 master weights fp32 (and w untouched)
    layers = [m for m in model.modules() if isinstance(m, DeLoRALinear)]
    w_before = [layer.delora_w_norm["default"].clone() for layer in layers]
    adapter_grads(model, lambda: low_loss(model))
    torch.optim.AdamW(trainable(model).values(), lr=1e-3).step()
    for layer, w in zip(layers, w_before):
        for k in ADAPTER_KINDS + ("delora_w_norm",):
            assert getattr(layer, k)["default"].dtype == torch.float32, k
        assert torch.equal(layer.delora_w_norm["default"], w)


# ---- activation (gradient) checkpointing -------------------------------------------------------------------
def _enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    """transformers' checkpointing switch: ``activation_checkpointing_enable`` where it exists (transformers >= 5
    deprecates ``gradient_checkpointing_enable`` in its favour, with the same effect), else the old name."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        # torch's reentrant checkpoint only backpropagates into its block if an input requires grad; the
        # embeddings are frozen, so without this the adapters would silently get no gradient
        model.enable_input_require_grads()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, device):
    """Checkpointed decoder layers recompute their forward in backward. With module dropout on, the recomputed
    forward must draw the same dropout seed (torch's checkpoint restores the RNG state), so gradients are the
    non-checkpointed ones exactly."""
    if device == "cuda" and not CUDA:
        pytest.skip("no CUDA device visible")
    model = patched_llama(module_dropout=0.1).train().to(device)
    ids = token_batch().to(device)

    def loss():
        torch.manual_seed(5)
        return lm_loss(model, ids)

    g_ref = adapter_grads(model, loss)
    _enable_checkpointing(model, use_reentrant)
    calls = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    g_ck = adapter_grads(model, loss)
    hook.remove()
    assert len(calls) == 2, f"q_proj ran {len(calls)} times: the layer was not recomputed in backward"
    assert_grads_close(g_ck, g_ref, 1e-6, "checkpointed vs plain")

    def other_seed():  # dropout really is on: another seed gives other gradients
        torch.manual_seed(6)
        return lm_loss(model, ids)

    g_other = adapter_grads(model, other_seed)
    assert max(rel_err(g_other[k], g_ref[k]) for k in g_ref) > 1e-3


# ---- distributed: DDP and FSDP2 over gloo, 2 CPU processes ---------------------------------------------------
WORLD = 2
DIST_STEPS = 3
DIST_OPTIMIZERS = ("sgd", "adamw")
DIST_DEADLINE_S = 50  # per launch (both optimizers); the workers are killed past it


def _global_batch(step: int) -> torch.Tensor:
    return token_batch(2 * WORLD, 8, seed=100 + step)


def _optimizer(name: str, params):
    params = list(params)
    return torch.optim.SGD(params, lr=0.1) if name == "sgd" else torch.optim.AdamW(params, lr=1e-2)


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers as plain tensors (an FSDP2 DTensor shard is gathered: a collective)."""
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[n] = t.detach().clone()
    return out


def _train_single_process(opt_name: str) -> tuple[dict, list[float]]:
    model = patched_llama()
    opt = _optimizer(opt_name, trainable(model).values())
    losses = []
    for step in range(DIST_STEPS):
        loss = lm_loss(model, _global_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return _full_state(model), losses


def _fsdp2(model: nn.Module, blocks) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _fsdp2_unsupported() -> str | None:
    """Whether this torch can run FSDP2 on CPU over gloo at all, tried on plain nn.Linear layers (no delora_ext):
    None if one training step and a gather work, else the error. Only that is a reason to skip."""
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        _fsdp2(plain, list(plain))
        opt = torch.optim.SGD(plain.parameters(), lr=0.1)
        plain(torch.ones(2, 8)).sum().backward()
        opt.step()
        _full_state(plain)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def _dist_worker(mode: str, rank: int, port: int, outdir: str) -> None:
    """One rank: train the patched model on its half of each global batch, save the full state and losses."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=DIST_DEADLINE_S))
    try:
        results = {"unsupported": _fsdp2_unsupported() if mode == "fsdp2" else None}
        if results["unsupported"]:
            torch.save(results, os.path.join(outdir, f"{mode}-rank{rank}.pt"))
            return
        for opt_name in DIST_OPTIMIZERS:
            model = patched_llama()
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                run = DistributedDataParallel(model)
            else:
                run = _fsdp2(model, model.model.layers)
            params = [p for p in run.parameters() if p.requires_grad]
            # how the optimizer sees the trainable parameters: (DTensors?, local elements, global elements)
            layout = (all(hasattr(p, "to_local") for p in params), sum(getattr(p, "to_local", lambda p=p: p)().numel()
                      for p in params), sum(p.numel() for p in params))
            opt = _optimizer(opt_name, params)
            losses = []
            for step in range(DIST_STEPS):
                per = _global_batch(step).shape[0] // WORLD
                ids = _global_batch(step)[rank * per:(rank + 1) * per]
                loss = run(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            results[opt_name] = (_full_state(model), losses, layout)
        # the end of a job: save the (last) adapter from what the job holds, the DDP wrapper on rank 0, or the
        # FSDP2 model on every rank (its sharded parameters are gathered by a collective)
        results["save_error"] = None
        if mode == "fsdp2" or rank == 0:
            try:
                delora_ext.save_adapter(run, os.path.join(outdir, f"{mode}-adapter"))
            except Exception as e:  # reported by the test, after the training checks
                results["save_error"] = f"rank {rank}: {type(e).__name__}: {e}"
        torch.save(results, os.path.join(outdir, f"{mode}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, outdir) -> list[dict]:
    """Run WORLD workers; kill every one of them (their whole process groups) as soon as one fails or the
    deadline passes. Returns each rank's saved results."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [here] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    for attempt in range(2):
        port = _free_port()
        logs = [os.path.join(outdir, f"{mode}-rank{r}-try{attempt}.log") for r in range(WORLD)]
        procs, timed_out = [], False
        try:
            for r in range(WORLD):
                with open(logs[r], "w") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, os.path.abspath(__file__), "--dist-worker", mode, str(r), str(port),
                         str(outdir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=here,
                        start_new_session=True))
            deadline = time.monotonic() + DIST_DEADLINE_S
            timed_out = True
            while time.monotonic() < deadline:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    timed_out = False
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        codes = [p.returncode for p in procs]
        text = "\n".join(f"--- rank {r} (exit {c}) ---\n" + open(f).read()[-4000:]
                         for r, (c, f) in enumerate(zip(codes, logs)))
        if all(c == 0 for c in codes):
            return [torch.load(os.path.join(outdir, f"{mode}-rank{r}.pt")) for r in range(WORLD)]
        if attempt == 0 and "address already in use" in text.lower():
            continue  # the free port was taken between probing and binding: once more with another
        why = (f"did not finish within {DIST_DEADLINE_S} s (killed)" if timed_out else
               "failed (the ranks still running were killed)")
        pytest.fail(f"{mode} workers {why}:\n{text}")
    raise AssertionError("unreachable")


def _assert_loads_as(directory: str, state: dict) -> None:
    """load_adapter(directory) into a fresh, unpatched model gives exactly ``state`` (parameters and buffers)."""
    fresh = delora_ext.load_adapter(build("llama"), directory)
    loaded = _full_state(fresh)
    assert list(loaded) == list(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def _check_distributed(mode: str, outdir) -> None:
    ranks = _launch(mode, outdir)
    if ranks[0]["unsupported"]:
        pytest.skip(f"torch {torch.__version__} cannot run FSDP2 on CPU/gloo even for plain nn.Linear layers: "
                    f"{ranks[0]['unsupported']}")
    for opt_name in DIST_OPTIMIZERS:
        ref_state, ref_losses = _train_single_process(opt_name)
        init = _full_state(patched_llama())
        states = [r[opt_name][0] for r in ranks]
        sharded, local, total = ranks[0][opt_name][2]
        if mode == "fsdp2":  # really sharded: each rank holds about half of every adapter tensor
            assert sharded and local <= total // WORLD + 2 * len(ref_state), (local, total)
        else:
            assert not sharded and local == total
        assert list(states[0]) == list(ref_state)
        for k in ref_state:
            assert torch.equal(states[0][k], states[1][k]), f"{mode}/{opt_name}: {k} differs between ranks"
            err = rel_err(states[0][k], ref_state[k])
            assert err <= 1e-5, f"{mode}/{opt_name}: {k} off the single-process run by {err:.2e}"
            trained = any(f".{a}." in k for a in ADAPTER_KINDS)
            changed = not torch.equal(states[0][k], init[k])
            assert changed == trained, f"{mode}/{opt_name}: {k} {'changed' if changed else 'did not change'}"
        # each rank's loss is the mean over its half of the batch; their mean is the global batch's loss
        for step, ref in enumerate(ref_losses):
            mean = sum(r[opt_name][1][step] for r in ranks) / WORLD
            assert abs(mean - ref) <= 1e-5 * abs(ref), (mode, opt_name, step, mean, ref)

    # the adapter saved by the workers loads into a fresh model as the trained state
    errors = [r["save_error"] for r in ranks if r["save_error"]]
    assert not errors, f"save_adapter in a {mode} job failed: {errors}"
    _assert_loads_as(os.path.join(outdir, f"{mode}-adapter"), ranks[0][DIST_OPTIMIZERS[-1]][0])


def test_ddp_two_processes_match_single_process(tmp_path):
    _check_distributed("ddp", tmp_path)


def test_fsdp2_two_processes_match_single_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this torch ({torch.__version__}) has no FSDP2: {e}")
    _check_distributed("fsdp2", tmp_path)


# ---- transformers.Trainer ----------------------------------------------------------------------------------
def test_hf_trainer_trains_only_the_adapter_and_the_saved_adapter_reproduces_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = patched_llama()
    before = snapshot(model)
    data = [{"input_ids": ids, "labels": ids} for ids in token_batch(8, 8, seed=11)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, report_to=[], save_strategy="no", max_steps=4,
        per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1, disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 4 and len(losses) == 4, trainer.state.log_history
    assert all(math.isfinite(v) for v in losses) and math.isfinite(result.training_loss), losses
    after = model.state_dict()
    adapter_keys = {k for k in before if any(f".{a}." in k for a in ADAPTER_KINDS)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == adapter_keys, (sorted(changed - adapter_keys)[:5], sorted(adapter_keys - changed)[:5])

    model.eval()
    ids = token_batch(seed=12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    delora_ext.save_adapter(model, str(tmp_path / "adapter"))
    fresh = build("llama")  # the same base weights, never patched
    delora_ext.load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, expected), rel_err(got, expected)


# ---- wrappers ----------------------------------------------------------------------------------------------
def test_save_and_load_adapter_through_a_torch_compile_wrapper(tmp_path):
    """Training code often holds only ``torch.compile(model)`` (an OptimizedModule whose submodule paths all
    start with ``_orig_mod.``): save_adapter must write the model's own keys, and load_adapter must accept the
    wrapper too. (Nothing is compiled here: the wrapper compiles on its first call.)"""
    model = patched_llama()
    delora_ext.save_adapter(torch.compile(model), str(tmp_path / "a"))
    _assert_loads_as(str(tmp_path / "a"), _full_state(model))
    fresh = build("llama")
    wrapper = torch.compile(fresh)
    assert delora_ext.load_adapter(wrapper, str(tmp_path / "a")) is wrapper
    loaded, expected = _full_state(fresh), _full_state(model)
    assert list(loaded) == list(expected) and all(torch.equal(loaded[k], v) for k, v in expected.items())


if __name__ == "__main__" and sys.argv[1:2] == ["--dist-worker"]:
    _dist_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
