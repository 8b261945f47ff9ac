"""What the commands print."""

from __future__ import annotations

import argparse
import sys


def print_perplexity(results: dict, fp: dict | None = None, recorded: dict | None = None) -> None:
    """One line per dataset; with the FP value and the value recorded at quantization time
    when they are known for the same number of windows."""
    for name, r in results.items():
        line = f"{name:<10} ppl {r['ppl']:.3f}  ({r['windows']} windows x {r['seqlen']} tokens)"
        if fp and name in fp:
            line += f"   FP {fp[name]['ppl']:.3f}"
        if recorded and name in recorded and recorded[name]["windows"] == r["windows"]:
            line += f"   at quantization time {recorded[name]['ppl']:.3f}"
        print(line)


def say(args: argparse.Namespace, text: str) -> None:
    """A status line on stderr, unless --quiet."""
    if not args.quiet:
        print(text, file=sys.stderr)
