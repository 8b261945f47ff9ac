"""Quantized blocks of a decoder layer (ALGORITHM.md §5): attention, a gated MLP and a sparse
mixture of experts.

Each block is a training-time view over the model's tensors (no copies). One block serves
as the FP teacher (`quantized=False`: original weights, nothing quantized) and as the
student (`quantized=True`: channel scaling, weight learnables, fake quantization). A block
owns its pre-norm and the channel-scaling vectors that cross its norm -> projection
boundaries, and returns its output *before* the residual add, so that a layer composes
blocks as `x = x + block(x)`.

Block weights are flat dicts: "norm", "<proj>.weight", "<proj>.bias" (None without bias)
and, in attention, "q_norm"/"k_norm" (None unless the family has per-head q/k norms). MoE
projections are named "router" and "experts.<e>.<gate|up|down>".
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

    def reads(self) -> list[Projection]:
        """The projections that read the normed residual stream."""
        return [self.proj[name] for name in self.READS]

    def writes(self) -> list[Projection]:
        """The projections that write back to the residual stream."""
        return [self.proj[name] for name in self.WRITES]

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


EXPERT_PROJECTIONS = ("gate", "up", "down")  # one expert's SwiGLU, in creation order


@dataclass
class MoEParts(BlockParts):
    """A sparse feed-forward: `proj` holds every expert's gate, up and down ("experts.<e>.
    <name>", views into the model's fused 3-D parameters), `router` the router's weight."""

    router: Projection | None = None
    num_experts: int = 0
    top_k: int = 0
    renormalize: bool = True  # top-k probabilities renormalised to sum to 1
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    scalings: frozenset[str] = MLP_SCALINGS

    def expert(self, e: int) -> dict[str, Projection]:
        return {name: self.proj[f"experts.{e}.{name}"] for name in EXPERT_PROJECTIONS}

    def reads(self) -> list[Projection]:
        return [self.router] + [self.proj[f"experts.{e}.{name}"]
                                for e in range(self.num_experts) for name in ("gate", "up")]

    def writes(self) -> list[Projection]:
        return [self.proj[f"experts.{e}.down"] for e in range(self.num_experts)]

    def tensors(self) -> BlockWeights:
        return {**super().tensors(), "router.weight": self.router.weight,
                "router.bias": self.router.bias}


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
    """What attention, MLP and MoE blocks share: a pre-norm, named projections, optional
    channel scales, and folding."""

    def __init__(self, parts: BlockParts):
        super().__init__()
        self.eps = parts.eps
        self.register_buffer("norm", parts.norm.detach(), persistent=False)
        self.scales: ChannelScales | None = None

    def projections(self) -> dict[str, QuantLinear]:
        """Every projection of the block by name."""
        return dict(self.proj)

    def base_weights(self) -> BlockWeights:
        w: BlockWeights = {"norm": self.norm}
        for name, lin in self.projections().items():
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
    def search_start(self) -> None:
        """Searched clipping start of every projection (see `QuantLinear.search_start`)."""
        w = self.student_weights()
        for name, lin in self.projections().items():
            lin.search_start(w[f"{name}.weight"])

    @torch.no_grad()
    def harden_(self, fraction: float) -> None:
        """Harden learned rounding of every projection to `fraction` (`QuantLinear.harden_`)."""
        w = self.student_weights()
        for name, lin in self.projections().items():
            lin.harden_(w[f"{name}.weight"], fraction)

    @torch.no_grad()
    def folded_weights(self) -> tuple[BlockWeights, dict[str, QuantGrid]]:
        """Final deployable weights (scaling folded, weight learnables merged, weights on the
        integer grid) and, per quantized projection, the grid they sit on."""
        w = self.student_weights()
        grids: dict[str, QuantGrid] = {}
        for name, lin in self.projections().items():
            w[f"{name}.weight"], grid = lin.folded(w[f"{name}.weight"])
            if grid is not None:
                grids[name] = grid
        return w, grids

    def _project(self, w: BlockWeights, name: str, h: torch.Tensor, rate: float,
                 quantized: bool, input_quantized: bool = False) -> torch.Tensor:
        return self.proj[name](h, w[f"{name}.weight"], w[f"{name}.bias"], rate, quantized,
                               input_quantized)

    def _shared_input(self, h: torch.Tensor, reader: str, rate: float, quantized: bool
                      ) -> torch.Tensor:
        """`h` quantized once for every projection that reads it (same bits, same rate)."""
        return self.proj[reader].quantize_input(h, rate) if quantized else h


def _linears(parts: BlockParts, names: tuple[str, ...], spec: LayerQuantSpec,
             generator: torch.Generator | None) -> nn.ModuleDict:
    """QuantLinears over `parts`' projections `names`, created (and LoRA drawn) in order."""
    return nn.ModuleDict({
        name: QuantLinear(parts.proj[name].weight, parts.proj[name].bias, spec, generator,
                          spec.format_of(name))
        for name in names})


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
        super().__init__(parts)
        self.proj = _linears(parts, ("q", "k", "v", "o"), spec, generator)
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
        h = self._shared_input(rms_norm(x, w["norm"], self.eps), "q", rate, quantized)
        q = self._heads(self._project(w, "q", h, rate, quantized, True), self.num_heads,
                        w["q_norm"])
        k = self._heads(self._project(w, "k", h, rate, quantized, True), self.num_kv_heads,
                        w["k_norm"])
        v = self._heads(self._project(w, "v", h, rate, quantized, True), self.num_kv_heads,
                        None)
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
        super().__init__(parts)
        self.proj = _linears(parts, ("gate", "up", "down"), spec, generator)
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
        h = self._shared_input(rms_norm(x, w["norm"], self.eps), "gate", rate, quantized)
        hidden = (self.act_fn(self._project(w, "gate", h, rate, quantized, True))
                  * self._project(w, "up", h, rate, quantized, True))
        return self._project(w, "down", hidden, rate, quantized)


