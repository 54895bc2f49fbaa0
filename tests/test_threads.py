"""Thread safety of the Python API where users expect it: several threads running one patched model.

Serving code shares one model between request threads (forward under no_grad), and data-parallel-in-threads
training code runs forward + autograd.grad per thread. Each thread's result must be bit-identical to the same
work done serially (same inputs, same single intra-op thread), including the very first forward of a model
built on the meta device, where w is computed lazily.
"""
from __future__ import annotations

import threading

import torch

import delora_ext
from delora_ext import DeLoRALinear

from helpers import requires_native
from tiny_models import all_linear, build, build_meta, one_thread  # noqa: F401  (one_thread: autouse fixture)

pytestmark = requires_native
N_THREADS, ROUNDS = 4, 6


def _patched(meta=False):
    """A tiny Llama with non-zero adapters on every linear layer. ``meta``: built on the meta device, then given
    the same weights by copying into its storage (no load_state_dict), so w is still pending at the first forward."""
    cfg = delora_ext.DeLoRAConfig(r=4, init_weights=False, **all_linear("llama"))
    real = delora_ext.patch(build("llama"), cfg)
    if not meta:
        return real
    model = delora_ext.patch(build_meta("llama"), cfg)
    model.to_empty(device="cpu")
    real_sd = real.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if ".delora_w_norm." not in name:
                t.copy_(real.get_buffer(name) if name not in real_sd else real_sd[name])
    return model


def _ids(i):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(100 + i))


def _run_threads(fn, jobs):
    """Run fn(job) for every job on N_THREADS threads released together; returns results in job order."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(N_THREADS)

    def worker(t):
        try:
            barrier.wait()
            for j in range(t, len(jobs), N_THREADS):
                results[j] = fn(jobs[j])
        except BaseException as e:  # noqa: BLE001  (reported below with the thread's number)
            errors.append((t, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, f"thread errors: {errors}"
    return results


def test_concurrent_inference_matches_serial():
    model = _patched()
    jobs = list(range(N_THREADS * ROUNDS))

    def infer(i):
        with torch.no_grad():
            return model(input_ids=_ids(i)).logits

    serial = [infer(i) for i in jobs]
    threaded = _run_threads(infer, jobs)
    for i, (a, b) in enumerate(zip(serial, threaded)):
        assert torch.equal(a, b), f"job {i}: threaded logits differ from serial"


def test_concurrent_forward_backward_matches_serial():
    model = _patched().train()
    params = [p for p in model.parameters() if p.requires_grad]
    jobs = list(range(N_THREADS * 2))

    def step(i):
        logits = model(input_ids=_ids(i)).logits
        loss = logits.float().square().mean()
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    serial = [step(i) for i in jobs]
    threaded = _run_threads(step, jobs)
    for i, (a, b) in enumerate(zip(serial, threaded)):
        for k, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"job {i}, output {k}: threaded result differs from serial"


def test_first_forward_of_meta_built_model_from_many_threads():
    """w is computed on the first forward after the real weights arrive; threads racing there all see it."""
    reference = _patched(meta=True)
    with torch.no_grad():
        expected = [reference(input_ids=_ids(i)).logits for i in range(N_THREADS)]
    model = _patched(meta=True)
    assert any(m._w_pending for m in model.modules() if isinstance(m, DeLoRALinear))

    def infer(i):
        with torch.no_grad():
            return model(input_ids=_ids(i)).logits

    got = _run_threads(infer, list(range(N_THREADS)))
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"thread job {i}"
    for m in model.modules():
        if isinstance(m, DeLoRALinear):
            w = torch.linalg.vector_norm(m.base_layer.weight.float(), dim=0)
            torch.testing.assert_close(m.delora_w_norm["default"], w, rtol=0, atol=0)


def test_forwards_of_a_layer_merged_while_disabled_unmerge_it_once(monkeypatch):
    """A disabled layer's forward takes a merge back; two threads' forwards must not both subtract ΔW (the second
    waits, then finds the layer unmerged). The unmerge is slowed down so that both threads are inside it at once
    if nothing stops them."""
    import time

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 12)
    layer = DeLoRALinear(lin, r=4, init_weights=False)
    W0 = layer.base_layer.weight.detach().clone()
    layer.enable_adapters(False)
    layer.merge()
    real = DeLoRALinear._apply_delta

    def slow(self, *args, **kwargs):
        time.sleep(0.05)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeLoRALinear, "_apply_delta", slow)
    x = torch.randn(3, 16)

    def forward(_):
        with torch.no_grad():
            return layer(x)

    outs = _run_threads(forward, [0, 1])
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight.detach(), W0, rtol=0, atol=1e-6)
    for y in outs:
        torch.testing.assert_close(y, x @ W0.t() + lin.bias.detach(), rtol=1e-5, atol=1e-5)
