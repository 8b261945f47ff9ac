"""The public Python face: quantize(), evaluate(), save_quantized(), load().

A facade: the quantize pipeline is pipeline.py, the run folder runfolder.py, the scans
sensitivity.py, the ranges ranges.py; what remains here are the entry points.

    from sliderquant import QuantConfig, quantize
    result = quantize(model, tokenizer, QuantConfig.from_preset("w2a16"), calib="wikitext2:valid")
    result.model   # transformers model with folded, plain weights
    result.report  # config, schedule, per-window losses, timings, peak memory
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sliderquant import runfolder
from sliderquant.atomic import write_text
from sliderquant.calibration import calibration_ids, check_source
from sliderquant.checkpoint import CheckpointError
from sliderquant.config import ConfigError, QuantConfig
from sliderquant.data import DataError, resolve_data_root
from sliderquant.distributed import Collective
from sliderquant.engine import NonFiniteLossError, WindowRecord
from sliderquant.eval.divergence import window_divergence
from sliderquant.eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls
from sliderquant.eval.zeroshot_data import TASKS as ZEROSHOT_TASKS
from sliderquant.export import compressed
from sliderquant.export.source import ExportError, ExportResult
from sliderquant.export.target import read_marker
from sliderquant.fold import install_activation_quantization
from sliderquant.hardware import default_device as default_device
from sliderquant.hardware import peak_rss_mb as peak_rss_mb
from sliderquant.models.adapters import (
    ContextLengthError,
    DecoderAdapter,
    UnsupportedModelError,
)
from sliderquant.models.embedded import cache_dir
from sliderquant.models.loading import FLOAT_DTYPES, LoadedModel, ModelLoadError, load_model
from sliderquant.pipeline import QuantizeResult, model_fingerprint
from sliderquant.pipeline import preflight as preflight
from sliderquant.pipeline import quantize as run_pipeline
from sliderquant.ranges import compare as compare_ranges
from sliderquant.runfolder import CHECKPOINT_DIR as CHECKPOINT_DIR
from sliderquant.runfolder import FORMATS as FORMATS
from sliderquant.runfolder import GRID_FILE as GRID_FILE
from sliderquant.runfolder import RUN_FILE as RUN_FILE
from sliderquant.runfolder import RunFolder as RunFolder
from sliderquant.runfolder import RunFolderError as RunFolderError
from sliderquant.runfolder import check_formats as check_formats
from sliderquant.runfolder import default_formats as default_formats
from sliderquant.runfolder import load_grids as load_grids
from sliderquant.runfolder import loadable_ref as loadable_ref
from sliderquant.runfolder import open_run as open_run
from sliderquant.runfolder import parse_formats as parse_formats
from sliderquant.runfolder import read_run_record as read_run_record
from sliderquant.runfolder import update_run_record as update_run_record
from sliderquant.sensitivity import DEFAULT_THRESHOLD, Progress, analyse


class MissingExtraError(ImportError):
    """An optional dependency (an extra of the sliderquant package) is not installed."""


# Errors caused by the user's input or environment: the CLI prints them without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, RunFolderError, ModelLoadError,
               UnsupportedModelError, ContextLengthError, NonFiniteLossError, ExportError,
               MissingExtraError)
EXPORT_FORMATS = ("compressed", "gguf")
EXPORT_ALIASES = {"packed": "compressed"}  # the name before 0.2


def quantize(
    model: torch.nn.Module,
    tokenizer,
    config: QuantConfig,
    calib: str | torch.Tensor | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    output_dir: str | os.PathLike | RunFolder | None = None,
    formats: str | tuple[str, ...] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    evaluation: tuple[str, ...] = (),
    record: dict | None = None,
    show_progress: bool = True,
    on_unit_end: Callable[[WindowRecord], None] | None = None,
    warn: Callable[[str], None] = lambda _: None,
) -> QuantizeResult:
    """Quantize `model` in place with `config`; return the folded model and a report.

    `calib` is a calibration source (`wikitext2:valid`, `c4`, a text file; default
    `config.calib`) or a ready tensor of token ids [n, seqlen]. Windows are trained on
    `device` (default: cuda if available); the model stays where it is, each window's layers
    visit `device` only while they are run or trained. With `output_dir` (a path, or a
    folder already opened with `open_run`), the folder is locked for the run, the learnables
    are checkpointed after every window (`resume=True` continues a killed run) and the
    model is saved there in `formats` (default: compressed where it can hold the result,
    else fake, with a note through `warn`; see `runfolder.save`). A folder
    that holds a finished run is refused unless `overwrite=True`. `evaluation` names the
    evaluation the caller will add before the run counts as finished; `record` holds extra
    entries for the run record.

    Called on every rank of an initialised `torch.distributed` process group, the run is
    data parallel (docs/DISTRIBUTED.md): same result, calibration caches split over the
    ranks; rank 0 alone opens, locks and writes `output_dir` (its errors are raised on
    every rank), every rank returns the folded model.
    """
    if formats is None and output_dir is not None:
        formats, note = default_formats(config, model)
        if note:
            warn(note)
    formats = parse_formats(formats)
    if output_dir is None:
        return run_pipeline(model, tokenizer, config, calib, data_dir=data_dir,
                            device=device, resume=resume, show_progress=show_progress,
                            on_unit_end=on_unit_end)
    comm = Collective()

    def open_folder() -> RunFolder:
        check_formats(formats, config, model)
        return output_dir if isinstance(output_dir, RunFolder) else \
            open_run(output_dir, resume, overwrite)

    run = comm.on_main(open_folder, share=False)
    if not comm.is_main:  # the other ranks of a data-parallel run train, rank 0 writes
        return run_pipeline(model, tokenizer, config, calib, data_dir=data_dir,
                            device=device, resume=resume, show_progress=show_progress,
                            on_unit_end=on_unit_end)
    try:
        result = run_pipeline(model, tokenizer, config, calib, data_dir=data_dir,
                              device=device, resume=resume, open_store=lambda: run.checkpoints,
                              show_progress=show_progress, on_unit_end=on_unit_end)
        runfolder.save(result, tokenizer, run.path, formats=formats, evaluation=evaluation,
                       data_root=resolve_data_root(data_dir), entries=record, warn=warn)
    finally:
        if run is not output_dir:
            run.close()
    return result


def save_quantized(result: QuantizeResult, tokenizer, output_dir: str | os.PathLike,
                   formats: str | tuple[str, ...] | None = None,
                   model_ref: str | None = None) -> Path:
    """Write a quantization result as a finished run folder (see `runfolder.save`):
    `formats` default to a compressed checkpoint; `model_ref` (how to load the source model
    again) defaults to what `load` noted on the model."""
    with open_run(output_dir, overwrite=True) as run:
        runfolder.save(result, tokenizer, run.path, formats=parse_formats(formats),
                       model_ref=model_ref)
    return Path(output_dir)


def resume_evaluation(run: RunFolder, dtype: torch.dtype = torch.float32) -> QuantizeResult:
    """The model and report of a run whose quantization is saved but whose evaluation did
    not finish (`run.state == "quantized"`), to evaluate it and `update_run_record`."""
    loaded = load_quantized(run.path, dtype)
    return QuantizeResult(model=loaded.model, report=loaded.run)


def load(ref: str, data_dir: str | os.PathLike | None = None,
         dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedModel:
    """Load any model reference; a sliderquant run folder comes back with its activation
    quantizers installed and its run record in `.run`; a compressed (compressed-tensors
    pack-quantized) folder is unpacked to `dtype`, with the activation quantization it
    describes (and, for sliderquant's own exports, the run's q/k/v quantization). The
    model remembers `ref` (recorded as `model_ref` when it is quantized and saved)."""
    path = Path(ref).expanduser()
    if (path / RUN_FILE).is_file():
        return load_quantized(path, dtype)
    if path.is_dir() and (compressed.is_compressed_folder(path)
                          or read_marker(path).get("format") == "fake"):
        return _load_export(path, dtype)
    loaded = load_model(ref, resolve_data_root(data_dir), dtype, trust_remote_code)
    runfolder.remember_source(loaded.model, ref)
    return loaded


def _load_export(path: Path, dtype: torch.dtype) -> LoadedModel:
    """A folder written by `export` or by `quantize --format` next to the run's model."""
    marker = read_marker(path)
    if compressed.is_compressed_folder(path):
        model, tokenizer = compressed.load_compressed(path, dtype)
        abits = compressed.activation_bits(path)
        attention = bool(marker.get("quantize_attention"))
        router = bool(marker.get("quantize_router"))
        note = (f"compressed ({compressed.FORMAT}) checkpoint, weights unpacked to "
                f"{str(dtype).removeprefix('torch.')}")
    else:
        loaded = load_model(str(path), None, dtype)
        model, tokenizer, note = loaded.model, loaded.tokenizer, loaded.note
        config = QuantConfig.from_dict(marker["run"]["config"])
        abits, attention, router = (config.abits, config.quantize_attention,
                                    config.quantize_router)
    if abits is not None and abits < 16:
        install_activation_quantization(DecoderAdapter(model), abits, attention, router)
    return LoadedModel(model, tokenizer, source=str(path), run=marker.get("run"), note=note)


