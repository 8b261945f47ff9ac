"""sliderquant: post-training quantization of LLMs with sliding-layer windows."""

__version__ = "0.1.0"

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
