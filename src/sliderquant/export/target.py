"""What an export may replace: only its own earlier output, never a user's file or folder.

A compressed folder carries `sliderquant_export.json`, which lists every file the export
wrote; a GGUF file carries `general.quantized_by = "sliderquant <version>"`. With
`overwrite`, a target is replaced only when it is such an export (a folder holding nothing
the export did not write).
"""

from __future__ import annotations

import json
from pathlib import Path

from sliderquant.export.source import ExportError
from sliderquant.version import __version__

EXPORT_RECORD = "sliderquant_export.json"
GGUF_OWNER_KEY = "general.quantized_by"


def write_marker(folder: Path, fmt: str, entries: dict) -> None:
    """Write `folder`'s export record: format, version, the files in it, and `entries`."""
    files = sorted({p.name for p in folder.iterdir()} | {EXPORT_RECORD})
    record = {"format": fmt, "sliderquant_version": __version__, "files": files, **entries}
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1))


def check_target(target: Path, overwrite: bool, folder: bool) -> None:
    """Raise ExportError unless `target` (a folder if `folder`, else a file) is free, or
    `overwrite` is set and `target` is an earlier export of sliderquant."""
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise ExportError(f"{target} exists; choose another --out, or pass --overwrite to "
                          "replace an earlier export")
    why = _not_an_export(target, folder)
    if why:
        raise ExportError(f"--overwrite replaces only an earlier sliderquant export, and "
                          f"{target} {why}; choose another --out")


def _not_an_export(target: Path, folder: bool) -> str | None:
    if target.is_symlink():
        return "is a symbolic link"
    if folder != target.is_dir():
        return "is a folder" if target.is_dir() else "is a file"
    if folder:
        marker = target / EXPORT_RECORD
        try:
            written = set(json.loads(marker.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"has no readable {EXPORT_RECORD}"
        others = sorted(p.name for p in target.iterdir() if p.name not in written)
        if others:
            return f"holds files the export did not write ({', '.join(others[:3])})"
        return None
    return None if _gguf_owner(target).startswith("sliderquant") else \
        "is not a GGUF file written by sliderquant"


def _gguf_owner(path: Path) -> str:
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get(GGUF_OWNER_KEY)
    except (OSError, ValueError, IndexError, KeyError):
        return ""
    if field is None:
        return ""
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def read_marker(folder: Path) -> dict:
    """The export record of a folder sliderquant exported (empty for any other folder)."""
    try:
        return json.loads((folder / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return {}
