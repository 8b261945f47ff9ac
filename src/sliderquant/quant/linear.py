"""QuantLinear: a frozen linear layer with LoRA, a weight quantizer and an input quantizer.

A training-time view over an existing `nn.Linear`: the base weight and bias are the same
tensors as the model's (frozen, never modified during training), so wrapping costs no copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.quantizer import WeightQuantizer, fake_quantize

LORA_ALPHA = 1.0  # fixed in the reference code: the delta is (B @ A) * alpha / rank


class QuantLinear(nn.Module):
    """y = Q_a(x) @ Q_w(W_t + B @ A * alpha / r)^T + b_t in quantized mode; x @ W^T + b in FP mode.

    `W_t`, `b_t` are the (possibly channel-scaled) weight and bias handed in by the layer.
    """

    def __init__(
        self,
        linear: nn.Linear,
        wbits: int,
        abits: int,
        group_size: int | None,
        lora_rank: int,
        lwc: bool,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.register_buffer("weight", linear.weight.detach(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.abits = abits
        self.weight_quantizer = WeightQuantizer(out_features, in_features, wbits, group_size, lwc)
        self.lora_rank = lora_rank
        if lora_rank > 0:
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            a = torch.empty(lora_rank, in_features).uniform_(-bound, bound, generator=generator)
            self.lora_a = nn.Parameter(a.to(linear.weight.dtype))
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank,
                                                   dtype=linear.weight.dtype))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` plus the LoRA delta (before quantization)."""
        if self.lora_rank == 0:
            return weight
        return weight + (self.lora_b @ self.lora_a) * (LORA_ALPHA / self.lora_rank)

    def quantized_weight(self, weight: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """Fake-quantized `weight + LoRA` at fraction `rate` (differentiable w.r.t. learnables)."""
        return self.weight_quantizer(self.merged_weight(weight), rate)

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
