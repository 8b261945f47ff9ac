"""Turn a model reference into (transformers model, tokenizer).

A reference is one of: an embedded default (`smollm2-135m`), `stories260k` (from the data
root), a `.gguf` file, a llama2.c `.bin` checkpoint, a local Hugging Face folder, or a
Hugging Face hub id. (Quantized run folders are loaded by `sliderquant.api.load`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.models.embedded import EMBEDDED, embedded_gguf
from sliderquant.models.llama2c import load_llama2c

STORIES = "stories260k"


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
    if ref.lower() == STORIES:
        if data_root is None:
            raise ModelLoadError("stories260k is read from the data root: pass --data-dir "
                                 "or set SLIDERQUANT_DATA")
        ref = str(data_root / "models" / "stories260K" / "stories260K.bin")
    path = Path(ref).expanduser()
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


def _load_hf(ref: str, dtype: torch.dtype, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load {ref!r}: not a local path, and the Hugging Face hub did not provide "
            f"it ({e}). Pass a local folder, a .gguf file, or one of: "
            f"{', '.join([*EMBEDDED, STORIES])}.") from e
    DecoderAdapter(model)  # fail early with the list of supported architectures
    return LoadedModel(model.eval(), tokenizer, source=ref)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    model, tokenizer = load_llama2c(path, tokenizers[0])
    return LoadedModel(model.to(dtype).eval(), tokenizer, source=str(path))
