"""Options shared by several commands, and their parsing."""

from __future__ import annotations

import argparse

from sliderquant.config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL plus how to load it (data root, dtype, remote code, progress)."""
    p.add_argument("model", help="smollm2-135m (embedded default), stories260k (data root), a "
                   ".gguf file, a llama2.c .bin, a Hugging Face folder or hub id, or (eval) a "
                   "sliderquant run folder")
    p.add_argument("--data-dir", help="data root with wikitext2/ and c4/ (default: "
                   "$SLIDERQUANT_DATA, else the Hugging Face hub)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load and save the model in (default float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the hub (off unless you pass it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_perplexity_arguments(p: argparse.ArgumentParser, default_tasks: str) -> None:
    """Which evaluation sets, at which window length, how many windows."""
    p.add_argument("--tasks", default=default_tasks,
                   help=f"comma-separated: wikitext2, c4, or none (default {default_tasks})")
    p.add_argument("--eval-seqlen", type=int, default=2048,
                   help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate only the first N windows of each set (default: all; "
                        "WikiText-2 test ~150 and C4 256 windows at 2048)")


def parse_tasks(text: str) -> tuple[str, ...]:
    from sliderquant.eval.perplexity import DATASETS

    if text.strip().lower() == "none":
        return ()
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; available: {', '.join(DATASETS)}, none")
    return tasks


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
