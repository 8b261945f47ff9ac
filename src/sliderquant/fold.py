"""Fold trained learnables into plain weights (ALGORITHM.md §10.3): zero extra inference cost.

Per layer: channel scales into the norms and neighbouring weights, weight learnables merged,
each weight replaced by its fake-quantized (dequantized) value, written in place into the
model's own tensors (a fused expert parameter is written slice by slice). For activation
quantization (abits < 16) the dynamic per-token quantizers are installed into the
transformers model itself.
"""

from __future__ import annotations

import torch

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import QuantDecoderLayer
from sliderquant.quant.runtime import (
    ActQuantLinear,
    quantize_router_input,
    register_attention,
    register_experts,
)


@torch.no_grad()
def fold_layers(
    adapter: DecoderAdapter, layers: list[QuantDecoderLayer], first: int = 0
) -> dict[str, torch.Tensor]:
    """Write every layer's folded weights into the model (in place); `layers` are the
    model's layers `first`, `first + 1`, … (all of them by default).

    Returns the quantization grid of every quantized projection as flat tensors keyed
    `<module path>.step`, `<module path>.zero` and `<module path>.bits` (what exporters
    need to recover the integer codes exactly: codes = round(W / step) + zero, in
    0..2^bits - 1). `.bits` is int64 [1], or [out] (every row's) for a channel split.
    """
    grids: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers, start=first):
        folded, layer_grids = layer.folded_weights()  # all computed before anything is written
        paths = adapter.projection_paths(i)
        for name, grid in layer_grids.items():
            path = paths[name]
            grids[f"{path}.step"], grids[f"{path}.zero"] = grid.step, grid.zero
            grids[f"{path}.bits"] = (torch.tensor([grid.bits]) if grid.row_bits is None
                                     else grid.row_bits.cpu())
        for block, parts in adapter.parts(i).blocks().items():
            for key, target in parts.tensors().items():
                if target is not None:
                    target.copy_(folded[block][key])
    return grids


def install_activation_quantization(
    adapter: DecoderAdapter, abits: int, quantize_attention: bool = True,
    quantize_router: bool = False,
) -> None:
    """Quantize every projection's input (and q/k/v in attention) per token at run time: Linear
    projections are wrapped, fused experts run through a registered experts implementation
    that quantizes their inputs, a quantized router gets its input quantized."""
    if abits >= 16:
        return
    model = adapter.model
    moe = False
    for i in range(adapter.num_layers):
        for name, lin in adapter.linears(i).items():
            if not isinstance(lin, ActQuantLinear):
                adapter.set_linear(i, name, ActQuantLinear(lin, abits))
        adapter.attention_module(i).sliderquant_abits = abits if quantize_attention else 16
        experts = adapter.experts_module(i)
        if experts is not None:
            moe = True
            experts.sliderquant_abits = abits
            if quantize_router:
                quantize_router_input(adapter.router_module(i), abits)
    model.set_attn_implementation(register_attention())
    if moe:
        model.set_experts_implementation(register_experts())
