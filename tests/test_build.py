"""Build information, the toolkit finder, and the import-time fallback when _C is stale or missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import delora_ext
from delora_ext import _build

PKG = os.path.dirname(delora_ext.__file__)


def test_build_info_reports_kernels_and_torch():
    info = delora_ext.build_info()
    assert info["running_torch"] == torch.__version__
    if os.environ.get("DELORA_EXT_EXPECT_NATIVE") == "1":
        assert info["native"], info["error"]
    if info["native"]:
        assert info["built_for_torch"] == torch.__version__
        assert "cpu" in info["kernels"]
    if os.environ.get("DELORA_EXT_EXPECT_CUDA") == "1":
        # CI builds with the CUDA build of torch and nvcc present: the CUDA half must have compiled.
        assert "cuda" in info["kernels"], info
        assert info["cuda_archs"] and info["cuda_toolkit"]


def test_toolkit_finder_rejects_wrapper_script(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexec /nonexistent/nvcc \"$@\"\n")
    nvcc.chmod(0o755)
    assert not _build._toolkit_ok(str(tmp_path))
    assert not _build._toolkit_ok(str(tmp_path / "missing"))


def test_plan_switch(monkeypatch):
    monkeypatch.setenv("DELORA_EXT_CUDA", "0")
    assert not _build.plan_build().cuda
    monkeypatch.setenv("DELORA_EXT_CUDA", "maybe")
    with pytest.raises(RuntimeError, match="DELORA_EXT_CUDA must be 1, 0 or unset"):
        _build.plan_build()
    if not torch.version.cuda:
        monkeypatch.setenv("DELORA_EXT_CUDA", "1")
        with pytest.raises(RuntimeError, match="cannot be built"):
            _build.plan_build()


def _copy_pkg(tmp_path, keep_so: bool, stamp: str | None):
    dst = tmp_path / "delora_ext"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__") if keep_so
                    else shutil.ignore_patterns("__pycache__", "*.so"))
    if stamp is not None:
        (dst / "_build_torch_version.txt").write_text(stamp + "\n")
    return tmp_path


_PROBE = (
    "import sys, warnings, torch\n"
    # an editable install's finder would otherwise supply the real _C for the copied package
    "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    "with warnings.catch_warnings(record=True) as rec:\n"
    "    warnings.simplefilter('always')\n"
    "    import delora_ext\n"
    "print('WARN:', ' | '.join(str(r.message) for r in rec))\n"
    "print('NATIVE:', delora_ext.build_info()['native'])\n"
    "l = delora_ext.DeLoRALinear(torch.nn.Linear(8, 4), r=2, init_weights=False)\n"
    "x = torch.randn(3, 8, requires_grad=True)\n"
    "l(x).sum().backward(); l.merge(); l.unmerge()\n"
    "print('OK')\n"
)


@pytest.mark.parametrize("case", ["stale", "missing"])
def test_import_falls_back_to_reference(tmp_path, case):
    root = _copy_pkg(tmp_path, keep_so=(case == "stale"), stamp="0.0.0+other" if case == "stale" else None)
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "NATIVE: False" in out.stdout and "OK" in out.stdout
    assert "Rebuild with: pip install --no-build-isolation" in out.stdout
    if case == "stale":
        assert "built for torch 0.0.0+other" in out.stdout
    else:
        assert "could not be imported" in out.stdout
