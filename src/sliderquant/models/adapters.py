"""The reader: a transformers model + its family entry (families/) -> the parts the
quantized blocks, folding, rotation and the run-time quantizers need.

Nothing here knows a family by name: every path comes from the entry.
"""

from __future__ import annotations

import torch
from torch import nn

from sliderquant.config import ConfigError
from sliderquant.families import Family, find_family, supported_architectures
from sliderquant.quant.blocks import ATTENTION_SCALINGS, MLP_SCALINGS, AttentionParts, MLPParts
from sliderquant.quant.layer import LayerParts
from sliderquant.quant.linear import Projection


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry."""


class ContextLengthError(ValueError):
    """A sequence length the model cannot attend over."""


class DecoderAdapter:
    """Uniform access to a transformers decoder-only causal LM of a supported family."""

    def __init__(self, model: nn.Module, family: Family | None = None):
        config = model.config
        model_type = getattr(config, "model_type", None)
        family = family or find_family(model_type)
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

    # ---- model-level parts ----------------------------------------------------------------
    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_submodule(self.family.embed)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.family.lm_head)

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
        return self.model.get_submodule(self.family.rotary)(hidden, positions)

    # ---- one layer ------------------------------------------------------------------------
    def parts(self, index: int) -> LayerParts:
        """Layer `index`'s tensors by block (the model's own parameters, not copies)."""
        layer = self.layers[index]
        att, mlp = self.family.attention, self.family.mlp

        def norm(path: str | None) -> torch.Tensor | None:
            return None if path is None else layer.get_submodule(path).weight

        def projections(paths: dict[str, str]) -> dict[str, Projection]:
            found = {}
            for name, path in paths.items():
                module = layer.get_submodule(path)
                found[name] = Projection(module.weight, module.bias)
            return found

        return LayerParts(
            attn=AttentionParts(
                norm=norm(att.norm), proj=projections(att.projections()), eps=self.eps,
                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, q_norm=norm(att.q_norm), k_norm=norm(att.k_norm),
                scalings=self.family.scalings & ATTENTION_SCALINGS,
            ),
            mlp=MLPParts(
                norm=norm(mlp.norm), proj=projections(mlp.projections()), eps=self.eps,
                act_fn=layer.get_submodule(mlp.act),
                scalings=self.family.scalings & MLP_SCALINGS,
            ),
        )

    def _projection_paths(self) -> dict[str, str]:
        return {**self.family.attention.projections(), **self.family.mlp.projections()}

    def linears(self, index: int) -> dict[str, nn.Module]:
        """The modules that hold layer `index`'s projections (nn.Linear or a run-time
        replacement), by projection name."""
        layer = self.layers[index]
        return {name: layer.get_submodule(path) for name, path in self._projection_paths().items()}

    def linear_path(self, index: int, name: str) -> str:
        """Module path of projection `name` of layer `index` inside the model."""
        return f"{self.family.layers}.{index}.{self._projection_paths()[name]}"

    def set_linear(self, index: int, name: str, module: nn.Module) -> None:
        """Replace the module of projection `name` of layer `index`."""
        parent, _, attr = self._projection_paths()[name].rpartition(".")
        setattr(self.layers[index].get_submodule(parent), attr, module)

    def attention_module(self, index: int) -> nn.Module:
        return self.layers[index].get_submodule(self.family.attention.module)

    # ---- checks ---------------------------------------------------------------------------
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

    def check_group_size(self, group_size: int | None) -> None:
        """Raise ConfigError unless `group_size` divides every projection's input width."""
        if group_size is None:
            return
        parts = self.parts(0)
        widths = sorted({p.weight.shape[-1] for block in parts.blocks().values()
                         for p in block.proj.values()})
        bad = [w for w in widths if w % group_size]
        if bad:
            raise ConfigError(f"group_size {group_size} does not divide the input width(s) "
                              f"{bad} of this model (widths: {widths}); pick a divisor such as "
                              f"{_largest_common_pow2(widths)}")


def _largest_common_pow2(widths: list[int]) -> int:
    g = 1
    while all(w % (g * 2) == 0 for w in widths) and g < 256:
        g *= 2
    return g
