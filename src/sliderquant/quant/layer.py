"""The quantized decoder layer (Llama/Qwen2 structure), ALGORITHM.md §5.

RMSNorm -> attention (RoPE, GQA, FP softmax) -> residual -> RMSNorm -> SwiGLU -> residual,
written out explicitly so that every weight and activation can be fake-quantized. One
module serves as the FP teacher (`quantized=False`: original weights, nothing quantized)
and as the student (`quantized=True`: channel scaling, LoRA, clipping, fake quantization).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.linear import QuantLinear
from sliderquant.quant.quantizer import QuantGrid, fake_quantize
from sliderquant.quant.smoothing import ChannelScales, LayerWeights

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class DecoderParts:
    """Where the pieces of one decoder layer are (filled in by a model adapter)."""

    input_norm: nn.Module
    post_norm: nn.Module
    linears: dict[str, nn.Linear]  # keys: PROJECTIONS
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


@dataclass(frozen=True)
class LayerQuantSpec:
    """What to quantize and which learnables to create in one layer."""

    wbits: int
    abits: int
    group_size: int | None = None
    lora_rank: int = 4
    lwc: bool = True
    channel_scaling: bool = False
    qk_scaling: bool = True
    down_scaling: bool = True
    quantize_attention: bool = True


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as transformers computes it (statistics in float32)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return gain * x.to(dtype)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the transformers (`rotate_half`) convention; cos/sin: [B, T, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def repeat_kv(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B, H_kv, T, d] -> [B, H_kv * group, T, d], kv head j serving query heads j*group…"""
    if group == 1:
        return t
    b, h, n, d = t.shape
    return t[:, :, None].expand(b, h, group, n, d).reshape(b, h * group, n, d)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention in full precision; q: [B, H, T, d], k/v: [B, H_kv, T, d]."""
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, group), repeat_kv(v, group), is_causal=True
    )


class QuantDecoderLayer(nn.Module):
    """Training-time view over one decoder layer; the base weights are shared, never copied."""

    def __init__(self, parts: DecoderParts, spec: LayerQuantSpec, generator: torch.Generator):
        super().__init__()
        self.spec = spec
        self.act_fn = parts.act_fn
        self.num_heads, self.num_kv_heads = parts.num_heads, parts.num_kv_heads
        self.head_dim, self.eps = parts.head_dim, parts.eps
        self.register_buffer("input_norm", parts.input_norm.weight.detach(), persistent=False)
        self.register_buffer("post_norm", parts.post_norm.weight.detach(), persistent=False)
        self.proj = nn.ModuleDict({
            name: QuantLinear(
                parts.linears[name], spec.wbits, spec.abits, spec.group_size,
                spec.lora_rank, spec.lwc, generator,
            )
            for name in PROJECTIONS
        })
        self.scales: ChannelScales | None = None
        if spec.channel_scaling:
            q, up = parts.linears["q"].weight, parts.linears["up"].weight
            self.scales = ChannelScales(
                q.shape[1], parts.num_heads, parts.num_kv_heads, parts.head_dim, up.shape[0],
                spec.qk_scaling, spec.down_scaling, dtype=q.dtype,
            )
        self.to(parts.input_norm.weight.device)  # learnables start where the weights are

    def base_weights(self) -> LayerWeights:
        w: LayerWeights = {"input_norm": self.input_norm, "post_norm": self.post_norm}
        for name, lin in self.proj.items():
            w[f"{name}.weight"], w[f"{name}.bias"] = lin.weight, lin.bias
        return w

    def student_weights(self) -> LayerWeights:
        """Base weights with the channel scaling folded in (before LoRA and quantization)."""
        if self.scales is None:
            return self.base_weights()
        self.scales.project_()
        return self.scales.transform(self.base_weights())

    def learnable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Learnables by optimiser group: "lora", "scale", "clip"."""
        groups: dict[str, list[nn.Parameter]] = {"lora": [], "scale": [], "clip": []}
        for lin in self.proj.values():
            if lin.lora_rank:
                groups["lora"] += [lin.lora_a, lin.lora_b]
            if lin.weight_quantizer.clip_upper is not None:
                groups["clip"] += [lin.weight_quantizer.clip_upper, lin.weight_quantizer.clip_lower]
        if self.scales is not None:
            groups["scale"] = list(self.scales.parameters())
        return groups

    @torch.no_grad()
    def folded_weights(self) -> tuple[LayerWeights, dict[str, QuantGrid]]:
        """Final deployable weights (scaling folded, LoRA merged, weights on the integer grid)
        and, per quantized projection, the grid they sit on."""
        w = self.student_weights()
        grids: dict[str, QuantGrid] = {}
        for name, lin in self.proj.items():
            merged = lin.merged_weight(w[f"{name}.weight"])
            if lin.weight_quantizer.bits >= 16:
                w[f"{name}.weight"] = merged
                continue
            grid = QuantGrid(*lin.weight_quantizer.integers(merged),
                             bits=lin.weight_quantizer.bits,
                             group_size=lin.weight_quantizer.group_size)
            w[f"{name}.weight"] = grid.dequantize()
            grids[name] = grid
        return w, grids

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        quantized: bool = False,
        rate: float = 1.0,
    ) -> torch.Tensor:
        w = self.student_weights() if quantized else self.base_weights()

        def proj(name: str, h: torch.Tensor) -> torch.Tensor:
            return self.proj[name](h, w[f"{name}.weight"], w[f"{name}.bias"], rate, quantized)

        b, t, _ = x.shape
        h = rms_norm(x, w["input_norm"], self.eps)
        q = proj("q", h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = proj("k", h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = proj("v", h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if quantized and self.spec.quantize_attention:
            q, k, v = (fake_quantize(z, self.spec.abits, rate) for z in (q, k, v))
        attn = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        x = x + proj("o", attn)
        h = rms_norm(x, w["post_norm"], self.eps)
        return x + proj("down", self.act_fn(proj("gate", h)) * proj("up", h))
