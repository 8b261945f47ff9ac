"""A benchmark suite's results: one JSON file of cells, shared by parallel invocations."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sliderquant.atomic import write_text


def read_results(path: Path) -> dict:
    """The recorded cells (and `_meta`), or {} before the first cell."""
    return json.loads(path.read_text()) if path.is_file() else {}


def record_cell(path: Path, meta: dict, key: str, record: dict) -> dict:
    """Add one finished cell and write the file atomically; returns everything recorded.

    The file is re-read first: another invocation (`--only`) may have finished cells since
    this one started, and they must not be lost.
    """
    results = {**read_results(path), "_meta": meta, key: record}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=1))
    return results


def fmt_ppl(ppl: float) -> str:
    """Perplexity for a table: two decimals, or three significant digits once it is huge."""
    return f"{ppl:.2f}" if ppl < 1e4 else f"{ppl:.3g}"


def read_list(path: Path) -> list[dict]:
    """The records of a list-shaped results file, or [] before the first."""
    return json.loads(path.read_text()) if path.is_file() else []


def record_in_list(path: Path, record: dict, key: Callable[[dict], str]) -> list[dict]:
    """Add `record` to a list-shaped results file, replacing the one with the same key;
    re-read first (as `record_cell`) and written atomically. Returns every record."""
    records = [r for r in read_list(path) if key(r) != key(record)] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(records, indent=1))
    return records
