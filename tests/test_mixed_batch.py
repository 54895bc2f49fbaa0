"""Mixed-batch inference, ``delora_ext.mixed_batch(model, adapter_names)``: PEFT LoRA's ``adapter_names`` semantics.

Every row must equal the same row run with its adapter alone (``set_adapter``; ``disable_adapters`` for
``"__base__"``), on the tiny transformers of tiny_models.py with adapters of different ranks, a paper-init one and
one that only some layers have; rows are grouped with one gather and one scatter per layer; bad names and counts
are refused naming ``adapter_names``; the model's state is what it was after the block, also when the block raises.
"""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import delora_ext
from delora_ext import DeLoRALinear

from helpers import requires_native
from tiny_models import ARCHS, all_linear, build, one_thread  # noqa: F401  (one_thread: autouse fixture)

pytestmark = requires_native
BASE = "__base__"
SOME = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"], "t5": ["q", "v"]}


def _three_adapters(arch: str, dtype=torch.float32) -> nn.Module:
    """'a' (r=4) and 'b' (r=2, paper init, moved off its frozen copy) on every linear layer, 'c' (r=3) on a few."""
    torch.manual_seed(5)
    model = delora_ext.patch(build(arch), r=4, init_weights=False, adapter_name="a", **all_linear(arch))
    delora_ext.patch(model, r=2, init_weights="paper", adapter_name="b", **all_linear(arch))
    delora_ext.patch(model, r=3, init_weights=False, adapter_name="c", target_modules=SOME[arch])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DeLoRALinear):
                m.delora_A["b"].mul_(1.7)
    delora_ext.set_adapter(model, "a")
    return model.to(dtype).eval()


def _batch(arch: str, n: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(0, 64, (n, 8), generator=g)}
    if arch == "t5":
        kw["decoder_input_ids"] = torch.randint(0, 64, (n, 5), generator=g)
    return kw


def _row(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def _alone(model, arch, batch, names) -> torch.Tensor:
    """Each row run by itself with its adapter active (the base model for "__base__")."""
    rows = []
    for i, name in enumerate(names):
        if name == BASE:
            with delora_ext.disable_adapters(model):
                rows.append(model(**_row(batch, i)).logits)
        else:
            delora_ext.set_adapter(model, name)
            rows.append(model(**_row(batch, i)).logits)
    delora_ext.set_adapter(model, "a")
    return torch.cat(rows)


@pytest.mark.parametrize("strategy", ["grouped", "masked", "segmented"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_row_equals_its_adapter_alone(arch, strategy):
    model = _three_adapters(arch)
    names = ["b", BASE, "a", "c", "a", "b", BASE, "c", "a"]
    batch = _batch(arch, len(names))
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, strategy=strategy):
            mixed = model(**batch).logits
        expected = _alone(model, arch, batch, names)
        normal = model(**batch).logits
    for i, name in enumerate(names):
        err = ((mixed[i] - expected[i]).norm() / expected[i].norm()).item()
        assert err <= 1e-6, f"row {i} ({name}): relative error {err:.1e}"
    assert not torch.allclose(mixed, normal), "the rows of other adapters differ from the active adapter's"


@pytest.mark.parametrize("strategy", ["grouped", "masked", "segmented"])
def test_fp64_rows_equal_their_adapter_alone_to_fp64_precision(strategy):
    model = _three_adapters("llama", torch.float64)
    names = ["c", "a", BASE, "b"]
    batch = _batch("llama", len(names))
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, strategy=strategy):
            mixed = model(**batch).logits
        expected = _alone(model, "llama", batch, names)
    assert ((mixed - expected).norm() / expected.norm()).item() <= 1e-12


@pytest.mark.parametrize("strategy", ["grouped", "masked", "segmented", "auto"])
def test_rows_under_autocast_equal_their_adapter_alone_under_autocast(strategy):
    """As the op under autocast: the base in autocast's dtype, the adapter GEMMs on x cast to it (fp32 factors
    rounded to it), so each row agrees with its adapter alone to bf16 rounding, and the output has the same dtype."""
    model = _three_adapters("llama")
    names = ["b", BASE, "a", "c", "a"]
    batch = _batch("llama", len(names))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with delora_ext.mixed_batch(model, names, strategy=strategy):
            mixed = model(**batch).logits
        expected = _alone(model, "llama", batch, names)
    with torch.no_grad():
        fp32 = _alone(model, "llama", batch, names)
    assert mixed.dtype == expected.dtype
    for i, name in enumerate(names):
        err = ((mixed[i].float() - expected[i].float()).norm() / expected[i].float().norm()).item()
        budget = ((expected[i].float() - fp32[i]).norm() / fp32[i].norm()).item()  # autocast's own error
        assert err <= 2 * budget + 1e-3, f"row {i} ({name}): relative error {err:.1e} (autocast's own {budget:.1e})"


def test_one_adapter_for_every_row_equals_set_adapter():
    model = _three_adapters("llama")
    batch = _batch("llama", 4)
    with torch.no_grad():
        with delora_ext.mixed_batch(model, ["c"] * 4):
            mixed = model(**batch).logits
        delora_ext.set_adapter(model, "c")
        expected = model(**batch).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)


