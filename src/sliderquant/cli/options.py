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
    p.add_argument("--data-dir", help="data root with wikitext2/, c4/ and zeroshot/ (default: "
                   "$SLIDERQUANT_DATA, else the Hugging Face hub)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load and save the model in (default float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the hub (off unless you pass it)")
    p.add_argument("--device", help="where to compute: cpu, cuda or cuda:N (default: cuda if "
                   "available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_perplexity_arguments(p: argparse.ArgumentParser, default_tasks: str,
                             zeroshot: bool = False) -> None:
    """Which evaluation sets (with `zeroshot`, also lm-eval's tasks), at which window length,
    how many windows."""
    names = ("wikitext2, c4 (perplexity), piqa, arc_easy, arc_challenge, hellaswag, "
             "winogrande, boolq (zero-shot through lm-eval), zeroshot (all six)" if zeroshot
             else "wikitext2, c4")
    p.add_argument("--tasks", default=default_tasks,
                   help=f"comma-separated: {names}, or none (default {default_tasks})")
    p.add_argument("--eval-seqlen", type=int, default=2048,
                   help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate only the first N windows of each set (default: all; "
                        "WikiText-2 test ~150 and C4 256 windows at 2048)")


def parse_tasks(text: str, zeroshot: bool = False) -> tuple[str, ...]:
    """Task names from a comma-separated list: the perplexity sets, and with `zeroshot` also
    the lm-eval tasks (`zeroshot` alone stands for all six); `none` is the empty list."""
    from sliderquant.eval.perplexity import DATASETS
    from sliderquant.eval.zeroshot_data import TASKS

    if text.strip().lower() == "none":
        return ()
    tasks: list[str] = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        for name in (TASKS if zeroshot and t == "zeroshot" else (t,)):
            if name not in tasks:
                tasks.append(name)
    available = (*DATASETS, *TASKS, "zeroshot") if zeroshot else DATASETS
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; available: {', '.join(available)}, none")
    return tuple(tasks)


def compute_device(name: str | None):
    """The torch device for `--device` (None: cuda if available, else cpu), checked to exist."""
    import torch

    from sliderquant.api import default_device

    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build or machine has no CUDA device; "
                          "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    return device


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
