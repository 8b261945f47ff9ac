"""The run folder of `sliderquant quantize --out R`: one concept, one module.

- **Lock.** `open_run` takes an exclusive lock (`R/.sliderquant.lock`, `flock`) for the
  whole run; a second run into the same folder is refused at once.
- **State**, read before any expensive work (`state_of`): `new` (nothing of ours),
  `partial` (a training checkpoint: `--resume` continues it), `quantized` (model and
  record saved, the requested evaluation missing: `--resume` finishes it), `finished`.
- **The record** `sliderquant.json`: the pipeline's report plus `model_ref` (how to load
  the source model again: `eval --kl`, `ranges`), `state`, the requested evaluation, the
  formats written and every name the run wrote at the top of the folder. It is written
  after the model files; `state: finished` only once the model, the record and the
  requested evaluation are all there.
- **Formats** (`save`): `compressed` (compressed-tensors pack-quantized, the default),
  `fake` (fp32 fake-quantized Hugging Face folder + `quantization.safetensors` grids),
  `gguf` (`R/model.gguf`). The first folder format fills `R` itself, a second one goes to
  `R/<format>`. Everything is staged inside `R` and moved in with the umask's modes.
- **Deleting.** `--overwrite` removes only names the previous record lists as its own (and
  the checkpoint); `sliderquant export --overwrite` replaces only an earlier export
  (`export.target`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sliderquant.atomic import apply_umask, write_text
from sliderquant.checkpoint import CheckpointError, CheckpointStore
from sliderquant.config import ConfigError, QuantConfig
from sliderquant.export.source import ExportError
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.models.embedded import EMBEDDED, embedded_gguf
from sliderquant.models.loading import FLOAT_DTYPES, STORIES, storage_dtype
from sliderquant.pipeline import RUN_FORMAT, QuantizeResult

RUN_FILE = "sliderquant.json"
GRID_FILE = "quantization.safetensors"  # fake format: per-projection step and zero
CHECKPOINT_DIR = "checkpoint"
LOCK_FILE = ".sliderquant.lock"
GGUF_FILE = "model.gguf"
FORMATS = ("compressed", "gguf", "fake")
DEFAULT_FORMATS = ("compressed",)
FOLDER_FORMATS = ("compressed", "fake")
SOURCE_ATTRIBUTE = "sliderquant_model_ref"  # set on a model by `api.load`


class RunFolderError(RuntimeError):
    """The output folder's state does not allow this run (finished run, partial run, …)."""


def parse_formats(text: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """`compressed,gguf` -> ("compressed", "gguf"); None -> the default (compressed)."""
    if text is None:
        return DEFAULT_FORMATS
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"--format {text!r}: use one or more of {', '.join(FORMATS)}, "
                          "comma-separated")
    return tuple(names)


def check_formats(formats: tuple[str, ...], config: QuantConfig,
                  model: torch.nn.Module | None = None) -> None:
    """Refuse, before any work, formats that cannot hold what `config` produces (on
    `model`, when given)."""
    if (model is not None and "compressed" in formats and config.wbits < 16
            and not config.symmetric and DecoderAdapter(model).fused_experts()):
        raise ConfigError("--format compressed cannot hold an asymmetric weight grid on an "
                          "MoE model (transformers + compressed-tensors drop the experts' zero "
                          "points); add --symmetric, or use --format fake or gguf")
    if config.wbits >= 16 and "compressed" in formats:
        raise ConfigError("--format compressed needs quantized weights (wbits < 16); use "
                          "--format fake for an activation-only run")
    if config.abits < 16 and "gguf" in formats:
        raise ConfigError(f"--format gguf holds weights only, so llama.cpp would run this "
                          f"W{config.wbits}A{config.abits} model without its activation "
                          "quantization; drop gguf here, or later run `sliderquant export R "
                          "--format gguf --drop-activation-quantization`")


def default_formats(config: QuantConfig,
                    model: torch.nn.Module | None = None) -> tuple[tuple[str, ...], str | None]:
    """What a run writes when no format was asked for: the compressed checkpoint where it can
    hold the result, else the fake-quantized folder, with a note saying why."""
    try:
        check_formats(DEFAULT_FORMATS, config, model)
    except ConfigError as refused:
        return ("fake",), f"writing the fake-quantized folder (--format fake): {refused}"
    return DEFAULT_FORMATS, None


def state_of(path: Path) -> str:
    """`new`, `partial`, `quantized` or `finished` (see the module docstring)."""
    record = _read_json(path / RUN_FILE)
    if record is not None:
        return record.get("state", "finished")  # records before `state` were written last
    if (path / CHECKPOINT_DIR / "learnables.safetensors").is_file():
        return "partial"
    return "new"


