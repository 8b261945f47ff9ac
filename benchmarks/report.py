"""Assemble docs/RESULTS.md from the generated tables in docs/results/, and draw the
perplexity-versus-quantization-time figure (paper Fig. B style).

    python benchmarks/report.py

Every `<!-- table: NAME -->` … `<!-- end: NAME -->` region of docs/RESULTS.md is replaced
by docs/results/NAME.md; the text around the regions (the discussion) is kept as written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from store import read_results

from sliderquant.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
DOC = REPO / "docs" / "RESULTS.md"
FIGURE = REPO / "docs" / "figures" / "ppl_vs_time.png"
REGION = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n).*?(<!-- end: (?P=name) -->)", re.S)


def fill_tables(text: str) -> str:
    def replace(match: re.Match) -> str:
        table = RESULTS / f"{match['name']}.md"
        body = table.read_text() if table.is_file() else "_not measured yet_\n"
        return f"{match.group(1)}{body}{match.group(3)}"

    return REGION.sub(replace, text)


def plot_ppl_vs_time() -> Path | None:
    """WikiText-2 perplexity against quantization wall time, one marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = {name: read_results(RESULTS / f"{name}.json")
              for name in ("main", "budget", "peers")}
    results = suites["main"]
    if not results:
        return None
    points: dict[str, list[tuple[float, float, str]]] = {}
    # Cell keys are "SETTING/METHOD" in every suite plotted ("W4A16 g64/hqq").
    for cells in suites.values():
        for key, r in cells.items():
            if not key.startswith("_") and isinstance(r, dict) and "ppl" in r \
                    and r.get("quantize_s"):
                setting, _, method = key.rpartition("/")
                points.setdefault(method, []).append(
                    (r["quantize_s"], r["ppl"]["wikitext2"], setting))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, pts in sorted(points.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method, s=36)
        for t, ppl, setting in pts:
            ax.annotate(setting, (t, ppl), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    fp = next((r["fp_ppl"]["wikitext2"] for k, r in results.items()
               if not k.startswith("_") and r.get("fp_ppl")), None)
    if fp:
        ax.axhline(fp, color="grey", linestyle="--", linewidth=1, label=f"FP ({fp:.1f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("quantization wall time (s, log)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity vs quantization time (2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=130)
    plt.close(fig)
    return FIGURE


def main() -> int:
    write_text(DOC, fill_tables(DOC.read_text()))
    figure = plot_ppl_vs_time()
    print(f"updated {DOC}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
