"""`sliderquant sensitivity`: per-layer and prefix quantization scans (paper Figure 1)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from sliderquant.cli import options
from sliderquant.cli.options import finite_float
from sliderquant.cli.printing import say
from sliderquant.config import METHODS, PRESETS, SCHEMES, ConfigError, QuantConfig
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
    options.add_model_arguments(p)
    options.add_data_dir(p)
    options.add_device(p)
    options.add_quiet(p)
    options.add_out(p, "sensitivity.json, sensitivity.md and sensitivity.png (default "
                    "./sensitivity)")
    p.add_argument("--scheme", help=f"what to quantize, by name ({', '.join(SCHEMES)}; see "
                   "quantize --help); or give --wbits/--abits/--group-size")
    p.add_argument("--wbits", type=int, default=None, help="weight bits (default 4)")
    p.add_argument("--abits", type=int, default=None,
                   help="activation bits: 4, 8 or 16 (default 16 = weight-only)")
    p.add_argument("--group-size", type=options.positive_int, default=None,
                   help="weight group size (default: one scale per output channel)")
    p.add_argument("--method", default="rtn", metavar="{" + ",".join(METHODS) + "}[,...]",
                   help="comma-separated methods, one line each in the figure (default rtn). "
                        "Trained methods use the --fast preset of the closest bits")
    options.add_calibration_arguments(p, default_calib="wikitext2:valid")
    options.add_eval_arguments(
        p, default_tasks="wikitext2", perplexity_only=True, default_seqlen=512,
        default_windows=4, seqlen_note="; a scan runs 2L+1 evaluations and ranks layers, "
        "which short windows do at a quarter of the attention cost; --eval-seqlen 2048 "
        "matches the other commands' protocol")
    p.add_argument("--dataset", dest="tasks", help=argparse.SUPPRESS)  # the old --tasks
    p.add_argument("--no-prefix", dest="prefix", action="store_false",
                   help="skip the prefix scan (quantize the first l layers)")
    p.add_argument("--k", type=finite_float, default=DEFAULT_THRESHOLD,
                   help="a layer is sensitive when its ppl increase exceeds k x the median "
                        f"middle-layer increase (default {DEFAULT_THRESHOLD:g})")


def configs_from_args(args: argparse.Namespace) -> list[QuantConfig]:
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--method: unknown method(s) {unknown}; choose from "
                          f"{', '.join(METHODS)}")
    common = dict(calib=args.calib, chat_template=args.chat_template,
                  wbits=args.wbits, abits=args.abits, group_size=args.group_size)
    if args.scheme:
        return [QuantConfig.from_preset(None, fast=True, scheme=args.scheme, method=m,
                                        **common) for m in dict.fromkeys(methods)]
    wbits, abits = args.wbits or 4, args.abits or 16
    if wbits >= 16 and abits >= 16:
        raise ConfigError("--wbits 16 --abits 16 quantizes nothing; lower one of them")
    preset = f"w{wbits}a{abits}"
    preset = preset if preset in PRESETS else ("w4a4" if abits < 16 else "w4a16")
    return [QuantConfig.from_preset(preset, fast=True, method=m,
                                    **{**common, "wbits": wbits, "abits": abits})
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
    from sliderquant.calibration import check_source
    from sliderquant.data import resolve_data_root
    from sliderquant.eval.perplexity import check_data
    from sliderquant.figures import sensitivity as draw

    configs = configs_from_args(args)
    sets = options.parse_tasks(args.tasks, perplexity_only=True)
    if len(sets) != 1:
        raise ConfigError("--tasks: a scan measures one perplexity set; name wikitext2 or c4")
    (dataset,) = sets
    device = options.compute_device(args.device)
    data_root = resolve_data_root(args.data_dir)
    if any(c.trains for c in configs):
        check_source(configs[0].calib, data_root, configs[0].chat_template)
    check_data((dataset,), data_root)
    loaded = api.load(args.model, args.data_dir, options.torch_dtype(args.dtype),
                      args.trust_remote_code)
    if loaded.run is not None:
        raise api.RunFolderError(f"{args.model} is a quantized run; scan the original model")
    loaded.model.to(device)
    seqlen = options.eval_length(loaded.model, args.eval_seqlen, args)
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

    bits = f"W{configs[0].wbits}A{configs[0].abits}"
    say(args, f"scanning {loaded.source}: {', '.join(c.method for c in configs)} "
              f"{configs[0].scheme or bits}, {args.eval_windows} x {seqlen} tokens "
              f"of {dataset} per measurement")
    result = api.sensitivity(loaded.model, loaded.tokenizer, configs, dataset, seqlen,
                             args.eval_windows, args.data_dir, args.prefix, args.k, progress)
    command = "sliderquant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.update(model=loaded.source, command=command,
                  date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    out = args.out or Path("sensitivity")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity.json").write_text(json.dumps(result, indent=1))
    (out / "sensitivity.md").write_text(markdown(result, command))
    draw(result, out / "sensitivity.png",
         f"{Path(loaded.source).name}: layer sensitivity, {bits}, "
         f"{result['windows']} x {result['seqlen']} tokens of {dataset}")
    sug = result["suggestion"]
    print(f"FP ppl {result['fp_ppl']:.3f}; most sensitive single layers ({sug['method']}): "
          + ", ".join(f"{i} ({p:.2f})" for p, i in sorted(
              ((p, i) for i, p in enumerate(result["scans"][sug["method"]]["per_layer"])),
              reverse=True)[:5]))
    print(f"suggested: --shallow {sug['shallow']} --deep {sug['deep']}  "
          "(quantize --schedule auto picks it the same way, on calibration data)")
    print(sug["reasoning"])
    print(f"wrote {out}/sensitivity.json, sensitivity.md, sensitivity.png")
    return 0
