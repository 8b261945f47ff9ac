"""One adapter per model family: where the embeddings, layers, norms and projections are.

Nothing else in the code asks which architecture a model is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sliderquant.quant.layer import DecoderParts


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


class ContextLengthError(ValueError):
    """A sequence length the model cannot attend over."""


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    description: str


FAMILIES = (
    Family("llama", ("llama", "mistral"), "Llama 1/2/3, SmolLM2, Mistral"),
    Family("qwen2", ("qwen2",), "Qwen2 / Qwen2.5 (q/k/v bias)"),
)
_PROJ_PATHS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def supported_architectures() -> str:
    return "; ".join(f"{f.name}: {f.description} (model_type {', '.join(f.model_types)})"
                     for f in FAMILIES)


class DecoderAdapter:
    """Uniform access to a transformers decoder-only causal LM of a supported family."""

    def __init__(self, model: nn.Module):
        config = model.config
        model_type = getattr(config, "model_type", None)
        family = next((f for f in FAMILIES if model_type in f.model_types), None)
        if family is None:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported. Supported: "
                f"{supported_architectures()}."
            )
        self.family = family
        self.model = model
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps

    @property
    def body(self) -> nn.Module:
        return self.model.model

    @property
    def embed(self) -> nn.Embedding:
        return self.body.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.body.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def rotary(self, hidden: torch.Tensor, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for positions 0..seqlen-1, shaped [1, seqlen, head_dim]."""
        positions = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
        return self.body.rotary_emb(hidden, positions)

    def parts(self, index: int) -> DecoderParts:
        layer = self.layers[index]
        return DecoderParts(
            input_norm=layer.input_layernorm,
            post_norm=layer.post_attention_layernorm,
            linears={name: layer.get_submodule(path) for name, path in _PROJ_PATHS.items()},
            act_fn=layer.mlp.act_fn,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            eps=self.eps,
        )

    def linear_path(self, index: int, name: str) -> str:
        """Module path of projection `name` of layer `index` inside the model."""
        layers_path = next(p for p, m in self.model.named_modules() if m is self.layers)
        return f"{layers_path}.{index}.{_PROJ_PATHS[name]}"

    def set_linear(self, index: int, name: str, module: nn.Module) -> None:
        """Replace projection `name` (one of q k v o gate up down) of layer `index`."""
        parent, _, attr = _PROJ_PATHS[name].rpartition(".")
        setattr(self.layers[index].get_submodule(parent), attr, module)

    def check_context(self, seqlen: int) -> None:
        """Raise if `seqlen` exceeds what the model can attend to."""
        if seqlen > self.max_positions:
            raise ContextLengthError(
                f"seqlen {seqlen} is longer than the model's context "
                f"({self.max_positions} positions); use --seqlen {self.max_positions} or less"
            )
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True) and seqlen > window:
            raise ContextLengthError(
                f"seqlen {seqlen} exceeds the model's sliding attention window ({window}); "
                f"sliderquant uses full causal attention, so use --seqlen {window} or less"
            )
