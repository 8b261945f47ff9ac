"""The quantized decoder layer (ALGORITHM.md §5): an attention block and a feed-forward block
(a gated MLP or a sparse mixture of experts), composed as transformers composes its decoder
layer (pre-norm residual blocks).

One module serves as the FP teacher (`quantized=False`) and as the student
(`quantized=True`); its base weights are the model's own tensors, never copied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sliderquant.quant.blocks import (
    AttentionParts,
    BlockParts,
    BlockWeights,
    MLPParts,
    MoEParts,
    QuantAttention,
    QuantBlock,
    QuantMLP,
    QuantMoE,
)
from sliderquant.quant.learnables import LayerQuantSpec
from sliderquant.quant.linear import QuantLinear
from sliderquant.quant.quantizer import QuantGrid

# The block class that serves each kind of feed-forward part.
FEED_FORWARD_BLOCKS: dict[type[BlockParts], type[QuantBlock]] = {MLPParts: QuantMLP,
                                                                 MoEParts: QuantMoE}


@dataclass
class LayerParts:
    """The tensors of one decoder layer, by block (read by `models/adapters.py`)."""

    attn: AttentionParts
    mlp: BlockParts  # MLPParts or MoEParts

    def blocks(self) -> dict[str, BlockParts]:
        return {"attn": self.attn, "mlp": self.mlp}


class QuantDecoderLayer(nn.Module):
    """Training-time view over one decoder layer: `x + attn(x)`, then `x + mlp(x)`.

    LoRA factors are drawn from `generator` in projection order: q k v o, then gate up down
    (or, in an MoE layer, the router if it is quantized and expert by expert gate up down).
    """

    def __init__(self, parts: LayerParts, spec: LayerQuantSpec,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.attn = QuantAttention(parts.attn, spec, generator)
        self.mlp = FEED_FORWARD_BLOCKS[type(parts.mlp)](parts.mlp, spec, generator)
        self.to(parts.attn.norm.device)  # learnables start where the weights are

    def blocks(self) -> dict[str, QuantBlock]:
        return {"attn": self.attn, "mlp": self.mlp}

    @property
    def device(self) -> torch.device:
        """Where the layer's frozen weights are now."""
        return self.attn.norm.device

    @contextlib.contextmanager
    def placed(self, device: torch.device) -> Iterator[None]:
        """The layer on `device` inside the block. After it, its learnables are back on the
        model's device and its frozen weights are again the model's own tensors (views into
        fused expert parameters included), so no second copy of a weight outlives the block."""
        home = self.device
        if home == device:
            yield
            return
        frozen = [(module, name, tensor) for module in self.modules()
                  for name, tensor in module.named_buffers(recurse=False)]
        self.to(device)
        try:
            yield
        finally:
            self.to(home)
            for module, name, tensor in frozen:
                module.register_buffer(name, tensor, persistent=False)

    def moe(self) -> QuantMoE | None:
        """The layer's mixture-of-experts block, if it has one."""
        return self.mlp if isinstance(self.mlp, QuantMoE) else None

    def projections(self) -> dict[str, QuantLinear]:
        """Every projection of the layer by name (names are unique in a layer)."""
        return {name: lin for block in self.blocks().values()
                for name, lin in block.projections().items()}

    @torch.no_grad()
    def folded_weights(self) -> tuple[dict[str, BlockWeights], dict[str, QuantGrid]]:
        """Per block, the deployable weights (see `QuantBlock.folded_weights`); per quantized
        projection, its grid. Everything is computed before the caller writes anything."""
        weights: dict[str, BlockWeights] = {}
        grids: dict[str, QuantGrid] = {}
        for name, block in self.blocks().items():
            weights[name], block_grids = block.folded_weights()
            grids.update(block_grids)
        return weights, grids

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        quantized: bool = False,
        rate: float = 1.0,
    ) -> torch.Tensor:
        x = self.feed_forward_input(x, cos, sin, quantized, rate)
        return x + self.mlp(x, quantized, rate)

    def feed_forward_input(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           quantized: bool = False, rate: float = 1.0) -> torch.Tensor:
        """The residual stream after attention, i.e. what the feed-forward block reads."""
        return x + self.attn(x, cos, sin, quantized, rate)
