"""`sliderquant ranges`: weight and activation ranges before and after quantization."""

from __future__ import annotations

import argparse
from pathlib import Path

from sliderquant.cli import options

NAME = "ranges"
HELP = "plot weight/activation ranges of a run's first, middle and last layer vs FP"
DESCRIPTION = (
    "For the first, a middle and the last layer of a finished run, plot the per-output-"
    "channel weight range (max - min) of q_proj and down_proj and the per-token activation "
    "absmax at their inputs, in the source FP model and in the quantized model (paper "
    "Figures D-R), on --nsamples calibration windows of --seqlen tokens drawn like the "
    "run's own. One PNG per layer, ranges_layer<i>.png, in --out (default RUN/figures).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished sliderquant run folder")
    options.add_data_dir(p)
    options.add_device(p)
    options.add_quiet(p)
    options.add_out(p, "ranges_layer<i>.png (default RUN/figures)")
    options.add_calibration_arguments(p, default_calib=None, nsamples=2, seqlen=512)
    p.add_argument("--windows", dest="nsamples", type=options.positive_int,
                   help=argparse.SUPPRESS)  # the old name of --nsamples


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.figures import ranges as draw

    record = api.read_run_record(args.run)
    data_dir = options.data_root_of(args, record)
    data = api.ranges(args.run, data_dir, args.nsamples, args.seqlen, args.calib,
                      args.chat_template, options.compute_device(args.device))
    cfg = record["config"]
    name = f"{cfg['method']} W{cfg['wbits']}A{cfg['abits']}"
    out = args.out or args.run / "figures"
    for layer, projections in data.items():
        path = draw(projections, out / f"ranges_layer{layer}.png",
                    f"{record.get('model', args.run)}, layer {layer}: FP vs {name} "
                    f"({args.nsamples} x {args.seqlen} tokens)")
        summary = "; ".join(
            f"{p} weight range {_mean(d['weight'][0]):.3g} -> {_mean(d['weight'][1]):.3g}, "
            f"act absmax {_mean(d['activation'][0]):.3g} -> {_mean(d['activation'][1]):.3g}"
            for p, d in projections.items())
        print(f"layer {layer}: {summary} (means)  {path}")
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
