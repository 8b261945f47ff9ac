"""The one vocabulary of flags every command shares, their types, and their parsing.

- `--data-dir`: the data root (wikitext2/, c4/, zeroshot/); default $SLIDERQUANT_DATA, then
  the root a run folder recorded, then the hub
- `--device`: where to compute; `--quiet`: no progress bars or status lines (also those of
  transformers and datasets)
- `--out`: the folder the command writes into; `--json [FILE]`: results as JSON, to FILE or
  stdout
- `--tasks`, `--eval-seqlen`, `--eval-windows`, `--limit`: what to evaluate (wikitext2, c4
  and lm-eval tasks), perplexity window length and count, items per lm-eval task
- `--calib`, `--chat-template`, `--nsamples`, `--seqlen`: calibration data, chat rendering,
  window count and tokens per window
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from sliderquant.cli.printing import say
from sliderquant.config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
PERPLEXITY_SETS = ("wikitext2", "c4")


# ---- argument types: bad values are argparse errors (one line, exit code 2) ----------------
def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def finite_float(text: str) -> float:
    """A finite float (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


# ---- shared options ------------------------------------------------------------------------
def add_model_arguments(p: argparse.ArgumentParser, run_folder: bool = False) -> None:
    """MODEL plus how to load it."""
    p.add_argument("model", help="smollm2-135m (embedded default), stories260k (data root), a "
                   ".gguf file, a llama2.c .bin, a Hugging Face folder or hub id"
                   + (", or a sliderquant run folder" if run_folder else ""))
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load (and save) the model in (default float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the hub (off unless you pass it)")


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data root with wikitext2/, c4/ and zeroshot/ (default: "
                   "$SLIDERQUANT_DATA, else the data root a run folder recorded, else the "
                   "Hugging Face hub)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where to compute: cpu, cuda or cuda:N (default: cuda if "
                   "available, else cpu)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or status lines (also silences transformers' and "
                        "datasets' bars); results are still printed")


def add_out(p: argparse.ArgumentParser, what: str, required: bool = False) -> None:
    p.add_argument("--out", type=Path, required=required, help=f"output folder: {what}")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="also write the results as JSON to FILE (to stdout without FILE or "
                        "with -)")


def add_eval_arguments(p: argparse.ArgumentParser, default_tasks: str,
                       perplexity_only: bool = False, default_seqlen: int = 2048,
                       default_windows: int | None = None, seqlen_note: str = "") -> None:
    """Which evaluation tasks, at which window length, how many windows / items."""
    names = ("wikitext2 or c4 (perplexity)" if perplexity_only else
             "wikitext2, c4 (perplexity), any lm-eval task: piqa, arc_easy, arc_challenge, "
             "hellaswag, winogrande, boolq read the data root's copies (zeroshot = all six), "
             "other tasks lm-eval's own data from the hub")
    skip = "" if perplexity_only else "; none to skip"
    p.add_argument("--tasks", default=default_tasks,
                   help=f"comma-separated: {names}{skip} (default {default_tasks})")
    p.add_argument("--eval-seqlen", type=positive_int, default=default_seqlen,
                   help=f"perplexity window length in tokens, capped at the model's context "
                        f"(default {default_seqlen}{seqlen_note})")
    p.add_argument("--eval-windows", type=positive_int, default=default_windows,
                   help="perplexity windows per set: the first N "
                        + (f"(default {default_windows})" if default_windows else
                           "(default: all; WikiText-2 test ~140 and C4 256 windows at 2048)"))
    if not perplexity_only:
        p.add_argument("--limit", type=positive_int, default=None,
                       help="score only the first N items of each lm-eval task (for CPU-sized "
                            "runs; reported with every result it affects). Default: all")


def add_calibration_arguments(p: argparse.ArgumentParser, default_calib: str | None,
                              nsamples: int | None = None, seqlen: int | None = None) -> None:
    """Calibration data (`--calib`, `--chat-template`) and, with defaults given, its window
    count and length (`--nsamples`, `--seqlen`)."""
    from sliderquant.calibration import SOURCES_HELP

    default = default_calib or "the preset's or the run's"
    p.add_argument("--calib", default=default_calib,
                   help=f"calibration data: {SOURCES_HELP} (default {default}; "
                        "wikitext2:train is not in the offline data root)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render the conversations of a messages column with the tokenizer's "
                        "chat template and pack whole conversations into the windows (text "
                        "is cut into random windows instead)")
    if nsamples is not None:
        p.add_argument("--nsamples", type=positive_int, default=nsamples,
                       help=f"number of calibration windows (default {nsamples})")
    if seqlen is not None:
        p.add_argument("--seqlen", type=positive_int, default=seqlen,
                       help=f"tokens per calibration window (default {seqlen})")


# ---- parsing -------------------------------------------------------------------------------
def parse_tasks(text: str, perplexity_only: bool = False) -> tuple[str, ...]:
    """Task names from a comma-separated list: the perplexity sets and (unless
    `perplexity_only`) lm-eval task names, `zeroshot` standing for the six local ones;
    `none` is the empty list. lm-eval names are checked by `check_zeroshot_tasks`."""
    from sliderquant.eval.zeroshot_data import TASKS

    if text.strip().lower() == "none":
        return ()
    tasks: list[str] = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        for name in (TASKS if t == "zeroshot" and not perplexity_only else (t,)):
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise ConfigError("--tasks is empty; name tasks or pass --tasks none")
    if perplexity_only:
        unknown = [t for t in tasks if t not in PERPLEXITY_SETS]
        if unknown:
            raise ConfigError(f"--tasks {','.join(unknown)}: this command measures perplexity "
                              f"on {' or '.join(PERPLEXITY_SETS)}")
    return tuple(tasks)


def split_tasks(tasks: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(perplexity sets, lm-eval tasks)."""
    return (tuple(t for t in tasks if t in PERPLEXITY_SETS),
            tuple(t for t in tasks if t not in PERPLEXITY_SETS))


def eval_length(model, seqlen: int, args: argparse.Namespace) -> int:
    """`seqlen` capped at what the model can attend to, with a note when it is."""
    from sliderquant.eval.perplexity import context_limit

    limit = context_limit(model)
    if seqlen <= limit:
        return seqlen
    say(args, f"note: --eval-seqlen {seqlen} is longer than the model's context ({limit} "
              f"positions); evaluating {limit}-token windows")
    return limit


def compute_device(name: str | None):
    """The torch device for `--device` (None: cuda if available, else cpu), checked to exist."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build or machine has no CUDA device; "
                          "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def data_root_of(args: argparse.Namespace, run: dict | None = None) -> str | None:
    """The data root for this command: --data-dir, else $SLIDERQUANT_DATA, else the one the
    run folder recorded (when it still exists), else None (the hub)."""
    from sliderquant.data import ENV_DATA

    if args.data_dir or os.environ.get(ENV_DATA):
        return args.data_dir or os.environ[ENV_DATA]
    recorded = (run or {}).get("data_root")
    return recorded if recorded and Path(recorded).is_dir() else None


def silence_libraries() -> None:
    """Turn off the progress bars and info logs of transformers, datasets and
    huggingface_hub: through their environment variables for modules not imported yet,
    through their switches for those already imported; and every other tqdm bar of the
    process (transformers' GGUF loader uses plain tqdm), unless a caller asks for it."""
    import functools

    import tqdm

    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error")):
        os.environ[name] = value
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
