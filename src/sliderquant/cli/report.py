"""`sliderquant report`: a run's per-window loss curves and window schedule as a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from sliderquant.cli import options
from sliderquant.cli.printing import after_loss

NAME = "report"
HELP = "draw a run's per-window training losses and its window schedule"
DESCRIPTION = (
    "From RUN/sliderquant.json: the training loss of every window per epoch, starting from "
    "its loss before training (quantized with the learnables at their start values), and the "
    "schedule (which layers each window covered, coloured by the loss it ended at). Writes "
    "report.png into --out (default RUN/figures); a mixed-precision run also gets "
    "allocation.png there (bits per projection, predicted vs measured loss).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished sliderquant run folder")
    options.add_quiet(p)
    options.add_out(p, "report.png (default RUN/figures)")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.figures import allocation, training
    from sliderquant.sensitivity import allocation_summary

    if args.out is not None and args.out.suffix.lower() == ".png":
        raise api.ConfigError(f"--out {args.out}: --out names a folder (report.png is written "
                              "into it)")
    record = api.read_run_record(args.run)
    cfg = record["config"]
    windows = record.get("windows") or []
    if not any(w["epoch_losses"] for w in windows):
        raise api.RunFolderError(f"{args.run} trained nothing (method {cfg['method']}): "
                                 "there are no losses to draw")
    num_layers = max(layer for w in record["schedule"] for layer in w) + 1
    auto = record.get("auto_schedule")
    depths = (f"shallow {cfg['shallow']} deep {cfg['deep']}"
              + (" (auto)" if auto else "") if cfg["method"] == "sliderquant" else "")
    bits = cfg.get("scheme") or f"W{cfg['wbits']}A{cfg['abits']}"
    title = (f"{record.get('model', args.run)}: {cfg['method']} {bits}"
             f" ({cfg.get('preset') or 'custom'}) {depths}")
    path = training(windows, num_layers, (args.out or args.run / "figures") / "report.png",
                    title)
    last = max(w["stage"] for w in windows)
    finals = [(w["window"], w["layers"], w["epoch_losses"][-1]) for w in windows
              if w["stage"] == last and w["epoch_losses"]]
    worst = max(finals, key=lambda f: f[2])
    print(f"{len(record['schedule'])} windows over {num_layers} layers; highest final loss "
          f"{worst[2]:.4g} in window {worst[0]} (layers {worst[1][0]}-{worst[1][-1]})")
    starts = [(w["initial_loss"], after_loss(w)) for w in windows
              if w.get("initial_loss") and after_loss(w)]
    if starts:
        before, after = sum(b for b, _ in starts), sum(a for _, a in starts)
        print(f"summed over windows, loss before training {before:.4g} -> after {after:.4g} "
              f"({(after / before - 1) * 100:+.0f} %)")
    if auto:
        print(f"schedule auto: {auto['reasoning']}")
    if record.get("allocation"):
        drawn = allocation(record["allocation"], path.with_name("allocation.png"), title)
        print(f"allocation: {allocation_summary(record['allocation'])}")
        print(f"wrote {drawn}")
    print(f"wrote {path}")
    return 0