@dataclass
class RunFolder:
    """An output folder locked for one run; `state` as found when it was opened."""

    path: Path
    state: str
    lock: int | None = None
    created: bool = False  # the folder did not exist before this run

    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.path / CHECKPOINT_DIR)

    def record(self) -> dict:
        return read_run_record(self.path)

    def close(self) -> None:
        if self.lock is not None:
            os.close(self.lock)  # closing the descriptor releases the flock
            self.lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, *exc) -> None:
        """Release the lock; a folder this run created and left empty (a refusal or a
        crash before anything was written) is removed again."""
        self.close()
        if kind is not None and self.created and \
                [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink()
            self.path.rmdir()


def open_run(path: str | os.PathLike, resume: bool = False, overwrite: bool = False
             ) -> RunFolder:
    """Check that `path` can take this run and lock it; raise RunFolderError (or
    CheckpointError) otherwise. Cheap: call it before loading models or evaluating."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file; name a folder (new or one of an "
                             "earlier run)")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise RunFolderError(f"--out {path} is not writable ({e.strerror}); choose a folder "
                             "you can write to") from None
    run = RunFolder(path, state_of(path), fd, created)
    if not os.access(path, os.W_OK | os.X_OK):
        run.close()
        raise RunFolderError(f"--out {path} is not writable; choose a folder you can "
                             "write to")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        run.close()
        raise RunFolderError(f"another sliderquant run is writing to {path}; wait for it to "
                             "end or choose another --out") from None
    try:
        _check_state(run, resume, overwrite)
    except BaseException:
        run.close()
        raise
    return run


def _check_state(run: RunFolder, resume: bool, overwrite: bool) -> None:
    path, state = run.path, run.state
    if overwrite:
        record = _read_json(path / RUN_FILE) or {}
        # records before `files` held a fake-quantized folder whose files get replaced
        # by name, except the grids
        ours = record.get("files", [GRID_FILE] if record else [])
        for name in (*ours, CHECKPOINT_DIR, RUN_FILE):
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        run.state = "new"
        return
    if state == "finished":
        raise RunFolderError(f"{path} holds a finished run ({RUN_FILE} exists); choose another "
                             "--out or pass --overwrite to replace it")
    if state == "quantized" and not resume:
        raise RunFolderError(f"{path} holds a quantized run whose evaluation did not finish; "
                             "pass --resume to finish it or --overwrite to start over")
    if state == "partial" and not resume:
        raise RunFolderError(f"{path} holds an unfinished run; pass --resume to continue it or "
                             "--overwrite to start over")
    if state == "new" and resume:
        raise CheckpointError(f"nothing to resume in {path} (no {CHECKPOINT_DIR}/ or "
                              f"{RUN_FILE}); start without --resume")


# ---- the record ---------------------------------------------------------------------------
def read_run_record(path: str | os.PathLike) -> dict:
    """The `sliderquant.json` of a saved run folder."""
    record = _read_json(Path(path) / RUN_FILE)
    if record is None:
        raise RunFolderError(f"{path} is not a sliderquant run folder (no readable {RUN_FILE})")
    if record.get("format") != RUN_FORMAT:
        raise RunFolderError(f"{path} was written by an incompatible sliderquant version")
    return record


def update_run_record(path: str | os.PathLike, finished: bool = False, **entries) -> None:
    """Add entries (e.g. evaluation results) to a saved run's record; `finished` marks the
    run complete (call it once the requested evaluation is in)."""
    record = read_run_record(path)
    record.update(entries)
    if finished:
        record["state"] = "finished"
    write_text(Path(path) / RUN_FILE, json.dumps(record, indent=1))


def loadable_ref(ref: str) -> str:
    """`ref` as `api.load` can resolve it again from any working directory (paths made
    absolute; model names and hub ids unchanged). Recorded as `model_ref`."""
    if ref in EMBEDDED or ref.lower() == STORIES:  # names win over same-named folders
        return ref
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def remember_source(model: torch.nn.Module, ref: str) -> None:
    """Note on `model` the reference it was loaded from (read back by `source_ref`)."""
    object.__setattr__(model, SOURCE_ATTRIBUTE, loadable_ref(ref))


def source_ref(model: torch.nn.Module) -> str | None:
    """How to load `model`'s source again: what `api.load` noted, else the folder or hub id
    transformers loaded it from; None for a model built in memory."""
    ref = getattr(model, SOURCE_ATTRIBUTE, None)
    if ref:
        return ref
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return loadable_ref(name) if name and Path(name).expanduser().exists() else None


def record_source(record: dict) -> str | None:
    """The `model_ref` of a record (older records: the `model` name)."""
    ref = record.get("model_ref")
    if ref is None and record.get("model"):
        ref = str(record["model"]).removesuffix(" (embedded default)")
    return ref or None


def source_gguf(record: dict) -> Path | None:
    """The GGUF a run's model was loaded from (its tokenizer and metadata are carried over)."""
    ref = record_source(record)
    if not ref:
        return None
    if ref in EMBEDDED:
        return embedded_gguf(ref)
    path = Path(ref)
    return path if path.suffix == ".gguf" and path.is_file() else None


def half_dtype(record: dict, data_root: Path | None, dtype: str | None = None
               ) -> tuple[torch.dtype, str] | None:
    """The dtype a compressed checkpoint stores unquantized tensors in: `dtype` if given,
    else the source model's own (None when it cannot be found)."""
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise ExportError(f"dtype {dtype!r}: use one of {', '.join(FLOAT_DTYPES)}")
        return FLOAT_DTYPES[dtype], "--dtype"
    ref = record_source(record)
    return storage_dtype(ref, data_root) if ref else None


# ---- saving -------------------------------------------------------------------------------
def save(
    result: QuantizeResult,
    tokenizer,
    path: str | os.PathLike,
    *,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    model_ref: str | None = None,
    evaluation: tuple[str, ...] = (),
    data_root: Path | None = None,
    entries: dict | None = None,
    warn: Callable[[str], None] = lambda _: None,
) -> dict:
    """Write the quantized model in `formats` and the run record into `path`; return the
    record. `evaluation` names the evaluation still to come: without it the run is
    finished at once, with it the record says `state: quantized` until
    `update_run_record(..., finished=True)`. The training checkpoint is removed once the
    record is written (the saved model supersedes it). A folder format that cannot hold the model
    (e.g. zero points outside the compressed range) falls back to `fake`, with a warning."""
    from sliderquant.export.compressed import write_compressed
    from sliderquant.export.gguf import write_gguf

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = QuantConfig.from_dict(result.report["config"])
    model_ref = model_ref or source_ref(result.model)
    record = {**result.report, "model": model_ref, "model_ref": model_ref, **(entries or {}),
              "state": "quantized" if evaluation else "finished",
              "evaluation_requested": list(evaluation)}
    folder_formats = [f for f in formats if f in FOLDER_FORMATS]
    written: dict[str, str] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".staging-") as staging_name:
        staging = Path(staging_name)
        for i, fmt in enumerate(folder_formats):
            place = "." if i == 0 else fmt
            target = staging / ("root" if i == 0 else fmt)
            if fmt == "compressed":
                found = half_dtype(record, data_root)
                dtype, why = found or (None, "the source model's dtype is not known here")
                try:
                    exported = write_compressed(result.model, result.grids, config, tokenizer,
                                                target, dtype=dtype, record=record)
                except ExportError as e:
                    if i:
                        raise
                    warn(f"the compressed format cannot hold this model ({e}); saved the "
                         "fake-quantized folder instead")
                    fmt = "fake"
                else:
                    notes += [f"compressed: unquantized tensors and scales in "
                              f"{str(exported_dtype(target)).removeprefix('torch.')} ({why})",
                              *(f"compressed: {n}" for n in exported.notes)]
            if fmt == "fake":
                _write_fake(result, tokenizer, target, record)
            written[fmt] = place
        if "gguf" in formats:
            exported = write_gguf(result.model, result.grids, config, tokenizer,
                                  staging / GGUF_FILE, source=model_ref or "",
                                  source_gguf=source_gguf(record), warn=warn)
            notes += [f"gguf: {n}" for n in exported.notes]
            written["gguf"] = GGUF_FILE
        names = _move_in(staging, out)
    record.update(formats=written, files=sorted(names), notes=notes)
    write_text(out / RUN_FILE, json.dumps(record, indent=1))
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the saved model supersedes it
    return record


