"""QuantLinear: a frozen projection with its weight learnables, weight and input quantizers.

A training-time view over a weight *tensor* (and optional bias), not over an `nn.Linear`:
the tensor may be a model parameter or a slice `param[e]` of a fused 3-D expert parameter.
The base tensors are the model's own (frozen, never modified during training), so wrapping
costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.learnables import LayerQuantSpec, weight_learnables
from sliderquant.quant.quantizer import (
    QuantGrid,
    WeightFormat,
    fake_quantize,
    fake_quantize_weight,
    weight_grid,
)


@dataclass(frozen=True)
class Projection:
    """Where a projection's tensors are: weight [out, in] and optional bias [out], the
    model's own tensors (or views into them, e.g. one expert of a fused parameter)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


class QuantLinear(nn.Module):
    """y = Q_a(x) @ Q_w(adjust(W_t))^T + b_t in quantized mode; x @ W^T + b in FP mode.

    `W_t`, `b_t` are the (possibly channel-scaled) weight and bias handed in by the block;
    `adjust` applies the weight learnables in order (LoRA: W_t + B @ A * alpha / r), and the
    quantizer receives what they hand it (clipping logits). The weight format is `fmt`
    (default: the spec's), so every projection of a layer may have its own.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerQuantSpec,
                 generator: torch.Generator | None = None, fmt: WeightFormat | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        self.register_buffer("weight", weight.detach(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.abits = spec.abits
        self.format = fmt or spec.weight_format
        self.learnables = nn.ModuleDict(weight_learnables(
            spec, out_features, in_features, weight.dtype, generator, self.format))

    def adjust(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` as the quantizer sees it (LoRA merged, …)."""
        for learnable in self.learnables.values():
            weight = learnable.adjust(weight)
        return weight

    def _quantizer_args(self) -> dict[str, torch.Tensor]:
        args: dict[str, torch.Tensor] = {}
        for learnable in self.learnables.values():
            args.update(learnable.quantizer_args())
        return args

    def quantized_weight(self, weight: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Fake-quantized `adjust(weight)` at fraction `rate` (differentiable w.r.t. learnables)."""
        return fake_quantize_weight(self.adjust(weight), self.format, rate,
                                    **self._quantizer_args())

    @torch.no_grad()
    def folded(self, weight: torch.Tensor) -> tuple[torch.Tensor, QuantGrid | None]:
        """The deployable weight (learnables merged, on the integer grid) and its grid (None
        when weights stay in full precision)."""
        adjusted = self.adjust(weight)
        if self.format.bits >= 16:
            return adjusted, None
        grid = weight_grid(adjusted, self.format, **self._quantizer_args())
        return grid.dequantize(), grid

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rate: float = 1.0,
        quantized: bool = True,
    ) -> torch.Tensor:
        if not quantized:
            return F.linear(x, self.weight, self.bias)
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        x = fake_quantize(x, self.abits, rate)
        return F.linear(x, self.quantized_weight(weight, rate), bias)
