"""Every PNG sliderquant draws (matplotlib, Agg backend): plain dicts and lists in, files out.

`sensitivity` (the paper's Figure 1), `ranges` (Figures D–R: weight and activation ranges
before/after), `training` (per-window loss curves and the window schedule of a run),
`allocation` (a mixed-precision run's bits per projection, predicted vs measured loss).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # the backend is chosen first
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def sensitivity(result: dict, path: str | Path, title: str = "") -> Path:
    """Two panels, one line per method: (a) perplexity with only layer i quantized,
    (b) perplexity with the first l layers quantized; the FP perplexity dashed."""
    L = result["num_layers"]
    bits = f"W{result['wbits']}A{result['abits']}"
    has_prefix = any(s["prefix"] for s in result["scans"].values())
    fig, axes = plt.subplots(1, 2 if has_prefix else 1, figsize=(11 if has_prefix else 6, 4),
                             squeeze=False)
    panels = [("per_layer", "quantized layer i (all others FP)", "(a) one layer at a time")]
    if has_prefix:
        panels.append(("prefix", "number of quantized layers l (layers 0..l-1)",
                       "(b) the first l layers"))
    for ax, (key, xlabel, name) in zip(axes[0], panels, strict=False):
        for method, s in result["scans"].items():
            xs = range(L) if key == "per_layer" else range(1, L + 1)
            ax.plot(list(xs), s[key], marker="o", markersize=3, label=f"{method} {bits}")
        ax.axhline(result["fp_ppl"], color="gray", linestyle="--", linewidth=1,
                   label=f"FP {result['fp_ppl']:.2f}")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{result['dataset']} perplexity")
        ax.set_title(name)
        if max(max(s[key]) for s in result["scans"].values()) > 3 * result["fp_ppl"]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"layer sensitivity, {bits}, {result['windows']} x "
                 f"{result['seqlen']} tokens")
    return _save(fig, path)


def ranges(data: dict, path: str | Path, title: str) -> Path:
    """One row per projection, two columns: weight range per output channel and activation
    absmax per token at the projection's input, before (FP) and after (quantized run).

    `data`: {projection: {"weight": (before, after), "activation": (before, after)}}.
    """
    fig, axes = plt.subplots(len(data), 2, figsize=(11, 3.2 * len(data)), squeeze=False)
    for row, (name, d) in zip(axes, data.items(), strict=True):
        for ax, key, xlabel, ylabel in (
            (row[0], "weight", "output channel", "max - min of the row"),
            (row[1], "activation", "token", "absmax over channels"),
        ):
            before, after = d[key]
            ax.plot(before, linewidth=0.7, label=f"FP (mean {sum(before) / len(before):.3g})")
            ax.plot(after, linewidth=0.7, alpha=0.8,
                    label=f"quantized (mean {sum(after) / len(after):.3g})")
            ax.set_title(f"{name}_proj: {key} ranges")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def training(windows: list[dict], num_layers: int, path: str | Path, title: str) -> Path:
    """Left: every epoch's loss in training order (one segment per window, coloured by
    window index, starting from an open circle at the window's loss before training and
    ending at a square at its loss after training, where the record has them; dotted lines
    between intra-layer stages). Right: the schedule — one column per window, its layers
    filled with the loss it ended at."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    stages = sorted({w["stage"] for w in windows})
    count = max(w["window"] for w in windows) + 1
    cmap = plt.get_cmap("viridis")
    x, stage = 0, windows[0]["stage"]
    started = ended = False
    for w in windows:
        losses = w["epoch_losses"]
        if w["stage"] != stage:
            left.axvline(x + 0.5, color="gray", linestyle=":", linewidth=1)
            stage = w["stage"]
        colour = cmap(w["window"] / max(count - 1, 1))
        if w.get("initial_loss") and losses:
            left.plot([x + 0.5, x + 1], [w["initial_loss"], losses[0]], linewidth=0.8,
                      linestyle="--", color=colour)
            left.plot([x + 0.5], [w["initial_loss"]], marker="o", markersize=4,
                      markerfacecolor="none", color=colour,
                      label=None if started else "before training")
            started = True
        left.plot(range(x + 1, x + len(losses) + 1), losses, linewidth=1, marker=".",
                  color=colour)
        if w.get("final_loss") and losses:
            left.plot([x + len(losses) + 0.5], [w["final_loss"]], marker="s", markersize=3,
                      color=colour, label=None if ended else "after training")
            ended = True
        x += len(losses)
    if started or ended:
        left.legend(fontsize=8, loc="upper right")
    left.set_yscale("log")
    left.set_xlabel("epoch, in training order (window after window"
                    + (f"; {len(stages)} stages" if len(stages) > 1 else "") + ")")
    left.set_ylabel("window MSE loss")
    left.set_title("training loss (colour = window index)")
    left.grid(alpha=0.3)
    final = {w["window"]: w["epoch_losses"][-1] for w in windows
             if w["stage"] == stages[-1] and w["epoch_losses"]}
    positive = [v for v in final.values() if v > 0]
    norm = LogNorm(min(positive), max(positive)) if positive else None
    for w in windows:
        if w["stage"] != stages[-1] or w["window"] not in final:
            continue
        lo, hi = w["layers"][0], w["layers"][-1]
        right.bar(w["window"], hi - lo + 1, bottom=lo - 0.5, width=0.85,
                  color=plt.get_cmap("magma")(norm(final[w["window"]])) if norm else "gray")
    if norm:
        mappable = plt.cm.ScalarMappable(norm=norm, cmap="magma")
        fig.colorbar(mappable, ax=right, label="final loss of the window (last stage)")
    right.set_xlim(-0.7, count - 0.3)
    right.set_ylim(num_layers - 0.5, -0.5)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("window (training order)")
    right.set_ylabel("layer")
    right.set_title(f"window schedule: {count} windows over {num_layers} layers")
    right.grid(alpha=0.2)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def allocation(record: dict, path: str | Path, title: str) -> Path:
    """Left: the bits of every projection (rows: layers, columns: projections; a channel
    split shows its average bits per weight). Right: the calibration loss of the FP model,
    the allocation's prediction, the allocation rounded to nearest, and the finished model."""
    layers = sorted(record["bits"], key=int)
    names = list(record["bits"][layers[0]])
    grid = [[_mean_bits(record["bits"][i][n]) for n in names] for i in layers]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.18 * len(layers) + 3),
                                      gridspec_kw={"width_ratios": [1, 1]})
    image = left.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=left, label="bits (codes)")
    left.set_xticks(range(len(names)), names)
    left.set_yticks(range(len(layers)), layers)
    left.set_ylabel("layer")
    left.set_title(f"{record['unit']} units, {record['score']} scores: "
                   f"{record['avg_bits']:.3f} bits per weight (budget {record['avg_bits_budget']})")
    keys = [("FP", "fp_loss"), ("predicted", "predicted_loss"), ("rounded (RTN)", "rtn_loss"),
            ("finished", "final_loss")]
    shown = [(label, record[k]) for label, k in keys if k in record]
    right.bar([label for label, _ in shown], [v for _, v in shown],
              color=["gray", "tab:blue", "tab:orange", "tab:green"][:len(shown)])
    for x, (_, v) in enumerate(shown):
        right.annotate(f"{v:.3f}", (x, v), ha="center", va="bottom")
    right.set_ylabel(f"mean next-token loss, {record['windows']} calibration windows")
    right.set_title("predicted vs measured loss")
    right.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _mean_bits(described: int | str) -> float:
    """Bits of a projection as the record describes it: 3, or "2+3 (31 rows)" (the mean
    bits of its rows need the row count, which the record gives only for the high rows)."""
    if isinstance(described, int):
        return float(described)
    low, high = (int(b) for b in described.split(" ")[0].split("+"))
    return low + 0.5 * (high - low)  # a split: drawn between its two widths
