"""What the commands print."""

from __future__ import annotations

import argparse
import sys


def print_results(results: dict, fp: dict | None = None, recorded: dict | None = None) -> None:
    """One line per task: perplexity sets, then lm-eval tasks."""
    print_perplexity({k: r for k, r in results.items() if "ppl" in r}, fp, recorded)
    print_zeroshot({k: r for k, r in results.items() if "ppl" not in r})


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
        if recorded and "ppl" in recorded.get(name, {}) \
                and recorded[name]["windows"] == r["windows"]:
            line += f"   at quantization time {recorded[name]['ppl']:.3f}"
        print(line)


def print_zeroshot(results: dict) -> None:
    """One line per task: the reported metric ± stderr, how many items, from where."""
    for name, r in results.items():
        scored = (f"first {r['n']} of {r['n_available']} items (--limit {r['limit']})"
                  if r["n"] < r["n_available"] else f"{r['n']} items")
        print(f"{name:<14} {r['metric']:<8} {_number(r['value'])} ± {_number(r['stderr'])}  "
              f"({scored}; {r['source']})")


def print_summary(results: dict, fp: dict | None, size_bytes: int, peak_rss_mb: float,
                  peak_gpu_mb: float | None, phases: dict, windows: list[dict]) -> None:
    """The end-of-run table: FP vs quantized per task with the change, quantize time, size
    on disk, peak memory, the training loss before -> after, and where the time went."""
    print()
    if results:
        print(f"{'task':<24}{'FP':>10}{'quantized':>12}{'change':>11}")
        for name, r in results.items():
            label, value = ((f"{name} ppl", r["ppl"]) if "ppl" in r
                            else (f"{name} {r['metric']}", r["value"]))
            before = (fp or {}).get(name)
            if before is None:
                print(f"{label:<24}{'-':>10}{_number(value):>12}{'':>11}")
                continue
            base = before["ppl"] if "ppl" in r else before["value"]
            change = (f"{(value / base - 1) * 100:+.1f} %" if "ppl" in r
                      else f"{value - base:+.4f}")
            print(f"{label:<24}{_number(base):>10}{_number(value):>12}{change:>11}")
    quantize = phases.get("quantize")  # absent when --resume only finished the evaluation
    memory = f"peak memory {peak_rss_mb:.0f} MiB RSS" + (
        f", {peak_gpu_mb:.0f} MiB GPU" if peak_gpu_mb else "")
    took = (f"quantize time {quantize['wall_s']:.0f} s ({quantize['cpu_s']:.0f} CPU s); "
            if quantize else "")
    print(f"{took}size on disk {size_bytes / 2**20:.1f} MiB; {memory}")
    trained = [w for w in windows if w.get("initial_loss") and after_loss(w)]
    if trained:
        ratios = sorted(after_loss(w) / w["initial_loss"] for w in trained)
        last = trained[-1]
        print(f"training: window loss before -> after: median {_pct(ratios[len(ratios) // 2])}, "
              f"best {_pct(ratios[0])}, worst {_pct(ratios[-1])} over {len(trained)} windows; "
              f"last window {last['initial_loss']:.4g} -> {after_loss(last):.4g} "
              "(every window in sliderquant.json; sliderquant report draws them)")
    print(f"{'where the time went':<24}{'wall s':>10}{'CPU s':>12}")
    for name, t in phases.items():
        print(f"  {name:<22}{t['wall_s']:>10.1f}{_number(t.get('cpu_s'), 1):>12}")
        for part, seconds in t.get("parts", {}).items():
            print(f"    {part:<20}{seconds:>10.1f}")


def after_loss(window: dict) -> float | None:
    """A window record's loss after training: `final_loss` (a no-grad pass measured like
    `initial_loss`), else, in records written before it existed, the last epoch's mean."""
    if window.get("final_loss") is not None:
        return window["final_loss"]
    return window["epoch_losses"][-1] if window.get("epoch_losses") else None


def _number(value, digits: int | None = None) -> str:
    """A score for a table: 4 decimals below 10, 3 below 1000, else 4 significant digits."""
    if value is None or isinstance(value, str):
        return str(value or "")
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}" if abs(value) < 1000 \
        else f"{value:.4g}"


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.0f} %"


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
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr)
