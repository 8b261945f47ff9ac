"""Atomic writes that respect the umask: stage next to the target, then rename over it.

Files come out with mode `0o666 & ~umask` and folders with `0o777 & ~umask`, as if created
with `open()` / `mkdir()`: the private 0600 / 0700 modes of tempfile (and of safetensors'
`save_file`, which writes through a temporary file) are not kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (read without changing it where Linux exposes it)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything in it) the modes the umask allows."""
    path = Path(path)
    mask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target` atomically.

    On error the temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        apply_umask(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder next to `target`; on success it takes `target`'s place
    (an existing `target` is renamed aside first and removed only once the new one is in).

    On error the staging folder is removed and `target` is left as it was. Whether an
    existing `target` may be replaced is the caller's decision.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
        apply_umask(staging)
        if not target.exists():
            os.replace(staging, target)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside / target.name, target)
            aside.rmdir()
            raise
        shutil.rmtree(aside)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Atomically write `text` (UTF-8) to `target`."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
