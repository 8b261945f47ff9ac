"""Model families: one short declarative entry each (see base.py for the vocabulary).

Nothing outside this package and the reader (`models/adapters.py`) asks which family a
model is.
"""

from __future__ import annotations

from sliderquant.families.base import Family
from sliderquant.families.llama import LLAMA
from sliderquant.families.mixtral import MIXTRAL
from sliderquant.families.qwen2 import QWEN2
from sliderquant.families.qwen3 import QWEN3
from sliderquant.families.qwen3_moe import QWEN3_MOE

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)


def find_family(model_type: str | None) -> Family | None:
    """The family that covers a transformers `model_type`, if any."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def supported_architectures() -> str:
    return "; ".join(f"{f.name}: {f.description} (model_type {', '.join(f.model_types)})"
                     for f in FAMILIES)
