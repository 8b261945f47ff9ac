"""Peer libraries side by side with sliderquant: same model, calibration ids and evaluator.

    PYTHONPATH=src python benchmarks/peers/run.py --data-dir DATA --work WORK --venvs VENVS

Each cell quantizes in its own process in the peer's environment (quantize_peer.py), then
`sliderquant eval` scores the saved fake-quant folder; a W4A4 cell is scored inside the
peer's process instead (its activation quantizer does not travel in a folder). Results
accumulate in docs/results/peers.json (a finished cell is not rerun unless --rerun) and
docs/results/peers.md holds the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "docs" / "results"
sys.path.insert(0, str(HERE.parent))
from store import fmt_ppl, read_results, record_cell  # noqa: E402 (no package)

from sliderquant.atomic import write_text  # noqa: E402

EVAL = ["--tasks", "wikitext2,c4", "--eval-seqlen", "2048", "--eval-windows", "8"]
W4A4 = "W4A4 per-channel, no rotation"
VENV = {"hqq": "peer-autoround", "gptq": "peer-llmcompressor", "autoround": "peer-autoround"}
AUTOROUND_ITERS = 50
# Our cell of the same setting (same protocol, --fast budget): suite and cell key prefix.
OUR_CELL = {"W4A16 per-channel": ("main", "W4A16"), "W4A16 g64": ("main", "W4A16 g64"),
            "W2A16 per-channel": ("main", "W2A16"), "W2A16 g64": ("w2-investigation", "g64"),
            # auto-round quantizes the inputs of the projections only: our cell of that scope.
            W4A4: ("ablations", "A4 scope (W4A4 no rot.)/projection inputs only")}


def ours(method: str) -> dict[str, tuple[float, float]]:
    """(WikiText-2, C4) of our `method` per peer setting where measured, and "FP"."""
    out = {}
    for setting, (suite, cell) in OUR_CELL.items():
        if suite == "ablations":  # SliderQuant-only cells, keyed without a method
            if method != "sliderquant":
                continue
            key = cell
        else:
            key = f"{cell}/{method}"
        r = read_results(RESULTS / f"{suite}.json").get(key, {})
        if "ppl" in r:
            out[setting] = (r["ppl"]["wikitext2"], r["ppl"]["c4"])
            out.setdefault("FP", (r["fp_ppl"]["wikitext2"], r["fp_ppl"]["c4"]))
    return out


@dataclass
class Cell:
    peer: str
    setting: str
    args: list[str] = field(default_factory=list)
    variant: str = ""  # a non-default budget, shown next to the peer's name

    @property
    def name(self) -> str:
        return f"{self.peer} ({self.variant})" if self.variant else self.peer

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.name}"


SETTINGS = {
    "W4A16 per-channel": ["--wbits", "4"],
    "W4A16 g64": ["--wbits", "4", "--group-size", "64"],
    "W2A16 per-channel": ["--wbits", "2"],
    "W2A16 g64": ["--wbits", "2", "--group-size", "64"],
}


def cells() -> list[Cell]:
    """Cheapest first: hqq and GPTQ weight-only, then auto-round, then W4A4."""
    out = [Cell(p, s, a) for p in ("hqq", "gptq") for s, a in SETTINGS.items()]
    ar = ["--iters", str(AUTOROUND_ITERS)]
    out += [Cell("autoround", s, [*a, *ar]) for s, a in SETTINGS.items()]
    # Budget-matched to our --fast W4A16 run (~500 s on one thread; 50 iters took 2325 s).
    out.append(Cell("autoround", "W4A16 per-channel", [*SETTINGS["W4A16 per-channel"],
                                                       "--iters", "10"], "10 iters"))
    out.append(Cell("autoround", W4A4, ["--wbits", "4", "--abits", "4", *ar]))
    return out


UNFINISHED = "the CPU budget ran out (`--only SETTING/PEER` runs one cell)"
# Cells of the brief that the scripts do not run, and why (shown in the table).
NOT_RUN = {
    ("W4A4 per-channel, rotation", "autoround"):
        "auto-round 0.16's hadamard rotation is set up for MX-FP data types, not INT4",
}


def run_cell(cell: Cell, args: argparse.Namespace) -> dict:
    """Quantize in the peer's venv, evaluate with sliderquant; the cell's record."""
    out = Path(tempfile.mkdtemp(prefix="sq-peer-")) / "model"
    python = args.venvs / VENV[cell.peer] / "bin" / "python"
    cmd = [str(python), str(HERE / "quantize_peer.py"), cell.peer, *cell.args,
           "--work", str(args.work), "--out", str(out)]
    # One thread, and torch.compile's C++ builds (auto-round compiles its block forward at
    # >= 10 iters) in-process, so that the quantize step's CPU time includes them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONPATH": ""}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-3000:], "command": _show(cmd, out)}
        record = json.loads((out / "peer.json").read_text())
        record["command"] = _show(cmd, out)
        if "ppl" in record:  # scored in the peer's process (W4A4)
            return record
        return {**record, **evaluate(out, args.data_dir)}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def evaluate(model: Path, data_dir: str) -> dict:
    """`sliderquant eval MODEL` with the shared protocol, one thread: {"ppl": {task: ppl}},
    or {"error": ...}."""
    report = model.parent / f"{model.name}-eval.json"
    ev = subprocess.run([sys.executable, "-m", "sliderquant", "eval", str(model), "--quiet",
                         "--data-dir", data_dir, *EVAL, "--json", str(report)],
                        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ev.returncode != 0:
        return {"error": ev.stderr.strip()[-3000:]}
    ppl = json.loads(report.read_text())["perplexity"]
    report.unlink()
    return {"ppl": {task: v["ppl"] for task, v in ppl.items()}}


def installed(venv: Path) -> list[str]:
    """`name version` of the packages that matter, read from the venv's dist-info folders."""
    wanted = ("auto_round", "hqq", "llmcompressor", "compressed_tensors", "torch",
              "transformers")
    found = (d.name.removesuffix(".dist-info").rsplit("-", 1)
             for d in venv.glob("lib/python*/site-packages/*.dist-info"))
    return sorted(f"{name} {ver}" for name, ver in found if name in wanted)


