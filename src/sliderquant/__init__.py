"""sliderquant: post-training quantization of LLMs with sliding-layer windows."""

from sliderquant.api import (
    QuantizeResult,
    evaluate_perplexity,
    evaluate_zeroshot,
    load,
    load_quantized,
    quantize,
    save_quantized,
)
from sliderquant.config import QuantConfig
from sliderquant.schedule import build_schedule, fixed
from sliderquant.version import __version__

__all__ = [
    "QuantConfig",
    "QuantizeResult",
    "__version__",
    "build_schedule",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "fixed",
    "load",
    "load_quantized",
    "quantize",
    "save_quantized",
]
