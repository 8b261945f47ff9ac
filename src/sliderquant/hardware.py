"""Where work runs and what it costs: the default compute device and peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def default_device() -> torch.device:
    """Where work runs unless the caller says: cuda when torch sees a GPU, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS)."""
    import resource

    # Linux's ru_maxrss survives fork + exec (a child reports its parent's peak); the
    # high-water mark of this process's own address space does not.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20
