"""Fake quantization with a hand-written backward: the same values and the same gradients as
`quantizer.fake_quantize` (asymmetric grids), at a fraction of autograd's cost.

Autograd records about fifteen elementwise operations per call (min/max statistics,
clipping, step, straight-through rounding, clamp, dequantization) and replays their
backward, including the search for the min/max entries. Here the forward takes the codes
from `quantizer.quantize_codes` (the one path to codes) without a graph, saves the codes and
the in-range mask, and the backward applies the chain rule in closed form:

- an entry inside the grid passes its gradient straight through (the STE), an entry
  clamped at 0 or 2^b - 1 passes none; a rounding offset receives `step` times the same;
- the step receives sum(g * (codes - zero - mask * x / step)) over its row/group (zero if
  the step was clamped), which flows to the row/group max and min, through the clipping
  sigmoid when there is one, and from there to the entries equal to the max/min, split
  evenly between ties, as `amax`/`amin` do; the zero point carries no gradient;
- with `rate < 0.99` the entries past `ceil(rate * D)` pass through unchanged.

`tests/test_fused.py` compares values and gradients with the autograd path.
"""

from __future__ import annotations

import math

import torch

from sliderquant.quant.quantizer import (
    FULL_RATE,
    STEP_MAX,
    STEP_MIN,
    _grouped,
    fake_quantize,
    quantize_codes,
)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper, lower, offset, bits: int, group_size: int | None, keep: int):
        with torch.no_grad():
            codes, step, zero = quantize_codes(x, bits, group_size, upper, lower, False, offset)
            out = ((codes - zero) * step).reshape(x.shape)
            if keep < x.shape[-1]:
                out = torch.cat([out[..., :keep], x[..., keep:]], dim=-1)
            # entries whose unclamped code is on the grid (clamp passes gradients at the
            # bounds too); only an entry with code 0 or 2^b - 1 can lie outside
            scaled = _grouped(x, group_size) / step
            if offset is not None:
                scaled = scaled + _grouped(offset, group_size)
            pre = scaled.round() + zero
            inside = (pre >= 0) & (pre <= 2**bits - 1)
        ctx.bits, ctx.group_size, ctx.keep = bits, group_size, keep
        ctx.save_for_backward(x, upper, lower, codes, step, zero, inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, upper, lower, codes, step, zero, inside = ctx.saved_tensors
        bits, group_size, keep = ctx.bits, ctx.group_size, ctx.keep
        levels = 2**bits - 1
        g = grad
        if keep < x.shape[-1]:
            g = torch.cat([grad[..., :keep], torch.zeros_like(grad[..., keep:])], dim=-1)
        gq = _grouped(g, group_size)
        xg = _grouped(x, group_size)
        mask = inside.to(gq.dtype)
        direct = gq * mask
        d_step = (gq * (codes - zero - mask * xg / step)).sum(-1, keepdim=True)
        hi0 = xg.amax(-1, keepdim=True)
        lo0 = xg.amin(-1, keepdim=True)
        if upper is not None:
            su = torch.sigmoid(upper).unsqueeze(-1)
            sl = torch.sigmoid(lower).unsqueeze(-1)
            hi, lo = su * hi0, sl * lo0
        else:
            hi, lo = hi0, lo0
        raw = (hi - lo) / levels
        d_step = d_step * ((raw >= STEP_MIN) & (raw <= STEP_MAX)).to(d_step.dtype)
        d_hi, d_lo = d_step / levels, -d_step / levels
        d_upper = d_lower = None
        if upper is not None:
            if ctx.needs_input_grad[1]:
                d_upper = (d_hi * hi0 * su * (1 - su)).squeeze(-1)
            if ctx.needs_input_grad[2]:
                d_lower = (d_lo * lo0 * sl * (1 - sl)).squeeze(-1)
            d_hi, d_lo = d_hi * su, d_lo * sl
        at_hi = (xg == hi0).to(gq.dtype)
        at_lo = (xg == lo0).to(gq.dtype)
        d_x = direct + at_hi * (d_hi / at_hi.sum(-1, keepdim=True)) \
            + at_lo * (d_lo / at_lo.sum(-1, keepdim=True))
        d_x = d_x.reshape(x.shape)
        if keep < x.shape[-1]:
            d_x = d_x + torch.cat([torch.zeros_like(grad[..., :keep]), grad[..., keep:]], dim=-1)
        d_offset = None
        if ctx.needs_input_grad[3]:
            d_offset = (direct * step).reshape(x.shape)
        return d_x, d_upper, d_lower, d_offset, None, None, None


def fake_quantize_fast(
    x: torch.Tensor,
    bits: int,
    rate: float = 1.0,
    group_size: int | None = None,
    upper: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    symmetric: bool = False,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """`quantizer.fake_quantize` with the hand-written backward (same arguments, same
    values, same gradients). Symmetric grids take the autograd path."""
    if bits >= 16:
        return x
    if symmetric:
        return fake_quantize(x, bits, rate, group_size, upper, lower, symmetric, offset)
    keep = math.ceil(rate * x.shape[-1]) if rate < FULL_RATE else x.shape[-1]
    return _FakeQuantize.apply(x, upper, lower, offset, bits, group_size, keep)
