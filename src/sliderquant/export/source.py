"""What every exporter shares: the integer codes of a folded weight on its learned grid,
and what an export reports back (per tensor: storage type, exact or not, measured error;
notes on which engines run the result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why."""


def is_quantized(grids: dict[str, torch.Tensor], module: str) -> bool:
    """Whether `module` (a Linear's path) has a learned weight grid."""
    return f"{module}.step" in grids


def grid_bits(grids: dict[str, torch.Tensor], module: str, default: int) -> int:
    """Bits of `module`'s grid; `default` (the run's `wbits`) for grids saved before they
    carried their bits. A channel split (two bit-widths in one tensor) has no exported form."""
    bits = grids.get(f"{module}.bits")
    if bits is None:
        return default
    widths = sorted({int(b) for b in bits.flatten().tolist()})
    if len(widths) > 1:
        raise ExportError(
            f"{module} is a channel split ({' and '.join(map(str, widths))} bits in one "
            "tensor); neither GGUF nor compressed-tensors stores two bit-widths in one tensor. "
            "Quantize with --alloc-unit layer or projection to export (docs/MIXED.md)")
    return widths[0]


def grid_codes(module: str, weight: torch.Tensor, grids: dict[str, torch.Tensor], bits: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, zero, codes) of every entry of `module`'s weight, float64 [out, in], checked
    against the weight: weight == step * (codes - zero) with codes in 0 .. 2**bits - 1."""
    step = grids[f"{module}.step"].double()
    zero = grids[f"{module}.zero"].double()
    rows, cols = weight.shape
    if step.shape[0] != rows or cols % step.shape[1]:
        raise ExportError(f"the grid of {module} ({list(step.shape)}) does not fit its "
                          f"weight ({rows}x{cols})")
    width = cols // step.shape[1]
    s = step.repeat_interleave(width, dim=1)
    z = zero.repeat_interleave(width, dim=1)
    w = weight.detach().double().cpu()
    codes = torch.round(w / s) + z
    off = ((s * (codes - z) - w).abs() / s).max().item()
    if off > 1e-3 or codes.min() < 0 or codes.max() > 2**bits - 1:
        raise ExportError(f"{module} does not sit on its recorded {bits}-bit grid (largest "
                          f"offset {off:.2g} steps); the weights and grids do not belong "
                          "together: re-run the quantization")
    return s.numpy(), z.numpy(), codes.numpy()


@dataclass
class TensorReport:
    name: str
    storage: str  # e.g. "Q4_1", "F16", "packed int4"
    status: str  # "exact" (grid reproduced), "requantized", "float" (not quantized)
    params: int
    reason: str = ""  # why this storage, when it is not the setting's natural one
    max_step_error: float | None = None  # max |w_file - w| / step, quantized tensors
    rel_rms_error: float = 0.0  # ||w_file - w|| / ||w||


@dataclass
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    tensors: list[TensorReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # which engines run it, what is lost

    def summary(self) -> list[str]:
        """Human-readable lines: one per (storage, status, reason) group."""
        groups: dict[tuple[str, str, str], list[TensorReport]] = {}
        for t in self.tensors:
            groups.setdefault((t.storage, t.status, t.reason), []).append(t)
        lines = []
        for (storage, status, reason), ts in groups.items():
            params = sum(t.params for t in ts)
            line = f"{storage:<12} {status:<11} {len(ts):>4} tensors {params / 1e6:8.2f} M params"
            steps = [t.max_step_error for t in ts if t.max_step_error is not None]
            if steps:
                line += f"  max |dw| {max(steps):.2%} of a step"
            rms = max(t.rel_rms_error for t in ts)
            line += f"  rel. RMS error <= {rms:.2e}"
            if reason:
                line += f"  ({reason})"
            lines.append(line)
        return lines

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "size_bytes": self.size_bytes,
                "warnings": self.warnings, "notes": self.notes,
                "tensors": [vars(t) for t in self.tensors]}
