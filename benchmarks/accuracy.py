"""Accuracy of the beyond-the-paper mechanisms (issue 13): one quantize + evaluate per call.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/accuracy.py NAME --model stories260k \\
        --data-dir DATA -- --preset w2a16 --fast --calib wikitext2:valid --rounding

The flags after `--` are `sliderquant quantize`'s (the CLI's own parser builds the config).
Measures the CPU seconds of `sliderquant.quantize` alone (`time.process_time`, one thread),
scores WikiText-2 (and C4 unless `--tasks wikitext2`) and records the run in
docs/results/accuracy.json (a list keyed by NAME; a rerun replaces its record) with the
command, date, load average and commit of src/. `--table` rewrites docs/results/accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from duel import config_from_flags, load_average, machine, src_commit  # noqa: E402 (no package)
from store import fmt_ppl, read_list, record_in_list  # noqa: E402

import sliderquant  # noqa: E402
from sliderquant import api  # noqa: E402
from sliderquant.atomic import write_text  # noqa: E402

RESULTS = HERE.parent / "docs" / "results"
JSON_PATH = RESULTS / "accuracy.json"


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    config = config_from_flags(args.flags)
    loaded = sliderquant.load(args.model, args.data_dir)
    before = load_average()
    wall, cpu = time.perf_counter(), time.process_time()
    result = sliderquant.quantize(loaded.model, loaded.tokenizer, config,
                                  data_dir=args.data_dir, device="cpu", show_progress=False)
    cpu_s, wall_s = time.process_time() - cpu, time.perf_counter() - wall
    tasks = tuple(args.tasks.split(","))
    ev = api.evaluate_perplexity(result.model, loaded.tokenizer, tasks, args.eval_seqlen,
                                 args.eval_windows, args.data_dir, show_progress=False)
    windows = result.report["windows"]
    return {
        "name": args.name, "model": args.model, "flags": args.flags,
        "command": f"OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/accuracy.py "
                   f"{shlex.quote(args.name)} --model {args.model} --tasks {args.tasks} "
                   f"--eval-seqlen {args.eval_seqlen} --eval-windows {args.eval_windows} "
                   f"--data-dir DATA -- {shlex.join(args.flags)}",
        "cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1),
        **{t: ev[t]["ppl"] for t in tasks},
        "eval": f"{args.eval_windows} x {args.eval_seqlen} tokens",
        "final_window_losses": [w["epoch_losses"][-1] for w in windows if w["epoch_losses"]][-3:],
        "date": date.today().isoformat(), "load_before": before, "load_after": load_average(),
        "machine": machine(), "commit": src_commit(), "config": config.to_dict(),
    }


def write_markdown(records: list[dict]) -> Path:
    lines = ["| run | model | flags | CPU s (quantize) | WikiText-2 | C4 | load before/after "
             "| date |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        c4 = fmt_ppl(r["c4"]) if r.get("c4") is not None else ""
        lines.append(f"| {r['name']} | {r['model']} | `{' '.join(r['flags'])}` | {r['cpu_s']:,.0f} "
                     f"| {fmt_ppl(r['wikitext2'])} | {c4} | {r['load_before']} / "
                     f"{r['load_after']} | {r['date']} |")
    lines += ["", "CPU s: `time.process_time()` of `sliderquant.quantize` on one thread "
              "(no loading or evaluation). Commands, commits and configs: accuracy.json."]
    path = RESULTS / "accuracy.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The script's own options, and in `flags` everything after the first `--` (a trailing
    REMAINDER positional would swallow the options that follow NAME)."""
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir")
    ap.add_argument("--tasks", default="wikitext2,c4")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--table", action="store_true", help="only rewrite accuracy.md")
    args = ap.parse_args(argv[:cut])
    args.flags = argv[cut + 1:]
    if not args.table and (not args.name or not args.data_dir):
        ap.error("NAME and --data-dir are needed unless --table")
    return args


def main() -> int:
    args = parse_args(sys.argv[1:])
    if not args.table:
        record = run(args)
        print(json.dumps({k: record[k] for k in ("name", "cpu_s", "wikitext2")}), flush=True)
        record_in_list(JSON_PATH, record, lambda r: r["name"])
    print(write_markdown(read_list(JSON_PATH)).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
