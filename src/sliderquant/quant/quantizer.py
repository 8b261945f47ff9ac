"""Uniform asymmetric fake quantizer (ALGORITHM.md §5.1).

One (step, zero-point) per row of the last axis, or per group of `group_size` entries of
it; straight-through rounding; optional learnable clipping logits; partial ("sliding")
quantization of the first `ceil(rate * D)` entries with statistics from the whole row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 8, 16)
CLIP_INIT = 4.0  # sigmoid(4) ≈ 0.982: clipping starts just inside the min/max range
STEP_MIN, STEP_MAX = 1e-5, 1e4
FULL_RATE = 0.99  # fractions at or above this quantize the whole axis, as in the reference code


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return t + (t.round() - t).detach()


def quant_params(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero-point for `x`, shaped `[..., n_groups, 1]` (one group if `group_size` is None).

    `upper`/`lower` are clipping logits shaped `[..., n_groups]`; the max/min of each group is
    multiplied by their sigmoid. The zero-point carries no gradient.
    """
    groups = _grouped(x, group_size)
    hi = groups.amax(dim=-1, keepdim=True)
    lo = groups.amin(dim=-1, keepdim=True)
    if upper is not None:
        hi = torch.sigmoid(upper).unsqueeze(-1) * hi
        lo = torch.sigmoid(lower).unsqueeze(-1) * lo
    step = ((hi - lo) / (2**bits - 1)).clamp(STEP_MIN, STEP_MAX)
    zero = (-lo / step).clamp(-1e4, 1e4).round().detach()
    return step, zero


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    rate: float = 1.0,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize `x` along its last axis; identity for `bits >= 16`.

    With `rate < 0.99` only the first `ceil(rate * D)` entries of every row are rounded;
    the rest pass through unchanged (each entry keeps its own group's step and zero-point).
    """
    if bits >= 16:
        return x
    step, zero = quant_params(x, bits, group_size, upper, lower)
    groups = _grouped(x, group_size)
    q = (round_ste(groups / step) + zero).clamp(0, 2**bits - 1)
    out = ((q - zero) * step).reshape(x.shape)
    if rate < FULL_RATE:
        k = math.ceil(rate * x.shape[-1])
        out = torch.cat([out[..., :k], x[..., k:]], dim=-1)
    return out


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


class WeightQuantizer(nn.Module):
    """Per-output-channel (or per-group) weight quantizer with learnable clipping (LWC)."""

    def __init__(
        self, out_features: int, in_features: int, bits: int, group_size: int | None, lwc: bool
    ):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        n_groups = 1 if group_size is None else in_features // group_size
        if lwc:
            self.clip_upper = nn.Parameter(torch.full((out_features, n_groups), CLIP_INIT))
            self.clip_lower = nn.Parameter(torch.full((out_features, n_groups), CLIP_INIT))
        else:
            self.clip_upper = self.clip_lower = None

    def forward(self, weight: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        return fake_quantize(
            weight, self.bits, rate, self.group_size, self.clip_upper, self.clip_lower
        )

    def integers(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, step, zero) of the full quantization of `weight`: codes in [0, 2^b - 1],
        step and zero shaped [out, n_groups]."""
        step, zero = quant_params(
            weight, self.bits, self.group_size, self.clip_upper, self.clip_lower
        )
        codes = (torch.round(_grouped(weight, self.group_size) / step) + zero).clamp(
            0, 2**self.bits - 1
        )
        return codes.reshape(weight.shape), step.squeeze(-1), zero.squeeze(-1)


@dataclass
class QuantGrid:
    """A weight on its integer grid: W = (codes - zero) * step, per row or per group."""

    codes: torch.Tensor  # [out, in], integers in [0, 2^bits - 1] (stored as float)
    step: torch.Tensor  # [out, n_groups]
    zero: torch.Tensor  # [out, n_groups]
    bits: int
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        out, n_groups = self.step.shape
        codes = self.codes.reshape(out, n_groups, -1)
        return ((codes - self.zero[..., None]) * self.step[..., None]).reshape(self.codes.shape)
