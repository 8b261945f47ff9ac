"""The duel: sliderquant against auto-round at equal CPU time of the quantize step.

    WORK=/work/venvs/smollm2-hf VENVS=/work/venvs DATA=/work/shared/data
    PYTHONPATH=src python benchmarks/duel.py run --data-dir $DATA --work $WORK --venvs $VENVS \\
        [--tool sliderquant|auto-round] [--only TEXT] [--rerun] \\
        [--recipe LABEL='FLAGS' ...] [--iters 4,12,25,50] [--match LABEL]
    PYTHONPATH=src python benchmarks/duel.py table       # duel.md and the figure from the JSON

Both tools quantize the same weights (WORK/fp, from benchmarks/peers/prepare.py), with the
same calibration ids (16 x 512 of wikitext2:valid drawn by sliderquant's `calibration_ids`
with the cell's seed: WORK/inputs.pt's `calib_by_seed`), and are scored by the same
evaluator (`sliderquant eval OUT` on 8 x 2048 windows of WikiText-2 and C4; W4A4 auto-round
models in auto-round's process with the evaluator's loop, see peers/quantize_peer.py).

Every cell runs in its own process on one thread (OMP_NUM_THREADS=1), and `cpu_s` is the
CPU time of the quantize call only (no model loading, saving or evaluation): for auto-round
`AutoRound(...).quantize()` in quantize_peer.py, for sliderquant `sliderquant.quantize(...)`
in this file's `quantize` command, a driver that builds the config from the recipe's
command-line flags exactly as `sliderquant quantize` does. Our recipe is a parameter
(`--recipe LABEL='FLAGS'`, repeatable) because the default recipe changes; the record
keeps the flags and the git commit of src/.

Equal compute: `--match LABEL` fits auto-round's CPU seconds against `iters` on that
cell's auto-round records (a line through the measured points), runs auto-round at the
`iters` predicted to cost what our LABEL record cost, and records whether the measured CPU
time landed within 15 %. Results accumulate in docs/results/duel.json (a list of records; a
finished cell is skipped unless --rerun); docs/results/duel.md and docs/figures/duel.png are
rewritten from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from importlib.metadata import version
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = REPO / "docs" / "results"
JSON_PATH = RESULTS / "duel.json"
FIGURE = REPO / "docs" / "figures" / "duel.png"
sys.path.insert(0, str(HERE))
from store import fmt_ppl, read_list, record_in_list  # noqa: E402 (no package)

from sliderquant.atomic import atomic_path, write_text  # noqa: E402


def _peers_runner():
    """benchmarks/peers/run.py as a module (its name clashes with benchmarks/run.py)."""
    spec = importlib.util.spec_from_file_location("peers_run", HERE / "peers" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = _peers_runner()
EVAL = peers.EVAL

MODEL_NAME = "SmolLM2-135M-Instruct (embedded GGUF, dequantized: WORK/fp)"
TOOLS = ("sliderquant", "auto-round")
MATCH_TOLERANCE = 0.15
# Our default recipe at two budgets: --fast, and 8 epochs per window, about
# auto-round's 50-iteration CPU time in every cell (--fast trains 2 epochs at 4 bits, 4 at
# 2 bits; with 8 epochs W4A16 per channel took 2,765 CPU s and W4A4 2,863 against
# auto-round's 2,268 and 2,398 at 50 iterations: 19-22 % more). The
# paper's recipe: `--recipe paper-fast='--fast --paper ...'`. A `fast` record ran the default
# recipe of the commit it names: the paper's before 2026-11-28 (and for W3A16 and W4A4 at
# 04747e9), see config.DEFAULT_FAST_BY_PRESET (and _GROUPED_BY_PRESET) for what it is now.
# These name `--method sliderquant`; with no method named, W2A16 `--fast` now trains one layer
# at a time (config.DEFAULT_FAST_METHOD_BY_PRESET), measured as the `blockround8` records.
DEFAULT_RECIPES = {"fast": "--fast --calib wikitext2:valid --method sliderquant",
                   "epochs8": "--fast --calib wikitext2:valid --method sliderquant --epochs 8"}
# auto-round's CPU-vs-iters line: ~100 s of set-up plus ~45 s per iteration on this machine
# (peers.json), so these span ~150 to ~1,200 CPU s, and 50 is the peers' budget.
DEFAULT_ITERS = (4, 12, 25, 50)
# auto-round torch.compiles its block forward from 10 iters on (on Linux). The duel builds
# the compiled code in-process (TORCHINDUCTOR_COMPILE_THREADS=1, peers/run.py) so that it is
# in cpu_s; the 2026-11-26 peers runs let inductor's worker processes build it.
COMPILE_FROM_ITERS = 10
CPU_NOTE_PEERS = ("peers run: torch.compile's C++ builds ran in inductor's worker processes, "
                  "whose CPU time is not in cpu_s")


@dataclass(frozen=True)
class Setting:
    name: str
    ours: tuple[str, ...]   # sliderquant flags of the setting, independent of the recipe
    peer: tuple[str, ...]   # quantize_peer.py flags
    seeds: tuple[int, ...]


SETTINGS = [
    Setting("W2A16 g64", ("--preset", "w2a16", "--group-size", "64"),
            ("--wbits", "2", "--group-size", "64"), (2, 3)),
    Setting("W2A16 per-channel", ("--preset", "w2a16"), ("--wbits", "2"), (2, 3)),
    Setting("W3A16 g64", ("--preset", "w3a16", "--group-size", "64"),
            ("--wbits", "3", "--group-size", "64"), (2,)),
    Setting("W4A16 per-channel", ("--preset", "w4a16"), ("--wbits", "4"), (2,)),
    # a second seed where a recipe choice was within one seed's spread (one or two stages)
    Setting("W4A16 g64", ("--preset", "w4a16", "--group-size", "64"),
            ("--wbits", "4", "--group-size", "64"), (2, 3)),
    # auto-round quantizes the inputs of the projections only: our same scope.
    Setting("W4A4 no rotation", ("--preset", "w4a4", "--no-rotate", "--no-quantize-attention"),
            ("--wbits", "4", "--abits", "4"), (2,)),
    Setting("W4A4 rotation", ("--preset", "w4a4", "--no-quantize-attention"),
            ("--wbits", "4", "--abits", "4", "--rotate"), (2,)),
]
# peers.json records of exactly this protocol (seed-2 ids, 16 x 512, batch 8, same evaluator,
# auto-round 0.16.1): (setting, iters) -> peers.json key.
PEER_RECORDS = {("W4A16 per-channel", 50): "W4A16 per-channel/autoround",
                ("W4A16 per-channel", 10): "W4A16 per-channel/autoround (10 iters)",
                ("W4A16 g64", 50): "W4A16 g64/autoround",
                ("W2A16 per-channel", 50): "W2A16 per-channel/autoround",
                ("W2A16 g64", 50): "W2A16 g64/autoround",
                ("W4A4 no rotation", 50): "W4A4 per-channel, no rotation/autoround"}


def key(setting: str, seed: int, tool: str, variant: str) -> str:
    return f"{setting}/seed {seed}/{tool}/{variant}"


def record_key(r: dict) -> str:
    return key(r["setting"], r["seed"], r["tool"], r["variant"])


# ---------------------------------------------------------------- sliderquant driver


def config_from_flags(flags: list[str]):
    """The QuantConfig that `sliderquant quantize MODEL FLAGS` would use (the CLI's own
    parser and config builder: the one place this benchmark touches CLI internals)."""
    from sliderquant.cli import build_parser
    from sliderquant.cli.quantize import _config_from_args

    return _config_from_args(build_parser().parse_args(["quantize", "-", "--out", "-",
                                                        *flags]))


def quantize_ours(args: argparse.Namespace) -> int:
    """Child process: load WORK/fp, quantize with the flags on the seed's ids (timed), save."""
    import torch

    import sliderquant

    torch.set_num_threads(1)
    config = config_from_flags([*args.flags, "--seed", str(args.seed)])
    ids = torch.load(args.work / "inputs.pt")["calib_by_seed"][args.seed]
    if (config.nsamples, config.seqlen) != tuple(ids.shape):
        print(f"duel: the recipe asks for {config.nsamples} x {config.seqlen} calibration "
              f"tokens; the duel's protocol is {list(ids.shape)} (same ids for both tools)",
              file=sys.stderr)
        return 2
    loaded = sliderquant.load(str(args.work / "fp"))
    began, cpu = time.perf_counter(), time.process_time()
    result = sliderquant.quantize(loaded.model, loaded.tokenizer, config, calib=ids,
                                  device="cpu", show_progress=False)
    wall_s, cpu_s = time.perf_counter() - began, time.process_time() - cpu
    sliderquant.save_quantized(result, loaded.tokenizer, args.out)
    record = {"cpu_s": round(cpu_s, 1), "wall_s": round(wall_s, 1),
              "peak_rss_mb": result.report["peak_rss_mb"],
              "config": result.report["config"],
              "final_window_losses": [w["epoch_losses"][-1] for w in result.report["windows"]
                                      if w["epoch_losses"]][-3:]}
    if config.holdout:  # the per-epoch curves that show whether a window over-fits
        record["window_losses"] = [
            {k: w[k] for k in ("stage", "layers", "epoch_losses", "heldout_losses")}
            for w in result.report["windows"]]
    (args.out / "duel.json").write_text(json.dumps(record, indent=1))
    return 0


