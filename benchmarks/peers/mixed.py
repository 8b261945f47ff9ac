"""auto-round's own average-bit search (AutoScheme) as a row of the mixed suite.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/peers/mixed.py --data-dir DATA \\
        --work WORK --venvs VENVS [--avg-bits 2.5] [--iters 5] [--model OUT]

Quantizes WORK/fp with `quantize_peer.py autoround --avg-bits B` in auto-round's venv, on
the calibration rows of the mixed suite's budget (the 8 x 512 ids that sliderquant's
`--calib wikitext2:valid --nsamples 8` draws with seed 2, found among prepare.py's 16 rows),
scores the saved fake-quant folder with `sliderquant eval` (the suite's evaluation flags),
and records the cell in docs/results/mixed.json (then rewrites docs/results/mixed.md).
`--model OUT` scores and records a folder that this command's quantize step already wrote
(its OUT/peer.json holds the quantize command's settings and CPU time) instead of
quantizing again. See benchmarks/peers/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import evaluate  # noqa: E402 (benchmarks/peers/run.py; it puts benchmarks/ on the path)
from store import record_cell  # noqa: E402

# benchmarks/run.py (the mixed suite), loaded under its own name: peers/run.py is `run`.
_spec = importlib.util.spec_from_file_location("suites", HERE.parent / "run.py")
suites = sys.modules["suites"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suites)

from sliderquant.calibration import calibration_ids  # noqa: E402
from sliderquant.config import QuantConfig  # noqa: E402


def mixed_rows(work: Path, data_dir: Path) -> list[int]:
    """Indices into WORK/inputs.pt's `calib` of the rows the mixed suite calibrates on."""
    import torch
    from transformers import AutoTokenizer

    config = QuantConfig.from_preset("w2a16", fast=True, calib="wikitext2:valid", nsamples=8)
    ours = calibration_ids(AutoTokenizer.from_pretrained(work / "fp"), config, data_dir)
    theirs = torch.load(work / "inputs.pt", weights_only=True)["calib"]
    rows = []
    for row in ours:
        found = [i for i, r in enumerate(theirs) if torch.equal(r, row)]
        if not found:
            raise SystemExit(f"{work / 'inputs.pt'} lacks a calibration row of the mixed "
                             "suite: rerun prepare.py")
        rows.append(found[0])
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="prepare.py's folder")
    ap.add_argument("--venvs", type=Path, required=True, help="folder of the peer venvs")
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--options", default="W2A16G64,W3A16G64")
    ap.add_argument("--iters", type=int, default=5, help="auto-round tuning steps per block")
    ap.add_argument("--model", type=Path, default=None,
                    help="an OUT already written by the quantize step: score and record it")
    args = ap.parse_args()
    python = args.venvs / "peer-autoround" / "bin" / "python"
    if args.model is None and not python.is_file():
        ap.error(f"no auto-round venv at {python}: see benchmarks/peers/README.md")
    if args.model is not None and not (args.model / "peer.json").is_file():
        ap.error(f"{args.model} has no peer.json: give a folder quantize_peer.py wrote")
    rows = ",".join(map(str, mixed_rows(args.work, args.data_dir)))
    out = args.model or Path(tempfile.mkdtemp(prefix="sq-autoscheme-")) / "model"
    cmd = [str(python), str(HERE / "quantize_peer.py"), "autoround",
           "--avg-bits", str(args.avg_bits), "--options", args.options,
           "--iters", str(args.iters), "--calib-rows", rows,
           "--work", str(args.work), "--out", str(out)]
    # One thread; torch.compile's C++ builds in-process; AutoScheme's scoring serial and
    # its score cache in a fresh folder, so that no earlier run's scores are reused.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONPATH": "", "AR_ENABLE_AUTO_SCHEME_PARALLEL": "0",
           "AR_AUTO_SCHEME_CACHE": str(out.parent / "autoscheme-cache")}
    if args.model is None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr.strip()[-3000:], file=sys.stderr)
            return 1
    record = json.loads((out / "peer.json").read_text())
    if record.get("settings", {}).get("options", {}).get("iters") != args.iters:
        ap.error(f"{out}/peer.json was not quantized with --iters {args.iters}")
    scored = evaluate(out, str(args.data_dir))
    if "error" in scored:
        print(scored["error"], file=sys.stderr)
        return 1
    record.update(scored, command=" ".join(cmd).replace(str(out), "OUT"),
                  load_average_after=round(os.getloadavg()[0], 1), date=date.today().isoformat())
    key = f"{args.avg_bits:g} auto-round AutoScheme ({args.iters} iters)"
    path = suites.RESULTS / "mixed.json"
    results = record_cell(path, suites.read_results(path).get("_meta", {}), key, record)
    print(suites.write_mixed_markdown("mixed", suites.mixed_suite(), results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
