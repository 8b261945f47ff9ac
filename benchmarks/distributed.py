"""Data-parallel quantization, 1 process against N: time, CPU seconds, per-rank memory, and
how far the N-process model is from the 1-process one.

    OMP_NUM_THREADS=1 python benchmarks/distributed.py stories260k --procs 1 2 \\
        --data-dir ../shared/data -- --fast --calib wikitext2:valid
    OMP_NUM_THREADS=1 python benchmarks/distributed.py smollm2-135m --procs 1 2 \\
        --data-dir ../shared/data -- --preset w4a16 --fast --calib wikitext2:valid

Each count runs `sliderquant quantize` in its own processes (N > 1 through `torchrun
--standalone`), one after the other, with no evaluation. CPU seconds are those of every
process of the run (the children's rusage, torchrun's agent included); wall times are only
comparable on an equally loaded machine, so the 1-minute load average is recorded before
and after. Results accumulate in docs/results/distributed.json, the table in
docs/results/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file
from store import record_cell

from sliderquant.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "distributed.json"


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(model: str, procs: int, args: list[str], data_dir: str, out: Path) -> dict:
    launcher = ([sys.executable, "-m", "sliderquant"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={procs}", "-m", "sliderquant"])
    cmd = [*launcher, "quantize", model, "--data-dir", data_dir, "--out", str(out), "--quiet",
           "--tasks", "none", "--format", "fake", *args]
    load_before, cpu, began = os.getloadavg()[0], children_cpu_s(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - began, children_cpu_s() - cpu
    prefix = (["sliderquant"] if procs == 1 else
              ["torchrun", *launcher[3:5], "-m", "sliderquant"])
    shown = " ".join([*prefix, *cmd[len(launcher):]]).replace(str(out), "OUT")
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-2000:], "command": shown}
    record = json.loads((out / "sliderquant.json").read_text())
    return {
        "command": shown,
        "processes": procs,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load_average_before": round(load_before, 1),
        "load_average_after": round(os.getloadavg()[0], 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
        "rank0_timings_s": {k: round(v, 1) for k, v in record["timings"].items()},
        "ranks": record["ranks"],
        "final_window_losses": [w["epoch_losses"][-1] for w in record["windows"]][-3:],
        "date": date.today().isoformat(),
        "config": record["config"],
    }


def compare(out: Path, reference: Path) -> dict:
    """How far the run is from the 1-process one: folded weights (largest difference, and
    how many differ by more than 1e-3, i.e. sit on another grid point) and window losses
    (largest relative difference, and the first window whose losses differ by more than
    1e-5 relative: float noise stays far below that until a rounding decision flips)."""
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(reference / "model.safetensors"))
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    moved = sum(int(((a[k].double() - b[k].double()).abs() > 1e-3).sum()) for k in a)
    la = [w["epoch_losses"] for w in json.loads((out / "sliderquant.json").read_text())["windows"]]
    lb = [w["epoch_losses"]
          for w in json.loads((reference / "sliderquant.json").read_text())["windows"]]
    rel = [max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(wa, wb, strict=True))
           for wa, wb in zip(la, lb, strict=True)]
    first = next((i for i, r in enumerate(rel) if r > 1e-5), None)
    return {"max_abs_weight_diff": worst, "weights_off_by_over_1e-3": moved,
            "weights": sum(t.numel() for t in a.values()), "max_rel_loss_diff": max(rel),
            "rel_loss_diff_per_window": [float(f"{r:.2g}") for r in rel],
            "first_window_off_by_over_1e-5": first}


def write_markdown(results: dict) -> Path:
    lines = ["| model | settings | processes | wall s | CPU s | load avg before/after | "
             "train s (rank 0) | samples per rank | peak cache MiB per rank | "
             "peak RSS MiB per rank | max abs weight diff vs 1 process |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        if key == "_meta" or "error" in r or "processes" not in r:
            continue
        model, settings, _ = key.split("|")
        ranks = r["ranks"]
        cache = ", ".join(f"{b / 2**20:.1f}" for b in ranks["peak_cache_bytes"])
        diff = r.get("vs_one_process", {}).get("max_abs_weight_diff")
        lines.append(
            f"| {model} | {settings} | {r['processes']} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['load_average_before']} / {r['load_average_after']} | "
            f"{r['rank0_timings_s'].get('train_s', '-')} | "
            f"{', '.join(map(str, ranks['samples']))} | {cache} | "
            f"{', '.join(f'{m:.0f}' for m in ranks['peak_rss_mb'])} | "
            f"{'-' if diff is None else f'{diff:.2e}'} |")
    meta = results["_meta"]
    lines += ["", f"Machine: {meta['machine']}. Command lines, dates and per-phase timings in "
              "distributed.json."]
    path = RESULTS.with_suffix(".md")
    write_text(path, "\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--keep", help="keep the run folders here (default: deleted)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    a, args = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: quantize's flags
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other "
                       f"jobs, Python {platform.python_version()}, torch {torch.__version__}"}
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="sq-dist-"))
    try:
        reference = None
        for procs in sorted(a.procs):
            out = work / f"n{procs}"
            result = run(a.model, procs, args, a.data_dir, out)
            if "error" not in result and procs == 1:
                reference = out
            elif "error" not in result and reference is not None:
                result["vs_one_process"] = compare(out, reference)
            key = f"{a.model}|{' '.join(args)}|{procs}"
            results = record_cell(RESULTS, meta, key, result)
            print(key, json.dumps({k: result.get(k) for k in
                                   ("wall_s", "cpu_s", "error", "vs_one_process")}))
        print(write_markdown(results))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
