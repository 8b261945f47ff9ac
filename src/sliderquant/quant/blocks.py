"""Quantized blocks of a decoder layer (ALGORITHM.md §5): attention and a gated MLP.

Each block is a training-time view over the model's tensors (no copies). One block serves
as the FP teacher (`quantized=False`: original weights, nothing quantized) and as the
student (`quantized=True`: channel scaling, weight learnables, fake quantization). A block
owns its pre-norm and the channel-scaling vectors that cross its norm -> projection
boundaries, and returns its output *before* the residual add, so that a layer composes
blocks as `x = x + block(x)`.

Block weights are flat dicts: "norm", "<proj>.weight", "<proj>.bias" (None without bias)
and, in attention, "q_norm"/"k_norm" (None unless the family has per-head q/k norms).
`student_weights` is the single implementation of the equivalent transformations: the
training forward calls it every step (differentiably) and folding calls it once.

The parts dataclasses are what a block is built from; `models/adapters.py` reads them out
of a transformers model according to its family entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sliderquant.quant.learnables import ChannelScales, LayerQuantSpec
from sliderquant.quant.linear import Projection, QuantGrid, QuantLinear
from sliderquant.quant.quantizer import fake_quantize

BlockWeights = dict[str, "torch.Tensor | None"]

ATTENTION_SCALINGS = frozenset({"qkv", "out", "qkt"})
MLP_SCALINGS = frozenset({"fc1", "fc2"})


@dataclass
class BlockParts:
    """A block's tensors in the model: its pre-norm gain and its projections by name."""

    norm: torch.Tensor
    proj: dict[str, Projection]
    eps: float

    READS: ClassVar[tuple[str, ...]] = ()  # projections that read the normed residual stream
    WRITES: ClassVar[tuple[str, ...]] = ()  # projections that write back to it

    def tensors(self) -> BlockWeights:
        """Every tensor of the block by its block-weights key (what folding writes)."""
        found: BlockWeights = {"norm": self.norm}
        for name, p in self.proj.items():
            found[f"{name}.weight"], found[f"{name}.bias"] = p.weight, p.bias
        return found


@dataclass
class AttentionParts(BlockParts):
    num_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    q_norm: torch.Tensor | None = None  # per-head RMSNorm gains [head_dim] (Qwen3)
    k_norm: torch.Tensor | None = None
    scalings: frozenset[str] = ATTENTION_SCALINGS  # the valid ones for this family

    READS: ClassVar[tuple[str, ...]] = ("q", "k", "v")
    WRITES: ClassVar[tuple[str, ...]] = ("o",)

    def tensors(self) -> BlockWeights:
        return {**super().tensors(), "q_norm": self.q_norm, "k_norm": self.k_norm}


@dataclass
class MLPParts(BlockParts):
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    scalings: frozenset[str] = MLP_SCALINGS

    READS: ClassVar[tuple[str, ...]] = ("gate", "up")
    WRITES: ClassVar[tuple[str, ...]] = ("down",)


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


def _scale_rows(w: BlockWeights, name: str, factor: torch.Tensor) -> None:
    w[f"{name}.weight"] = w[f"{name}.weight"] * factor.unsqueeze(1)
    if w[f"{name}.bias"] is not None:
        w[f"{name}.bias"] = w[f"{name}.bias"] * factor


class QuantBlock(nn.Module):
    """What attention, MLP (and MoE) blocks share: a pre-norm, named projections, optional
    channel scales, and folding."""

    def __init__(self, parts: BlockParts, spec: LayerQuantSpec, names: tuple[str, ...],
                 generator: torch.Generator | None):
        super().__init__()
        self.eps = parts.eps
        self.register_buffer("norm", parts.norm.detach(), persistent=False)
        self.proj = nn.ModuleDict({
            name: QuantLinear(parts.proj[name].weight, parts.proj[name].bias, spec, generator,
                              spec.format_of(name))
            for name in names
        })
        self.scales: ChannelScales | None = None

    def base_weights(self) -> BlockWeights:
        w: BlockWeights = {"norm": self.norm}
        for name, lin in self.proj.items():
            w[f"{name}.weight"], w[f"{name}.bias"] = lin.weight, lin.bias
        return w

    def student_weights(self) -> BlockWeights:
        """Base weights with the channel scaling folded in (before LoRA and quantization)."""
        if self.scales is None:
            return self.base_weights()
        self.scales.project_()
        return self._scaled(self.base_weights())

    def _scaled(self, w: BlockWeights) -> BlockWeights:
        raise NotImplementedError

    @torch.no_grad()
    def folded_weights(self) -> tuple[BlockWeights, dict[str, QuantGrid]]:
        """Final deployable weights (scaling folded, weight learnables merged, weights on the
        integer grid) and, per quantized projection, the grid they sit on."""
        w = self.student_weights()
        grids: dict[str, QuantGrid] = {}
        for name, lin in self.proj.items():
            w[f"{name}.weight"], grid = lin.folded(w[f"{name}.weight"])
            if grid is not None:
                grids[name] = grid
        return w, grids

    def _project(self, w: BlockWeights, name: str, h: torch.Tensor, rate: float,
                 quantized: bool) -> torch.Tensor:
        return self.proj[name](h, w[f"{name}.weight"], w[f"{name}.bias"], rate, quantized)