def src_commit() -> str:
    """Short id of the last commit that changed src/, marked +dirty when src/ differs from
    HEAD: it names the sliderquant code a record measured."""
    head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "src"], cwd=REPO,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=REPO).returncode
    return head + ("+dirty" if dirty else "")


def run_ours(setting: Setting, seed: int, label: str, recipe: str,
             args: argparse.Namespace) -> dict:
    """One sliderquant cell: the driver in its own process, then `sliderquant eval`."""
    flags = [*setting.ours, *shlex.split(recipe)]
    tmp = Path(tempfile.mkdtemp(prefix="sq-duel-"))
    out = tmp / "model"
    cmd = [sys.executable, str(Path(__file__).resolve()), "quantize", "--work", str(args.work),
           "--out", str(out), "--seed", str(seed), "--", *flags]
    shown = (f"python benchmarks/duel.py quantize --work WORK --out OUT --seed {seed} -- "
             + shlex.join(flags))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-3000:], "command": shown}
        record = json.loads((out / "duel.json").read_text())
        return {**record, "recipe": recipe, "flags": flags, "commit": src_commit(),
                "command": shown, **peers.evaluate(out, args.data_dir),
                "versions": {d: version(d) for d in ("sliderquant", "torch", "transformers")}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- auto-round


def run_autoround(setting: Setting, seed: int, iters: int, args: argparse.Namespace) -> dict:
    """One auto-round cell through the peers' runner (its venv, then our evaluator)."""
    cell = peers.Cell("autoround", setting.name, [*setting.peer, "--iters", str(iters),
                                            "--seed", str(seed)])
    record = peers.run_cell(cell, args)
    record["command"] = record["command"].replace(str(args.work), "WORK")
    if "quantize_cpu_s" in record:
        record["cpu_s"] = record.pop("quantize_cpu_s")
        record["wall_s"] = record.pop("quantize_s")
    return {**record, "iters": iters}


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of CPU seconds against iters."""
    n = len(points)
    mx = sum(i for i, _ in points) / n
    my = sum(c for _, c in points) / n
    slope = (sum((i - mx) * (c - my) for i, c in points)
             / sum((i - mx) ** 2 for i, _ in points))
    return my - slope * mx, slope


def fit_iters(points: list[tuple[int, float]], cpu_s: float) -> int:
    """The iters whose CPU time the line through the two measured points nearest to cpu_s
    (bracketing it where possible) puts at cpu_s: the cost is not one straight line, since
    torch.compile switches on at COMPILE_FROM_ITERS."""
    below = [p for p in points if p[1] <= cpu_s]
    above = [p for p in points if p[1] > cpu_s]
    if below and above:
        pair = [max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])]
    else:
        pair = sorted(points, key=lambda p: abs(p[1] - cpu_s))[:2]
    a, b = fit_line(pair)
    return max(1, round((cpu_s - a) / b))


def cost_lines(records: list[dict]) -> dict[tuple[str, int], list[tuple[int, float]]]:
    """(setting, seed) -> sorted (iters, cpu_s) of its auto-round records."""
    out: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in records:
        if r["tool"] == "auto-round" and r.get("cpu_s") is not None:
            out.setdefault((r["setting"], r["seed"]), []).append((r["iters"], r["cpu_s"]))
    return {k: sorted(set(v)) for k, v in out.items()}


# ---------------------------------------------------------------- the runner


def machine() -> str:
    return (f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def reference_cpu_s() -> float:
    """CPU seconds of a fixed one-thread fp32 workload (200 products of 512 x 512 matrices,
    the least of three tries): the sessions' machines differ, so cpu_s compares across
    sessions only divided by this."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tries = []
    for _ in range(3):
        a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
        began = time.process_time()
        for _ in range(200):
            a = torch.tanh(a @ a)
        tries.append(time.process_time() - began)
    torch.set_num_threads(threads)
    return round(min(tries), 2)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def reuse_peer_records() -> None:
    """peers.json's auto-round cells of exactly the duel's protocol, as duel records (unless
    the duel measured that cell itself)."""
    peers = json.loads((RESULTS / "peers.json").read_text())
    meta = peers["_meta"]
    measured = {record_key(r) for r in read_list(JSON_PATH) if not r.get("reused_from")}
    for (setting, iters), peer_key in PEER_RECORDS.items():
        r = peers.get(peer_key)
        if (r is None or "ppl" not in r
                or key(setting, 2, "auto-round", f"iters {iters}") in measured):
            continue
        record_in_list(JSON_PATH, {
            "setting": setting, "tool": "auto-round", "seed": 2, "variant": f"iters {iters}",
            "iters": iters, "cpu_s": r["quantize_cpu_s"], "wall_s": r["quantize_s"],
            "wikitext2": r["ppl"]["wikitext2"], "c4": r["ppl"]["c4"],
            "peak_rss_mb": r["peak_rss_mb"], "settings": r["settings"],
            "command": r["command"].replace("--work /work/venvs/smollm2-hf", "--work WORK"),
            "date": meta["date"], "machine": f"{meta['machine']} (peers run)", "threads": 1,
            "versions": r["versions"], "calib": r["calib"], "load": None,
            "reused_from": f"peers.json '{peer_key}'",
            "cpu_note": CPU_NOTE_PEERS if iters >= COMPILE_FROM_ITERS else None}, record_key)


def finish(record: dict, setting: Setting, seed: int, tool: str, variant: str,
           load_before: str) -> dict:
    """The cell's record in the duel's shape (perplexities flattened, context added)."""
    ppl = record.pop("ppl", {})
    return {"setting": setting.name, "tool": tool, "seed": seed, "variant": variant,
            **record, "wikitext2": ppl.get("wikitext2"), "c4": ppl.get("c4"),
            "date": date.today().isoformat(), "machine": machine(), "threads": 1,
            "reference_cpu_s": reference_cpu_s(), "boot_id": boot_id(),
            "load": {"before": load_before, "after": load_average()},
            "eval": " ".join(["sliderquant eval OUT", *EVAL])}


def planned(args: argparse.Namespace, done: dict[str, dict]) -> list[tuple]:
    """(setting, seed, tool, variant, payload) of every cell this invocation should run."""
    out = []
    for setting in SETTINGS:
        for seed in setting.seeds:
            if args.tool in (None, "sliderquant"):
                for label, recipe in args.recipes.items():
                    out.append((setting, seed, "sliderquant", label, recipe))
            if args.tool in (None, "auto-round"):
                for iters in args.iters:
                    out.append((setting, seed, "auto-round", f"iters {iters}", iters))
                if args.match:
                    matched = match_iters(setting, seed, args.match, done)
                    if matched:
                        out.append((setting, seed, "auto-round", f"iters {matched}", matched))
    return [c for c in out if not args.only or args.only in key(c[0].name, *c[1:4])]


def match_iters(setting: Setting, seed: int, label: str, done: dict[str, dict]) -> int | None:
    """auto-round iters predicted to cost what our `label` record cost, or None."""
    ours = done.get(key(setting.name, seed, "sliderquant", label))
    if ours is None or ours.get("cpu_s") is None:
        return None
    # auto-round's costs as if on our record's machine; other machines' left out
    comparable = [{**r, "cpu_s": ours["cpu_s"] * relative_cost(r, ours)}
                  for r in done.values() if r["tool"] == "auto-round"
                  and r.get("cpu_s") is not None and relative_cost(r, ours) is not None]
    points = cost_lines(comparable).get((setting.name, seed), [])
    if len({i for i, _ in points}) < 2:
        return None
    return fit_iters(points, ours["cpu_s"])


def run(args: argparse.Namespace) -> int:
    reuse_peer_records()
    done = {record_key(r): r for r in read_list(JSON_PATH)}
    for setting, seed, tool, variant, payload in planned(args, done):
        k = key(setting.name, seed, tool, variant)
        if k in done and done[k].get("wikitext2") is not None and not args.rerun:
            continue
        before = load_average()
        print(f"[{time.strftime('%H:%M:%S')}] {k} (load {before})", flush=True)
        if tool == "sliderquant":
            record = run_ours(setting, seed, variant, payload, args)
        else:
            record = run_autoround(setting, seed, payload, args)
        record = finish(record, setting, seed, tool, variant, before)
        print(f"    cpu {record.get('cpu_s')} s, ppl {record['wikitext2']} / {record['c4']}"
              + (f", error {record['error'][-300:]}" if "error" in record else ""), flush=True)
        done = {record_key(r): r for r in record_in_list(JSON_PATH, record, record_key)}
        write_outputs(list(done.values()))
    write_outputs(read_list(JSON_PATH))
    return 0


# ---------------------------------------------------------------- outputs


def relative_cost(a: dict, b: dict) -> float | None:
    """a's CPU time over b's. The sessions' machines differ in speed (auto-round's same run
    cost 2.4x less on 2026-11-28 than the day before): records of one boot of one machine
    compare as measured; of two machines, each divided by its reference workload (which
    itself varies about 10 % beside a second job); records from before either was kept
    compare raw with each other and not at all with newer ones."""
    if same_machine(a, b):
        return a["cpu_s"] / b["cpu_s"]
    ra, rb = a.get("reference_cpu_s"), b.get("reference_cpu_s")
    if ra and rb:
        return (a["cpu_s"] / ra) / (b["cpu_s"] / rb)
    newer = ("boot_id", "reference_cpu_s")
    if any(r.get(k) for r in (a, b) for k in newer):
        return None
    return a["cpu_s"] / b["cpu_s"]


def same_machine(a: dict, b: dict) -> bool:
    """Both records ran on one boot of one machine."""
    return bool(a.get("boot_id")) and a.get("boot_id") == b.get("boot_id")


def boot_id() -> str | None:
    """This boot of this machine (Linux), to tell records of one machine from another's."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def matched_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(ours, auto-round) pairs of one cell whose CPU times are within MATCH_TOLERANCE."""
    pairs = []
    for o in records:
        if o["tool"] != "sliderquant" or o.get("wikitext2") is None:
            continue
        costs = [(relative_cost(r, o), r) for r in records if r["tool"] == "auto-round"
                 and r.get("wikitext2") and r["setting"] == o["setting"]
                 and r["seed"] == o["seed"]]
        theirs = [(abs(c - 1), r) for c, r in costs
                  if c is not None and abs(c - 1) <= MATCH_TOLERANCE]
        if theirs:
            pairs.append((o, min(theirs, key=lambda t: t[0])[1]))
    return pairs


def remaining(records: list[dict]) -> list[str]:
    """Keys of the default plan's cells that have no perplexity yet."""
    done = {record_key(r) for r in records if r.get("wikitext2") is not None}
    plan = [key(s.name, seed, "sliderquant", label) for s in SETTINGS for seed in s.seeds
            for label in DEFAULT_RECIPES]
    plan += [key(s.name, seed, "auto-round", f"iters {i}") for s in SETTINGS
             for seed in s.seeds for i in DEFAULT_ITERS]
    return [k for k in plan if k not in done]


def variant_label(r: dict) -> str:
    if r["tool"] == "sliderquant":
        return f"{r['variant']} @ {r.get('commit', '?')}"
    return r["variant"] + (" (peers.json)" if r.get("reused_from") else "")


def write_markdown(records: list[dict]) -> Path:
    order = {s.name: i for i, s in enumerate(SETTINGS)}
    rows = sorted((r for r in records if r.get("wikitext2") is not None),
                  key=lambda r: (order.get(r["setting"], 99), r["seed"], r["tool"], r["cpu_s"]))
    lines = ["| setting | seed | tool | recipe / iters | CPU s | WikiText-2 | C4 | load before "
             "| date |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        load = r["load"]["before"].split()[0] if r.get("load") else "-"
        lines.append(f"| {r['setting']} | {r['seed']} | {r['tool']} | {variant_label(r)} | "
                     f"{r['cpu_s']:.0f} | {fmt_ppl(r['wikitext2'])} | {fmt_ppl(r['c4'])} | "
                     f"{load} | {r['date']} |")
    failed = [r for r in records if r.get("wikitext2") is None]
    lines += [f"| {r['setting']} | {r['seed']} | {r['tool']} | {variant_label(r)} | failed: "
              f"{r.get('error', '?').splitlines()[-1][:160]} | | | | {r['date']} |"
              for r in failed]
    pairs = matched_pairs(records)
    lines += ["", f"**At equal CPU time** (auto-round within {MATCH_TOLERANCE:.0%} of our CPU "
              "seconds, same seed; machine: whether both ran on one boot of one machine — "
              "the sessions' machines differ up to 2.4x in speed, and records before "
              "2026-11-28 16:27 UTC did not say which machine they ran on):", ""]
    if pairs:
        lines += ["| setting | seed | sliderquant recipe | CPU s (ours / auto-round) | "
                  "WikiText-2 (ours / auto-round) | C4 (ours / auto-round) | machine |",
                  "|---|---|---|---|---|---|---|"]
        for o, a in pairs:
            same = "one" if same_machine(o, a) else "not recorded"
            lines.append(f"| {o['setting']} | {o['seed']} | {variant_label(o)} | "
                         f"{o['cpu_s']:.0f} / {a['cpu_s']:.0f} ({a['variant']}) | "
                         f"{fmt_ppl(o['wikitext2'])} / {fmt_ppl(a['wikitext2'])} | "
                         f"{fmt_ppl(o['c4'])} / {fmt_ppl(a['c4'])} | {same} |")
    else:
        lines.append("No pair measured yet.")
    lines += ["", "**auto-round's CPU seconds against iters** (the line `--match` interpolates on; "
              "from 10 iters on it torch.compiles its block forward):", ""]
    machines = sorted({r.get("boot_id") or "" for r in rows})
    for boot in machines:  # one line per machine: costs on two machines do not fit one line
        where = f"machine {boot[:8]}" if boot else "machines not recorded"
        for (setting, seed), points in cost_lines(
                [r for r in rows if (r.get("boot_id") or "") == boot]).items():
            fit = ""
            if len({i for i, _ in points}) >= 2:
                a, b = fit_line(points)
                fit = f" — fit: {a:.0f} s + {b:.1f} s x iters"
            lines.append(f"- {setting}, seed {seed} ({where}): "
                         + ", ".join(f"{i} iters {c:.0f} s" for i, c in points) + fit)
    missing = remaining(records)
    lines += ["", f"**Not measured yet** ({len(missing)} cells of the default plan: "
              "`duel.py run` with no --tool/--recipe/--iters, then `--match LABEL` per recipe):",
              ""]
    grouped: dict[str, list[str]] = {}
    for k in missing:
        cell, variant = k.rsplit("/", 1)
        grouped.setdefault(cell, []).append(variant)
    lines += [f"- {cell}: {', '.join(v)}" for cell, v in grouped.items()] or ["- none"]
    versions = sorted({f"{k} {v}" for r in rows for k, v in r.get("versions", {}).items()})
    lines += [
        "",
        "Command: `PYTHONPATH=src python benchmarks/duel.py run --data-dir DATA --work WORK "
        "--venvs VENVS` (each row's own command is in duel.json).",
        f"Model: {MODEL_NAME}. Data: calibration 16 x 512 token ids of wikitext2:valid drawn by "
        "sliderquant's `calibration_ids` with the row's seed, the same ids for both tools "
        "(auto-round's own seed stays at its default); evaluation WikiText-2 test and C4 "
        "validation, 8 windows x 2048, by `sliderquant eval` (auto-round W4A4: in its process "
        "with the evaluator's loop).",
        "CPU s: CPU time of the quantize call only, one thread (`OMP_NUM_THREADS=1`), each cell "
        "in its own process; the machine is shared (load average before each cell in the "
        "table), which stretches wall time more than CPU time.",
        "auto-round: asymmetric, batch 8, nsamples 16, seqlen 512, `iters` as shown; W4A4 with "
        "dynamic per-token INT4 activations into every projection; rotation: its in-place "
        "(QuaRot-style) rotation, a random Hadamard in blocks of 192 fused into the weights "
        "plus its online Hadamard hooks on the inputs of o_proj and down_proj (full width "
        "is impossible with SmolLM2's 9 heads; ours is full width and offline only, see "
        "benchmarks/peers/README.md). sliderquant: the row's recipe flags on top of the "
        "setting's (`W4A4`: `--no-quantize-attention`, the projection inputs only, "
        "auto-round's scope); `@` names the commit of src/.",
        f"Machine: {', '.join(sorted({r['machine'] for r in rows}))}. Versions: "
        f"{', '.join(versions)}.",
    ]
    path = RESULTS / "duel.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def write_figure(records: list[dict]) -> Path | None:
    """Perplexity against CPU seconds, one panel per setting, log-y; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in SETTINGS if any(r["setting"] == s.name for r in records)]
    if not names:
        return None
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    colours = {"sliderquant": "tab:blue", "auto-round": "tab:orange"}
    for ax, name in zip(axes.flat, names, strict=False):
        for tool in TOOLS:
            for seed in sorted({r["seed"] for r in records if r["setting"] == name}):
                pts = sorted((r["cpu_s"], r["wikitext2"], r["c4"]) for r in records
                             if r["setting"] == name and r["tool"] == tool
                             and r["seed"] == seed and r.get("wikitext2") is not None)
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                marker = "o" if seed == 2 else "s"
                ax.plot(xs, [p[1] for p in pts], "-", marker=marker, color=colours[tool],
                        label=f"{tool} s{seed} WikiText-2")
                ax.plot(xs, [p[2] for p in pts], "--", marker=marker, color=colours[tool],
                        mfc="none", label=f"{tool} s{seed} C4")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("CPU s of the quantize step (1 thread)")
        ax.set_ylabel("perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(FIGURE) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return FIGURE


def write_outputs(records: list[dict]) -> None:
    write_markdown(records)
    write_figure([r for r in records if r.get("wikitext2") is not None])


# ---------------------------------------------------------------- command line


def parse_recipe(text: str) -> tuple[str, str]:
    label, sep, flags = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: write LABEL='FLAGS'")
    return label, flags


def add_recipe_argument(parser: argparse.ArgumentParser, defaults: dict[str, str]) -> None:
    """`--recipe LABEL='FLAGS'` (repeatable): our recipes, as `sliderquant quantize` flags."""
    parser.add_argument("--recipe", action="append", type=parse_recipe, default=None,
                        help="LABEL='sliderquant quantize flags' (repeatable; default: "
                             + "; ".join(f"{k}='{v}'" for k, v in defaults.items()) + ")")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the missing cells, then rewrite the table and figure")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--work", type=Path, required=True, help="benchmarks/peers/prepare.py's output")
    r.add_argument("--venvs", type=Path, required=True, help="folder of the peer venvs")
    r.add_argument("--tool", choices=TOOLS)
    r.add_argument("--only", help="run only cells whose key (SETTING/seed N/TOOL/VARIANT) "
                   "contains this text")
    r.add_argument("--rerun", action="store_true", help="rerun finished cells")
    add_recipe_argument(r, DEFAULT_RECIPES)
    r.add_argument("--iters", default=",".join(map(str, DEFAULT_ITERS)),
                   help="auto-round iters values to run ('' for none)")
    r.add_argument("--match", metavar="LABEL",
                   help="also run auto-round at the iters that costs what our LABEL cell cost")
    sub.add_parser("table", help="rewrite duel.md and the figure from duel.json")
    q = sub.add_parser("quantize", help="(internal) one sliderquant cell, timed")
    q.add_argument("--work", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--seed", type=int, required=True)
    q.add_argument("flags", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.command == "quantize":
        args.flags = [f for f in args.flags if f != "--"]
        return quantize_ours(args)
    if args.command == "table":
        write_outputs(read_list(JSON_PATH))
        return 0
    if not (args.work / "inputs.pt").is_file():
        ap.error(f"{args.work}/inputs.pt is missing: run benchmarks/peers/prepare.py first")
    if args.tool != "sliderquant" and not (args.venvs / "peer-autoround").is_dir():
        ap.error(f"{args.venvs}/peer-autoround is missing: see benchmarks/peers/README.md")
    args.recipes = dict(args.recipe) if args.recipe else DEFAULT_RECIPES
    args.iters = [int(i) for i in args.iters.split(",") if i]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
