"""Perplexity in the GPTQ/OmniQuant protocol (ALGORITHM.md §11.1).

WikiText-2 test: rows joined by "\\n\\n", tokenized once, cut into consecutive
non-overlapping `seqlen` windows. C4: `count` random `seqlen` crops of validation
documents with Python `random.seed(0)`. Per window: mean next-token cross-entropy over the
`seqlen - 1` shifted positions; PPL = exp(mean of the window means).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sliderquant.data import (
    DataError,
    c4_documents,
    c4_eval_windows,
    tokenize_stream,
    wikitext2_text,
)

DATASETS = ("wikitext2", "c4")
C4_WINDOWS = 256


def eval_windows(
    dataset: str,
    tokenizer,
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_root: Path | None = None,
) -> torch.Tensor:
    """Token windows [n, seqlen] of an evaluation set; the first `max_windows` if given."""
    if dataset == "wikitext2":
        ids = tokenize_stream(tokenizer, wikitext2_text("test", data_root))
        n = ids.numel() // seqlen
        if n == 0:
            raise DataError(f"WikiText-2 test has {ids.numel()} tokens, fewer than seqlen "
                            f"{seqlen}")
        windows = ids[: n * seqlen].view(n, seqlen)
        return windows[:max_windows] if max_windows else windows
    if dataset == "c4":
        count = min(max_windows or C4_WINDOWS, C4_WINDOWS)
        return c4_eval_windows(tokenizer, c4_documents(data_root), seqlen, count)
    raise DataError(f"unknown perplexity dataset {dataset!r}; use one of {', '.join(DATASETS)}")


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, desc: str = "ppl", show_progress: bool = True,
                device: torch.device | None = None) -> list[float]:
    """Mean next-token negative log-likelihood of every window."""
    device = device or next(model.parameters()).device
    nlls = []
    for row in tqdm(windows, desc=desc, unit="window", disable=not show_progress,
                    dynamic_ncols=True):
        ids = row.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        nlls.append(nll.item())
    return nlls


def perplexity_from_nlls(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))
