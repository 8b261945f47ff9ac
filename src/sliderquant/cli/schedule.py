"""`sliderquant schedule`: print the window schedule for a number of layers."""

from __future__ import annotations

import argparse
import json

from sliderquant.cli import options
from sliderquant.config import METHODS

NAME = "schedule"
HELP = "print the window schedule for a number of layers"
DESCRIPTION = "Print the windows a method trains, in order."


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--layers", type=options.positive_int, required=True,
                   help="number of decoder layers L")
    s.add_argument("--method", choices=[m for m in METHODS if m != "rtn"],
                   default="sliderquant", help="schedule family (default sliderquant)")
    s.add_argument("--shallow", type=int, default=4, help="Ls (sliderquant)")
    s.add_argument("--deep", type=int, default=4, help="Ld (sliderquant)")
    s.add_argument("--window-size", type=int, default=None,
                   help="window size s (default 2; blockwise 1)")
    s.add_argument("--stride", type=int, default=1, help="stride i")
    options.add_json(s)


def run(args: argparse.Namespace) -> int:
    from sliderquant.schedule import build_schedule, describe, fixed, visit_counts

    if args.method == "sliderquant":
        windows = build_schedule(args.layers, args.shallow, args.deep,
                                 args.window_size or 2, args.stride)
    else:
        size = args.window_size or (1 if args.method == "blockwise" else 2)
        windows = fixed(args.layers, size, args.stride)
    rows = describe(windows, sliding=args.method == "sliderquant")
    if args.json:
        data = json.dumps({"layers": args.layers, "windows": rows,
                           "visits": visit_counts(windows, args.layers)})
        if args.json == "-":
            print(data)
            return 0
        from sliderquant.atomic import write_text

        write_text(args.json, data)
    print(f"{args.method} schedule, L = {args.layers}: {len(windows)} windows")
    print(f"{'#':>3}  {'kind':<5}  {'layers':<22} slide")
    for row in rows:
        layers = row["layers"]
        span = f"[{layers[0]}]" if len(layers) == 1 else f"[{layers[0]}..{layers[-1]}]"
        slide = "-" if row["slide"] is None else str(row["slide"])
        print(f"{row['index']:>3}  {row['kind']:<5}  {span:<22} {slide}")
    print("visits per layer:", " ".join(map(str, visit_counts(windows, args.layers))))
    return 0