def source_model(run: dict, data_dir: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The unquantized model a run record was made from (its `model_ref`)."""
    ref = runfolder.record_source(run)
    if ref is None:
        raise RunFolderError("the run record does not name its source model (it was "
                             "quantized from a model built in memory); pass the unquantized "
                             "model as the reference")
    return load(ref, data_dir, dtype)


def load_quantized(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Reload a saved run folder for evaluation or generation, whichever format its top
    level holds (compressed, fake, or only a GGUF), with its activation quantizers."""
    path = Path(path)
    run = read_run_record(path)
    config = QuantConfig.from_dict(run["config"])
    fmt, where = runfolder.model_location(path, run)
    if fmt == "compressed":
        model, tokenizer = compressed.load_compressed(where, dtype)
        loaded = LoadedModel(model, tokenizer, source=str(path))
    else:
        loaded = load_model(str(where), None, dtype)
    install_activation_quantization(DecoderAdapter(loaded.model), config.abits,
                                    config.quantize_attention, config.quantize_router)
    loaded.source, loaded.run = str(path), run
    loaded.note = run.get("model_note") or (f"{fmt} model of the run folder"
                                            if fmt != "fake" else None)
    return loaded


def export(
    run_dir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    exact: bool = False,
    float_type: str = "f16",
    embedding_type: str | None = None,
    vocab_from: str | os.PathLike | None = None,
    drop_activation_quantization: bool = False,
    warn: Callable[[str], None] = lambda _: None,
) -> ExportResult:
    """Write a saved run for an inference engine: `compressed` (alias `packed`:
    compressed-tensors pack-quantized for transformers and vLLM; default `RUN/<fmt>`) or
    `gguf` (llama.cpp; default `RUN/model.gguf`). `overwrite` replaces only an earlier
    export. `dtype` (compressed: float16, bfloat16, float32) defaults to the source model's
    own. See `sliderquant.export.compressed` / `.gguf` for the rules."""
    from sliderquant.export.gguf import write_gguf
    from sliderquant.export.target import check_target

    folder = Path(run_dir)
    if fmt not in (*EXPORT_FORMATS, *EXPORT_ALIASES):
        raise ExportError(f"unknown export format {fmt!r}; use one of "
                          f"{', '.join(EXPORT_FORMATS)}")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ExportError(f"dtype {dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
    record = read_run_record(folder)
    target = Path(out) if out else folder / ("model.gguf" if fmt == "gguf" else fmt)
    if target.resolve() in (folder.resolve(), *folder.resolve().parents):
        raise RunFolderError(f"--out {target} would replace the run folder; name a new file "
                             "or folder")
    check_target(target, overwrite, folder=fmt != "gguf")
    config = QuantConfig.from_dict(record["config"])
    stored, where = runfolder.model_location(folder, record)
    if stored == "gguf":
        raise ExportError(f"{folder} holds only a GGUF file, which does not keep the learned "
                          "grids exactly; re-run quantize with --format compressed or fake")
    loaded = (LoadedModel(*compressed.load_compressed(where), source=str(folder))
              if stored == "compressed" else load_model(str(where), None))
    grids = runfolder.load_grids(where)
    if fmt == "gguf":
        return write_gguf(loaded.model, grids, config, loaded.tokenizer, target,
                          source=str(record.get("model", "")),
                          source_gguf=runfolder.source_gguf(record),
                          vocab_from=Path(vocab_from) if vocab_from else None, exact=exact,
                          float_type=float_type, embedding_type=embedding_type,
                          drop_activation_quantization=drop_activation_quantization,
                          warn=warn)
    found = runfolder.half_dtype(record, resolve_data_root(None), dtype)
    chosen, why = found or (loaded.model.dtype, "the source model's own dtype is not known "
                                                "here, so the run's; --dtype to choose")
    result = compressed.write_compressed(
        loaded.model, grids, config, loaded.tokenizer, target, dtype=chosen, record=record,
        drop_activation_quantization=drop_activation_quantization)
    result.notes.insert(0, f"unquantized tensors and scales stored as "
                           f"{str(chosen).removeprefix('torch.')} ({why})")
    return result


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    datasets: tuple[str, ...] = ("wikitext2", "c4"),
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    reference: torch.nn.Module | None = None,
) -> dict:
    """Perplexity per dataset: {name: {"ppl", "windows", "seqlen", "seconds"}}.

    With a `reference` model (the FP model `model` was quantized from, same tokenizer), each
    dataset also gets "reference_ppl", "kl" (mean KL(reference ‖ model) per token, nats) and
    "top1_agreement", from both models run on the same windows (see eval/divergence.py).
    """
    data_root = resolve_data_root(data_dir)
    adapter = DecoderAdapter(model)
    adapter.check_context(seqlen)
    if reference is not None:
        DecoderAdapter(reference).check_context(seqlen)
        if reference.config.vocab_size != model.config.vocab_size:
            raise ConfigError(f"the reference model's vocabulary ({reference.config.vocab_size}"
                              f") differs from the model's ({model.config.vocab_size}); KL "
                              "needs the model it was quantized from")
    results = {}
    for name in datasets:
        t = time.perf_counter()
        windows = eval_windows(name, tokenizer, seqlen, max_windows, data_root)
        if reference is None:
            nlls = window_nlls(model, windows, desc=name, show_progress=show_progress)
            results[name] = {"ppl": perplexity_from_nlls(nlls)}
        else:
            results[name] = window_divergence(model, reference, windows, desc=f"{name} kl",
                                              show_progress=show_progress)
            del results[name]["positions"]
        results[name].update(windows=len(windows), seqlen=seqlen,
                             seconds=round(time.perf_counter() - t, 1))
    return results


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer,
    tasks: tuple[str, ...] = ZEROSHOT_TASKS,
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    batch_tokens: int = 4096,
) -> dict:
    """lm-eval tasks (needs the `eval` extra): {task: {"metric" (acc_norm where the task has
    it, else acc, else its first metric), "value", "stderr", "n" (items scored),
    "n_available", "limit", "metrics" (all), "source" (local file or hub dataset)}}.

    `limit` scores the first N items of each task. With a data root the six commonsense
    tasks read its `zeroshot/` copies (see eval/zeroshot_data.py); every other task, and
    all of them without a data root, read lm-eval's hub datasets.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of items (got {limit})")
    data_root = resolve_data_root(data_dir)
    DecoderAdapter(model)
    return _lm_eval().run_tasks(model, tokenizer, tuple(tasks), limit, data_root, batch_tokens,
                                show_progress)


def check_tasks(tasks: tuple[str, ...]) -> None:
    """ConfigError for lm-eval task names the harness does not know (instant for the six
    local tasks; other names index all of lm-eval's tasks, ~25 s)."""
    _lm_eval().check_tasks(tasks)


def _lm_eval():
    """The lm-eval bridge module (imported by name: a package attribute left by an earlier
    import would hide a module that can no longer be imported)."""
    try:
        zeroshot = importlib.import_module("sliderquant.eval.zeroshot")
    except (ImportError, AttributeError) as e:  # absent, or a version that breaks on import
        raise MissingExtraError(
            f"lm-eval tasks need the lm-eval version pinned in the `eval` extra (import "
            f"failed: {e}); install it with: pip install 'sliderquant[eval]' (pip install -e "
            "'.[eval]' in a checkout)") from e
    return zeroshot


def sensitivity(
    model: torch.nn.Module,
    tokenizer,
    configs: list[QuantConfig],
    dataset: str = "wikitext2",
    seqlen: int = 512,
    max_windows: int | None = 4,
    data_dir: str | os.PathLike | None = None,
    prefix: bool = True,
    k: float = DEFAULT_THRESHOLD,
    progress: Progress | None = None,
) -> dict:
    """Layer sensitivity scans of `model`, one per config, and the shallow/deep suggestion
    (see `sensitivity.analyse`)."""
    return analyse(model, tokenizer, configs, dataset, seqlen, max_windows, data_dir, prefix,
                   k, progress)


def ranges(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    windows: int = 2,
    seqlen: int = 512,
    calib: str | None = None,
    chat_template: bool | None = None,
    device: str | torch.device | None = None,
) -> dict[int, dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """Weight and activation ranges (see ranges.py) of the first, a middle and the last
    layer, in the run's source FP model and in the run's quantized model:
    {layer: {projection: {"weight": (before, after), "activation": (before, after)}}}.

    Activations come from `windows` calibration windows of `seqlen` tokens drawn like the
    run's own (its calibration source, chat template and seed; `calib` and `chat_template`
    override them), computed on `device` (default: where the models load)."""
    run = read_run_record(run_dir)
    config = QuantConfig.from_dict(run["config"])
    source_name = calib or (run.get("calibration") or {}).get("source", config.calib)
    if source_name == "tensor":
        raise ConfigError("the run was calibrated on a tensor of ids; name calibration data "
                          "with --calib")
    config = QuantConfig.from_dict({
        **config.to_dict(), "calib": source_name, "nsamples": windows, "seqlen": seqlen,
        "batch_size": 1,
        "chat_template": config.chat_template if chat_template is None else chat_template})
    data_root = resolve_data_root(data_dir)
    check_source(config.calib, data_root, config.chat_template)
    quantized = load_quantized(run_dir)
    source = source_model(run, data_dir)
    if device is not None:
        quantized.model.to(device)
        source.model.to(device)
    ids = calibration_ids(source.tokenizer, config, data_root)
    return compare_ranges(source.model, quantized.model, ids)


def fp_reference(
    model: torch.nn.Module,
    tokenizer,
    tasks: tuple[str, ...],
    seqlen: int = 2048,
    max_windows: int | None = None,
    data_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    limit: int | None = None,
) -> dict:
    """{task: result} of an unquantized model: `evaluate_perplexity` for the perplexity sets,
    `evaluate_zeroshot` for lm-eval tasks; cached on disk by model content and protocol (the
    FP numbers never change, and on a CPU they cost minutes)."""
    from sliderquant.eval.perplexity import DATASETS

    root = resolve_data_root(data_dir)
    key = f"{model_fingerprint(model)}-{seqlen}-{max_windows or 'all'}-{root or 'hub'}"
    path = cache_dir() / "fp_eval" / (hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
    cached = json.loads(path.read_text()) if path.is_file() else {}
    perplexity_sets = tuple(t for t in tasks if t in DATASETS and t not in cached)
    if perplexity_sets:
        cached.update(evaluate_perplexity(model, tokenizer, perplexity_sets, seqlen,
                                          max_windows, data_dir, show_progress))
    results = {t: cached[t] for t in tasks if t in DATASETS}
    lm_eval_tasks = tuple(t for t in tasks if t not in DATASETS)
    names = {t: f"{t}@limit={limit or 'all'}" for t in lm_eval_tasks}
    fresh = [t for t in lm_eval_tasks if names[t] not in cached]
    if not fresh:
        results.update({t: cached[names[t]] for t in lm_eval_tasks})
    else:
        scores = evaluate_zeroshot(model, tokenizer, lm_eval_tasks, limit, data_dir,
                                   show_progress)
        results.update(scores)
        if set(scores) == set(lm_eval_tasks):  # a group's results are its tasks': not cached
            cached.update({names[t]: scores[t] for t in lm_eval_tasks})
    if perplexity_sets or fresh:
        write_text(path, json.dumps(cached, indent=1))
    return results
