#!/usr/bin/env bash
# Build delora_ext._C with CMake + Ninja into $1 (default build-cmake/), from the same plan setup.py uses
# (delora_ext/_build.py: DELORA_EXT_CUDA, CUDA_HOME, TORCH_CUDA_ARCH_LIST are honoured there; MAX_JOBS here),
# then check the result: import it as delora_ext._C from a scratch copy of the package (the installed package
# and its own _C are left alone), require build_info()['native'], and compare delta_weight on CPU with the
# reference. Exits non-zero on any failure. PYTHON selects the interpreter (default: python on PATH).
# Arguments after the build folder go to cmake's configure step (e.g. -DDELORA_SANITIZE=ON -DDELORA_WITH_CUDA=OFF);
# CHECK_PRELOAD, when set, is LD_PRELOADed for the check (a sanitizer runtime).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(realpath -m "${1:-$ROOT/build-cmake}")
PY=$(command -v "${PYTHON:-python}")

plan=$("$PY" "$ROOT/delora_ext/_build.py")
echo "$plan"
get() { sed -n "s/^$1=//p" <<<"$plan"; }
CUDA=$(get CUDA) TOOLKIT=$(get TOOLKIT) ARCHS=$(get ARCHS)

args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" -DDELORA_WITH_CUDA="$CUDA"
      -DDELORA_EXTRA_CUDA_INCLUDES="$(get EXTRA_INCLUDES)")
if [[ -n $TOOLKIT ]]; then
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$TOOLKIT" -DCMAKE_CUDA_COMPILER="$TOOLKIT/bin/nvcc")
fi
if [[ -n $(get NVRTC) ]]; then
  args+=(-DCUDA_nvrtc_LIBRARY="$(get NVRTC)")  # torch's Caffe2 config links CUDA::nvrtc
fi
if [[ $CUDA == ON ]]; then
  # torch's CMake turns CMAKE_CUDA_ARCHITECTURES off and builds -gencode flags from TORCH_CUDA_ARCH_LIST.
  args+=(-DTORCH_CUDA_ARCH_LIST="$ARCHS")
fi
cmake -S "$ROOT" -B "$BUILD" "${args[@]}" "${@:2}"
CUDA=$(sed -n 's/^DELORA_WITH_CUDA:[A-Z]*=//p' "$BUILD/CMakeCache.txt")  # what was configured, -D included
cmake --build "$BUILD" ${MAX_JOBS:+--parallel "$MAX_JOBS"}

shopt -s nullglob
sos=("$BUILD"/_C.*.so)
if (( ${#sos[@]} != 1 )); then
  echo "cmake_build.sh: expected one _C.*.so in $BUILD, found ${#sos[@]}" >&2
  exit 1
fi

# Scratch copy of the package with the CMake-built _C; PyInit__C fixes the module name, so it must be
# imported as delora_ext._C from a folder that comes before the installed (editable) package on sys.path.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/delora_ext"
cp "$ROOT"/delora_ext/*.py "$scratch/delora_ext/"
if [[ -d $ROOT/delora_ext/data ]]; then cp -r "$ROOT/delora_ext/data" "$scratch/delora_ext/"; fi
cp "${sos[0]}" "$scratch/delora_ext/"

cd "$scratch"
LD_PRELOAD=${CHECK_PRELOAD:-} "$PY" -I - "$scratch" "$CUDA" "$ARCHS" "$TOOLKIT" <<'EOF'
import os
import sys

scratch, cuda, archs, toolkit = sys.argv[1:]
sys.path.insert(0, scratch)
import torch

import delora_ext
from delora_ext import reference

so = delora_ext.ops._C.__file__ if delora_ext.ops._C is not None else None
assert delora_ext.__file__.startswith(scratch + os.sep), f"imported the wrong package: {delora_ext.__file__}"
info = delora_ext.build_info()
assert info["native"], f"CMake-built _C did not load: {info['error']}"
assert os.path.dirname(so) == os.path.join(scratch, "delora_ext"), f"imported the wrong _C: {so}"
assert ("cuda" in info["kernels"]) == (cuda == "ON"), f"kernels {info['kernels']} but plan CUDA={cuda}"
if cuda == "ON":
    assert info["cuda_archs"] == archs and info["cuda_toolkit"] == toolkit, info

torch.manual_seed(0)
for dtype in (torch.float32, torch.float64):
    r, n_in, n_out = 3, 7, 5
    A = torch.randn(r, n_in, dtype=dtype)
    B = torch.randn(n_out, r, dtype=dtype)
    lam = torch.tensor([2.5], dtype=dtype)
    w = torch.rand(n_in, dtype=dtype) + 0.5
    got = torch.ops.delora_ext.delta_weight(A, B, lam, w)
    torch.testing.assert_close(got, reference.delta_weight_ref(A, B, lam, w))
print(f"cmake_build.sh: OK {so}\n  build_info: {info}")
EOF
