"""Quantize a span of a model's layers: build the quantized views, capture the span's input,
train it window by window, fold it into the model. Shared by the quantize pipeline (the
span is every layer) and the sensitivity scans (one layer, or a prefix).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sliderquant.checkpoint import CheckpointStore
from sliderquant.config import QuantConfig
from sliderquant.distributed import Collective
from sliderquant.engine import Engine, WindowRecord
from sliderquant.expert_coverage import ExpertCoverage, count_expert_tokens
from sliderquant.fold import fold_layers
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import QuantDecoderLayer
from sliderquant.quant.learnables import LayerQuantSpec
from sliderquant.quant.quantizer import WeightFormat


def quantize_span(
    adapter: DecoderAdapter,
    config: QuantConfig,
    ids: torch.Tensor,
    device: torch.device,
    first: int = 0,
    last: int | None = None,
    *,
    store: CheckpointStore | None = None,
    fingerprint: str = "",
    resume: bool = False,
    on_unit_end: Callable[[WindowRecord], None] | None = None,
    show_progress: bool = True,
    timings: dict[str, float] | None = None,
    formats: dict[int, dict[str, WeightFormat]] | None = None,
    memory: dict[str, int] | None = None,
    coverage: list[ExpertCoverage] | None = None,
    collective: Collective | None = None,
) -> tuple[list[WindowRecord], dict[str, torch.Tensor]]:
    """Quantize layers `first`..`last` (inclusive; default all) of `adapter.model` in place
    with `config`, training on the calibration windows `ids` [n, T] (ignored by methods that
    train nothing); layers before `first` stay FP and only carry the windows to the span.

    Returns the window records and the grids (see `fold.fold_layers`). `timings` receives
    `capture_s`, `train_s` (trained methods), `search_s` (a searched start without
    training; trained methods search inside the engine) and `fold_s`; `memory` receives
    `peak_cache_bytes`, the most bytes this process's activation caches held at once;
    `coverage` receives, for a trained method on a model with MoE layers, the calibration
    tokens routed to each expert (summed over the ranks). The LoRA initialisation draws from
    one generator seeded with `config.seed`, layer by layer from layer 0, so a layer's start
    does not depend on the span. `formats` gives projections their own weight format (by
    layer, then projection name: a mixed-precision allocation).

    With a `collective` of several ranks (see engine.py), each rank embeds and trains on its
    shard of `ids` only; every rank returns the same records and folds the same weights.
    """
    last = adapter.num_layers - 1 if last is None else last
    timings = {} if timings is None else timings
    collective = collective or Collective()
    formats = formats or {}
    generator = torch.Generator().manual_seed(config.seed)
    views = [QuantDecoderLayer(adapter.parts(i),
                               LayerQuantSpec.from_config(config, formats.get(i)), generator)
             for i in range(last + 1)]
    for p in adapter.model.parameters():
        p.requires_grad_(False)

    records: list[WindowRecord] = []
    if config.trains:
        t = time.perf_counter()
        shard = collective.shard(len(ids))
        x = embed(adapter, ids[shard.start:shard.stop], config.inference_batch_size)
        rope = adapter.rotary(x.new_zeros(1, 1, x.shape[-1]).to(device), ids.shape[1])
        x = _through_fp_layers(views[:first], x, rope, device)
        if coverage is not None and any(v.moe() is not None for v in views[first:]):
            mine = count_expert_tokens(views[first:], x, rope, device,
                                       config.inference_batch_size, first)
            coverage.append(ExpertCoverage(_summed(collective.gather(mine.tokens))))
        timings["capture_s"] = time.perf_counter() - t
        t = time.perf_counter()
        engine = Engine(views[first:], rope, config, device, store, fingerprint, on_unit_end,
                        show_progress, collective)
        records = engine.run(x, resume=resume, shard=shard)
        timings["train_s"] = time.perf_counter() - t
        if memory is not None:
            memory["peak_cache_bytes"] = engine.peak_cache_bytes
        del x
    elif config.search_start:
        t = time.perf_counter()
        x = embed(adapter, ids, config.inference_batch_size)
        rope = adapter.rotary(x[:1].to(device), ids.shape[1])
        x = _through_fp_layers(views[:first], x, rope, device)
        _searched_start(views[first:], x, rope, device)
        timings["search_s"] = time.perf_counter() - t
        del x

    t = time.perf_counter()
    grids = fold_layers(adapter, views[first:], first)
    timings["fold_s"] = time.perf_counter() - t
    return records, grids


def embed(adapter: DecoderAdapter, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Embedding output for every calibration window (computed where the embedding lives),
    float32 on the host; [0, T, d] for no windows."""
    home = adapter.embed.weight.device
    with torch.no_grad():
        parts = [adapter.embed(ids[i:i + chunk].to(home)).float().cpu()
                 for i in range(0, ids.shape[0], chunk)]
    if not parts:
        return torch.zeros(0, ids.shape[1], adapter.embed.weight.shape[1])
    return torch.cat(parts)


@torch.no_grad()
def _through_fp_layers(views: list[QuantDecoderLayer], x: torch.Tensor,
                       rope: tuple[torch.Tensor, torch.Tensor], device: torch.device
                       ) -> torch.Tensor:
    """`x` (host) through `views` in full precision, one window at a time, on `device`."""
    if not views or not len(x):
        return x
    cos, sin = rope
    rows = []
    for j in range(len(x)):
        h = x[j:j + 1].to(device)
        for view in views:
            h = view(h, cos, sin)
        rows.append(h.cpu())
    return torch.cat(rows)


@torch.no_grad()
def _searched_start(views: list[QuantDecoderLayer], x: torch.Tensor,
                    rope: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> None:
    """Searched clipping start of every view from its full-precision inputs (`x` enters the
    first view), one layer at a time: observe a layer, carry `x` through it, search."""
    for view in views:
        view.observe()
        x = _through_fp_layers([view], x, rope, device)
        view.search_start()


def _summed(per_rank: list[dict[int, list[int]]]) -> dict[int, list[int]]:
    """Token counts per layer and expert, added up over the ranks."""
    return {layer: [sum(c) for c in zip(*(r[layer] for r in per_rank), strict=True)]
            for layer in per_rank[0]}
