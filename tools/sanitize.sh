#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels: build delora_ext._C with CMake
# (-DDELORA_SANITIZE=ON, CPU half only) into $1 (default build-asan/), then run the op tests against it with the
# sanitizer runtime preloaded (python itself is not instrumented). Any ASan/UBSan report aborts the test process
# (-fno-sanitize-recover=all, halt_on_error) and this script exits non-zero; reports also go to $1/reports/.
# Extra arguments are passed to pytest (default: the op, property and non-finite tests).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$(realpath -m "${1:-$ROOT/build-asan}")
shift $(( $# > 0 ? 1 : 0 ))
PY=$(command -v "${PYTHON:-python}")
tests=("$@")
(( ${#tests[@]} )) || tests=(tests/test_ops.py tests/test_properties.py tests/test_nonfinite.py tests/test_determinism.py tests/test_threads.py)

ASAN_RT=$(gcc -print-file-name=libasan.so)
[[ -f $ASAN_RT ]] || { echo "sanitize.sh: gcc has no libasan.so ($ASAN_RT)" >&2; exit 1; }
# libstdc++ preloaded too: ASan resolves __cxa_throw at start-up, and modules dlopen'ed later (triton) throw.
ASAN_RT="$ASAN_RT $(gcc -print-file-name=libstdc++.so.6)"
mkdir -p "$BUILD/reports"
rm -f "$BUILD"/reports/*
# detect_leaks=0: CPython and torch keep allocations alive at exit by design; leaks are not what we look for.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$BUILD/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$BUILD/reports/ubsan"

CHECK_PRELOAD="$ASAN_RT" bash "$ROOT/tools/cmake_build.sh" "$BUILD" \
  -DDELORA_SANITIZE=ON -DDELORA_WITH_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo

# The module must really be instrumented (a flag lost on the way would make this run meaningless).
undefined=$(nm -D --undefined-only "$BUILD"/_C.*.so)
for sym in __asan_report_load8 __ubsan_handle; do
  grep -q "$sym" <<<"$undefined" || { echo "sanitize.sh: _C lacks $sym" >&2; exit 1; }
done

# A scratch tree with the package (sanitized _C) and the tests: run from there, so `delora_ext` resolves to the
# scratch copy before the installed one (python -m puts the working folder first on sys.path).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/delora_ext"
cp "$ROOT"/delora_ext/*.py "$scratch/delora_ext/"
cp "$BUILD"/_C.*.so "$scratch/delora_ext/"
cp -r "$ROOT/tests" "$scratch/tests"
cd "$scratch"
LD_PRELOAD="$ASAN_RT" "$PY" -c "
import delora_ext, os
assert delora_ext.__file__.startswith('$scratch' + os.sep), delora_ext.__file__
assert delora_ext.ops.NATIVE and delora_ext.ops._C.__file__.startswith('$scratch'), delora_ext.ops.native_error
print('sanitize.sh: testing', delora_ext.ops._C.__file__)
"
status=0
LD_PRELOAD="$ASAN_RT" "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
if compgen -G "$BUILD/reports/*" >/dev/null; then
  echo "sanitize.sh: sanitizer reports:" >&2
  cat "$BUILD"/reports/* >&2
  status=1
fi
if (( status == 0 )); then
  echo "sanitize.sh: clean (ASan+UBSan, ${tests[*]})"
else
  echo "sanitize.sh: FAILED (exit $status)" >&2
fi
exit $status
