"""Perplexity in the GPTQ/OmniQuant protocol (ALGORITHM.md §11.1).

WikiText-2 test: rows joined by "\\n\\n", tokenized once, cut into consecutive
non-overlapping `seqlen` windows. C4: `count` random `seqlen` crops of validation
documents with Python `random.seed(0)`. Per window: mean next-token cross-entropy over the
`seqlen - 1` shifted positions; PPL = exp(mean of the window means).

Windows run through the decoder `batch_tokens // seqlen` at a time under
`torch.inference_mode`; the output head and the cross-entropy then run over `chunk`
positions at a time, so the [batch, seqlen, vocab] logits are never held at once.
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
BATCH_TOKENS = 8192  # decoder tokens per forward pass: 4 windows of 2048
HEAD_CHUNK = 1024  # positions per output-head + cross-entropy chunk


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
            raise DataError(f"WikiText-2 test has {ids.numel()} tokens, fewer than "
                            f"--eval-seqlen {seqlen}")
        windows = ids[: n * seqlen].view(n, seqlen)
        return windows[:max_windows] if max_windows else windows
    if dataset == "c4":
        count = min(max_windows or C4_WINDOWS, C4_WINDOWS)
        return c4_eval_windows(tokenizer, c4_documents(data_root), seqlen, count)
    raise DataError(f"unknown perplexity dataset {dataset!r}; use one of {', '.join(DATASETS)}")


def check_data(datasets: tuple[str, ...], data_root: Path | None) -> None:
    """Read the evaluation sets now (they stay in memory), so that missing data is an error
    before a model is loaded."""
    for name in datasets:
        if name == "wikitext2":
            wikitext2_text("test", data_root)
        elif name == "c4":
            c4_documents(data_root)
        else:
            raise DataError(f"unknown perplexity dataset {name!r}; use one of "
                            f"{', '.join(DATASETS)}")


def context_limit(model) -> int:
    """The longest window `model` attends to in full: its position limit, or its sliding
    attention window when that is smaller and in use."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 2048
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)
    return limit


@torch.inference_mode()
def window_nlls(model, windows: torch.Tensor, desc: str = "ppl", show_progress: bool = True,
                device: torch.device | None = None,
                batch_tokens: int = BATCH_TOKENS, chunk: int = HEAD_CHUNK) -> list[float]:
    """Mean next-token negative log-likelihood of every window; `batch_tokens` decoder
    tokens per forward, `chunk` positions per output-head pass."""
    device = device or next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    batch = max(1, batch_tokens // windows.shape[1])
    nlls = []
    with tqdm(total=len(windows), desc=desc, unit="window", disable=not show_progress,
              dynamic_ncols=True) as bar:
        for lo in range(0, len(windows), batch):
            ids = windows[lo:lo + batch].to(device)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            for row in range(ids.shape[0]):
                nlls.append(_mean_nll(head, hidden[row, :-1], ids[row, 1:], chunk))
            bar.update(ids.shape[0])
    return nlls


def _mean_nll(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> float:
    """Mean cross-entropy of `targets` under `head(hidden)`, `chunk` positions at a time."""
    total = 0.0
    for lo in range(0, targets.numel(), chunk):
        logits = head(hidden[lo:lo + chunk]).float()
        total += F.cross_entropy(logits, targets[lo:lo + chunk], reduction="sum").item()
    return total / targets.numel()


def perplexity_from_nlls(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls))
