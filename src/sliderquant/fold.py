"""Fold trained learnables into plain weights (ALGORITHM.md §10.3): zero extra inference cost.

Per layer: channel scales into the norms and neighbouring weights, LoRA merged, each weight
replaced by its fake-quantized (dequantized) value. For activation quantization (abits < 16)
the dynamic per-token quantizers are installed into the transformers model itself.
"""

from __future__ import annotations

import torch

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import PROJECTIONS, QuantDecoderLayer
from sliderquant.quant.runtime import ActQuantLinear, register_attention


@torch.no_grad()
def fold_layers(adapter: DecoderAdapter, layers: list[QuantDecoderLayer]) -> None:
    """Write every layer's folded weights into the model (in place)."""
    for i, layer in enumerate(layers):
        folded = layer.folded_weights()  # computed in full before any base tensor is written
        parts = adapter.parts(i)
        parts.input_norm.weight.copy_(folded["input_norm"])
        parts.post_norm.weight.copy_(folded["post_norm"])
        for name in PROJECTIONS:
            lin = parts.linears[name]
            lin.weight.copy_(folded[f"{name}.weight"])
            if lin.bias is not None:
                lin.bias.copy_(folded[f"{name}.bias"])


def install_activation_quantization(
    adapter: DecoderAdapter, abits: int, quantize_attention: bool = True
) -> None:
    """Quantize every projection's input (and q/k/v in attention) per token at run time."""
    if abits >= 16:
        return
    for i in range(adapter.num_layers):
        for name, lin in adapter.parts(i).linears.items():
            if not isinstance(lin, ActQuantLinear):
                adapter.set_linear(i, name, ActQuantLinear(lin, abits))
        adapter.layers[i].self_attn.sliderquant_abits = abits if quantize_attention else 16
    adapter.model.set_attn_implementation(register_attention())
