"""Mixed precision under a bit budget: what a choice stores, and the best choice exactly.

Pure functions of numbers (no model, no torch). `storage_bits` counts what a quantized
weight takes on disk; `solve` picks one option per unit so that the predicted loss change
(one term per unit, plus terms between neighbouring units) is smallest while the storage
stays within the budget. The measurements behind the options are `sensitivity.py`'s.

What "average bits" counts (docs/MIXED.md): the storage bits of every quantized
projection weight — its codes, one 16-bit scale per row or group (the float16/bfloat16 the
exports store) and, for asymmetric grids, one zero point of the row's own bit-width per row
or group, plus, for a channel split, one bit per row saying which width it has — divided by
the number of those weights. Embeddings, norms and the output head (kept in float) are
outside it. A unit left in float (16 bits) costs 16 bits per weight and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCALE_BITS = 16  # one float16/bfloat16 step per row or group


def storage_bits(rows: int, cols: int, bits: int, group_size: int | None = None,
                 symmetric: bool = False, high_rows: int = 0,
                 high_bits: int | None = None) -> int:
    """Bits a weight [rows, cols] takes stored at `bits` (see the module docstring); with
    `high_rows` > 0, that many rows are at `high_bits` (a channel split)."""
    if bits >= 16:
        return rows * cols * 16
    per_row = 1 if group_size is None else cols // group_size

    def part(n: int, b: int) -> int:
        return n * cols * b + n * per_row * (SCALE_BITS + (0 if symmetric else b))

    if high_rows == 0:
        return part(rows, bits)
    return part(rows - high_rows, bits) + part(high_rows, high_bits) + rows


def budget_bits(avg_bits: float, weights: int) -> int:
    """The storage budget, in bits, of `weights` weights at `avg_bits` on average."""
    return math.floor(avg_bits * weights + 1e-9)


@dataclass(frozen=True)
class Option:
    """One choice for a unit: its storage (bits) and its predicted loss change."""

    cost: int
    loss: float


@dataclass(frozen=True)
class Solution:
    choices: tuple[int, ...]  # the option index of every unit
    cost: int  # total storage bits
    loss: float  # predicted loss change: unit terms + pair terms of the choices


class InfeasibleBudget(ValueError):
    """No choice of options fits the budget."""


def total_loss(options: Sequence[Sequence[Option]], choices: Sequence[int],
               pairs: Sequence[np.ndarray | None] | None = None) -> float:
    """The objective of `solve` for given choices."""
    loss = sum(options[i][c].loss for i, c in enumerate(choices))
    for i, pair in enumerate(pairs or []):
        if pair is not None:
            loss += float(pair[choices[i], choices[i + 1]])
    return loss


def solve(options: Sequence[Sequence[Option]], budget: int,
          pairs: Sequence[np.ndarray | None] | None = None) -> Solution:
    """Exactly minimise sum_i options[i][c_i].loss + sum_i pairs[i][c_i, c_{i+1}] subject to
    sum_i options[i][c_i].cost <= budget.

    `pairs[i]` (shape [len(options[i]), len(options[i + 1])], or None for zero) couples unit
    i with unit i + 1, so the units form a chain. Dynamic programming along the chain: for
    every unit and every option of it, the Pareto front of (storage so far, loss so far)
    over all choices of the units before, each point remembering how it was reached. A
    point dominated by a cheaper one that is no worse can never be part of a better
    solution, so dropping it keeps the result exact; a point that cannot be completed
    within the budget (even with the cheapest options for the rest) is dropped as well.
    Raises `InfeasibleBudget` when even the cheapest choices exceed the budget.
    """
    n = len(options)
    if n == 0:
        return Solution((), 0, 0.0)
    cheapest = [min(o.cost for o in opts) for opts in options]
    rest = np.cumsum([0, *cheapest[::-1]])[::-1]  # rest[i]: cheapest storage of units i..n-1
    if rest[0] > budget:
        raise InfeasibleBudget(f"the cheapest choice stores {rest[0]} bits, over the budget "
                               f"of {budget}")
    # fronts[i][c] = (cost, loss, previous option, index in its front), sorted by cost
    fronts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = []
    for i, opts in enumerate(options):
        limit = budget - rest[i + 1]
        layer = []
        for c, opt in enumerate(opts):
            if i == 0:
                cost, loss = np.array([opt.cost]), np.array([opt.loss])
                prev = index = np.array([-1])
            else:
                parts = []
                for p, (pc, pl, _, _) in enumerate(fronts[-1]):
                    coupling = 0.0 if pairs is None or pairs[i - 1] is None \
                        else float(pairs[i - 1][p, c])
                    parts.append((pc + opt.cost, pl + opt.loss + coupling,
                                  np.full(len(pc), p), np.arange(len(pc))))
                cost, loss, prev, index = (np.concatenate(a) for a in zip(*parts, strict=True))
            keep = cost <= limit
            cost, loss, prev, index = cost[keep], loss[keep], prev[keep], index[keep]
            layer.append(_pareto(cost, loss, prev, index))
        fronts.append(layer)
    best = min(((float(f[1][j]), int(f[0][j]), c, j) for c, f in enumerate(fronts[-1])
                for j in range(len(f[0]))), default=None)
    if best is None:  # cannot happen: the cheapest completion always survives
        raise InfeasibleBudget("no choice fits the budget")
    loss, cost, c, j = best
    choices = [c]
    for i in range(n - 1, 0, -1):
        _, _, prev, index = fronts[i][c]
        c, j = int(prev[j]), int(index[j])
        choices.append(c)
    return Solution(tuple(reversed(choices)), cost, loss)


def _pareto(cost: np.ndarray, loss: np.ndarray, prev: np.ndarray, index: np.ndarray):
    """The points no other point beats on both storage and loss (cheapest first)."""
    order = np.lexsort((loss, cost))
    cost, loss, prev, index = cost[order], loss[order], prev[order], index[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
    keep = loss < best_before
    return cost[keep], loss[keep], prev[keep], index[keep]
