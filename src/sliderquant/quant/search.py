"""Searched start: per row/group clipping that minimises the activation-weighted weight error.

Pure solver functions. For a weight `W` [out, in] and the second moments of its inputs
`d_j = E[x_j^2]`, the output error of a quantized weight Q on inputs with uncorrelated
channels is sum_j d_j (W_ij - Q_ij)^2 per row: the weighted error of AWQ's and auto-round's
imatrix searches. Candidates are quantized through the package's own quantizer
(`fake_quantize` with clipping logits), so the grid searched is the grid trained and folded.
No clipping (factor 1) is a candidate, so the result never has a larger error than min/max.
"""

from __future__ import annotations

import torch

from sliderquant.quant.quantizer import fake_quantize

SHARED_FACTORS = tuple(1.0 - 0.02 * i for i in range(36))  # 1.00 … 0.30, both ends together
REFINE = tuple(0.01 * i for i in range(-5, 6))  # then each end alone, ±0.05 around it


def weighted_error(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    upper: torch.Tensor,
    lower: torch.Tensor,
    importance: torch.Tensor | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """Per row/group [out, n_groups] weighted squared error of `weight` quantized with
    clipping *factors* `upper`/`lower` in (0, 1] (not logits); unweighted if `importance`
    is None."""
    w = weight.float()
    q = fake_quantize(w, bits, 1.0, group_size, torch.logit(upper.float()),
                      torch.logit(lower.float()), symmetric)
    err = (q - w) ** 2
    if importance is not None:
        err = err * importance.float().clamp_min(0)
    n_groups = upper.shape[-1]
    return err.reshape(*w.shape[:-1], n_groups, -1).sum(-1)


@torch.no_grad()
def search_clipping(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    importance: torch.Tensor | None = None,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipping factors (upper, lower) in (0, 1], shaped [out, n_groups], minimising the
    weighted error of every row/group: a shared factor for both ends first (1.00 … 0.30),
    then each end alone within ±0.05 of it."""
    out, n_in = weight.shape
    n_groups = 1 if group_size is None else n_in // group_size
    ones = torch.ones(out, n_groups, device=weight.device)

    def error(up: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return weighted_error(weight, bits, group_size, up, low, importance, symmetric)

    best = error(ones, ones)
    up = ones.clone()
    for a in SHARED_FACTORS[1:]:
        cand = ones * a
        err = error(cand, cand)
        better = err < best
        best = torch.where(better, err, best)
        up = torch.where(better, cand, up)
    low = up.clone()
    for side in ("lower", "upper"):
        base = low if side == "lower" else up
        choice = base.clone()
        for delta in REFINE:
            cand = (base + delta).clamp(0.05, 1.0)
            err = error(up, cand) if side == "lower" else error(cand, low)
            better = err < best
            best = torch.where(better, err, best)
            choice = torch.where(better, cand, choice)
        if side == "lower":
            low = choice
        else:
            up = choice
    return up, low
