"""Shared inputs of the peer benchmark, written once with sliderquant's own code.

    PYTHONPATH=src python benchmarks/peers/prepare.py --data-dir DATA --out WORK

WORK/fp: SmolLM2-135M-Instruct (the embedded GGUF, dequantized) as a plain transformers
folder, so every peer quantizes the same weights. WORK/inputs.pt: the calibration token ids
(16 x 512 from wikitext2:valid, drawn by `calibration_ids` with the --fast config's seed)
and the evaluation windows (WikiText-2 test and C4, 8 x 2048) of `sliderquant eval`, for
the peers whose fake-quant model must be scored inside their own environment (W4A4).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sliderquant.api import calibration_ids, load
from sliderquant.config import QuantConfig
from sliderquant.data import resolve_data_root
from sliderquant.eval.perplexity import eval_windows

MODEL = "smollm2-135m"
EVAL_SEQLEN, EVAL_WINDOWS = 2048, 8


def main() -> None:
    """Write WORK/fp and WORK/inputs.pt (skipped when present)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    root = resolve_data_root(args.data_dir)
    loaded = load(MODEL, args.data_dir)
    fp = args.out / "fp"
    if not (fp / "config.json").is_file():
        loaded.model.save_pretrained(fp)
        loaded.tokenizer.save_pretrained(fp)
    inputs = args.out / "inputs.pt"
    if not inputs.is_file():
        config = QuantConfig.from_preset("w4a16", fast=True, calib="wikitext2:valid")
        torch.save({
            "calib": calibration_ids(loaded.tokenizer, config, root),
            "calib_source": f"{config.calib}, seed {config.seed}",
            "eval": {task: eval_windows(task, loaded.tokenizer, EVAL_SEQLEN, EVAL_WINDOWS, root)
                     for task in ("wikitext2", "c4")},
        }, inputs)
    print(f"wrote {fp} and {inputs}")


if __name__ == "__main__":
    main()
