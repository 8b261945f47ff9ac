"""Calibration windows and evaluation streams, from a local data root or the HF hub.

Data root: `--data-dir`, else the `SLIDERQUANT_DATA` environment variable, else the hub.
With a data root, every dataset is read from it and nothing falls back to the hub.
Layout of a data root: `wikitext2/{test,valid}.txt` (raw WikiText-2 files),
`c4/c4_validation_2k.jsonl` (C4 `en` validation documents, one JSON per line).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from sliderquant.config import QuantConfig

ENV_DATA = "SLIDERQUANT_DATA"
CALIB_SOURCES = ("wikitext2:train", "wikitext2:valid", "c4")
_WIKITEXT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
_HF_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
C4_LOCAL = "c4/c4_validation_2k.jsonl"


class DataError(ValueError):
    """Requested data is unavailable or too small; the message says what to use instead."""


def resolve_data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data root to read from, or None for the Hugging Face hub."""
    root = data_dir or os.environ.get(ENV_DATA)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root {path} is not a directory (from --data-dir or ${ENV_DATA})")
    return path


def wikitext2_text(split: str, data_root: Path | None) -> str:
    """A WikiText-2 raw split, rows joined by "\\n\\n" (the GPTQ/OmniQuant convention)."""
    if split not in _WIKITEXT_FILES:
        raise DataError(f"unknown WikiText-2 split {split!r}; use train, valid or test")
    if data_root is None:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=_HF_SPLITS[split])["text"]
        return "\n\n".join(rows)
    path = data_root / "wikitext2" / _WIKITEXT_FILES[split]
    if not path.is_file():
        others = [f"wikitext2:{s}" for s, f in _WIKITEXT_FILES.items()
                  if s != "test" and (data_root / "wikitext2" / f).is_file()]
        if (data_root / C4_LOCAL).is_file():
            others.append("c4")
        raise DataError(
            f"WikiText-2 {split} split is not in the data root ({path} is missing). "
            f"Use --calib {' or --calib '.join(others) or 'FILE.txt'}, or unset the data root "
            f"(--data-dir / ${ENV_DATA}) to download it from the Hugging Face hub."
        )
    # Raw files hold one row per line, blank rows as " ": map them back to the HF rows.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def c4_documents(data_root: Path | None, split: str = "validation") -> list[str]:
    """C4 `en` documents: the local validation subset, or the first hub shard of `split`."""
    if data_root is None:
        from datasets import load_dataset

        shard = (f"en/c4-{split}.00000-of-00008.json.gz" if split == "validation"
                 else "en/c4-train.00000-of-01024.json.gz")
        return load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]
    path = data_root / C4_LOCAL
    if not path.is_file():
        raise DataError(f"C4 is not in the data root ({path} is missing); use --calib "
                        "wikitext2:valid or unset the data root to use the hub")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def calibration_text(source: str, data_root: Path | None) -> str:
    """Raw text of a calibration source: `wikitext2:train|valid`, `c4`, or a text file path."""
    if source.startswith("wikitext2:"):
        split = source.split(":", 1)[1]
        if split == "test":
            raise DataError("wikitext2:test is the evaluation set; calibrate on "
                            "wikitext2:train, wikitext2:valid or c4")
        return wikitext2_text(split, data_root)
    if source == "c4":
        # Documents are joined so that any seqlen works with the 2,000-document subset.
        return "\n\n".join(c4_documents(data_root, "validation" if data_root else "train"))
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(f"unknown calibration source {source!r}: use one of "
                    f"{', '.join(CALIB_SOURCES)} or the path of a text file")


def calibration_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`nsamples` random `seqlen`-token windows of a 1-D token stream, shape [nsamples, seqlen].

    The reference procedure (ALGORITHM.md §4): Python `random` seeded with `seed`, a uniform
    start in [0, n - seqlen - 1] per sample, then the list shuffled with the same generator.
    """
    n = tokens.numel()
    if n < seqlen + 1:
        raise DataError(f"the calibration text has {n} tokens, fewer than seqlen + 1 = "
                        f"{seqlen + 1}; use a shorter --seqlen or more text")
    if nsamples * seqlen > n:
        raise DataError(
            f"{nsamples} windows of {seqlen} tokens need {nsamples * seqlen} tokens but the "
            f"calibration text has only {n}; use at most --nsamples {n // seqlen} at this "
            "seqlen, a shorter --seqlen, or a larger source"
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        start = rng.randint(0, n - seqlen - 1)
        windows.append(tokens[start:start + seqlen])
    rng.shuffle(windows)
    return torch.stack(windows)


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenize `text` as one sequence (tokenizer's default special tokens), as a 1-D tensor."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def calibration_ids(tokenizer, config: QuantConfig, data_root: Path | None = None
                    ) -> torch.Tensor:
    """The calibration windows a config asks for, [nsamples, seqlen] token ids."""
    text = calibration_text(config.calib, data_root)
    return calibration_windows(tokenize_stream(tokenizer, text), config.nsamples,
                               config.seqlen, config.seed)


def c4_eval_windows(tokenizer, documents: list[str], seqlen: int, count: int) -> torch.Tensor:
    """C4 evaluation windows (ALGORITHM.md §11.1): seed 0, random crops of documents >= seqlen.

    Raises if no document is long enough (then use a shorter seqlen).
    """
    rng = random.Random(0)
    lengths: dict[int, torch.Tensor] = {}
    if not any(len(d) >= seqlen for d in documents):
        raise DataError(f"no C4 document reaches {seqlen} tokens; use a shorter --seqlen")
    windows = []
    tries = 0
    while len(windows) < count:
        i = rng.randint(0, len(documents) - 1)
        if i not in lengths:
            lengths[i] = tokenize_stream(tokenizer, documents[i])
        ids = lengths[i]
        tries += 1
        if ids.numel() < seqlen:
            if tries > 200 * count:
                raise DataError(f"too few C4 documents reach {seqlen} tokens; "
                                "use a shorter --seqlen")
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)
