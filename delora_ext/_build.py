"""Build planning shared by setup.py and CMake: which halves to build, which CUDA toolkit, which archs.

Kept free of delora_ext's runtime imports so setup.py can load it before the extension exists.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig


@dataclasses.dataclass
class BuildPlan:
    cuda: bool
    summary: str
    toolkit: str | None = None
    arch_list: str = ""
    extra_includes: list = dataclasses.field(default_factory=list)
    nvrtc: str | None = None


def _toolkit_ok(path: str | None) -> bool:
    if not path:
        return False
    nvcc = os.path.join(path, "bin", "nvcc")
    if not os.path.isfile(nvcc) or not os.access(nvcc, os.X_OK):
        return False
    with open(nvcc, "rb") as f:  # a wrapper script is not a toolkit: its folder has no headers
        if f.read(2) == b"#!":
            return False
    return os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc: str) -> str | None:
    """Ask an nvcc (possibly a wrapper script) where its toolkit is: `--dryrun` prints `#$ TOP=...`."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if m:
        return os.path.normpath(os.path.join(m.group(1).strip(), ".."))
    return None


def find_cuda_toolkit(torch_cuda: str | None) -> tuple[str | None, list[str]]:
    """Return (toolkit folder, folders tried). Tries CUDA_HOME/CUDA_PATH, what `nvcc` on PATH says about
    itself, the folder above a real nvcc, then /usr/local/cuda-<torch's version> and /usr/local/cuda."""
    tried: list[str] = []
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(_nvcc_top(nvcc))
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    if torch_cuda:
        cands.append(f"/usr/local/cuda-{torch_cuda}")
    cands.append("/usr/local/cuda")
    for c in cands:
        if not c or c in tried:
            continue
        tried.append(c)
        if _toolkit_ok(c):
            return os.path.realpath(c), tried
    return None, tried


def _nvidia_roots() -> list[str]:
    roots = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        p = os.path.join(base, "nvidia") if base else None
        if p and os.path.isdir(p) and p not in roots:
            roots.append(p)
    return roots


def extra_cuda_includes(toolkit: str) -> list[str]:
    """Include folders of the pip `nvidia` packages when the toolkit lacks headers torch includes."""
    needed = ("cublas_v2.h", "cusparse.h", "cusolverDn.h")
    if all(os.path.isfile(os.path.join(toolkit, "include", h)) for h in needed):
        return []
    found = []
    for root in _nvidia_roots():
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.isfile(os.path.join(inc, h)) for h in needed) and inc not in found:
                found.append(inc)
    return found


def find_nvrtc() -> str | None:
    for root in _nvidia_roots():
        hits = sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
        hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
        if hits:
            return hits[0]
    return None


def _default_arch_list(torch) -> str:
    try:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps)
    except Exception:  # a broken driver must not stop a CPU-only build machine
        pass
    return "9.0"


def plan_build() -> BuildPlan:
    import torch

    force = os.environ.get("DELORA_EXT_CUDA", "").strip().lower()
    if force not in ("", "0", "1", "auto", "false", "true", "off", "on"):
        raise RuntimeError(f"DELORA_EXT_CUDA must be 1, 0 or unset, got {force!r}")
    want = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}.get(force)

    def refuse(reason: str) -> BuildPlan:
        if want:
            raise RuntimeError(f"delora_ext: DELORA_EXT_CUDA=1 but the CUDA half cannot be built: {reason}")
        return BuildPlan(cuda=False, summary=f"delora_ext: building CPU kernels only ({reason})")

    if want is False:
        return BuildPlan(cuda=False, summary="delora_ext: building CPU kernels only (DELORA_EXT_CUDA=0)")
    if not torch.version.cuda:
        return refuse(f"torch {torch.__version__} is not a CUDA build")
    toolkit, tried = find_cuda_toolkit(torch.version.cuda)
    if toolkit is None:
        return refuse("no CUDA toolkit found; tried " + ", ".join(tried) + "; set CUDA_HOME")
    os.environ["CUDA_HOME"] = toolkit
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_arch_list(torch)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    incs = extra_cuda_includes(toolkit)
    return BuildPlan(
        cuda=True,
        toolkit=toolkit,
        arch_list=arch,
        extra_includes=incs,
        nvrtc=find_nvrtc(),
        summary=(f"delora_ext: building CPU + CUDA kernels (toolkit {toolkit}, archs {arch}"
                 + (f", extra headers from {', '.join(incs)}" if incs else "") + ")"),
    )


if __name__ == "__main__":  # used by CMake and CI: print the plan as KEY=VALUE lines
    p = plan_build()
    print(f"CUDA={'ON' if p.cuda else 'OFF'}")
    print(f"TOOLKIT={p.toolkit or ''}")
    print(f"ARCHS={p.arch_list}")
    print(f"EXTRA_INCLUDES={';'.join(p.extra_includes)}")
    print(f"NVRTC={p.nvrtc or ''}")
