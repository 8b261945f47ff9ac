"""Turn a model reference into (transformers model, tokenizer).

A reference is one of: an embedded default (`smollm2-135m`), `stories260k` (from the data
root), a `.gguf` file, a llama2.c `.bin` checkpoint, a local Hugging Face folder, or a
Hugging Face hub id. (Quantized run folders are loaded by `sliderquant.api.load`.)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.models.embedded import EMBEDDED, embedded_gguf
from sliderquant.models.llama2c import Llama2cFormatError, load_llama2c

STORIES = "stories260k"
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(ValueError):
    """The model reference cannot be resolved or loaded; the message says why."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what was loaded, in words
    note: str | None = None  # caveat to carry into every report (e.g. GGUF provenance)
    run: dict | None = None  # the run record, when loaded from a quantized run folder


def load_model(
    ref: str,
    data_root: Path | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `ref` in `dtype`, in eval mode, on the CPU."""
    if ref in EMBEDDED:
        loaded = _load_gguf(embedded_gguf(ref), dtype)
        loaded.source, loaded.note = f"{ref} (embedded default)", EMBEDDED[ref].note
        return loaded
    path = _path(ref, data_root)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_file() and path.suffix == ".bin":
        return _load_llama2c(path, dtype)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(str(path), dtype, trust_remote_code)
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file, a llama2.c .bin checkpoint, "
                             "nor a folder with config.json")
    return _load_hf(ref, dtype, trust_remote_code)


def storage_dtype(ref: str, data_root: Path | None = None) -> tuple[torch.dtype, str] | None:
    """The float dtype `ref`'s own weights are stored in, and how that was decided, read
    from its files without loading the weights (what an export stores unquantized tensors
    in); None when it cannot be found here. A Hugging Face folder or cached hub model: its
    config's `dtype`/`torch_dtype`. A GGUF: the type of its float matrices, or float16
    (GGUF's float type) when every matrix is quantized, as in the embedded SmolLM2.
    llama2.c: float32."""
    if not ref:
        return None
    if ref in EMBEDDED:
        return _gguf_dtype(embedded_gguf(ref))
    if ref.lower() == STORIES:
        return torch.float32, "llama2.c checkpoints are float32"
    path = _path(ref, data_root)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_dtype(path)
    if path.is_file() and path.suffix == ".bin":
        return torch.float32, "llama2.c checkpoints are float32"
    config = path / "config.json" if path.is_dir() else _cached_hub_config(ref)
    if config is None or not config.is_file():
        return None
    values = json.loads(config.read_text())
    name = values.get("dtype") or values.get("torch_dtype")
    if name in FLOAT_DTYPES:
        return FLOAT_DTYPES[name], f"the source's config.json says {name}"
    return torch.float32, "the source's config.json names no float dtype, so float32"


def _path(ref: str, data_root: Path | None) -> Path:
    if ref.lower() == STORIES:
        if data_root is None:
            raise ModelLoadError("stories260k is read from the data root: pass --data-dir "
                                 "or set SLIDERQUANT_DATA")
        return data_root / "models" / "stories260K" / "stories260K.bin"
    return Path(ref).expanduser()


def _cached_hub_config(ref: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref, "config.json")
    except ValueError:  # not a valid hub id
        return None
    return Path(found) if isinstance(found, str) else None


def _gguf_dtype(path: Path) -> tuple[torch.dtype, str]:
    import gguf

    kinds = {t.tensor_type for t in _read_gguf(path).tensors if len(t.shape) > 1}
    for kind, dtype in ((gguf.GGMLQuantizationType.BF16, torch.bfloat16),
                        (gguf.GGMLQuantizationType.F16, torch.float16)):
        if kind in kinds:
            return dtype, f"the float matrices of {path.name} are {kind.name}"
    if kinds == {gguf.GGMLQuantizationType.F32}:
        return torch.float32, f"the matrices of {path.name} are F32"
    return torch.float16, (f"every matrix of {path.name} is quantized; float16 is GGUF's "
                           "float type")


def _read_gguf(path: Path):
    """The GGUFReader of `path`, or a ModelLoadError for a truncated or corrupt file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e}); it is truncated or "
                             "corrupt: copy or download it again") from e


def _load_hf(ref: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read the weights of {ref} ({e}); a .safetensors file "
                             "is truncated or corrupt: copy or download it again") from e
    except OSError as e:
        raise ModelLoadError(
            f"cannot load {ref!r}: not a local path, and the Hugging Face hub did not provide "
            f"it ({e}). Pass a local folder, a .gguf file, or one of: "
            f"{', '.join([*EMBEDDED, STORIES])}.") from e
    DecoderAdapter(model)  # fail early with the list of supported architectures
    return LoadedModel(model.eval(), tokenizer, source=ref)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _read_gguf(path)  # a clear error for a truncated file, before transformers reads it
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The tensors are dequantized floats now; drop the GGUF marker so that saving and
    # reloading the model treats it as an ordinary checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    DecoderAdapter(model)
    return LoadedModel(model.eval(), tokenizer, source=str(path),
                       note=f"loaded from GGUF {path.name}; GGUF weights are dequantized "
                            "to float")


def _load_llama2c(path: Path, dtype: torch.dtype) -> LoadedModel:
    tokenizers = sorted(path.parent.glob("tok*.bin"))
    if not tokenizers:
        raise ModelLoadError(f"no llama2.c tokenizer (tok*.bin) next to {path}")
    try:
        model, tokenizer = load_llama2c(path, tokenizers[0])
    except Llama2cFormatError as e:
        raise ModelLoadError(f"{e}; copy or download it again") from e
    return LoadedModel(model.to(dtype).eval(), tokenizer, source=str(path))
