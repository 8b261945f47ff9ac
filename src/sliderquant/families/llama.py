"""Llama 1/2/3, SmolLM2, Mistral: the reference layout."""

from sliderquant.families.base import Family

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral"),
    description="Llama 1/2/3, SmolLM2, Mistral",
    gguf_architecture="llama",
)
