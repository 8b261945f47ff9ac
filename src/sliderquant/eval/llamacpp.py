"""Perplexity of a GGUF file inside llama.cpp, on the same token windows as our evaluator.

Needs the optional `llama-cpp-python` package (extra `deploy`). The windows are fed as
token ids, so tokenization cannot differ; the per-window cross-entropy is computed from
llama.cpp's logits exactly as `perplexity.window_nlls` computes it from ours.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class LlamaCppMissingError(ImportError):
    """llama-cpp-python is not installed."""


def open_gguf(path: str | os.PathLike, n_ctx: int, n_threads: int | None = None,
              logits_all: bool = True):
    """A llama.cpp model (llama_cpp.Llama) on the CPU for `path`."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppMissingError(
            "llama-cpp-python is not installed: pip install -e '.[deploy]' (it compiles "
            "llama.cpp, which takes a while)") from e
    return llama_cpp.Llama(model_path=str(Path(path)), n_ctx=n_ctx, n_batch=n_ctx,
                           logits_all=logits_all, n_threads=n_threads or os.cpu_count(),
                           n_gpu_layers=0, verbose=False)


def llamacpp_window_nlls(path: str | os.PathLike, windows: torch.Tensor,
                         n_threads: int | None = None, show_progress: bool = True
                         ) -> list[float]:
    """Mean next-token negative log-likelihood of every window [n, seqlen], in llama.cpp."""
    llm = open_gguf(path, windows.shape[1], n_threads)
    try:
        nlls = []
        for row in tqdm(windows, desc="llama.cpp", unit="window", disable=not show_progress,
                        dynamic_ncols=True):
            ids = row.tolist()
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
            nlls.append(F.cross_entropy(logits[:-1], row[1:]).item())
        return nlls
    finally:
        llm.close()
