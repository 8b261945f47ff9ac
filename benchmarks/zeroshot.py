"""Zero-shot accuracy (lm-eval) of FP and W4A16 SmolLM2-135M, and the quantized model's KL
divergence from FP on WikiText-2 and C4.

    python benchmarks/zeroshot.py --data-dir ../shared/data --limit 300 --method sliderquant

Steps, each a `sliderquant` command in its own process whose JSON is kept in --work (a
finished step of the same command is not rerun unless --rerun): quantize SmolLM2 with the
w4a16 --fast preset and --method, evaluate the FP model on the six tasks, evaluate the
quantized run on the six tasks plus perplexity and KL(FP || Q). Results:
docs/results/zeroshot.json and zeroshot.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from sliderquant.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
MODEL = "smollm2-135m"
TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25,
          "winogrande": 0.5, "boolq": 0.5}  # boolq: uniform guess; majority class is 0.62


def sliderquant(args: list[str], log: Path) -> float:
    """Run `sliderquant ARGS` under the lowest CPU priority; its wall time in seconds."""
    cmd = ["nice", "-n", "19", sys.executable, "-m", "sliderquant", *args]
    began = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log}")
    return round(time.perf_counter() - began, 1)


def steps(data_dir: str, work: Path, method: str, limit: int, seqlen: int,
          windows: int) -> list[tuple]:
    run = work / f"smollm2-w4a16-{method}"
    zeroshot = ["--tasks", ",".join(TASKS), "--limit", str(limit)]
    fp_json, q_json = work / f"fp_zeroshot_{limit}.json", work / f"w4a16_zeroshot_{limit}.json"
    perplexity = ["--tasks", "wikitext2,c4", "--eval-seqlen", str(seqlen), "--eval-windows",
                  str(windows), "--kl"]
    return [
        ("quantize", run / "sliderquant.json",
         ["quantize", MODEL, "--preset", "w4a16", "--fast", "--method", method, "--calib",
          "wikitext2:valid", "--data-dir", data_dir, "--out", str(run), "--tasks", "none",
          "--quiet"]),
        ("fp_zeroshot", fp_json,
         ["eval", MODEL, "--data-dir", data_dir, *zeroshot, "--quiet", "--json", str(fp_json)]),
        ("w4a16_zeroshot", q_json,
         ["eval", str(run), "--data-dir", data_dir, *zeroshot, "--quiet", "--json", str(q_json)]),
        ("w4a16_kl", work / "w4a16_kl.json",
         ["eval", str(run), "--data-dir", data_dir, *perplexity, "--quiet",
          "--json", str(work / "w4a16_kl.json")]),
    ]


def machine() -> str:
    from importlib.metadata import version

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, torch {version('torch')}, transformers "
            f"{version('transformers')}, lm-eval {version('lm-eval')}")


def shown(args: list[str], work: Path, data_dir: str) -> str:
    text = " ".join(["sliderquant", *args])
    return text.replace(str(work), "WORK").replace(data_dir, "DATA")


def _cell(task_results: dict | None, task: str) -> str:
    if task_results is None:
        return "not run"
    r = task_results[task]
    return f"{r['value']:.3f} ± {r['stderr']:.3f}"


def write_markdown(results: dict) -> Path:
    """The table of whatever steps have finished; missing ones say "not run"."""
    meta = results["_meta"]
    fp = results.get("fp_zeroshot", {}).get("zeroshot")
    q = results.get("w4a16_zeroshot", {}).get("zeroshot")
    lines = ["### Zero-shot accuracy and KL divergence: SmolLM2-135M-Instruct, FP vs W4A16",
             "", f"First {meta['limit']} items of each task (`--limit {meta['limit']}`), "
             "0-shot, lm-eval's prompts and metrics, local data copies (see "
             "[docs/EVALUATION.md](../EVALUATION.md) for which file each task reads). "
             "Metric: acc_norm where the task has it, else acc; ± is lm-eval's stderr.", "",
             f"| task | metric | chance | FP | W4A16 ({meta['method']}) | items |",
             "|---|---|---|---|---|---|"]
    for task in TASKS:
        r = (fp or q or {}).get(task)
        metric, items = (r["metric"], f"{r['n']} of {r['n_available']}") if r else ("", "")
        lines.append(f"| {task} | {metric} | {CHANCE[task]:.2f} | {_cell(fp, task)} | "
                     f"{_cell(q, task)} | {items} |")
    means = [f"{sum(x[t]['value'] for t in TASKS) / len(TASKS):.3f}" if x else "not run"
             for x in (fp, q)]
    lines.append(f"| mean | | | {means[0]} | {means[1]} | |")
    kl = results.get("w4a16_kl", {}).get("perplexity")
    if kl:
        first = next(iter(kl.values()))
        lines += ["", f"Perplexity and KL(FP ‖ W4A16) of the next-token distributions "
                  f"({first['windows']} windows × {first['seqlen']} tokens per set):", "",
                  "| set | FP ppl | W4A16 ppl | mean KL (nats/token) | top-1 agreement |",
                  "|---|---|---|---|---|"]
        for name, r in kl.items():
            lines.append(f"| {name} | {r['reference_ppl']:.3f} | {r['ppl']:.3f} | "
                         f"{r['kl']:.4f} | {r['top1_agreement']:.3f} |")
    else:
        lines += ["", "KL(FP ‖ W4A16): not run."]
    lines += ["", f"Machine: {meta['machine']}; load average at the start "
              f"{meta['load_average']} (shared with other jobs; every step ran under "
              f"`nice -n 19`, so wall times are not timings). Date: {meta['date']}.",
              f"Produced by `{meta['command']}`, which runs:", ""]
    for key in ("quantize", "fp_zeroshot", "w4a16_zeroshot", "w4a16_kl"):
        if key not in results:
            lines.append(f"- {key}: not run")
            continue
        wall = results[key]["wall_s"]
        lines.append(f"- `{results[key]['command']}` "
                     f"({'output reused' if wall is None else f'{wall:.0f} s wall'})")
    path = RESULTS / "zeroshot.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="data root (wikitext2/, c4/, zeroshot/)")
    parser.add_argument("--limit", type=int, default=300, help="items per zero-shot task")
    parser.add_argument("--method", default="sliderquant",
                        help="quantization method of the W4A16 model (w4a16 --fast preset)")
    parser.add_argument("--kl-seqlen", type=int, default=2048, help="perplexity/KL window")
    parser.add_argument("--kl-windows", type=int, default=8, help="windows per set for KL")
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "zeroshot",
                        help="where the quantized run and the per-step JSON are kept")
    parser.add_argument("--rerun", action="store_true", help="rerun finished steps")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite zeroshot.md from zeroshot.json")
    args = parser.parse_args()
    if args.report:
        print(write_markdown(json.loads((RESULTS / "zeroshot.json").read_text())))
        return 0
    data_dir = str(Path(args.data_dir).resolve())
    args.work.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "zeroshot.json"
    results = json.loads(path.read_text()) if path.is_file() and not args.rerun else {}
    results["_meta"] = {
        "machine": machine(), "date": date.today().isoformat(), "model": MODEL,
        "limit": args.limit, "method": args.method,
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": f"python benchmarks/zeroshot.py --data-dir DATA --limit {args.limit} "
                   f"--method {args.method} --kl-seqlen {args.kl_seqlen} "
                   f"--kl-windows {args.kl_windows}"}
    for key, output, cmd in steps(data_dir, args.work, args.method, args.limit,
                                  args.kl_seqlen, args.kl_windows):
        if (key in results and results[key]["command"] == shown(cmd, args.work, data_dir)
                and output.is_file() and not args.rerun):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
        wall = None  # None: the output of an earlier run of the same command is reused
        if args.rerun or not output.is_file():
            cmd = [*cmd, "--overwrite"] if key == "quantize" and args.rerun else cmd
            wall = sliderquant(cmd, args.work / f"{key}.log")
        record = json.loads(output.read_text())
        if key == "quantize":
            record = {k: record[k] for k in ("model", "config", "timings", "peak_rss_mb")}
        results[key] = {**record, "command": shown(cmd, args.work, data_dir), "wall_s": wall}
        write_text(path, json.dumps(results, indent=1))
        write_markdown(results)
    print(write_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
