"""The standard corpora (WikiText-2, C4), from a local data root or the HF hub.

Data root: `--data-dir`, else the `SLIDERQUANT_DATA` environment variable, else the hub.
With a data root, every dataset is read from it and nothing falls back to the hub.
Layout of a data root: `wikitext2/{test,valid}.txt` (raw WikiText-2 files),
`c4/c4_validation_2k.jsonl` (C4 `en` validation documents, one JSON per line),
`zeroshot/` (eval/zeroshot_data.py). Calibration sources are `sliderquant.calibration`'s.
"""

from __future__ import annotations

import json
import os
import random
from functools import lru_cache
from pathlib import Path

import torch

ENV_DATA = "SLIDERQUANT_DATA"
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


def hub_error(what: str, error: Exception, fix: str | None = None) -> DataError:
    """The DataError for a dataset the Hugging Face hub did not provide (no network, unknown
    name, ...): what failed, why, and what to do instead."""
    fix = fix or (f"pass --data-dir DIR (or set ${ENV_DATA}) to a data root that holds it; "
                  "the project's offline data root has wikitext2/, c4/ and zeroshot/")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return DataError(f"could not load {what} from the Hugging Face hub "
                     f"({type(error).__name__}{': ' + reason[:200] if reason else ''}); {fix}")


def wikitext2_file(split: str, data_root: Path) -> Path:
    """The raw WikiText-2 file of `split` in the data root; DataError naming the
    alternatives when it is missing."""
    if split not in _WIKITEXT_FILES:
        raise DataError(f"unknown WikiText-2 split {split!r}; use train, valid or test")
    path = data_root / "wikitext2" / _WIKITEXT_FILES[split]
    if not path.is_file():
        others = [f"wikitext2:{s}" for s, f in _WIKITEXT_FILES.items()
                  if s != "test" and (data_root / "wikitext2" / f).is_file()]
        if (data_root / C4_LOCAL).is_file():
            others.append("c4")
        if split == "test":
            raise DataError(f"WikiText-2 test split is not in the data root ({path} is "
                            f"missing); point --data-dir at a data root that has it")
        raise DataError(
            f"WikiText-2 {split} split is not in the data root ({path} is missing). "
            f"Use --calib {' or --calib '.join(others) or 'FILE.txt'}, or unset the data root "
            f"(--data-dir / ${ENV_DATA}) to download it from the Hugging Face hub."
        )
    return path


@lru_cache(maxsize=4)
def wikitext2_text(split: str, data_root: Path | None) -> str:
    """A WikiText-2 raw split, rows joined by "\n\n" (the GPTQ/OmniQuant convention);
    kept in memory, as the FP and quantized evaluations of a run read it twice."""
    if split not in _WIKITEXT_FILES:
        raise DataError(f"unknown WikiText-2 split {split!r}; use train, valid or test")
    if data_root is None:
        try:
            from datasets import load_dataset

            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=_HF_SPLITS[split])["text"]
        except Exception as e:  # datasets raises many types (network, cache, missing split)
            raise hub_error(f"WikiText-2 {split}", e) from e
        return "\n\n".join(rows)
    # Raw files hold one row per line, blank rows as " ": map them back to the HF rows.
    lines = wikitext2_file(split, data_root).read_text(encoding="utf-8").splitlines(
        keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


@lru_cache(maxsize=2)
def c4_documents(data_root: Path | None, split: str = "validation") -> tuple[str, ...]:
    """C4 `en` documents: the local validation subset, or the first hub shard of `split`
    (kept in memory like `wikitext2_text`)."""
    if data_root is None:
        shard = (f"en/c4-{split}.00000-of-00008.json.gz" if split == "validation"
                 else "en/c4-train.00000-of-01024.json.gz")
        try:
            from datasets import load_dataset

            return tuple(load_dataset("allenai/c4", data_files={split: shard},
                                      split=split)["text"])
        except Exception as e:  # datasets raises many types (network, cache, missing file)
            raise hub_error(f"C4 ({shard})", e) from e
    path = data_root / C4_LOCAL
    if not path.is_file():
        raise DataError(f"C4 is not in the data root ({path} is missing); use --calib "
                        "wikitext2:valid or unset the data root to use the hub")
    with path.open(encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f if line.strip())


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Tokenize `text` as one sequence (tokenizer's default special tokens), as a 1-D tensor."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def c4_eval_windows(tokenizer, documents: tuple[str, ...], seqlen: int,
                    count: int) -> torch.Tensor:
    """C4 evaluation windows (ALGORITHM.md §11.1): seed 0, random crops of documents >= seqlen.

    Raises if no document is long enough (then use a shorter seqlen).
    """
    rng = random.Random(0)
    lengths: dict[int, torch.Tensor] = {}
    if not any(len(d) >= seqlen for d in documents):
        raise DataError(f"no C4 document reaches {seqlen} tokens; use a shorter --eval-seqlen")
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
                                "use a shorter --eval-seqlen")
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1) if ids.numel() > seqlen else 0
        windows.append(ids[start:start + seqlen])
    return torch.stack(windows)
