"""Probe for a crash of torch.ops.delora_ext.merge_many_ called with lists of different lengths, on CPU tensors
(tests/test_ops.py::test_merge_many_errors_name_the_argument), seen on one GPU machine (torch 2.11.0+cu130,
Python 3.12.3, gVisor) and nowhere else. Each case runs in its own process, so one crash does not hide the
others; c10's fatal-signal handler prints the C++ stack of a crash. Usage: python tools/merge_many_crash_probe.py
"""
from __future__ import annotations

import subprocess
import sys

CASE = r'''
import sys, torch
torch._C._set_print_stack_traces_on_fatal_signal(True)
import delora_ext  # loads the ops
OPS = torch.ops.delora_ext
r, i, o = 3, 10, 6
A, B, lam, w = torch.randn(r, i), torch.randn(o, r), torch.tensor([2.0]), torch.rand(i) + 0.5
W = torch.randn(o, i)
case = sys.argv[1]
args = {
    "empty": ([], [], [], [], []),
    "alpha_longer": ([A], [B], [lam], [w], [1.0, 1.0]),
    "B_longer": ([A], [B, B], [lam], [w], [1.0]),
    "lam_longer": ([A], [B], [lam, lam], [w], [1.0]),
    "alpha_shorter": ([A, A], [B, B], [lam, lam], [w, w], [1.0]),
    "ok_two": ([A, A], [B, B], [lam, lam], [w, w], [1.0, -1.0]),
}[case]
try:
    OPS.merge_many_(W, *args)
    print(case, "returned")
except RuntimeError as e:
    print(case, "raised:", str(e).splitlines()[0][:200])
'''


def main() -> int:
    worst = 0
    for case in ("empty", "alpha_longer", "B_longer", "lam_longer", "alpha_shorter", "ok_two"):
        p = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, case], capture_output=True, text=True,
                           timeout=120)
        print(f"--- {case}: rc {p.returncode}")
        print(p.stdout.strip())
        if p.returncode != 0:
            print(p.stderr.strip()[-6000:])
            worst = p.returncode
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