# ---- grouping: one gather and one scatter per layer, GEMMs per adapter, not per row --------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _eight_adapter_layer():
    torch.manual_seed(0)
    layer = DeLoRALinear(nn.Linear(48, 40), r=4, init_weights=False, adapter_name="a0")
    for i in range(1, 8):
        layer.update_layer(f"a{i}", 2 + i % 3, init_weights=False, activate=False)
    return layer.eval()


def _counted(layer, names, x, strategy):
    with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy=strategy):
        layer(x)  # fills the caches
        with _CountOps() as ops:
            y = layer(x)
    return y, ops.counts


def _check_rows(layer, names, x, y, tol=1e-6):
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == BASE:
                exp = layer.base_layer(x[i])
            else:
                layer.set_adapter(name)
                exp = layer(x[i:i + 1])[0]
            torch.testing.assert_close(y[i], exp, rtol=tol, atol=tol)


def test_grouped_rows_take_one_gather_and_one_scatter():
    layer = _eight_adapter_layer()
    names = [f"a{(7 * i) % 8}" for i in range(32)] + [BASE] * 4
    x = torch.randn(len(names), 3, 48)
    y, c = _counted(layer, names, x, "grouped")
    assert c.get("index_select") == 1 and c.get("index_add_", 0) + c.get("index_add", 0) == 1, c
    assert c.get("mm") == 2 * 8, c  # u = x A'ᵀ and u B'ᵀ per adapter segment
    assert "prep" not in c, "cached factors are reused"
    _check_rows(layer, names, x, y)


def test_masked_rows_take_two_gemms_whatever_the_number_of_adapters():
    layer = _eight_adapter_layer()
    names = [f"a{(3 * i) % 8}" for i in range(16)] + [BASE] * 2
    x = torch.randn(len(names), 2, 48)
    y, c = _counted(layer, names, x, "masked")
    assert c.get("mm") == 1 and c.get("addmm_") == 1 and c.get("masked_fill_") == 1, c
    assert "index_select" not in c and "index_add_" not in c and "prep" not in c and "cat" not in c, c
    _check_rows(layer, names, x, y)


@pytest.mark.skipif(not delora_ext.ops.HAS_SEGMENTED, reason="the native build has no segmented op")
def test_segmented_rows_take_one_native_call_whatever_the_number_of_adapters():
    layer = _eight_adapter_layer()
    names = [f"a{(5 * i) % 8}" for i in range(24)] + [BASE] * 3
    x = torch.randn(len(names), 2, 48)
    y, c = _counted(layer, names, x, "segmented")
    assert c.get("segmented_adapter_") == 1, c
    assert not {"mm", "index_select", "index_add_", "index_add", "prep", "cat", "masked_fill_"} & set(c), c
    _check_rows(layer, names, x, y)


