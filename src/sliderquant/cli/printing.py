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
        if "kl" in r:
            line += (f"   FP {r['reference_ppl']:.3f}   KL(FP||Q) {r['kl']:.4f} nats/token"
                     f"   top-1 agreement {r['top1_agreement']:.3f}")
        if recorded and name in recorded and recorded[name]["windows"] == r["windows"]:
            line += f"   at quantization time {recorded[name]['ppl']:.3f}"
        print(line)


def print_zeroshot(results: dict) -> None:
    """One line per task: the reported metric ± stderr, how many items, from where."""
    for name, r in results.items():
        scored = (f"first {r['n']} of {r['n_available']} items (--limit {r['limit']})"
                  if r["n"] < r["n_available"] else f"{r['n']} items")
        print(f"{name:<14} {r['metric']:<8} {r['value']:.4f} ± {r['stderr']:.4f}  "
              f"({scored}; {r['source']})")


def print_expert_tokens(experts: dict) -> None:
    """The calibration tokens each expert of every MoE layer received, and the experts below
    the low-coverage threshold (see expert_coverage.py)."""
    print("calibration tokens per expert (FP routing):")
    for layer, counts in experts["tokens_per_expert"].items():
        print(f"  layer {layer:>3}: " + " ".join(str(n) for n in counts))
    low, threshold = experts["low_coverage"], experts["low_coverage_threshold"]
    if low:
        print(f"{len(low)} experts received fewer than {threshold} tokens (trained on what they "
              "received, flagged in sliderquant.json); more --nsamples widens coverage")


def say(args: argparse.Namespace, text: str) -> None:
    """A status line on stderr, unless --quiet."""
    if not args.quiet:
        print(text, file=sys.stderr)
