"""Fixtures shared by the test files (the helpers themselves are in helpers.py)."""
from __future__ import annotations

import pytest

from helpers import NATIVE, tuned


def _switch_fixture(name: str, values: tuple, doc: str):
    """A fixture running its test once per value of the kernel switch ``name`` (delora_ext.ops.set_tuning)."""
    @pytest.fixture(params=list(values))
    def fixture(request):
        if not NATIVE:
            pytest.skip("kernel variants need the native extension")
        with tuned(**{name: request.param}):
            yield request.param
    fixture.__doc__ = doc
    return fixture


gemm_order = _switch_fixture("gemm_order", ("base_first", "seeded"),
                             "Both GEMM orders of the forward/backward (the same math, different rounding order).")
small_n = _switch_fixture("small_n", ("off", "on", "overlap"),
                          "The CUDA small-N forward (at most 16 rows) off, on, and on with its first launch on a "
                          "side stream (CPU ops are unaffected).")
merge_kernel = _switch_fixture("merge_kernel", ("rows", "tiled"),
                               "Both CUDA merge kernels (bit-identical by construction; CPU merges are unaffected).")


@pytest.fixture(params=["fused", "base_first", "seeded"])
def adapter_path(request):
    """The CPU ways to compute the adapter part: the fused pass (forced at every size, where the default takes it
    for small shapes only), and with it off both GEMM orders (the same math, different rounding order). On CUDA
    only the GEMM order applies."""
    if not NATIVE:
        pytest.skip("kernel variants need the native extension")
    switches = ({"cpu_fused": "always", "gemm_order": "base_first"} if request.param == "fused"
                else {"cpu_fused": "off", "gemm_order": request.param})
    with tuned(**switches):
        yield request.param


@pytest.fixture
def gemm_path():
    """The CPU op on its GEMM path (the fused small-shape pass off): what the inference cache computes, bit for bit.
    The fused pass agrees with both to rounding (test_inference_cache.py)."""
    if not NATIVE:
        pytest.skip("kernel variants need the native extension")
    with tuned(cpu_fused="off"):
        yield