def _show(cmd: list[str], out: Path) -> str:
    return " ".join(cmd).replace(str(out), "OUT").replace(str(REPO) + "/", "")


def write_markdown(results: dict) -> Path:
    """docs/results/peers.md from the JSON."""
    meta = results["_meta"]
    sq, rtn = ours("sliderquant"), ours("rtn")
    lines = ["| setting | peer | WikiText-2 | C4 | quantize s | peak RSS MiB | sliderquant "
             "(WikiText-2 / C4) |", "|---|---|---|---|---|---|---|"]
    fp = sq.get("FP") or rtn.get("FP")  # absent until our main table has a cell
    if fp:
        lines.append(f"| FP |  | {fmt_ppl(fp[0])} | {fmt_ppl(fp[1])} | - | - |  |")
    for cell in cells():
        r = results.get(cell.key)
        mine = sq.get(cell.setting)
        ours_s = f"{fmt_ppl(mine[0])} / {fmt_ppl(mine[1])}" if mine else "-"
        if r is None or "ppl" not in r:
            r = r or {}
            reason = (r["note"] if "note" in r else
                      r["error"].splitlines()[-1][:150] if "error" in r else
                      f"evaluation {UNFINISHED}" if "quantize_s" in r else UNFINISHED)
            done = (f"{r['quantize_s']:.0f} | {r['peak_rss_mb']:.0f}" if "quantize_s" in r
                    else " | ")
            lines.append(f"| {cell.setting} | {cell.name} | not run: {reason} | | {done} | "
                         f"{ours_s} |")
            continue
        ppl = r["ppl"]
        lines.append(f"| {cell.setting} | {cell.name} | {fmt_ppl(ppl['wikitext2'])} | "
                     f"{fmt_ppl(ppl['c4'])} | {r['quantize_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{ours_s} |")
    lines += [f"| {setting} | {peer} | not run: {why} | | | | |"
              for (setting, peer), why in NOT_RUN.items()]
    lines += [
        "",
        f"Command: `PYTHONPATH=src python benchmarks/peers/run.py --data-dir DATA --work WORK "
        f"--venvs VENVS` (one cell: quantize_peer.py PEER ... in the peer's venv, then "
        f"`sliderquant eval OUT {' '.join(EVAL)} --data-dir DATA`).",
        f"Machine: {meta['machine']}, no GPU; shared with other jobs, so times are rough. "
        f"Date: {meta['date']}.",
        "Data: calibration 16 x 512 token ids from wikitext2:valid drawn by sliderquant's "
        "`calibration_ids` (seed 2), the same ids for every peer; evaluation WikiText-2 test "
        "and C4 validation, 8 windows x 2048 (the protocol of main.md).",
        f"Budget: hqq none (no calibration); GPTQ one pass, default dampening; auto-round "
        f"{AUTOROUND_ITERS} iterations per block (default 200) unless the row says otherwise, "
        "batch 8. All asymmetric "
        "(as sliderquant); projections only, embeddings and lm_head FP.",
        f"{W4A4}: auto-round's dynamic per-token asymmetric INT4 activations into every "
        "projection (`act_bits=4, act_group_size=-1, act_sym=False, act_dynamic=True`), in its "
        "tuning loop and at inference; no quantization of q/k/v inside attention. Scored in "
        "auto-round's process on prepare.py's windows with the loop of sliderquant's "
        "evaluator (checked on 2026-11-26: `perplexity` of quantize_peer.py on WORK/fp and "
        "`sliderquant eval smollm2-135m --tasks wikitext2,c4 --eval-windows 1` both give "
        "15.147 / 33.402). Its sliderquant column is our W4A4 no-rotation --fast run with "
        "`--no-quantize-attention`, the same scope (ablations.md); main.md's W4A4 rows also "
        "quantize q/k/v.",
        "Versions: " + "; ".join(f"{venv}: {', '.join(v)}"
                                 for venv, v in meta["versions"].items()) + ".",
        "sliderquant column: our --fast numbers (main.md, w2-investigation.md); our RTN: "
        + "; ".join(f"{k} {fmt_ppl(v[0])} / {fmt_ppl(v[1])}"
                    for k, v in rtn.items() if k != "FP")
        + ".",
    ]
    path = RESULTS / "peers.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def main() -> None:
    """Run the missing cells, then rewrite the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--work", type=Path, required=True, help="prepare.py's output")
    ap.add_argument("--venvs", type=Path, required=True, help="folder of the peer venvs")
    ap.add_argument("--only", help="run only cells whose key contains this text "
                    "(one that matches none just rewrites the table)")
    ap.add_argument("--rerun", action="store_true", help="rerun finished cells")
    args = ap.parse_args()
    path = RESULTS / "peers.json"
    results = read_results(path)
    results["_meta"] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                        "date": str(date.today()),
                        "versions": {v: installed(args.venvs / v)
                                     for v in sorted(set(VENV.values()))}}
    for cell in cells():
        if args.only and args.only not in cell.key:
            continue
        if cell.key in results and "ppl" in results[cell.key] and not args.rerun:
            continue
        print(f"[{cell.key}] running", flush=True)
        record = run_cell(cell, args)
        print(f"[{cell.key}] {record.get('ppl') or record['error']}", flush=True)
        results = record_cell(path, results["_meta"], cell.key, record)
        write_markdown(results)
    write_markdown({**read_results(path), "_meta": results["_meta"]})


if __name__ == "__main__":
    main()
