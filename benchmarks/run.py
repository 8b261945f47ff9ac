"""Benchmark suites: each cell is one `sliderquant quantize` run in its own process.

    python benchmarks/run.py main --data-dir ../shared/data        # methods x bits table
    python benchmarks/run.py fast-lr --data-dir ../shared/data     # tuning of the --fast LRs
    python benchmarks/run.py mixed --data-dir ../shared/data       # average-bit budgets

Results accumulate in docs/results/<suite>.json (a finished cell is not rerun unless
--rerun), and docs/results/<suite>.md holds the table. A cell's wall time and peak RSS are
those of its own process (quantization only; evaluation is timed separately).
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
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from store import fmt_ppl, read_results, record_cell

from sliderquant.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
MODEL = "smollm2-135m"
EVAL = ["--tasks", "wikitext2,c4", "--eval-seqlen", "2048", "--eval-windows", "8"]
# Shared CPU budget of the learned methods: the --fast preset values, one calibration set,
# and the paper's recipe (these suites reproduce and ablate the paper; the default recipe's
# departures are measured by duel.py and accuracy.py).
BUDGET = ["--fast", "--paper", "--calib", "wikitext2:valid"]


@dataclass
class Cell:
    key: str
    label: dict  # columns shown in the table
    args: list[str] = field(default_factory=list)


def main_suite() -> list[Cell]:
    settings = [("W4A16", ["--preset", "w4a16"]), ("W3A16", ["--preset", "w3a16"]),
                ("W2A16", ["--preset", "w2a16"]), ("W4A4", ["--preset", "w4a4"]),
                ("W4A4 no rotation", ["--preset", "w4a4", "--no-rotate"]),
                ("W4A16 g64", ["--preset", "w4a16", "--group-size", "64"])]
    cells = []
    for name, args in settings:
        for method in ("rtn", "blockwise", "fixed", "sliderquant"):
            cells.append(Cell(f"{name}/{method}", {"setting": name, "method": method},
                              [*args, *BUDGET, "--method", method]))
    return cells


def fast_lr_suite() -> list[Cell]:
    cells = []
    for preset in ("w4a16", "w2a16"):
        for factor in (1, 5, 20):
            base = {"w4a16": (1e-4, 1e-2), "w2a16": (5e-4, 1e-2)}[preset]
            lora, clip = base[0] * factor, base[1] * factor
            cells.append(Cell(f"{preset}/x{factor}", {"preset": preset, "lr factor": factor,
                                                      "lora_lr": lora, "clip_lr": clip},
                              ["--preset", preset, *BUDGET, "--lora-lr", str(lora),
                               "--clip-lr", str(clip)]))
    return cells


def ablation_suite() -> list[Cell]:
    """The paper's ablations (Tables 6-10, F, G) at the shared --fast budget on SmolLM2.

    Schedule ablations at W2A16 (where the differences are largest); channel scaling and
    LoRA at W4A4 without rotation (the only setting with channel scaling; the rotated W4A4
    run takes ~6x longer on this CPU, and without rotation the activation outliers that
    channel scaling exists for are still there). "A4 scope" quantizes the inputs of the
    projections only, not q/k/v inside attention: auto-round's W4A4 scope, for the peer
    table. Cells equal to a cell of another suite are not repeated: the SliderQuant W2A16
    and W4A4-no-rotation defaults (main) and W2A16 g64 (w2-investigation).
    """
    w2 = ["--preset", "w2a16", *BUDGET]
    w4a4 = ["--preset", "w4a4", "--no-rotate", *BUDGET]
    cells = []

    def add(table: str, variant: str, args: list[str]) -> None:
        cells.append(Cell(f"{table}/{variant}", {"table": table, "variant": variant}, args))

    for ls, ld, stages, name in [(1, 1, 1, "no PESW, no PCSW, no intra"),
                                 (4, 1, 1, "PESW only"), (1, 4, 1, "PCSW only"),
                                 (4, 4, 1, "PESW + PCSW, no intra")]:
        add("T6 components", name, [*w2, "--shallow", str(ls), "--deep", str(ld),
                                    "--intra-stages", str(stages)])
    for f in (2, 3, 5, 6):
        add("T7 Ls=Ld", f"Ls=Ld={f}", [*w2, "--shallow", str(f), "--deep", str(f)])
    for stages in (3, 4):
        add("T8 gamma", f"gamma=1/{stages}", [*w2, "--intra-stages", str(stages)])
    for size in (3, 4):
        add("T9 window size", f"s={size}", [*w2, "--window-size", str(size)])
    add("T10 CS/LoRA (W4A4 no rot.)", "CS only", [*w4a4, "--lora-rank", "0"])
    add("T10 CS/LoRA (W4A4 no rot.)", "LoRA only", [*w4a4, "--no-channel-scaling"])
    add("T10 CS/LoRA (W4A4 no rot.)", "neither (clipping only)",
        [*w4a4, "--lora-rank", "0", "--no-channel-scaling"])
    add("A4 scope (W4A4 no rot.)", "projection inputs only",
        [*w4a4, "--no-quantize-attention"])
    for n in (4, 8, 32):
        add("TF calibration samples", f"nsamples={n}", [*w2, "--nsamples", str(n)])
    add("TG group size", "g32", [*w2, "--group-size", "32"])
    add("intra mode", "per_window", [*w2, "--intra-mode", "per_window"])
    return cells


def w2_investigation_suite() -> list[Cell]:
    """Why does SliderQuant not win at W2A16 per-channel? Seed noise, a longer budget, and
    the same comparison at g64 where the 2-bit model is not destroyed."""
    cells = []
    for method in ("fixed", "sliderquant"):
        for seed in (3, 4):
            cells.append(Cell(f"seed {seed}/{method}", {"variant": f"seed {seed}",
                                                        "method": method},
                              ["--preset", "w2a16", *BUDGET, "--method", method,
                               "--seed", str(seed)]))
        cells.append(Cell(f"8 epochs/{method}", {"variant": "8 epochs", "method": method},
                          ["--preset", "w2a16", *BUDGET, "--method", method, "--epochs", "8"]))
    for method in ("rtn", "blockwise", "fixed", "sliderquant"):
        cells.append(Cell(f"g64/{method}", {"variant": "g64", "method": method},
                          ["--preset", "w2a16", *BUDGET, "--method", method,
                           "--group-size", "64"]))
    # SliderQuant's windows with every epoch at full rate (fixed's split), at g64.
    cells.append(Cell("g64, no intra/sliderquant", {"variant": "g64, --intra-stages 1",
                                                    "method": "sliderquant"},
                      ["--preset", "w2a16", *BUDGET, "--method", "sliderquant",
                       "--group-size", "64", "--intra-stages", "1"]))
    return cells


def budget_suite() -> list[Cell]:
    """SliderQuant W4A16 with 4x the --fast epochs: about the compute auto-round's 50-iter
    peer cell spent (peers.md), to compare the two methods at a matched budget."""
    return [Cell("W4A16 epochs=8/sliderquant", {"setting": "W4A16, --epochs 8 (4x --fast)",
                                                "method": "sliderquant"},
                 ["--preset", "w4a16", *BUDGET, "--epochs", "8"])]


# Rows another suite already measured, shown in this suite's table for comparison:
# (label, suite, cell key).
REFERENCES = {"ablations": [
    ({"table": "default W2A16", "variant": "all on (main.md)"}, "main", "W2A16/sliderquant"),
    ({"table": "default W4A4 no rot.", "variant": "CS + LoRA (main.md)"}, "main",
     "W4A4 no rotation/sliderquant"),
    ({"table": "TG group size", "variant": "g64 (w2-investigation.md)"}, "w2-investigation",
     "g64/sliderquant"),
], "budget": [({"setting": "W4A16 (--fast)", "method": "sliderquant (main.md)"}, "main",
               "W4A16/sliderquant")]}

# The mixed suite's one training budget, the same for every cell: the w2a16 --fast recipe
# (its learning rates) at a quarter of its optimiser steps (8 samples x 2 epochs instead of
# 16 x 4), so that four cells fit the shared 2-core machine (~1,300 CPU s per --fast W2 cell).
MIXED_BUDGET = ["--preset", "w2a16", *BUDGET, "--nsamples", "8", "--epochs", "2"]


def mixed_suite() -> list[Cell]:
    """Mixed precision under an average-bit budget (docs/MIXED.md) against uniform 2- and
    3-bit g64 grids, all with one training budget (MIXED_BUDGET: same recipe, calibration
    ids, samples and epochs; the uniform 3-bit cell is the same recipe at --wbits 3). Every
    cell is exported to both formats and measured on disk; cells marked `reload` are
    evaluated again from both exports. 2-bit g64 alone stores 2.28 bits per weight (codes,
    scales, zero points), so the 2.25-bit budget needs larger groups; groups of 128 do not
    divide SmolLM2's width 576, so that cell is per output channel (2.03 bits at 2-bit)."""
    g64 = ["--group-size", "64"]
    fisher = ["--alloc-unit", "projection", "--alloc-score", "fisher"]
    rows = [  # (key, setting, allocation, args, reload the exports)
        ("W2 g64", "uniform 2-bit g64", "-", [*MIXED_BUDGET, *g64], False),
        ("W3 g64", "uniform 3-bit g64", "-", [*MIXED_BUDGET, *g64, "--wbits", "3"], False),
        ("2.5 projection fisher", "2.5 bits, g64", "projection, fisher",
         [*MIXED_BUDGET, *g64, "--avg-bits", "2.5", *fisher], True),
        ("2.25 projection fisher per-channel", "2.25 bits, per channel", "projection, fisher",
         [*MIXED_BUDGET, "--avg-bits", "2.25", *fisher], False),
    ]
    return [Cell(key, {"setting": setting, "allocation": alloc, "reload": reload}, args)
            for key, setting, alloc, args, reload in rows]


