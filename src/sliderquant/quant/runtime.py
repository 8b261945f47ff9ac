"""Dynamic activation quantization inside a plain transformers model (W4A4 deployment).

After folding, weights are ordinary tensors; what remains of the quantization at run time
is the per-token activation quantizer in front of every projection and the per-token,
per-head quantizer of q/k/v inside attention. `ActQuantLinear` is an `nn.Linear` with the
same parameters and state-dict keys; the attention quantizer is a registered transformers
attention implementation, so `generate`, lm-eval and friends work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.quantizer import fake_quantize

ATTENTION_IMPLEMENTATION = "sliderquant_qkv"


class ActQuantLinear(nn.Linear):
    """nn.Linear whose input is fake-quantized per token to `abits` bits."""

    def __init__(self, linear: nn.Linear, abits: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.abits = abits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize(x, self.abits), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, abits={self.abits}"


def _quantized_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bits = getattr(module, "sliderquant_abits", 16)
    query, key, value = (fake_quantize(t, bits) for t in (query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> str:
    """Register the q/k/v-quantizing attention with transformers (idempotent); its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _quantized_sdpa)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    return ATTENTION_IMPLEMENTATION
