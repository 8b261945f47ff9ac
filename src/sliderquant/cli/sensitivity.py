"""`sliderquant sensitivity`: per-layer and prefix quantization scans (paper Figure 1)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sliderquant.cli.options import add_model_arguments, compute_device, torch_dtype
from sliderquant.cli.printing import say
from sliderquant.config import METHODS, PRESETS, ConfigError, QuantConfig
from sliderquant.sensitivity import DEFAULT_THRESHOLD

NAME = "sensitivity"
HELP = "perplexity when one layer / the first l layers are quantized; suggests shallow/deep"
DESCRIPTION = (
    "Quantize one layer at a time (all others FP), then the first l layers for l = 1..L, "
    "and measure perplexity each time. Writes sensitivity.json, sensitivity.md and "
    "sensitivity.png (two panels, one line per method) into --out, and suggests the "
    "shallow/deep depths of SliderQuant's schedule (what `quantize --schedule auto` uses). "
    "rtn (default) costs one evaluation per measurement; trained methods train the "
    "quantized span each time (the prefix scan costs O(L^2) layer trainings).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--wbits", type=int, default=4, help="weight bits (default 4)")
    p.add_argument("--abits", type=int, default=16,
                   help="activation bits: 4, 8 or 16 (default 16 = weight-only)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weight group size (default: one scale per output channel)")
    p.add_argument("--method", default="rtn",
                   help=f"comma-separated methods, one line each in the figure: "
                        f"{', '.join(METHODS)} (default rtn). Trained methods use the --fast "
                        "preset of the closest bits")
    p.add_argument("--calib", default="wikitext2:valid",
                   help="calibration data of trained methods (default wikitext2:valid)")
    p.add_argument("--dataset", choices=("wikitext2", "c4"), default="wikitext2",
                   help="perplexity data (default wikitext2 test)")
    p.add_argument("--eval-seqlen", type=int, default=512,
                   help="tokens per evaluation window (default 512)")
    p.add_argument("--eval-windows", type=int, default=4,
                   help="evaluation windows per measurement (default 4)")
    p.add_argument("--no-prefix", dest="prefix", action="store_false",
                   help="skip the prefix scan (quantize the first l layers)")
    p.add_argument("--k", type=float, default=DEFAULT_THRESHOLD,
                   help="a layer is sensitive when its ppl increase exceeds k x the median "
                        f"middle-layer increase (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--out", type=Path, default=Path("sensitivity"),
                   help="output folder (default ./sensitivity)")


def configs_from_args(args: argparse.Namespace) -> list[QuantConfig]:
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.wbits >= 16 and args.abits >= 16:
        raise ConfigError("--wbits 16 --abits 16 quantizes nothing; lower one of them")
    preset = f"w{args.wbits}a{args.abits}"
    preset = preset if preset in PRESETS else ("w4a4" if args.abits < 16 else "w4a16")
    return [QuantConfig.from_preset(preset, fast=True, method=m, wbits=args.wbits,
                                    abits=args.abits, group_size=args.group_size,
                                    calib=args.calib)
            for m in dict.fromkeys(methods)]


def markdown(result: dict, command: str) -> str:
    """The result as a markdown table (one row per layer) with its setup and suggestion."""
    L, fp = result["num_layers"], result["fp_ppl"]
    bits = f"W{result['wbits']}A{result['abits']}"
    group = result["group_size"] or "per-channel"
    lines = [f"# Layer sensitivity, {bits} ({group})", "",
             f"`{command}`", "",
             f"{result['dataset']}: {result['windows']} windows x {result['seqlen']} tokens; "
             f"FP perplexity {fp:.3f}; {result['seconds']:.0f} s.", ""]
    header, rule = ["layer i"], ["---:"]
    for method, s in result["scans"].items():
        header += [f"{method}: only layer i", "increase"]
        rule += ["---:", "---:"]
        if s["prefix"]:
            header += [f"{method}: layers 0..i", "quantized layers"]
            rule += ["---:", "---:"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for i in range(L):
        row = [str(i)]
        for s in result["scans"].values():
            row += [f"{s['per_layer'][i]:.3f}", f"{s['per_layer'][i] - fp:+.3f}"]
            if s["prefix"]:
                row += [f"{s['prefix'][i]:.3f}", str(s["prefix_quantized"][i])]
        lines.append("| " + " | ".join(row) + " |")
    sug = result["suggestion"]
    lines += ["", f"Suggested schedule ({sug['method']} scan, k = {sug['k']:g}): "
              f"`--shallow {sug['shallow']} --deep {sug['deep']}`", "", sug["reasoning"], ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.figures import sensitivity as draw

    configs = configs_from_args(args)
    if args.eval_windows < 1 or args.eval_seqlen < 2:
        raise ConfigError("--eval-windows must be >= 1 and --eval-seqlen >= 2")
    loaded = api.load(args.model, args.data_dir, torch_dtype(args.dtype), args.trust_remote_code)
    if loaded.run is not None:
        raise api.RunFolderError(f"{args.model} is a quantized run; scan the original model")
    loaded.model.to(compute_device(args.device))
    began = time.perf_counter()
    first: list[float] = []  # when the FP evaluation (which also tokenizes the data) ended

    def progress(what: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if not first:
            first.append(now)
            say(args, f"[{what}] {done}/{total} measurements, {now - began:.0f} s elapsed")
            return
        eta = (now - first[0]) / (done - 1) * (total - done)
        say(args, f"[{what}] {done}/{total} measurements, {now - began:.0f} s elapsed, "
                  f"ETA {eta / 60:.1f} min")

    say(args, f"scanning {loaded.source}: {', '.join(c.method for c in configs)} "
              f"W{args.wbits}A{args.abits}, {args.eval_windows} x {args.eval_seqlen} tokens "
              f"of {args.dataset} per measurement")
    result = api.sensitivity(loaded.model, loaded.tokenizer, configs, args.dataset,
                             args.eval_seqlen, args.eval_windows, args.data_dir, args.prefix,
                             args.k, progress)
    command = "sliderquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.update(model=loaded.source, command=command,
                  date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(result, indent=1))
    (args.out / "sensitivity.md").write_text(markdown(result, command))
    draw(result, args.out / "sensitivity.png",
         f"{Path(loaded.source).name}: layer sensitivity, W{args.wbits}A{args.abits}, "
         f"{result['windows']} x {result['seqlen']} tokens of {args.dataset}")
    sug = result["suggestion"]
    print(f"FP ppl {result['fp_ppl']:.3f}; most sensitive single layers ({sug['method']}): "
          + ", ".join(f"{i} ({p:.2f})" for p, i in sorted(
              ((p, i) for i, p in enumerate(result["scans"][sug["method"]]["per_layer"])),
              reverse=True)[:5]))
    print(f"suggested: --shallow {sug['shallow']} --deep {sug['deep']}  "
          "(quantize --schedule auto picks it the same way, on calibration data)")
    print(sug["reasoning"])
    print(f"wrote {args.out}/sensitivity.json, sensitivity.md, sensitivity.png")
    return 0