SUITES = {"main": main_suite, "w2-investigation": w2_investigation_suite,
          "fast-lr": fast_lr_suite, "ablations": ablation_suite, "budget": budget_suite,
          "mixed": mixed_suite}


def run_cell(cell: Cell, data_dir: str) -> dict:
    out = Path(tempfile.mkdtemp(prefix="sq-bench-"))
    cmd = [sys.executable, "-m", "sliderquant", "quantize", MODEL, "--data-dir", data_dir,
           "--out", str(out / "run"), "--quiet", *EVAL, *cell.args]
    began = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - began
    try:
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-2000:], "command": " ".join(cmd)}
        record = json.loads((out / "run" / "sliderquant.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        "command": " ".join(["sliderquant", *cmd[3:]]).replace(str(out / "run"), "OUT"),
        "ppl": {k: v["ppl"] for k, v in record["eval"].items()},
        "fp_ppl": {k: v["ppl"] for k, v in record.get("eval_fp", {}).items()},
        "eval_windows": {k: v["windows"] for k, v in record["eval"].items()},
        "quantize_s": round(record["timings"]["total_s"], 1),
        "process_s": round(wall, 1),
        "peak_rss_mb": record["peak_rss_mb"],
        # Wall times are only comparable between cells run on an equally quiet machine.
        "load_average_after": round(os.getloadavg()[0], 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
        "date": date.today().isoformat(),
        "config": record["config"],
        "final_window_losses": [w["epoch_losses"][-1] for w in record["windows"]
                                if w["epoch_losses"]][-3:],
    }


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sliderquant(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sliderquant", *args], capture_output=True,
                          text=True)


def _tensor_bytes(folder: Path) -> int:
    """Bytes of the quantized projections' tensors (packed codes, scales, zero points) in a
    compressed folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if name.rpartition(".")[2] in ("weight_packed", "weight_scale",
                                               "weight_zero_point"):
                    t = f.get_tensor(name)
                    total += t.numel() * t.element_size()
    return total


def _gguf_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """Bytes of the quantized projections' tensors in a GGUF file, and their types."""
    import gguf

    total, types = 0, {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and t.tensor_type.name not in ("F32", "F16", "BF16"):
            total += int(t.n_bytes)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return total, types


def run_mixed_cell(cell: Cell, data_dir: str) -> dict:
    """`run_cell`, plus both exports measured on disk (total and projection bytes) and, for
    `reload` cells, both exports evaluated again with `sliderquant eval`."""
    out = Path(tempfile.mkdtemp(prefix="sq-bench-"))
    run = out / "run"
    cmd = [sys.executable, "-m", "sliderquant", "quantize", MODEL, "--data-dir", data_dir,
           "--out", str(run), "--quiet", *EVAL, *cell.args]
    try:
        cpu, began = _child_cpu(), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - began, _child_cpu() - cpu
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-2000:], "command": " ".join(cmd)}
        record = json.loads((run / "sliderquant.json").read_text())
        result = {
            "command": " ".join(["sliderquant", *cmd[3:]]).replace(str(run), "OUT"),
            "ppl": {k: v["ppl"] for k, v in record["eval"].items()},
            "fp_ppl": {k: v["ppl"] for k, v in record.get("eval_fp", {}).items()},
            "quantize_s": round(record["timings"]["total_s"], 1),
            "quantize_cpu_s": round(record["timings"]["total_cpu_s"], 1),
            "allocation_cpu_s": round(record["timings"].get("allocation_cpu_s", 0.0), 1),
            "process_s": round(wall, 1), "process_cpu_s": round(cpu, 1),
            "peak_rss_mb": record["peak_rss_mb"],
            "load_average_after": round(os.getloadavg()[0], 1),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
            "date": date.today().isoformat(), "config": record["config"],
            "allocation": record.get("allocation"),
            "final_window_losses": [w["epoch_losses"][-1] for w in record["windows"]
                                    if w["epoch_losses"]][-3:],
        }
        if record["config"].get("alloc_unit") == "channel" and record["config"]["avg_bits"]:
            result["exports"] = "none: a channel split has no export format"
            return result
        exports = {"compressed": (run / "compressed", []),
                   "gguf": (run / "model.gguf", ["--exact"])}
        for fmt, (target, extra) in exports.items():
            began = _child_cpu()
            done = _sliderquant("export", str(run), "--format", fmt, "--quiet", *extra)
            if done.returncode != 0:
                result[fmt] = {"error": done.stderr.strip()[-1000:]}
                continue
            size = (sum(f.stat().st_size for f in target.iterdir()) if target.is_dir()
                    else target.stat().st_size)
            entry = {"bytes": size, "export_cpu_s": round(_child_cpu() - began, 1)}
            if fmt == "compressed":
                entry["projection_bytes"] = _tensor_bytes(target)
            else:
                entry["projection_bytes"], entry["types"] = _gguf_bytes(target)
            if cell.label.get("reload"):
                report = out / f"{fmt}.json"
                ev = _sliderquant("eval", str(target), "--quiet", "--data-dir", data_dir, *EVAL,
                                  "--json", str(report))
                if ev.returncode != 0:
                    entry["error"] = ev.stderr.strip()[-1000:]
                else:
                    ppl = json.loads(report.read_text())["perplexity"]
                    entry["ppl"] = {k: v["ppl"] for k, v in ppl.items()}
            result[fmt] = entry
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_mixed_markdown(suite: str, cells: list[Cell], results: dict) -> Path:
    """The mixed suite's table: budget, what the exports store, perplexity, reload check."""
    rows = [c for c in cells if "ppl" in results.get(c.key, {})]
    path = RESULTS / f"{suite}.md"
    if not rows:
        return path
    lines = ["| setting | allocation | avg bits (ours) | compressed: projections MB / bits per "
             "weight / folder MB | GGUF: projections MB / file MB | WikiText-2 | C4 | "
             "reloaded compressed / GGUF (WikiText-2, C4) | CPU s (scan) |",
             "|---|---|---|---|---|---|---|---|---|"]
    fp = next(iter(results[r.key]["fp_ppl"] for r in rows if results[r.key]["fp_ppl"]), None)
    if fp:
        lines.append(f"| FP |  |  |  |  | {fmt_ppl(fp['wikitext2'])} | {fmt_ppl(fp['c4'])} |  "
                     "|  |")
    for c in rows:
        r = results[c.key]
        alloc = r.get("allocation")
        weights = alloc["weights"] if alloc else None
        bits = f"{alloc['avg_bits']:.4f}" if alloc else _uniform_bits(r["config"])
        comp, gg = r.get("compressed", {}), r.get("gguf", {})
        if "bytes" in comp:
            per = (f"{comp['projection_bytes'] * 8 / weights:.4f}" if weights
                   else f"{comp['projection_bytes'] * 8 / PROJECTION_WEIGHTS:.4f}")
            comp_s = (f"{comp['projection_bytes'] / 1e6:.1f} / {per} / "
                      f"{comp['bytes'] / 1e6:.1f}")
        else:
            comp_s = r.get("exports", "-")
        gguf_s = (f"{gg['projection_bytes'] / 1e6:.1f} / {gg['bytes'] / 1e6:.1f}"
                  if "bytes" in gg else "-")
        reload = " / ".join(
            ", ".join(f"{_change(e['ppl'][k], r['ppl'][k])}" for k in ("wikitext2", "c4"))
            if "ppl" in e else "-" for e in (comp, gg)) if c.label.get("reload") else "-"
        scan = f" ({r['allocation_cpu_s']:.0f})" if alloc else ""
        lines.append(f"| {c.label['setting']} | {c.label['allocation']} | {bits} | {comp_s} | "
                     f"{gguf_s} | {fmt_ppl(r['ppl']['wikitext2'])} | {fmt_ppl(r['ppl']['c4'])} "
                     f"| {reload} | {r['quantize_cpu_s']:.0f}{scan} |")
    lines += [_peer_row(key, r) for key, r in results.items()
              if isinstance(r, dict) and "peer" in r and "ppl" in r]
    meta = results.get("_meta", {})
    lines += ["", "avg bits (ours): storage bits of the quantized projections (codes, a 16-bit "
              "scale and a zero point of the row's width per group of 64 or 128) per "
              "projection weight, as the allocation counted them; the compressed column "
              "measures the same from the exported tensors (weight_packed, weight_scale, "
              "weight_zero_point bytes x 8 / weights). Folder and file sizes include the "
              "float16 embedding (57 MB) and norms. GGUF exported with --exact (every grid "
              "kept exactly; SmolLM2's 576-wide rows make 2- and 3-bit tensors Q4_1). "
              "Reloaded: perplexity change of `sliderquant eval` on the export against the "
              "in-memory model. CPU s: CPU seconds of the quantization (scan included, in "
              "brackets) in one process with OMP_NUM_THREADS=1, evaluation excluded. "
              "auto-round rows (benchmarks/peers/mixed.py): its AutoScheme search and tuning "
              "in auto-round's venv, saved as a fake-quant folder (not exported), scored by "
              "`sliderquant eval`; avg bits counted the same way from its chosen bits; CPU s "
              "include its child processes, its search in brackets.", "",
              f"Machine: {meta.get('machine')}. Dates: {cell_dates(results, rows)}.",
              f"Command: `OMP_NUM_THREADS=1 python benchmarks/run.py {suite} --data-dir DATA` "
              f"(each cell: `{results[rows[0].key]['command']}` with its own flags, then "
              "`sliderquant export OUT --format compressed`, `sliderquant export OUT --format "
              "gguf --exact`, and for reloaded cells `sliderquant eval` of both with the same "
              "evaluation flags)."]
    write_text(path, "\n".join(lines) + "\n")
    return path


def _peer_row(key: str, r: dict) -> str:
    """A peer's mixed-precision cell (benchmarks/peers/mixed.py) in the mixed table."""
    counts = r["storage"]["projections_by_bits"]
    alloc = ", ".join(f"{n} at {b} bits" for b, n in counts.items())
    cpu = r["quantize_cpu_s"] + r.get("children_cpu_s", 0.0)
    return (f"| {key} | {alloc} | {r['storage']['bits_per_weight']:.4f} | not exported | - | "
            f"{fmt_ppl(r['ppl']['wikitext2'])} | {fmt_ppl(r['ppl']['c4'])} | - | {cpu:.0f} "
            f"({r['settings']['auto_scheme']['cpu_s']:.0f}) |")


PROJECTION_WEIGHTS = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # SmolLM2-135M


def _uniform_bits(config: dict) -> str:
    """Average storage bits of a uniform grid (the allocation's count, docs/MIXED.md)."""
    from sliderquant.allocation import SCALE_BITS

    bits, group = config["wbits"], config["group_size"] or 576
    zero = 0 if config.get("symmetric") else bits
    return f"{bits + (SCALE_BITS + zero) / group:.4f}"


def _change(new: float, old: float) -> str:
    return f"{(new - old) / old:+.3%}"


RUNNERS = {"mixed": run_mixed_cell}
MARKDOWN = {"mixed": write_mixed_markdown}


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, torch {_version('torch')}, transformers "
            f"{_version('transformers')}")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def write_markdown(suite: str, cells: list[Cell], results: dict) -> Path:
    rows = [c for c in cells if c.key in results and "ppl" in results[c.key]]
    path = RESULTS / f"{suite}.md"
    if not rows:
        return path
    label_cols = list(cells[0].label)
    lines = [f"| {' | '.join(label_cols)} | WikiText-2 | C4 | final MSE | quantize s | "
             "peak RSS MiB |", "|" + "---|" * (len(label_cols) + 5)]
    fp = next(iter(results[r.key]["fp_ppl"] for r in rows if results[r.key]["fp_ppl"]), None)
    if fp:
        lines.append(f"| {' | '.join(['FP'] + [''] * (len(label_cols) - 1))} | "
                     f"{fmt_ppl(fp['wikitext2'])} | {fmt_ppl(fp['c4'])} | - | - | - |")
    shown = [(ref_label, read_results(RESULTS / f"{ref_suite}.json").get(key, {}))
             for ref_label, ref_suite, key in REFERENCES.get(suite, [])]
    shown += [(c.label, results[c.key]) for c in rows]
    for label, r in shown:
        if "ppl" not in r:
            continue
        final = f"{r['final_window_losses'][-1]:.1f}" if r["final_window_losses"] else "-"
        lines.append(f"| {' | '.join(str(label[k]) for k in label_cols)} | "
                     f"{fmt_ppl(r['ppl']['wikitext2'])} | {fmt_ppl(r['ppl']['c4'])} | {final} | "
                     f"{r['quantize_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    meta = results.get("_meta", {})
    lines += ["", "final MSE: the training loss of the last window in its last epoch, i.e. "
              "the mean squared error of the last decoder layer's output against the FP "
              "model on the calibration windows (the quantity every learned method "
              "minimises; same target for all methods). quantize s: wall time of the "
              "quantization on a shared 2-core machine (see the notes on timing).", "",
              f"Machine: {meta.get('machine')}. Dates: {cell_dates(results, rows)}.",
              f"Command: `python benchmarks/run.py {suite} --data-dir DATA` "
              f"(each cell: `{rows[0] and results[rows[0].key]['command']}` with its own "
              "flags)."]
    write_text(path, "\n".join(lines) + "\n")
    return path


def cell_dates(results: dict, rows: list[Cell]) -> str:
    """The date range of the shown cells; cells from before dates were recorded say so."""
    dates = sorted({results[c.key]["date"] for c in rows if "date" in results[c.key]})
    undated = sum("date" not in results[c.key] for c in rows)
    span = f"{dates[0]} to {dates[-1]}" if len(dates) > 1 else "".join(dates)
    if undated:
        span = (f"{span}; " if span else "") + (
            f"{undated} cells recorded before per-cell dates, run 2026-11-23 to 2026-11-25")
    return span


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=list(SUITES))
    parser.add_argument("--data-dir", required=True, help="data root (wikitext2/, c4/)")
    parser.add_argument("--only", help="run only cells whose key contains this text")
    parser.add_argument("--rerun", action="store_true", help="rerun finished cells")
    parser.add_argument("--table", action="store_true",
                        help="only rewrite the markdown table from the JSON")
    args = parser.parse_args()
    cells = SUITES[args.suite]()
    path = RESULTS / f"{args.suite}.json"
    markdown = MARKDOWN.get(args.suite, write_markdown)
    if args.table:
        markdown(args.suite, cells, json.loads(path.read_text()))
        return 0
    results = read_results(path)
    results["_meta"] = {"machine": machine(), "date": date.today().isoformat(),
                        "model": MODEL, "eval": " ".join(EVAL),
                        "budget": " ".join(MIXED_BUDGET if args.suite == "mixed" else BUDGET)}
    for cell in cells:
        if args.only and args.only not in cell.key:
            continue
        if cell.key in results and "ppl" in results[cell.key] and not args.rerun:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {cell.key} ...", flush=True)
        result = RUNNERS.get(args.suite, run_cell)(cell, args.data_dir)
        print(f"    {result.get('ppl') or result.get('error')}", flush=True)
        results = record_cell(path, results["_meta"], cell.key, result)
        markdown(args.suite, cells, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