def exported_dtype(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text()).get("dtype", "float32")


def _write_fake(result: QuantizeResult, tokenizer, target: Path, record: dict) -> None:
    from sliderquant.export.target import write_marker

    target.mkdir()
    result.model.save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    if result.grids:
        save_file({k: v.detach().cpu().contiguous() for k, v in result.grids.items()},
                  str(target / GRID_FILE))
    write_marker(target, "fake", {"run": record})


def _move_in(staging: Path, out: Path) -> list[str]:
    """Move the staged outputs into `out` (the `root` folder's files into `out` itself);
    return the names now in `out` that the run wrote."""
    names = []
    items = [*(staging / "root").iterdir()] if (staging / "root").is_dir() else []
    items += [p for p in staging.iterdir() if p.name != "root"]
    for item in items:
        apply_umask(item)
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # only reached for names this run staged (see open_run)
        os.replace(item, target)
        names.append(item.name)
    return names


# ---- reading ------------------------------------------------------------------------------
def model_location(path: Path, record: dict) -> tuple[str, Path]:
    """(format, path) of the model a run folder holds in its top level, else its GGUF."""
    formats = record.get("formats") or {"fake": "."}
    for fmt, place in formats.items():
        if place == ".":
            return fmt, path
    if "gguf" in formats:
        return "gguf", path / formats["gguf"]
    raise RunFolderError(f"{path}: the record names no model file")


def load_grids(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weight grids of a run folder (`<module>.step`, `<module>.zero`): from
    `quantization.safetensors` (fake format) or from the packed checkpoint (compressed);
    empty when the run quantized no weights."""
    from sliderquant.export import compressed

    path = Path(path)
    if compressed.is_compressed_folder(path):
        return compressed.read_grids(path)
    if (path / GRID_FILE).is_file():
        return load_file(str(path / GRID_FILE))
    return {}


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
