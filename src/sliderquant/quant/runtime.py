"""Dynamic activation quantization inside a plain transformers model (W4A4 deployment).

After folding, weights are ordinary tensors; what remains of the quantization at run time
is the per-token activation quantizer in front of every projection and the per-token,
per-head quantizer of q/k/v inside attention. `ActQuantLinear` is an `nn.Linear` with the
same parameters and state-dict keys; the attention quantizer is a registered transformers
attention implementation, and the fused MoE experts run through a registered experts
implementation that quantizes each expert's inputs (transformers' own fused kernels would
bypass any hook), so `generate`, lm-eval and friends work unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.quantizer import fake_quantize

ATTENTION_IMPLEMENTATION = "sliderquant_qkv"
EXPERTS_IMPLEMENTATION = "sliderquant_experts"


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


def _quantized_experts(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts loop (concatenated [gate; up], no bias) with each expert's
    inputs fake-quantized per token to `module.sliderquant_abits` bits."""
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        raise NotImplementedError("sliderquant's quantized experts take [gate; up] experts "
                                  "without bias, stored [out, in]")
    bits = getattr(module, "sliderquant_abits", 16)
    x = fake_quantize(hidden_states, bits)
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        if e >= module.gate_up_proj.shape[0]:
            continue  # the slot transformers uses for tokens dropped by expert parallelism
        token, slot = torch.where(top_k_index == e)
        gate, up = F.linear(x[token], module.gate_up_proj[e]).chunk(2, dim=-1)
        hidden = fake_quantize(module.act_fn(gate) * up, bits)
        y = F.linear(hidden, module.down_proj[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def register_experts() -> str:
    """Register the input-quantizing experts implementation with transformers (idempotent);
    its name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _quantized_experts)
    return EXPERTS_IMPLEMENTATION


def quantize_router_input(router: nn.Module, abits: int) -> None:
    """Fake-quantize a (quantized) MoE router's input per token (idempotent)."""
    if getattr(router, "sliderquant_abits", None) is None:
        router.register_forward_pre_hook(
            lambda module, args: (fake_quantize(args[0], module.sliderquant_abits), *args[1:]))
    router.sliderquant_abits = abits