def test_auto_strategy_by_size_and_dtype(monkeypatch):
    # the masked/grouped rule, on a device where auto does not pick segmented (test_mixed_batch_segmented.py)
    monkeypatch.setattr(delora_ext.inference, "SEGMENTED_AUTO_DEVICES", frozenset())
    layer = _eight_adapter_layer()
    names = [f"a{i % 8}" for i in range(8)]
    _, small = _counted(layer, names, torch.randn(8, 48), "auto")
    assert "index_select" not in small, "few rows: masked"
    _, large = _counted(layer, names, torch.randn(8, 2048, 48), "auto")
    assert large.get("index_select") == 1, "many rows: grouped"
    half = _eight_adapter_layer().half()
    x = torch.randn(8, 48).half()
    y, c16 = _counted(half, names, x, "auto")
    assert c16.get("index_select") == 1, "fp16: grouped (a masked-out product could overflow)"
    _check_rows(half, names, x, y, tol=1e-3)
    with pytest.raises(ValueError, match="`strategy` must be"):
        with delora_ext.mixed_batch(layer, names, strategy="fast"):
            pass


@pytest.mark.parametrize("strategy", ["grouped", "masked", "segmented"])
def test_non_finite_values_stay_in_their_own_rows(strategy):
    """An adapter with a NaN and an input row with an inf: every other row is what it is without them."""
    layer = _eight_adapter_layer()
    names = ["a1", "a2", BASE, "a3", "a2"]
    x = torch.randn(5, 48)
    with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy=strategy):
        clean = layer(x)
    with torch.no_grad():
        layer.delora_B["a3"][0, 0] = float("nan")
    x_bad = x.clone()
    x_bad[1, 0] = float("inf")
    with torch.no_grad(), delora_ext.mixed_batch(layer, names, strategy=strategy):
        y = layer(x_bad)
    for i in (0, 2, 4):  # (masked: the broken factor sends this batch through the grouped path, other rounding)
        assert torch.isfinite(y[i]).all(), f"row {i} ({names[i]})"
        torch.testing.assert_close(y[i], clean[i], rtol=1e-6, atol=1e-6)
    assert not torch.isfinite(y[3]).all() and not torch.isfinite(y[1]).all()


def test_gradients_through_a_mixed_batch_are_each_adapters_own():
    """In eval mode with grad enabled the factors are computed with autograd: each adapter's gradient equals the
    gradient of its rows run alone."""
    layer = _eight_adapter_layer()
    names = [f"a{i % 3}" for i in range(9)]
    x = torch.randn(9, 48)
    g = torch.randn(9, 40)
    with delora_ext.mixed_batch(layer, names):
        (layer(x) * g).sum().backward()
    got = {n: layer.delora_B[n].grad.clone() for n in ("a0", "a1", "a2")}
    got_lam = {n: layer.delora_lambda[n].grad.clone() for n in ("a0", "a1", "a2")}
    layer.zero_grad(set_to_none=True)
    for n in ("a0", "a1", "a2"):
        rows = [i for i, nm in enumerate(names) if nm == n]
        layer.set_adapter(n)
        (layer(x[rows]) * g[rows]).sum().backward()
        torch.testing.assert_close(got[n], layer.delora_B[n].grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_lam[n], layer.delora_lambda[n].grad, rtol=1e-4, atol=1e-6)


def test_hooked_base_layer_runs_its_hook_for_the_whole_batch():
    layer = _eight_adapter_layer()
    calls = []
    layer.base_layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]) or out * 2)
    names = ["a1", BASE, "a1", "a3"]
    x = torch.randn(4, 48)
    with torch.no_grad():
        with delora_ext.mixed_batch(layer, names):
            y = layer(x)
        assert calls == [4], "the base layer ran once, on the whole batch"
        for i, name in enumerate(names):
            if name == BASE:
                exp = layer.base_layer(x[i:i + 1])
            else:
                layer.set_adapter(name)
                exp = layer(x[i:i + 1])
            torch.testing.assert_close(y[i:i + 1], exp, rtol=1e-6, atol=1e-6)


# ---- refusals -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names,match", [
    (["a", "zzz"], r"`adapter_names`: unknown adapter\(s\) 'zzz'"),
    ("a", r"`adapter_names` must be a list"),
    ([], r"`adapter_names` is empty"),
    (["a", 3], r"`adapter_names` must hold adapter names"),
])
def test_bad_adapter_names_are_refused(names, match):
    model = _three_adapters("llama")
    with pytest.raises(ValueError, match=match):
        with delora_ext.mixed_batch(model, names):
            pass


