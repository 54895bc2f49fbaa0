"""What the CPU and GPU benchmark scripts share: the argument parser's preamble and JSON-safe results."""
from __future__ import annotations

import argparse
import math


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The script's parser, described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def json_safe(obj, drop_private: bool = False):
    """``obj`` with string keys, lists for tuples and None for non-finite floats (JSON has neither inf nor NaN);
    ``drop_private`` leaves out keys starting with "_" (in-process working state)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v, drop_private) for k, v in obj.items()
                if not (drop_private and isinstance(k, str) and k.startswith("_"))}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, drop_private) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
