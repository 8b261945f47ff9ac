"""Uniform fake quantizer (ALGORITHM.md §5.1) as pure functions.

One (step, zero-point) per row of the last axis, or per group of `group_size` entries of
it; optional clipping logits that shrink the range; partial ("sliding") quantization of
the first `ceil(rate * D)` entries with statistics from the whole row.

`quant_params` and `_codes` are the one path from a tensor to its integer codes: training
reaches it through `fake_quantize` (straight-through rounding, so gradients flow) and
folding through `quantize_codes` / `weight_grid` (the same codes, kept as a `QuantGrid`),
so the two cannot disagree. An optional per-entry rounding `offset` (learned rounding,
quant/learnables.py `Rounding`) is added to `x / step` before rounding on both paths: the
codes stay on the same grid.

Training calls the quantizer for every weight and activation in every step, so its two
full-size parts are autograd Functions with hand-written backwards (`_GroupRange`: the
min/max statistics, `_RoundTrip`: round, clamp, dequantize). They evaluate the derivative
formulas autograd uses for the plain graph (straight-through rounding `t + (round(t) -
t).detach()`, clamp, amax/amin), in the same order and memory layouts, so values and
gradients are bit-identical to it (tests/test_fake_quant.py keeps that graph as the
reference); what they drop is cost: masks are float arithmetic instead of boolean tensors
(slow on CPU), temporaries are reused in place, the min/max gradients are added into the
round trip's gradient instead of a tensor of their own, and nothing is saved under
`no_grad`. The small per-row/group arithmetic (clipping, step, zero point) stays on
autograd.
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
    hi, lo = _GroupRange.apply(_grouped(x, group_size), _PendingGrad())
    return _params_of_range(hi, lo, bits, upper, lower, symmetric)


def _params_of_range(hi, lo, bits, upper, lower, symmetric):
    """`quant_params` from the max/min of every row or group."""
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
    """(codes, step, zero) of `x`: codes in [0, 2^b - 1] (float; for folding, no gradient:
    training differentiates `fake_quantize`) shaped `[..., n_groups, group]`, step and zero
    `[..., n_groups, 1]`.

    `offset` (shaped like `x`, in [-0.5, 0.5]) is added to `x / step` before rounding, so
    an entry rounds up or down by choice instead of to the nearest level."""
    step, zero = quant_params(x, bits, group_size, upper, lower, symmetric)
    offset = None if offset is None else _grouped(offset, group_size)
    with torch.no_grad():
        _, codes = _codes(_grouped(x, group_size), step, zero, offset, 2**bits - 1)
    return codes, step, zero


def _codes(x, step, zero, offset, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(round(x / step + offset) + zero, the same clamped to [0, levels]) of grouped `x`."""
    t = x / step
    if offset is not None:
        t = _into(t, offset, torch.add)
    t = _into(t.round_(), zero, torch.add)
    return t, t.clamp(0, levels)


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
    pending = _PendingGrad()
    hi, lo = _GroupRange.apply(_grouped(x, group_size), pending)
    step, zero = _params_of_range(hi, lo, bits, upper, lower, symmetric)
    grouped_offset = None if offset is None else _grouped(offset, group_size)
    out = _RoundTrip.apply(_grouped(x, group_size), step, zero, grouped_offset, 2**bits - 1,
                           torch.is_grad_enabled(), pending).reshape(x.shape)
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


class _PendingGrad:
    """The gradient `_RoundTrip` computed for x, handed to `_GroupRange` (whose backward runs
    after it) so that the min/max gradients are added into it in place: autograd would
    materialise them as a second dense tensor and then add the two."""

    grad: torch.Tensor | None = None
    scratch: torch.Tensor | None = None  # a free temporary of x's shape, if there is one


