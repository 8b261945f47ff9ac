"""Perplexity: the batched, chunked loop gives the numbers of one plain forward per window."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from sliderquant.eval.perplexity import context_limit, window_nlls


def _direct(model, windows):
    with torch.no_grad():
        return [F.cross_entropy(model(input_ids=row[None]).logits[0, :-1].float(),
                                row[1:]).item() for row in windows]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_chunked_nlls_equal_one_forward_per_window(family):
    model = tiny_model(family)
    windows = torch.randint(0, 96, (5, 200), generator=torch.Generator().manual_seed(0))
    direct = _direct(model, windows)
    for batch_tokens, chunk in ((400, 64), (200, 1024), (10_000, 7)):  # 2, 1, all windows
        nlls = window_nlls(model, windows, show_progress=False, batch_tokens=batch_tokens,
                           chunk=chunk)
        assert nlls == pytest.approx(direct, rel=1e-5, abs=1e-6)


def test_context_limit_is_positions_or_sliding_window():
    model = tiny_model()
    assert context_limit(model) == 256
    model.config.sliding_window, model.config.use_sliding_window = 128, True
    assert context_limit(model) == 128
    model.config.use_sliding_window = False
    assert context_limit(model) == 256
