"""Build of delora_ext: the pybind11/TORCH_LIBRARY extension delora_ext._C.

CPU kernels are always built. CUDA kernels are built whenever torch is a CUDA build and a working CUDA
toolkit is found, whether or not a GPU is visible. Switches (environment):

  DELORA_EXT_CUDA=1|0      force the CUDA half on (fail loudly if impossible) or off; unset = automatic
  CUDA_HOME / CUDA_PATH    toolkit to use (checked, not trusted blindly)
  TORCH_CUDA_ARCH_LIST     architectures (default: the visible GPUs', else 9.0 to keep CPU-only builds fast)
  MAX_JOBS                 parallel compile jobs (ninja)

Install with `pip install --no-build-isolation .` so the extension is built against the torch you run.
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Load the build planner by path: importing the delora_ext package itself would need the extension.
_spec = importlib.util.spec_from_file_location("_delora_build", os.path.join(ROOT, "delora_ext", "_build.py"))
_build = importlib.util.module_from_spec(_spec)
sys.modules["_delora_build"] = _build  # dataclasses look their module up there
_spec.loader.exec_module(_build)
plan_build = _build.plan_build
plan = plan_build()  # decides CPU/CUDA, fixes CUDA_HOME and TORCH_CUDA_ARCH_LIST before cpp_extension loads
print(plan.summary, flush=True)

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# The torch this extension is compiled against; delora_ext/ops.py compares it with the running torch before
# it imports _C, so a stale build degrades to the reference instead of failing to link.
with open(os.path.join(ROOT, "delora_ext", "_build_torch_version.txt"), "w") as f:
    f.write(torch.__version__ + "\n")

csrc = os.path.join("csrc")
sources = [os.path.join(csrc, f)
           for f in ("registration.cpp", "autograd.cpp", "autocast.cpp", "delora_ops.cpp", "delora_cpu.cpp",
                    "segmented.cpp")]
define_macros = [
    ("DELORA_TORCH_VERSION", f'"{torch.__version__}"'),
    ("DELORA_CUDA_ARCHS", f'"{plan.arch_list}"'),
    ("DELORA_CUDA_TOOLKIT", f'"{plan.toolkit or ""}"'),
]
cxx_flags = ["-O3"]  # the C++ standard is the one torch itself asks for
extra_compile_args = {"cxx": cxx_flags}
include_dirs = [os.path.join(ROOT, "csrc")]

if plan.cuda:
    sources += [os.path.join(csrc, "delora_cuda.cu"), os.path.join(csrc, "segmented_cuda.cu")]
    define_macros.append(("DELORA_WITH_CUDA", None))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    # Headers torch's CUDA headers include but some toolkits lack (cublas_v2.h, cusparse.h …) come from the
    # pip nvidia packages; -isystem puts them after the toolkit's own include folder.
    for inc in plan.extra_includes:
        nvcc_flags += ["-isystem", inc]
        cxx_flags = cxx_flags + ["-isystem", inc]
    if os.environ.get("DELORA_EXT_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    ext = CUDAExtension("delora_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                        extra_compile_args=extra_compile_args)
else:
    ext = CppExtension("delora_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                       extra_compile_args=extra_compile_args)

setup(
    packages=find_packages(include=["delora_ext", "delora_ext.*"]),
    package_data={"delora_ext": ["_build_torch_version.txt", "data/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
