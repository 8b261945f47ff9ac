"""Uniform fake quantizer (ALGORITHM.md §5.1) as pure functions.

One (step, zero-point) per row of the last axis, or per group of `group_size` entries of
it; optional clipping logits that shrink the range; partial ("sliding") quantization of
the first `ceil(rate * D)` entries with statistics from the whole row.

`quantize_codes` is the one path from a tensor to its integer codes: training reaches it
through `fake_quantize` (straight-through rounding, so gradients flow) and folding through
`weight_grid` (the same codes, kept as a `QuantGrid`). Rounding with the straight-through
estimator gives exactly `round(t)` in the forward pass, so the two cannot disagree.
An optional per-entry rounding `offset` (learned rounding, quant/learnables.py `Rounding`)
is added to `x / step` before rounding on both paths: the codes stay on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

STEP_MIN, STEP_MAX = 1e-5, 1e4
FULL_RATE = 0.99  # fractions at or above this quantize the whole axis, as in the reference code


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is quantized: bits, per-channel (`group_size` None) or per-group, and
    asymmetric (default, learned zero point) or symmetric (fixed zero point 2^(bits-1)).

    A *channel split* keeps the output channels (rows) `high_rows` at `high_bits` and the
    others at `bits`; every row keeps its own grid, so a split only changes how many levels
    a row's grid has (trained and folded; no export format holds it, docs/MIXED.md).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = False
    high_bits: int | None = None
    high_rows: tuple[int, ...] = ()

    @property
    def split(self) -> bool:
        return bool(self.high_rows)

    def row_bits(self, rows: int) -> torch.Tensor:
        """Bits of every output channel, int64 [rows]."""
        bits = torch.full((rows,), self.bits, dtype=torch.int64)
        if self.split:
            bits[list(self.high_rows)] = self.high_bits
        return bits


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient; the value is exactly `t.round()`."""
    return t + (t.round() - t).detach()


