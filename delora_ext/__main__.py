"""Command line: ``python -m delora_ext {demo,experiment,info,bench}`` (also the ``delora-ext`` console script)."""
from __future__ import annotations

import argparse
import json
import sys

COMMANDS = {
    "demo": "fine-tune a small causal LM with DeLoRA end to end (demo --help for its options)",
    "experiment": "learning-rate robustness and forgetting: DeLoRA vs LoRA and DoRA (experiment --help)",
    "info": "print the build information (torch, compiled kernels, CUDA toolkit)",
    "bench": "run the CPU benchmark and write its tables and plot (needs a source checkout: the scripts live in "
             "bench/; bench --help for its options)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="delora-ext", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    # demo, experiment and bench own their options: everything after the command goes to them unparsed
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "info":
        import delora_ext

        parser.parse_args(argv)  # info takes no options
        print(json.dumps(delora_ext.build_info(), indent=2))
        return 0
    if args.command == "demo":
        from delora_ext import demo

        return demo.main(rest)
    if args.command == "experiment":
        from delora_ext import experiment

        return experiment.main(rest)
    from delora_ext import benchmark

    return benchmark.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