class QuantAttention(QuantBlock):
    """RMSNorm -> q/k/v (optional per-head q/k RMSNorm) -> RoPE -> GQA softmax attention in
    full precision -> o. Quantized q/k/v activations per token and head (after RoPE).

    Channel scales (ALGORITHM.md §5.3), where the family allows them:
    qkv [hidden]  norm output       -> columns of q, k, v (shared)
    out [kv_dim]  rows of v         -> columns of o (expanded over the query heads)
    qkt [kv_dim]  rows of q (expanded, divided), rows of k (multiplied); pre-RoPE
    """

    def __init__(self, parts: AttentionParts, spec: LayerQuantSpec,
                 generator: torch.Generator | None = None):
        super().__init__(parts, spec, ("q", "k", "v", "o"), generator)
        self.num_heads, self.num_kv_heads = parts.num_heads, parts.num_kv_heads
        self.head_dim = parts.head_dim
        self.abits = spec.abits
        self.quantize_activations = spec.quantize_attention
        for name in ("q_norm", "k_norm"):
            gain = getattr(parts, name)
            self.register_buffer(name, None if gain is None else gain.detach(), persistent=False)
        if spec.channel_scaling:
            q = parts.proj["q"].weight
            kv_dim = parts.num_kv_heads * parts.head_dim
            sizes = {"qkv": q.shape[1], "out": kv_dim}
            if spec.qk_scaling:
                sizes["qkt"] = kv_dim
            self.scales = ChannelScales(
                {k: n for k, n in sizes.items() if k in parts.scalings}, dtype=q.dtype)

    def base_weights(self) -> BlockWeights:
        return {**super().base_weights(), "q_norm": self.q_norm, "k_norm": self.k_norm}

    def expand_kv(self, v: torch.Tensor) -> torch.Tensor:
        """[kv_heads * d] -> [heads * d]: each kv-head block repeated for its query heads."""
        group = self.num_heads // self.num_kv_heads
        blocks = v.view(self.num_kv_heads, 1, self.head_dim)
        return blocks.expand(self.num_kv_heads, group, self.head_dim).reshape(-1)

    def _scaled(self, w: BlockWeights) -> BlockWeights:
        w = dict(w)
        qkv, out, qkt = (self.scales.get(n) for n in ("qkv", "out", "qkt"))
        if qkv is not None:
            w["norm"] = w["norm"] / qkv
            for name in ("q", "k", "v"):
                w[f"{name}.weight"] = w[f"{name}.weight"] * qkv
        if out is not None:
            _scale_rows(w, "v", 1 / out)
            w["o.weight"] = w["o.weight"] * self.expand_kv(out)
        if qkt is not None:
            _scale_rows(w, "q", 1 / self.expand_kv(qkt))
            _scale_rows(w, "k", qkt)
        return w

    def _heads(self, t: torch.Tensor, heads: int, norm: torch.Tensor | None) -> torch.Tensor:
        """[B, T, heads * d] -> [B, heads, T, d], through the per-head norm if there is one."""
        t = t.view(*t.shape[:2], heads, self.head_dim)
        if norm is not None:
            t = rms_norm(t, norm, self.eps)
        return t.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                quantized: bool = False, rate: float = 1.0) -> torch.Tensor:
        w = self.student_weights() if quantized else self.base_weights()
        b, t, _ = x.shape
        h = rms_norm(x, w["norm"], self.eps)
        q = self._heads(self._project(w, "q", h, rate, quantized), self.num_heads, w["q_norm"])
        k = self._heads(self._project(w, "k", h, rate, quantized), self.num_kv_heads,
                        w["k_norm"])
        v = self._heads(self._project(w, "v", h, rate, quantized), self.num_kv_heads, None)
        q, k = apply_rope(q, k, cos, sin)
        if quantized and self.quantize_activations:
            q, k, v = (fake_quantize(z, self.abits, rate) for z in (q, k, v))
        attn = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return self._project(w, "o", attn, rate, quantized)


class QuantMLP(QuantBlock):
    """RMSNorm -> down(act(gate(h)) * up(h)) (SwiGLU).

    Channel scales: fc1 [hidden] norm output -> columns of up and gate (shared);
    fc2 [intermediate] rows of up -> columns of down.
    """

    def __init__(self, parts: MLPParts, spec: LayerQuantSpec,
                 generator: torch.Generator | None = None):
        super().__init__(parts, spec, ("gate", "up", "down"), generator)
        self.act_fn = parts.act_fn
        if spec.channel_scaling:
            up = parts.proj["up"].weight
            sizes = {"fc1": up.shape[1]}
            if spec.down_scaling:
                sizes["fc2"] = up.shape[0]
            self.scales = ChannelScales(
                {k: n for k, n in sizes.items() if k in parts.scalings}, dtype=up.dtype)

    def _scaled(self, w: BlockWeights) -> BlockWeights:
        w = dict(w)
        fc1, fc2 = self.scales.get("fc1"), self.scales.get("fc2")
        if fc1 is not None:
            w["norm"] = w["norm"] / fc1
            for name in ("up", "gate"):
                w[f"{name}.weight"] = w[f"{name}.weight"] * fc1
        if fc2 is not None:
            _scale_rows(w, "up", 1 / fc2)
            w["down.weight"] = w["down.weight"] * fc2
        return w

    def forward(self, x: torch.Tensor, quantized: bool = False, rate: float = 1.0
                ) -> torch.Tensor:
        w = self.student_weights() if quantized else self.base_weights()
        h = rms_norm(x, w["norm"], self.eps)
        hidden = (self.act_fn(self._project(w, "gate", h, rate, quantized))
                  * self._project(w, "up", h, rate, quantized))
        return self._project(w, "down", hidden, rate, quantized)
