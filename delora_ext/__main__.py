"""Command line: ``python -m delora_ext {demo,info,bench}`` (also the ``delora-ext`` console script)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="delora-ext", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print the build information (torch, compiled kernels, CUDA toolkit)")
    d = sub.add_parser("demo", help="fine-tune a small causal LM with DeLoRA end to end (see demo --help)",
                       add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    b = sub.add_parser("bench", help="run the CPU benchmark (see bench/README or --help)", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import delora_ext

        print(json.dumps(delora_ext.build_info(), indent=2))
        return 0
    if args.cmd == "demo":
        from delora_ext import demo

        return demo.main(args.rest)
    if args.cmd == "bench":
        from delora_ext import benchmark

        return benchmark.main(args.rest) or 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