class _GroupRange(torch.autograd.Function):
    """(amax, amin) over the last axis, keepdim. Backward: autograd's `amax`/`amin`
    backward, (grad / count) * (x == extreme), the two summed and added to the round trip's
    gradient of x; the equality masks come from float arithmetic (`1 - sign(max - x)` is 1
    at a maximum, 0 elsewhere)."""

    @staticmethod
    def forward(ctx, x, pending: _PendingGrad):
        hi, lo = x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True)
        ctx.pending = pending
        ctx.save_for_backward(x, hi, lo)
        return hi, lo

    @staticmethod
    def backward(ctx, d_hi, d_lo):
        x, hi, lo = ctx.saved_tensors
        grad, scratch = ctx.pending.grad, ctx.pending.scratch
        ctx.pending.grad = ctx.pending.scratch = None
        if grad is None:
            grad = torch.zeros_like(x)
        # the masks' layout does not matter: counts are exact, products with 0/1 too
        at = hi - x if scratch is None else torch.sub(hi, x, out=scratch)
        at = at.sign_().neg_().add_(1)
        count = at.sum(dim=-1, keepdim=True)
        # a constant row is all maxima and all minima: autograd adds both shares there
        # before the round trip's gradient, so they are added together here too
        constant = hi == lo
        grad.addcmul_(at, torch.where(constant, d_hi / count + d_lo / count, d_hi / count))
        at = torch.sub(lo, x, out=at).sign_().add_(1)
        d_lo = torch.where(constant, 0.0, d_lo / at.sum(dim=-1, keepdim=True))
        return grad.addcmul_(at, d_lo), None


class _RoundTrip(torch.autograd.Function):
    """`(clamp(round(x / step + offset) + zero, 0, levels) - zero) * step` on grouped
    tensors (step, zero: [..., 1]; zero carries no gradient), with autograd's gradients of
    that graph under straight-through rounding:
    d/dstep = sum(g * (codes - zero)) - sum(g' * (x / step) / step) and d/dx = g' / step,
    d/doffset = g', where g' = g * step inside the clamp range and 0 outside it."""

    @staticmethod
    def forward(ctx, x, step, zero, offset, levels: int, saves: bool, pending: _PendingGrad):
        t, codes = _codes(x, step, zero, offset, levels)
        centred = codes.sub_(zero)  # t's dtype already is zero's promotion
        if not saves:
            return _into(centred, step, torch.mul)
        ctx.levels, ctx.pending = levels, pending
        ctx.save_for_backward(x, step, t, centred)
        return centred * step

    @staticmethod
    def backward(ctx, grad):
        # Saved tensors are reused as buffers: a second backward through the same graph
        # fails autograd's version check instead of reading them.
        x, step, t, centred = ctx.saved_tensors
        needs_x, needs_step, _, needs_offset, _, _, _ = ctx.needs_input_grad
        # clamp's gradient mask: t is an integer, so "0 <= t <= levels" is the open
        # interval (-0.5, levels + 0.5) of hardtanh's backward. Masking before or after
        # the product with the step gives the same values; written into t, whose layout is
        # the one autograd's `where` gives (so the sums downstream add in the same order).
        g = torch.ops.aten.hardtanh_backward.grad_input(grad, t, -0.5, ctx.levels + 0.5,
                                                        grad_input=t)
        g = _into(g, step, torch.mul)
        d_step = None
        if needs_step:
            # sum(grad * (codes - zero)); written into `centred` only where that keeps the
            # layout of autograd's product, which sets the order of the sum
            same = centred.stride() == grad.stride()
            product = _into(centred, grad, torch.mul) if same else grad * centred
            d_step = product.sum(dim=-1, keepdim=True)
            # - sum(g * (x / step) / step), reusing the product's memory
            ratio = (torch.div(x, step, out=product)
                     if product.dtype == torch.result_type(x, step) else x / step)
            reverse = _into(_into(ratio, step, torch.div), g, torch.mul)
            d_step = d_step + reverse.sum(dim=-1, keepdim=True).neg_()
            if reverse.dtype == x.dtype:
                ctx.pending.scratch = reverse
        d_offset = g if needs_offset else None
        if needs_x:  # x's gradient continues in _GroupRange's backward, in x's dtype as
            # autograd would hand it over
            d_x = g / step if needs_offset else _into(g, step, torch.div)
            ctx.pending.grad = d_x.to(x.dtype)
        return None, d_step, None, d_offset, None, None, None


def _into(a: torch.Tensor, b: torch.Tensor, op) -> torch.Tensor:
    """`op(a, b)`, written into the temporary `a` where that gives the same dtype."""
    if a.dtype == torch.result_type(a, b):
        return op(a, b, out=a)
    return op(a, b)


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
