"""Qwen2 / Qwen2.5: the Llama layout with q/k/v biases (read from the modules)."""

from sliderquant.families.base import Family

QWEN2 = Family(
    name="qwen2",
    model_types=("qwen2",),
    description="Qwen2 / Qwen2.5 (q/k/v bias)",
    gguf_architecture="qwen2",
)
