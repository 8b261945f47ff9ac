"""Window schedules: which consecutive layers are optimised together, in which order.

Pure functions of integers (ALGORITHM.md §6). A schedule is a list of windows; a window
is a list of consecutive layer indices.
"""

from __future__ import annotations

import math

Window = list[int]


def fixed(num_layers: int, size: int = 2, stride: int = 1) -> list[Window]:
    """Fixed-size windows of `size` layers moved by `stride` (CBQ-style; size 1 = blockwise).

    The last window is cut at the final layer, as in the reference code.
    """
    _check(num_layers, size, stride)
    count = math.ceil(max(num_layers - size, 0) / stride) + 1
    windows = [list(range(r * stride, min(r * stride + size, num_layers))) for r in range(count)]
    return _dedupe(windows)


def build_schedule(
    num_layers: int, shallow: int = 4, deep: int = 4, size: int = 2, stride: int = 1
) -> list[Window]:
    """SliderQuant's schedule: PESW over `shallow` layers, FSSW(size, stride), PCSW over `deep`.

    Growing windows `[0]…[0..Ls-1]` anchored at layer 0, then `size`-layer windows moved by
    `stride` starting at layer `Ls - stride`, then shrinking windows `[L-Ld..L-1]…[L-1]`
    anchored at the last layer. With `Ls = Ld = 4, size = 2, stride = 1` this is exactly the
    reference code's schedule (`L + 1` windows).

    Small models: `shallow` and `deep` are clamped to `num_layers`, and a window identical to
    the one before it (e.g. `[0..3]` twice when L = 4) is dropped. With `Ls + Ld >= L` there
    are no intermediate windows; the deep windows then overlap the shallow ones.
    """
    _check(num_layers, size, stride)
    if shallow < 1 or deep < 1:
        raise ValueError(f"shallow and deep must be >= 1 (got {shallow}, {deep})")
    shallow, deep = min(shallow, num_layers), min(deep, num_layers)
    head = [list(range(0, k + 1)) for k in range(shallow)]
    tail = [list(range(num_layers - deep + k, num_layers)) for k in range(deep)]
    first = max(shallow - stride, 0)
    reserved_end = max(deep - stride, 0)
    count = math.ceil((num_layers - first - reserved_end - size) / stride) + 1
    mid = [
        list(range(first + r * stride, min(first + r * stride + size, num_layers)))
        for r in range(max(count, 0))
    ]
    return _dedupe(head + mid + tail)


def visit_counts(schedule: list[Window], num_layers: int) -> list[int]:
    """How many windows contain each layer."""
    counts = [0] * num_layers
    for window in schedule:
        for layer in window:
            counts[layer] += 1
    return counts


def check_coverage(schedule: list[Window], num_layers: int) -> None:
    """Raise if a layer is never optimised or windows move backwards (the engine needs both)."""
    missing = [i for i, c in enumerate(visit_counts(schedule, num_layers)) if c == 0]
    if missing:
        raise ValueError(
            f"layers {missing} are in no window; use a stride no larger than the window size"
        )
    starts = [w[0] for w in schedule]
    if starts != sorted(starts):
        raise ValueError("window starts must never decrease (the engine advances caches forward)")


def parse_schedule(text: str, num_layers: int) -> list[Window]:
    """Parse an explicit schedule like "0-0,0-1,1-2" (inclusive ranges, one per window)."""
    windows = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"bad window {part!r}: write inclusive ranges like 3-4") from None
        if not 0 <= lo <= hi < num_layers:
            raise ValueError(f"window {part!r} is outside layers 0..{num_layers - 1}")
        windows.append(list(range(lo, hi + 1)))
    check_coverage(windows, num_layers)
    return windows


def describe(schedule: list[Window], sliding: bool = True) -> list[dict]:
    """One row per window: index, layers, kind and slide to the next window.

    For a sliding schedule the leading windows anchored at layer 0 are PESW, the trailing
    windows anchored at the last layer are PCSW, the rest FSSW; otherwise every kind is "fixed".
    """
    last = max(w[-1] for w in schedule)
    n_head = next((i for i, w in enumerate(schedule) if w[0] != 0), len(schedule))
    n_tail = next((i for i, w in enumerate(reversed(schedule)) if w[-1] != last), len(schedule))
    rows = []
    for i, window in enumerate(schedule):
        if not sliding:
            kind = "fixed"
        elif i < n_head:
            kind = "PESW"
        elif i >= len(schedule) - n_tail:
            kind = "PCSW"
        else:
            kind = "FSSW"
        slide = schedule[i + 1][0] - window[0] if i + 1 < len(schedule) else None
        rows.append({"index": i, "layers": window, "kind": kind, "slide": slide})
    return rows


def _check(num_layers: int, size: int, stride: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 (got {num_layers})")
    if size < 1 or stride < 1:
        raise ValueError(f"window size and stride must be >= 1 (got {size}, {stride})")
    if stride > size:
        raise ValueError(
            f"stride {stride} > window size {size} would leave layers unquantized; "
            "use stride <= size"
        )


def _dedupe(windows: list[Window]) -> list[Window]:
    out: list[Window] = []
    for w in windows:
        if not out or out[-1] != w:
            out.append(w)
    return out
