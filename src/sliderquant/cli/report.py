"""`sliderquant report`: a run's per-window loss curves and window schedule as a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "report"
HELP = "draw a run's per-window training losses and its window schedule"
DESCRIPTION = (
    "From RUN/sliderquant.json: the training loss of every window per epoch, and the "
    "schedule (which layers each window covered, coloured by the loss it ended at). Writes "
    "RUN/figures/report.png unless --out names another file; a mixed-precision run also "
    "gets allocation.png beside it (bits per projection, predicted vs measured loss).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished sliderquant run folder")
    p.add_argument("--out", type=Path, help="PNG to write (default RUN/figures/report.png)")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.figures import allocation, training
    from sliderquant.sensitivity import allocation_summary

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
    title = (f"{record.get('model', args.run)}: {cfg['method']} W{cfg['wbits']}A{cfg['abits']}"
             f" ({cfg.get('preset') or 'custom'}) {depths}")
    path = training(windows, num_layers, args.out or args.run / "figures" / "report.png", title)
    last = max(w["stage"] for w in windows)
    finals = [(w["window"], w["layers"], w["epoch_losses"][-1]) for w in windows
              if w["stage"] == last and w["epoch_losses"]]
    worst = max(finals, key=lambda f: f[2])
    print(f"{len(record['schedule'])} windows over {num_layers} layers; highest final loss "
          f"{worst[2]:.4g} in window {worst[0]} (layers {worst[1][0]}-{worst[1][-1]})")
    if auto:
        print(f"schedule auto: {auto['reasoning']}")
    if record.get("allocation"):
        drawn = allocation(record["allocation"], path.with_name("allocation.png"), title)
        print(f"allocation: {allocation_summary(record['allocation'])}")
        print(f"wrote {drawn}")
    print(f"wrote {path}")
    return 0