def test_an_adapter_named_like_the_base_model_is_refused():
    model = _three_adapters("llama")
    delora_ext.patch(model, r=2, init_weights=False, adapter_name=BASE, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"adapter named '__base__', which in `adapter_names` means the base model"):
        with delora_ext.mixed_batch(model, ["a", BASE]):
            pass


def test_a_wrong_count_is_refused_naming_adapter_names():
    model = _three_adapters("llama")
    with torch.no_grad(), delora_ext.mixed_batch(model, ["a", "b", "c"]):
        with pytest.raises(ValueError, match=r"`adapter_names` has 3 names .* but the input of this layer has 2 rows"):
            model(**_batch("llama", 2))


def _generate_alone(model, prompts, names, **kw):
    """Each prompt generated by itself with its adapter active (the base model for "__base__")."""
    out = []
    for i, name in enumerate(names):
        one = {k: v[i:i + 1] for k, v in prompts.items()}
        if name == BASE:
            with delora_ext.disable_adapters(model):
                out.append(model.generate(**one, **kw))
        else:
            delora_ext.set_adapter(model, name)
            out.append(model.generate(**one, **kw))
    delora_ext.set_adapter(model, "a")
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_beam_search_follows_each_prompts_adapter(arch):
    """generate repeats each prompt num_beams times before the decoder runs (an encoder-decoder's encoder runs on
    the prompts themselves): with num_beams=k each name covers its prompt's k rows, as PEFT's
    generate(adapter_names=..., num_beams=k), and every prompt's beams equal the prompt generated alone."""
    model = _three_adapters(arch)
    names = ["b", BASE, "c", "a"]
    prompts = {"input_ids": _batch(arch, len(names))["input_ids"]}
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=4, min_new_tokens=4, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, num_beams=3):
            mixed = model.generate(**prompts, **kw)
        alone = _generate_alone(model, prompts, names, **kw)
        with pytest.raises(ValueError, match=r"pass mixed_batch\(\.\.\., num_beams=3\)"):
            with delora_ext.mixed_batch(model, names):
                model.generate(**prompts, **kw)
    for i, (name, ref) in enumerate(zip(names, alone)):
        rows = slice(3 * i, 3 * i + 3)
        assert torch.equal(mixed.sequences[rows], ref.sequences), f"prompt {i} ({name}): other beams"
        torch.testing.assert_close(mixed.sequences_scores[rows], ref.sequences_scores, rtol=1e-5, atol=1e-6)
    firsts = [ref.sequences[0] for ref in alone]
    assert any(not torch.equal(firsts[0], f) for f in firsts[1:]), "the adapters generate different text"


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_beam_search_matches_peft_loras_adapter_names(arch, tmp_path):
    """Side by side with PEFT: each adapter exported as its exact LoRA (export_lora) and loaded into a PeftModel,
    whose generate(adapter_names=..., num_beams=k) runs PEFT's own mixed batch and beam bookkeeping."""
    peft = pytest.importorskip("peft")
    model = _three_adapters(arch)
    for name in ("a", "b", "c"):
        delora_ext.export_lora(model, str(tmp_path / name), adapter_name=name)
    lora = peft.PeftModel.from_pretrained(build(arch), str(tmp_path / "a"), adapter_name="a")
    for name in ("b", "c"):
        lora.load_adapter(str(tmp_path / name), adapter_name=name)
    lora.eval()
    names = ["c", "a", BASE, "b"]
    prompts = {"input_ids": _batch(arch, len(names), seed=8)["input_ids"]}
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=4, min_new_tokens=4, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, num_beams=2):
            ours = model.generate(**prompts, **kw)
        theirs = lora.generate(**prompts, adapter_names=names, **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores, rtol=1e-5, atol=1e-6)


