"""Forward + backward CPU cost of one fake quantization: autograd's path (`fake_quantize`)
against the hand-written backward (`fake_quantize_fast`), interleaved in one process.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/quantizer_cost.py [--reps 5]

Shapes of SmolLM2-135M: an MLP weight [1536, 576] (per channel with clipping, and g64 with
clipping) and the per-token input of a projection (2 x 512 tokens x 576). Also the input
of q/k/v quantized three times against once (what the blocks now do). Writes
docs/results/quantizer_cost.json and prints a table. Complements benchmarks/step.py, whose
whole-step ratios a loaded machine blurs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from duel import load_average, machine, src_commit  # noqa: E402 (no package)

from sliderquant.atomic import write_text  # noqa: E402
from sliderquant.quant.fused import fake_quantize_fast  # noqa: E402
from sliderquant.quant.quantizer import fake_quantize  # noqa: E402

CALLS = 20


def case(kind: str):
    g = torch.Generator().manual_seed(0)
    if kind == "activation":
        x = torch.randn(2, 512, 576, generator=g)
        return x, {"bits": 4}, None
    w = torch.randn(1536, 576, generator=g) * 0.05
    group = 64 if kind.endswith("g64") else None
    n = 1 if group is None else 576 // group
    clip = (torch.full((1536, n), 4.0), torch.full((1536, n), 4.0))
    return w, {"bits": 2 if group else 4, "group_size": group}, clip


def timed(fn, kind: str, copies: int = 1) -> float:
    x, kw, clip = case(kind)
    x.requires_grad_(True)
    upper = lower = None
    if clip is not None:
        upper, lower = (c.clone().requires_grad_(True) for c in clip)
    began = time.process_time()
    for _ in range(CALLS):
        outs = [fn(x, rate=1.0, upper=upper, lower=lower, **kw) for _ in range(copies)]
        sum(o.sum() for o in outs).backward()
    return (time.process_time() - began) / CALLS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = {("weight per-channel + clipping", "weight"), ("weight g64 + clipping", "weight-g64"),
            ("per-token input", "activation")}
    results = []
    for label, kind in sorted(rows):
        times: dict[str, list[float]] = {"autograd": [], "hand-written": []}
        for _ in range(args.reps):
            times["autograd"].append(timed(fake_quantize, kind))
            times["hand-written"].append(timed(fake_quantize_fast, kind))
        results.append({"case": label, **{k: round(statistics.median(v), 5)
                                           for k, v in times.items()},
                        "reps": {k: [round(t, 5) for t in v] for k, v in times.items()}})
    shared: dict[str, list[float]] = {"q/k/v input quantized 3 times (autograd)": [],
                                      "once (hand-written)": []}
    for _ in range(args.reps):
        shared["q/k/v input quantized 3 times (autograd)"].append(
            timed(fake_quantize, "activation", copies=3))
        shared["once (hand-written)"].append(timed(fake_quantize_fast, "activation"))
    results.append({"case": "q/k/v input", **{k: round(statistics.median(v), 5)
                                              for k, v in shared.items()}})
    record = {"date": date.today().isoformat(), "commit": src_commit(), "machine": machine(),
              "threads": 1, "load_after": load_average(), "calls_per_timing": CALLS,
              "command": f"PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/quantizer_cost.py "
                         f"--reps {args.reps}",
              "unit": "CPU s per forward + backward (median of reps)", "results": results}
    write_text(HERE.parent / "docs" / "results" / "quantizer_cost.json",
               json.dumps(record, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
