"""QuantLinear: a frozen projection with its weight learnables, weight and input quantizers.

A training-time view over a weight *tensor* (and optional bias), not over an `nn.Linear`:
the tensor may be a model parameter or a slice `param[e]` of a fused 3-D expert parameter.
The base tensors are the model's own (frozen, never modified during training), so wrapping
costs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.learnables import Clipping, LayerQuantSpec, Rounding, weight_learnables
from sliderquant.quant.quantizer import (
    QuantGrid,
    WeightFormat,
    fake_quantize,
    fake_quantize_weight,
    weight_grid,
)
from sliderquant.quant.search import search_clipping

L = TypeVar("L", bound=nn.Module)


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
    quantizer receives what they hand it (clipping logits choose the grid of the adjusted
    weight, rounding offsets shift `adjusted / step` before rounding). The weight format is
    `fmt` (default: the spec's), so every projection of a layer may have its own.

    While `observing`, full-precision forwards accumulate the second moments of the inputs
    (per input channel) for a searched start (`search_start`).
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
        self.input_moments: torch.Tensor | None = None  # sum of x^2 per input channel
        self.observed_tokens = 0

    def _learnable(self, kind: type[L]) -> L | None:
        return next((m for m in self.learnables.values() if isinstance(m, kind)), None)

    def observe(self) -> None:
        """Start accumulating the second moments of full-precision inputs."""
        self.input_moments = torch.zeros(self.weight.shape[1], device=self.weight.device)
        self.observed_tokens = 0

    @torch.no_grad()
    def search_start(self, weight: torch.Tensor) -> None:
        """Start the clipping at the activation-weighted searched factors of `adjust(weight)`
        (`weight`: the channel-scaled base weight; unweighted if no input was observed), and
        stop observing. No-op without clipping."""
        clip = self._learnable(Clipping)
        if clip is not None and self.format.bits < 16:
            importance = (self.input_moments.to(weight.device) / self.observed_tokens
                          if self.input_moments is not None and self.observed_tokens else None)
            fmt = self.format
            upper, lower = search_clipping(self.adjust(weight), fmt.bits, fmt.group_size,
                                           importance, fmt.symmetric)
            clip.start_at(upper.to(clip.upper.device), lower.to(clip.lower.device))
        self.input_moments, self.observed_tokens = None, 0

    @torch.no_grad()
    def harden_(self, weight: torch.Tensor, fraction: float) -> None:
        """Harden learned rounding (see `Rounding.harden_`) until `fraction` of it is hard;
        `weight` is the channel-scaled base weight. No-op without learned rounding."""
        rounding = self._learnable(Rounding)
        if rounding is None:
            return
        adjusted = self.adjust(weight)
        args = {k: v for k, v in self._quantizer_args().items() if k != "offset"}
        step = weight_grid(adjusted, self.format, **args).step  # per row's own bits (splits)
        out, n_in = adjusted.shape
        scaled = (adjusted.reshape(out, step.shape[-1], -1) / step[..., None]).reshape(out, n_in)
        rounding.harden_(scaled, fraction)

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

    def quantize_input(self, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
        """The input quantizer (per token, `abits`); projections that read the same tensor
        (q/k/v, gate/up) share one call of it (see quant/blocks.py)."""
        return fake_quantize(x, self.abits, rate)

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
        input_quantized: bool = False,
    ) -> torch.Tensor:
        """`input_quantized`: `x` already went through `quantize_input` at this `rate`."""
        if not quantized:
            if self.input_moments is not None:
                moments = x.detach().float().pow(2).reshape(-1, x.shape[-1]).sum(0)
                self.input_moments += moments.to(self.input_moments.device)
                self.observed_tokens += x.numel() // x.shape[-1]
            return F.linear(x, self.weight, self.bias)
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        if not input_quantized:
            x = self.quantize_input(x, rate)
        return F.linear(x, self.quantized_weight(weight, rate), bias)