def quant_params(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and zero-point for `x`, shaped `[..., n_groups, 1]` (one group if `group_size` is None).

    `upper`/`lower` are clipping logits shaped `[..., n_groups]`; the max/min of each group is
    multiplied by their sigmoid. The zero-point carries no gradient.

    Asymmetric: step = (max - min) / (2^b - 1), zero = round(-min / step).
    Symmetric: step = 2 * absmax / (2^b - 1) and the fixed zero 2^(b-1), so W = step * (q -
    2^(b-1)) with q in 0..2^b - 1: at 4 bits exactly GGUF Q4_0's grid d * (q - 8), q in 0..15,
    and compressed-tensors' symmetric int4 (scale absmax / 7.5). The grid covers
    [-2^(b-1), 2^(b-1) - 1] steps, so a positive absmax is clipped by less than one step.
    """
    groups = _grouped(x, group_size)
    hi = groups.amax(dim=-1, keepdim=True)
    lo = groups.amin(dim=-1, keepdim=True)
    if upper is not None:
        hi = torch.sigmoid(upper).unsqueeze(-1) * hi
        lo = torch.sigmoid(lower).unsqueeze(-1) * lo
    if symmetric:
        absmax = torch.maximum(hi.abs(), lo.abs())
        step = (2 * absmax / (2**bits - 1)).clamp(STEP_MIN, STEP_MAX)
        return step, torch.full_like(step, 2 ** (bits - 1))
    step = ((hi - lo) / (2**bits - 1)).clamp(STEP_MIN, STEP_MAX)
    zero = (-lo / step).clamp(-1e4, 1e4).round().detach()
    return step, zero


def quantize_codes(
    x: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    symmetric: bool = False,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, step, zero) of `x`: codes in [0, 2^b - 1] (float, straight-through gradient)
    shaped `[..., n_groups, group]`, step and zero `[..., n_groups, 1]`.

    `offset` (shaped like `x`, in [-0.5, 0.5]) is added to `x / step` before rounding, so
    an entry rounds up or down by choice instead of to the nearest level."""
    step, zero = quant_params(x, bits, group_size, upper, lower, symmetric)
    scaled = _grouped(x, group_size) / step
    if offset is not None:
        scaled = scaled + _grouped(offset, group_size)
    codes = (round_ste(scaled) + zero).clamp(0, 2**bits - 1)
    return codes, step, zero


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    rate: float = 1.0,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    symmetric: bool = False,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize `x` along its last axis; identity for `bits >= 16`.

    With `rate < 0.99` only the first `ceil(rate * D)` entries of every row are rounded;
    the rest pass through unchanged (each entry keeps its own group's step and zero-point).
    """
    if bits >= 16:
        return x
    codes, step, zero = quantize_codes(x, bits, group_size, upper, lower, symmetric, offset)
    out = ((codes - zero) * step).reshape(x.shape)
    if rate < FULL_RATE:
        k = math.ceil(rate * x.shape[-1])
        out = torch.cat([out[..., :k], x[..., k:]], dim=-1)
    return out


def fake_quantize_weight(
    weight: torch.Tensor,
    fmt: WeightFormat,
    rate: float = 1.0,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fake_quantize` of a weight [out, in] in its format (a channel split quantizes its
    high rows at `high_bits`, each row with its own clipping logits and rounding offsets)."""
    low = fake_quantize(weight, fmt.bits, rate, fmt.group_size, upper, lower, fmt.symmetric,
                        offset)
    if not fmt.split:
        return low
    rows = torch.tensor(fmt.high_rows, device=weight.device)
    upper, lower, offset = _rows(upper, rows), _rows(lower, rows), _rows(offset, rows)
    high = fake_quantize(weight.index_select(0, rows), fmt.high_bits, rate, fmt.group_size,
                         upper, lower, fmt.symmetric, offset)
    return low.index_copy(0, rows, high)


def weight_grid(
    weight: torch.Tensor,
    fmt: WeightFormat,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> QuantGrid:
    """The full (rate 1) quantization of `weight` [out, in] as integer codes on their grid."""
    codes, step, zero = quantize_codes(weight, fmt.bits, fmt.group_size, upper, lower,
                                       fmt.symmetric, offset)
    codes, step, zero = codes.reshape(weight.shape), step.squeeze(-1), zero.squeeze(-1)
    if not fmt.split:
        return QuantGrid(codes, step, zero, fmt.bits, fmt.group_size)
    rows = torch.tensor(fmt.high_rows, device=weight.device)
    high = weight_grid(weight.index_select(0, rows),
                       WeightFormat(fmt.high_bits, fmt.group_size, fmt.symmetric),
                       _rows(upper, rows), _rows(lower, rows), _rows(offset, rows))
    return QuantGrid(codes.index_copy(0, rows, high.codes), step.index_copy(0, rows, high.step),
                     zero.index_copy(0, rows, high.zero), fmt.bits, fmt.group_size,
                     fmt.row_bits(weight.shape[0]).to(weight.device))


def _rows(t: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.index_select(0, rows)


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size is None:
        return x.unsqueeze(-2)
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


@dataclass
class QuantGrid:
    """A weight on its integer grid: W = (codes - zero) * step, per row or per group; codes
    of a row with b bits lie in [0, 2^b - 1]."""

    codes: torch.Tensor  # [out, in], integers in [0, 2^bits - 1] (stored as float)
    step: torch.Tensor  # [out, n_groups]
    zero: torch.Tensor  # [out, n_groups]
    bits: int  # every row's bits, or the low bits of a channel split
    group_size: int | None
    row_bits: torch.Tensor | None = None  # a channel split: bits of every row [out]

    def dequantize(self) -> torch.Tensor:
        out, n_groups = self.step.shape
        codes = self.codes.reshape(out, n_groups, -1)
        return ((codes - self.zero[..., None]) * self.step[..., None]).reshape(self.codes.shape)