# A router kept in full precision: no learnables, nothing quantized.
FULL_PRECISION = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False)


class QuantMoE(QuantBlock):
    """RMSNorm -> router -> softmax -> top-k experts (probabilities renormalised to sum to 1
    where the family does) -> sum over the chosen experts of probability * SwiGLU expert,
    as transformers computes it. The router stays in full precision unless
    `spec.quantize_router`; every expert is quantized like a dense MLP. An expert's weights
    are views into the model's fused parameters, and its scaled weights are built only when
    a token is routed to it.

    Channel scales (equivalent transformations, routing included):
    fc1 [hidden]                 norm output -> columns of the router and of every expert's
                                 gate and up (shared)
    fc2 [experts * intermediate] per expert: rows of its up -> columns of its down
    """

    def __init__(self, parts: MoEParts, spec: LayerQuantSpec,
                 generator: torch.Generator | None = None):
        super().__init__(parts)
        self.num_experts, self.top_k = parts.num_experts, parts.top_k
        self.renormalize = parts.renormalize
        self.act_fn = parts.act_fn
        router_spec = spec if spec.quantize_router else FULL_PRECISION
        self.router = QuantLinear(parts.router.weight, parts.router.bias, router_spec, generator)
        self.experts = nn.ModuleList(
            nn.ModuleDict({name: QuantLinear(p.weight, p.bias, spec, generator)
                           for name, p in parts.expert(e).items()})
            for e in range(parts.num_experts))
        self.intermediate = parts.proj["experts.0.up"].weight.shape[0]
        if spec.channel_scaling:
            sizes = {"fc1": parts.router.weight.shape[1]}
            if spec.down_scaling:
                sizes["fc2"] = parts.num_experts * self.intermediate
            self.scales = ChannelScales(
                {k: n for k, n in sizes.items() if k in parts.scalings},
                dtype=parts.router.weight.dtype)

    def projections(self) -> dict[str, QuantLinear]:
        found = {"router": self.router}
        for e, expert in enumerate(self.experts):
            found.update({f"experts.{e}.{name}": lin for name, lin in expert.items()})
        return found

    def _scaled(self, w: BlockWeights) -> BlockWeights:
        w = self._scaled_shared(w)
        for e in range(self.num_experts):
            w.update(self._scaled_expert(w, e))
        return w

    def _scaled_shared(self, w: BlockWeights) -> BlockWeights:
        """`w` with fc1 folded into the norm and the router's columns."""
        w = dict(w)
        fc1 = self.scales.get("fc1")
        if fc1 is not None:
            w["norm"] = w["norm"] / fc1
            w["router.weight"] = w["router.weight"] * fc1
        return w

    def _scaled_expert(self, w: BlockWeights, e: int) -> BlockWeights:
        """Expert `e`'s weights from the unscaled `w`, with fc1 and its part of fc2."""
        keys = [f"experts.{e}.{name}.{kind}" for name in EXPERT_PROJECTIONS
                for kind in ("weight", "bias")]
        x = {key: w[key] for key in keys}
        fc1, fc2 = self.scales.get("fc1"), self.scales.get("fc2")
        if fc1 is not None:
            for name in ("gate", "up"):
                x[f"experts.{e}.{name}.weight"] = x[f"experts.{e}.{name}.weight"] * fc1
        if fc2 is not None:
            s = fc2.view(self.num_experts, self.intermediate)[e]
            _scale_rows(x, f"experts.{e}.up", 1 / s)
            x[f"experts.{e}.down.weight"] = x[f"experts.{e}.down.weight"] * s
        return x

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts) [tokens, top_k] from router logits [tokens, experts]: softmax in
        float32, top-k, optional renormalisation (transformers' order)."""
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(logits.dtype), index

    @torch.no_grad()
    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision (teacher) routing of the block input `x` [..., hidden]: the normed
        tokens [tokens, hidden] the experts read and the router's probabilities [tokens,
        experts]."""
        h = rms_norm(x, self.norm, self.eps).reshape(-1, x.shape[-1])
        logits = F.linear(h, self.router.weight, self.router.bias)
        return h, torch.softmax(logits.float(), dim=-1)

    def expert_output(self, e: int, h: torch.Tensor, w: BlockWeights, rate: float,
                      quantized: bool) -> torch.Tensor:
        """Expert `e`'s SwiGLU of the normed tokens `h` [tokens, hidden] with the block weights
        `w` (student weights are scaled here, so only used experts are)."""
        if quantized and self.scales is not None:
            w = self._scaled_expert(w, e)
        lin = self.experts[e]

        def project(name: str, t: torch.Tensor) -> torch.Tensor:
            key = f"experts.{e}.{name}"
            return lin[name](t, w[f"{key}.weight"], w[f"{key}.bias"], rate, quantized)

        return project("down", self.act_fn(project("gate", h)) * project("up", h))

    def forward(self, x: torch.Tensor, quantized: bool = False, rate: float = 1.0
                ) -> torch.Tensor:
        if quantized and self.scales is not None:
            self.scales.project_()
            w = self._scaled_shared(self.base_weights())
        else:
            w = self.base_weights()
        h = rms_norm(x, w["norm"], self.eps).reshape(-1, x.shape[-1])
        logits = self.router(h, w["router.weight"], w["router.bias"], rate, quantized)
        top, index = self.route(logits)
        out = torch.zeros_like(h)
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            y = self.expert_output(e, h[token], w, rate, quantized) * top[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.view(x.shape)
