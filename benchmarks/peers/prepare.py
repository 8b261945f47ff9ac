"""Shared inputs of the peer benchmark, written once with sliderquant's own code.

    PYTHONPATH=src python benchmarks/peers/prepare.py --data-dir DATA --out WORK [--seeds 2,3]

WORK/fp: SmolLM2-135M-Instruct (the embedded GGUF, dequantized) as a plain transformers
folder, so every peer quantizes the same weights. WORK/inputs.pt: the calibration token ids
(16 x 512 from wikitext2:valid, drawn by `calibration_ids` with the --fast config and each
seed: `calib_by_seed[seed]`; `calib` is the --fast config's own seed, 2) and the evaluation
windows (WikiText-2 test and C4, 8 x 2048) of `sliderquant eval`, for the peers whose
fake-quant model must be scored inside their own environment (W4A4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sliderquant.api import calibration_ids, load
from sliderquant.atomic import atomic_path
from sliderquant.config import QuantConfig
from sliderquant.data import resolve_data_root
from sliderquant.eval.perplexity import eval_windows

MODEL = "smollm2-135m"
EVAL_SEQLEN, EVAL_WINDOWS = 2048, 8


def calibration_config(seed: int | None = None) -> QuantConfig:
    """The peers' calibration protocol: the --fast W4A16 config on wikitext2:valid."""
    return QuantConfig.from_preset("w4a16", fast=True, calib="wikitext2:valid", seed=seed)


def main() -> None:
    """Write WORK/fp and WORK/inputs.pt (what is present is kept; missing seeds are added)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", default="2,3", help="calibration seeds to draw ids for")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = resolve_data_root(args.data_dir)
    loaded = load(MODEL, args.data_dir)
    fp = args.out / "fp"
    if not (fp / "config.json").is_file():
        loaded.model.save_pretrained(fp)
        loaded.tokenizer.save_pretrained(fp)
    path = args.out / "inputs.pt"
    inputs = torch.load(path) if path.is_file() else {}
    if "calib" not in inputs:
        config = calibration_config()
        inputs["calib"] = calibration_ids(loaded.tokenizer, config, root)
        inputs["calib_source"] = f"{config.calib}, seed {config.seed}"
    by_seed = inputs.setdefault("calib_by_seed", {})
    for seed in seeds:
        if seed not in by_seed:
            by_seed[seed] = calibration_ids(loaded.tokenizer, calibration_config(seed), root)
    if "eval" not in inputs:
        inputs["eval"] = {task: eval_windows(task, loaded.tokenizer, EVAL_SEQLEN, EVAL_WINDOWS,
                                             root) for task in ("wikitext2", "c4")}
    with atomic_path(path) as staged:
        torch.save(inputs, staged)
    print(f"wrote {fp} and {path} (seeds {sorted(by_seed)})")


if __name__ == "__main__":
    main()
