"""What an exporter reads (a finished run: folded model, weight grids, run record) and what
it reports back (per tensor: storage type, exact or not, measured error)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class ExportError(ValueError):
    """The run cannot be written in the requested format; the message says why."""


@dataclass
class QuantizedRun:
    """A finished sliderquant run, as the exporters see it."""

    model: torch.nn.Module  # plain transformers model holding the folded weights
    folder: Path  # the run folder (Hugging Face files, tokenizer)
    record: dict  # sliderquant.json
    grids: dict[str, torch.Tensor]  # "<module>.step" / "<module>.zero", [out, n_groups]
    source_gguf: Path | None = None  # GGUF the model came from (its tokenizer is reused)

    @property
    def wbits(self) -> int:
        return int(self.record["config"]["wbits"])

    @property
    def abits(self) -> int:
        return int(self.record["config"]["abits"])

    @property
    def group_size(self) -> int | None:
        return self.record["config"].get("group_size")

    def is_quantized(self, module: str) -> bool:
        return f"{module}.step" in self.grids

    def element_grid(self, module: str, weight: torch.Tensor
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(step, zero, codes) of every entry of `module`'s weight, float64 [out, in],
        checked against the stored weight: weight == step * (codes - zero)."""
        step, zero = self.grids[f"{module}.step"].double(), self.grids[f"{module}.zero"].double()
        rows, cols = weight.shape
        if step.shape[0] != rows or cols % step.shape[1]:
            raise ExportError(f"the grid of {module} ({list(step.shape)}) does not fit its "
                              f"weight ({rows}x{cols})")
        width = cols // step.shape[1]
        s = step.repeat_interleave(width, dim=1)
        z = zero.repeat_interleave(width, dim=1)
        w = weight.detach().double()
        codes = torch.round(w / s) + z
        off = ((s * (codes - z) - w).abs() / s).max().item()
        top = 2 ** self.wbits - 1
        if off > 1e-3 or codes.min() < 0 or codes.max() > top:
            raise ExportError(f"{module} does not sit on its recorded {self.wbits}-bit grid "
                              f"(largest offset {off:.2g} steps); the run folder is "
                              "inconsistent: re-run the quantization")
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
                "warnings": self.warnings,
                "tensors": [vars(t) for t in self.tensors]}
