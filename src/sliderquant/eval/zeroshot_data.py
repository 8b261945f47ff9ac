"""Local copies of the six zero-shot sets, read into the schema of lm-eval's hub datasets.

Each reader returns (split name, rows, description). With these rows lm-eval's own prompt
templates and metrics apply unchanged; only where the data comes from differs:

| task | file under `<data root>/zeroshot/` | split lm-eval scores |
|---|---|---|
| piqa | `piqa/valid.jsonl` + `piqa/valid-labels.lst` | validation (1,838) |
| arc_easy / arc_challenge | `arc_*/test.jsonl` (`choices`, `gold`) | test (2,376 / 1,172) |
| hellaswag | `hellaswag/olmes_validation_subset1000.jsonl` | 1,000 of the 10,042 validation items |
| winogrande | `winogrande/winogrande_xl_validation.jsonl` | validation (1,267) |
| boolq | `boolq/super_glue_validation.jsonl` | validation (3,270) |

HellaSwag is the one departure: the full local validation file was preprocessed slightly
differently from lm-eval (no `ctx_b.capitalize()`, other `[...]` tags kept), so the local task
reads the 1,000-item random subset that has lm-eval's exact preprocessing instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from sliderquant.data import DataError

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")
ZEROSHOT_DIR = "zeroshot"


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path} is missing from the data root; unset the data root "
                        "(--data-dir / $SLIDERQUANT_DATA) to read the task from the hub")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _piqa(root: Path) -> tuple[str, list[dict], str]:
    docs = _jsonl(root / "piqa" / "valid.jsonl")
    labels_file = root / "piqa" / "valid-labels.lst"
    if not labels_file.is_file():
        raise DataError(f"{labels_file} is missing from the data root")
    labels = [int(x) for x in labels_file.read_text().split()]
    if len(labels) != len(docs):
        raise DataError(f"{labels_file} has {len(labels)} labels for {len(docs)} PIQA items")
    rows = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}
            for d, y in zip(docs, labels, strict=True)]
    return "validation", rows, "piqa/valid.jsonl + valid-labels.lst"


def _arc(root: Path, task: str) -> tuple[str, list[dict], str]:
    rows = []
    for d in _jsonl(root / task / "test.jsonl"):
        letters = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"id": d["id"], "question": d["question"],
                     "choices": {"text": d["choices"], "label": letters},
                     "answerKey": letters[d["gold"]]})
    return "test", rows, f"{task}/test.jsonl"


def _hellaswag(root: Path) -> tuple[str, list[dict], str]:
    # Already in the form lm-eval's process_docs produces (query, choices, gold); `label` is
    # what its doc_to_target reads.
    rows = [{"ind": d["ind"], "query": d["query"], "choices": d["choices"],
             "gold": int(d["gold"]), "label": str(d["gold"])}
            for d in _jsonl(root / "hellaswag" / "olmes_validation_subset1000.jsonl")]
    return "validation", rows, ("hellaswag/olmes_validation_subset1000.jsonl (1,000-item "
                                "random subset of validation)")


def _winogrande(root: Path) -> tuple[str, list[dict], str]:
    rows = _jsonl(root / "winogrande" / "winogrande_xl_validation.jsonl")
    return "validation", rows, "winogrande/winogrande_xl_validation.jsonl"


def _boolq(root: Path) -> tuple[str, list[dict], str]:
    rows = _jsonl(root / "boolq" / "super_glue_validation.jsonl")
    return "validation", rows, "boolq/super_glue_validation.jsonl"


def local_rows(task: str, data_root: Path) -> tuple[str, list[dict], str]:
    """(split, rows in lm-eval's hub schema, which local file) for one of TASKS."""
    root = data_root / ZEROSHOT_DIR
    if task == "piqa":
        return _piqa(root)
    if task in ("arc_easy", "arc_challenge"):
        return _arc(root, task)
    if task == "hellaswag":
        return _hellaswag(root)
    if task == "winogrande":
        return _winogrande(root)
    if task == "boolq":
        return _boolq(root)
    raise DataError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)}")