def test_sampled_copies_of_a_prompt_share_its_adapter():
    """Sampling with num_return_sequences=k also repeats each prompt k times: num_beams=k covers them, and the
    first step's logits of each copy equal those of the prompt generated alone (later steps follow other samples)."""
    model = _three_adapters("llama")
    names = [BASE, "c"]
    prompts = {"input_ids": _batch("llama", 2)["input_ids"]}
    kw = dict(num_return_sequences=2, max_new_tokens=2, do_sample=True, output_logits=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        with delora_ext.mixed_batch(model, names, num_beams=2):
            mixed = model.generate(**prompts, **kw).logits[0]
        alone = [ref.logits[0][0] for ref in _generate_alone(model, prompts, names, **kw)]
    for i, want in enumerate(alone):
        for copy in (2 * i, 2 * i + 1):
            torch.testing.assert_close(mixed[copy], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1]), "the two prompts' adapters differ"


@pytest.mark.parametrize("num_beams", [0, -2, 2.0, True, "3"])
def test_bad_num_beams_is_refused(num_beams):
    model = _three_adapters("llama")
    with pytest.raises(ValueError, match=r"`num_beams` must be a positive int"):
        with delora_ext.mixed_batch(model, ["a"], num_beams=num_beams):
            pass


def test_training_mode_merged_adapters_copies_and_compile_wrappers_are_refused():
    model = _three_adapters("llama")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        with delora_ext.mixed_batch(model, ["a"]):
            pass
    model.eval()
    delora_ext.merge(model, adapter_names=["a"])
    with pytest.raises(ValueError, match=r"adapters \['a'\] are merged"):
        with delora_ext.mixed_batch(model, ["b"]):
            pass
    delora_ext.unmerge(model)
    with pytest.raises(ValueError, match="torch.compile"):
        with delora_ext.mixed_batch(torch.compile(model), ["b"]):
            pass
    with_head = delora_ext.patch(build("llama"), r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                 adapter_name="h").eval()
    with pytest.raises(ValueError, match=r"adapters \['h'\] have modules_to_save copies"):
        with delora_ext.mixed_batch(with_head, ["h", BASE]):
            pass
    with pytest.raises(ValueError, match="no DeLoRA layers"):
        with delora_ext.mixed_batch(nn.Linear(2, 2), ["a"]):
            pass


# ---- the model after the block ----------------------------------------------------------------------------------
def test_state_after_the_block_also_when_it_raises():
    model = _three_adapters("llama")
    batch = _batch("llama", 3)
    active = {n: list(m.active_adapters) for n, m in model.named_modules() if isinstance(m, DeLoRALinear)}
    with torch.no_grad():
        before = model(**batch).logits
        with pytest.raises(RuntimeError, match="inside the block"):
            with delora_ext.mixed_batch(model, ["b", "c", BASE]):
                model(**batch)
                raise RuntimeError("inside the block")
        after = model(**batch).logits
    assert {n: list(m.active_adapters) for n, m in model.named_modules() if isinstance(m, DeLoRALinear)} == active
    assert torch.equal(before, after)


def test_nested_blocks_restore_the_outer_grouping():
    layer = _eight_adapter_layer()
    x = torch.randn(2, 48)
    with torch.no_grad():
        with delora_ext.mixed_batch(layer, ["a1", "a2"]):
            outer = layer(x)
            with delora_ext.mixed_batch(layer, ["a3", "a3"]):
                inner = layer(x)
            again = layer(x)
        layer.set_adapter("a3")
        torch.testing.assert_close(inner, layer(x), rtol=1e-6, atol=1e-6)  # (segmented: its own rounding)
    assert torch.equal(outer, again)


def test_the_grouping_belongs_to_the_thread_that_opened_the_block():
    """Serving threads share one model: a mixed batch in one thread leaves another thread's forwards alone."""
    layer = _eight_adapter_layer()
    x = torch.randn(2, 48)
    with torch.no_grad():
        expected_plain = layer(x)
    inside = threading.Event()
    done = threading.Event()
    seen = {}

    def other():
        inside.wait(timeout=60)
        with torch.no_grad():
            seen["y"] = layer(x)
        done.set()

    th = threading.Thread(target=other)
    th.start()
    with torch.no_grad(), delora_ext.mixed_batch(layer, ["a5", BASE]):
        inside.set()
        done.wait(timeout=60)
        mixed = layer(x)
    th.join(timeout=60)
    assert torch.equal(seen["y"], expected_plain)
    assert not torch.equal(mixed, expected_plain)
