"""The quantize pipeline, independent of how the model was loaded and where results go:
preflight -> calibration ids -> (rotation) -> (auto schedule) -> (mixed-precision
allocation) -> quantize every layer
(span.py: views, capture, windows, fold) -> run-time activation quantizers -> report.

Run folders (lock, checkpoint location, saving, the run record on disk) belong to
runfolder.py; the pipeline only receives the checkpoint store to use.

Inside an initialised `torch.distributed` process group every rank runs this pipeline on
its own copy of the model; the calibration windows are sharded over the ranks (see
engine.py), the store is opened and the auto schedule resolved by rank 0 alone, and every
rank returns the same folded model.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from sliderquant.calibration import calibration_ids
from sliderquant.checkpoint import CheckpointStore
from sliderquant.config import AUTO_SCHEDULE, ConfigError, QuantConfig
from sliderquant.data import resolve_data_root
from sliderquant.distributed import Collective
from sliderquant.engine import WindowRecord, make_schedule
from sliderquant.expert_coverage import ExpertCoverage
from sliderquant.fold import install_activation_quantization
from sliderquant.hardware import default_device, peak_rss_mb
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.rotation import rotate_model
from sliderquant.sensitivity import (
    allocate,
    calibration_loss,
    check_budget,
    resolve_auto_schedule,
)
from sliderquant.span import quantize_span
from sliderquant.version import __version__

RUN_FORMAT = 1  # version of the run record's layout


@dataclass
class QuantizeResult:
    model: torch.nn.Module
    report: dict = field(default_factory=dict)
    grids: dict[str, torch.Tensor] = field(default_factory=dict)  # see fold.fold_layers


def preflight(model: torch.nn.Module, config: QuantConfig) -> DecoderAdapter:
    """Check that `config` fits `model` before any expensive work; return its adapter."""
    config.validate()
    adapter = DecoderAdapter(model)
    if config.trains:  # round-to-nearest reads no calibration windows
        adapter.check_context(config.seqlen)
    adapter.check_group_size(config.group_size)
    if config.allocates:
        check_budget(model, config)
    if config.trains and config.schedule != AUTO_SCHEDULE:
        try:
            make_schedule(config, adapter.num_layers)
        except ValueError as e:
            raise ConfigError(f"schedule for this {adapter.num_layers}-layer model: {e}"
                              ) from None
    return adapter


def _progress_bar(show: bool) -> Callable[[str, int, int], None] | None:
    """A progress callback drawing one tqdm bar (None when progress is not shown)."""
    if not show:
        return None
    bar = None

    def update(what: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=what, unit="scan", dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def family_report(adapter: DecoderAdapter, config: QuantConfig) -> dict:
    """The model's family and the channel scalings this run asked for that the family drops
    (not equivalent transformations there), each with the reason. The run goes on without
    them: `qk_scaling` is on by default, so a refusal would stop every default W4A4 run."""
    asked = set()
    if config.channel_scaling:
        asked = {"qkv", "out", "fc1"} | ({"qkt"} if config.qk_scaling else set()) | \
            ({"fc2"} if config.down_scaling else set())
    family = adapter.family
    return {"name": family.name,
            "moe_layers": sum(adapter.is_moe(i) for i in range(adapter.num_layers)),
            "dropped_scalings": {name: why for name, why in family.dropped_scalings
                                 if name in asked}}


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's shape and a few weight sums (path-independent)."""
    adapter = DecoderAdapter(model)
    h = hashlib.sha256()
    c = model.config
    h.update(f"{c.model_type}/{adapter.num_layers}/{c.hidden_size}/{c.vocab_size}".encode())
    tensors = [adapter.embed.weight] + [adapter.linears(i)["q"].weight
                                        for i in range(adapter.num_layers)]
    for t in tensors:
        h.update(f"{t.double().sum().item():.10e}/{t.double().abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def quantize(
    model: torch.nn.Module,
    tokenizer,
    config: QuantConfig,
    calib: str | torch.Tensor | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    open_store: Callable[[], CheckpointStore | None] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    on_unit_end: Callable[[WindowRecord], None] | None = None,
) -> QuantizeResult:
    """Quantize `model` in place with `config`; return the folded model and its report.

    `calib`: a calibration source name (overrides `config.calib`) or token ids [n, seqlen].
    `open_store` is called (by rank 0 alone) once the inputs are checked and before any
    expensive work; the store it returns receives a checkpoint after every window (`resume`
    continues from it). See `api.quantize` for the rest.
    """
    comm = Collective()
    timings: dict[str, float] = {}
    began, began_cpu = time.perf_counter(), time.process_time()
    if isinstance(calib, str):
        config = QuantConfig.from_dict({**config.to_dict(), "calib": calib})
    adapter = preflight(model, config)
    device = torch.device(device or default_device())
    if device.type == "cuda":
        # the allocator has no statistics before CUDA is initialised ("Invalid device argument")
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)  # the report's peak is quantization's own
    data_root = resolve_data_root(data_dir)
    # rank 0 alone owns the run folder and the store; the others learn of its errors
    store = comm.on_main(lambda: open_store() if open_store else None, share=False)

    t = time.perf_counter()
    if isinstance(calib, torch.Tensor):
        ids = calib.long()
        if ids.dim() != 2 or ids.shape[1] != config.seqlen:
            raise ConfigError(f"calibration ids must be [n, {config.seqlen}] (got "
                              f"{list(ids.shape)})")
        config = QuantConfig.from_dict({**config.to_dict(), "calib": "tensor",
                                        "nsamples": ids.shape[0]})
    elif config.trains:
        ids = calibration_ids(tokenizer, config, data_root)
    else:  # round-to-nearest needs no data
        ids = torch.empty(0, config.seqlen, dtype=torch.long)
    timings["calibration_data_s"] = time.perf_counter() - t
    fingerprint = hashlib.sha256(
        (config.fingerprint() + model_fingerprint(model)).encode()
        + ids.numpy().tobytes()).hexdigest()[:16]
    comm.check_same(fingerprint, "the model, settings or calibration windows")

    rotation = None
    if config.rotate:
        t = time.perf_counter()
        rotation = rotate_model(adapter, config.seed, config.center_embeddings)
        timings["rotation_s"] = time.perf_counter() - t

    auto = None
    if config.schedule == AUTO_SCHEDULE and config.trains:
        t = time.perf_counter()
        config, auto = comm.on_main(lambda: resolve_auto_schedule(model, config, ids))
        timings["auto_schedule_s"] = time.perf_counter() - t

    allocation = None
    if config.allocates:
        t = time.perf_counter()
        cpu = time.process_time()
        allocation = allocate(model, config, ids, _progress_bar(show_progress))
        timings["allocation_s"] = time.perf_counter() - t
        timings["allocation_cpu_s"] = time.process_time() - cpu
        fingerprint = hashlib.sha256(
            (fingerprint + allocation.fingerprint()).encode()).hexdigest()[:16]

    memory: dict[str, int] = {}
    coverage: list[ExpertCoverage] = []
    records, grids = quantize_span(adapter, config, ids, device, store=store,
                                   fingerprint=fingerprint, resume=resume,
                                   on_unit_end=on_unit_end, show_progress=show_progress,
                                   timings=timings, memory=memory, coverage=coverage,
                                   collective=comm,
                                   formats=allocation.formats if allocation else None)
    if allocation:  # the loss of the finished weights on the windows the scan measured
        allocation.record["final_loss"] = calibration_loss(
            model, ids[:config.alloc_windows], config.inference_batch_size)
    t = time.perf_counter()
    install_activation_quantization(adapter, config.abits, config.quantize_attention,
                                    config.quantize_router)
    timings["fold_s"] += time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - began
    timings["total_cpu_s"] = time.process_time() - began_cpu  # this process, all threads
    report = {
        "format": RUN_FORMAT,
        "sliderquant_version": __version__,
        "config": config.to_dict(),
        "effective_learning_rates": config.learning_rates,
        "schedule": make_schedule(config, adapter.num_layers) if config.trains else [],
        "rotation": rotation,
        "auto_schedule": auto,
        "allocation": allocation.record if allocation else None,
        "family": family_report(adapter, config),
        "calibration": {"source": config.calib, "nsamples": int(ids.shape[0]),
                        "seqlen": int(ids.shape[1]), "seed": config.seed,
                        "tokens": int(ids.numel()), "chat_template": config.chat_template}
        if ids.numel() else None,
        "windows": [asdict(r) for r in records],
        "timings": timings,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if coverage:
        report["experts"] = coverage[0].to_dict()
    if device.type == "cuda":
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    report["ranks"] = _rank_report(comm, len(ids), memory.get("peak_cache_bytes", 0), report)
    return QuantizeResult(model=model, report=report, grids=grids)


def _rank_report(comm: Collective, num_samples: int, cache_bytes: int, report: dict) -> dict:
    """Per rank (in rank order): calibration windows held, peak bytes of the activation
    caches, peak RSS (and GPU) MiB. One rank when the run was not data parallel."""
    mine = {"samples": len(comm.shard(num_samples)), "peak_cache_bytes": cache_bytes,
            "peak_rss_mb": report["peak_rss_mb"], "peak_gpu_mb": report.get("peak_gpu_mb")}
    ranks = comm.gather(mine)
    return {"world_size": comm.world_size, "backend": comm.backend,
            **{key: [r[key] for r in ranks] for key in mine}}
