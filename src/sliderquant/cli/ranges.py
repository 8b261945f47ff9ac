"""`sliderquant ranges`: weight and activation ranges before and after quantization."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "ranges"
HELP = "plot weight/activation ranges of a run's first, middle and last layer vs FP"
DESCRIPTION = (
    "For the first, a middle and the last layer of a finished run, plot the per-output-"
    "channel weight range (max - min) of q_proj and down_proj and the per-token activation "
    "absmax at their inputs, in the source FP model and in the quantized model (paper "
    "Figures D-R). One PNG per layer, ranges_layer<i>.png, in --out (default RUN/figures).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished sliderquant run folder")
    p.add_argument("--data-dir", help="data root (default: $SLIDERQUANT_DATA, else the hub)")
    p.add_argument("--windows", type=int, default=2,
                   help="calibration windows for the activations (default 2)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--calib", help="calibration data (default: the run's)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/figures)")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.figures import ranges as draw

    if args.windows < 1 or args.seqlen < 2:
        raise api.ConfigError("--windows must be >= 1 and --seqlen >= 2")
    data = api.ranges(args.run, args.data_dir, args.windows, args.seqlen, args.calib)
    record = api.read_run_record(args.run)
    cfg = record["config"]
    name = f"{cfg['method']} W{cfg['wbits']}A{cfg['abits']}"
    out = args.out or args.run / "figures"
    for layer, projections in data.items():
        path = draw(projections, out / f"ranges_layer{layer}.png",
                    f"{record.get('model', args.run)}, layer {layer}: FP vs {name} "
                    f"({args.windows} x {args.seqlen} tokens)")
        summary = "; ".join(
            f"{p} weight range {_mean(d['weight'][0]):.3g} -> {_mean(d['weight'][1]):.3g}, "
            f"act absmax {_mean(d['activation'][0]):.3g} -> {_mean(d['activation'][1]):.3g}"
            for p, d in projections.items())
        print(f"layer {layer}: {summary} (means)  {path}")
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
