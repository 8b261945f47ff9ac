"""The learnables of a quantized layer (ALGORITHM.md §5.2–5.3), each a small module that
describes itself.

Every learnable names its optimiser group (`group`, also the key of its learning rate in
`QuantConfig.learning_rates`); the engine builds one AdamW group per name it finds
(`optimiser_groups`), so a new learnable needs no engine change. Learnables attached to one
weight (`WeightLearnable`) act through two hooks that `QuantLinear` applies in order:
`adjust` changes the weight before quantization (LoRA adds its delta) and `quantizer_args`
hands arguments to the quantizer (clipping hands its logits, learned rounding its offsets).
Channel scaling crosses a
block's norm -> projection boundaries, so the blocks apply it (quant/blocks.py).

`LayerQuantSpec` says which learnables a layer carries; `weight_learnables` creates the
per-weight ones. Adding a learnable = a class here, its switch in the spec and in
`QuantConfig` (with its learning rate), and a CLI flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sliderquant.config import QuantConfig
from sliderquant.quant.quantizer import WeightFormat

LORA_ALPHA = 1.0  # fixed in the reference code: the delta is (B @ A) * alpha / rank
CLIP_INIT = 4.0  # sigmoid(4) ≈ 0.982: clipping starts just inside the min/max range
CLIP_MAX_FACTOR = 0.999  # a searched start of 1 (no clipping) is stored as logit(0.999)
ROUND_RANGE = 0.5  # a learned rounding offset moves a code by at most one level
SCALE_MIN = 0.01  # scales are projected to |s| >= 0.01 before every use


@dataclass(frozen=True)
class LayerQuantSpec:
    """What one layer quantizes and which learnables it carries."""

    wbits: int
    abits: int
    group_size: int | None = None
    symmetric: bool = False
    lora_rank: int = 4
    lwc: bool = True
    channel_scaling: bool = False
    qk_scaling: bool = True
    down_scaling: bool = True
    quantize_attention: bool = True
    rounding: bool = False
    formats: tuple[tuple[str, WeightFormat], ...] = ()  # per projection, where not the default
    quantize_router: bool = False  # MoE routers stay in full precision by default

    @classmethod
    def from_config(cls, config: QuantConfig,
                    formats: Mapping[str, WeightFormat] | None = None) -> LayerQuantSpec:
        """The spec of a run; a method that trains nothing (`rtn`) gets no LoRA, and clipping
        only to carry a searched start. `formats` gives projections their own weight format
        (a mixed-precision allocation)."""
        return cls(
            wbits=config.wbits, abits=config.abits, group_size=config.group_size,
            symmetric=config.symmetric, lora_rank=config.lora_rank if config.trains else 0,
            lwc=(config.lwc and config.trains) or config.search_start,
            channel_scaling=config.channel_scaling,
            qk_scaling=config.qk_scaling, down_scaling=config.down_scaling,
            quantize_attention=config.quantize_attention,
            rounding=config.rounding and config.trains,
            formats=tuple(sorted((formats or {}).items())),
            quantize_router=config.quantize_router,
        )

    @property
    def weight_format(self) -> WeightFormat:
        """The default weight format of the layer's projections."""
        return WeightFormat(self.wbits, self.group_size, self.symmetric)

    def format_of(self, projection: str) -> WeightFormat:
        """The weight format of one projection (by its name in the layer)."""
        return dict(self.formats).get(projection, self.weight_format)


class Learnable(nn.Module):
    """A module of trainable tensors; `group` is its optimiser group and learning-rate key."""

    group: ClassVar[str]


class WeightLearnable(Learnable):
    """A learnable attached to one quantized weight."""

    def adjust(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight handed to the quantizer (default: unchanged)."""
        return weight

    def quantizer_args(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the quantizer (see quant/quantizer.py; default: none)."""
        return {}


class LoRA(WeightLearnable):
    """Low-rank delta added before quantization: W + (B @ A) * alpha / r. A starts
    Kaiming-uniform (drawn from `generator`), B at zero, so the delta starts at zero."""

    group = "lora"

    def __init__(self, out_features: int, in_features: int, rank: int, dtype: torch.dtype,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.rank = rank
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a = torch.empty(rank, in_features).uniform_(-bound, bound, generator=generator)
        self.a = nn.Parameter(a.to(dtype))
        self.b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))

    def adjust(self, weight: torch.Tensor) -> torch.Tensor:
        scale = LORA_ALPHA / self.rank
        if torch.is_autocast_enabled(weight.device.type):  # addmm would cast the weight too
            return weight + (self.b @ self.a) * scale
        # one pass over the weight instead of three; the same values where `scale` is a
        # power of two (the default rank 4), within float rounding otherwise
        return torch.addmm(weight, self.b, self.a, alpha=scale)


class Clipping(WeightLearnable):
    """Learnable weight clipping (LWC): the max/min of every row or group are multiplied by
    sigmoid(upper) / sigmoid(lower) before the grid is chosen."""

    group = "clip"

    def __init__(self, out_features: int, n_groups: int):
        super().__init__()
        self.upper = nn.Parameter(torch.full((out_features, n_groups), CLIP_INIT))
        self.lower = nn.Parameter(torch.full((out_features, n_groups), CLIP_INIT))

    def quantizer_args(self) -> dict[str, torch.Tensor]:
        return {"upper": self.upper, "lower": self.lower}

    @torch.no_grad()
    def start_at(self, upper: torch.Tensor, lower: torch.Tensor) -> None:
        """Set the logits so that sigmoid(logit) is the given factor in (0, 1] (a searched
        start); factors are capped at 0.999 so that a factor of 1 can still move."""
        for logit, factor in ((self.upper, upper), (self.lower, lower)):
            logit.copy_(torch.logit(factor.clamp(1e-3, CLIP_MAX_FACTOR)).to(logit))


class Rounding(WeightLearnable):
    """Learned rounding (SignRound-style): one offset v in [-0.5, 0.5] per weight, added to
    `W / step` before rounding, so each weight chooses to round up or down.

    `hard` (persistent, so checkpointed) marks hardened entries: +1 rounds up, -1 down,
    relative to floor(W / step); they use the offset ±0.5 and no longer learn. `harden_`
    hardens the most confident free entries; the engine calls it after every window that
    contains the layer so that all are hard when its last window ends (quant/layer.py).
    """

    group = "round"

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype))
        self.register_buffer("hard", torch.zeros(out_features, in_features, dtype=torch.int8))

    def value(self) -> torch.Tensor:
        """The offsets the quantizer adds: learned where free, ±0.5 where hardened."""
        with torch.no_grad():  # projection outside autograd, like the channel scales'
            self.offset.clamp_(-ROUND_RANGE, ROUND_RANGE)
        if not bool(self.hard.any()):
            return self.offset
        return torch.where(self.hard != 0, self.hard.to(self.offset) * ROUND_RANGE, self.offset)

    def quantizer_args(self) -> dict[str, torch.Tensor]:
        return {"offset": self.value()}

    @property
    def hardened(self) -> float:
        """Fraction of entries that are hard."""
        return float((self.hard != 0).float().mean())

    @torch.no_grad()
    def harden_(self, scaled: torch.Tensor, fraction: float) -> None:
        """Harden free entries, most confident first, until `fraction` of all are hard.

        `scaled` is `W / step` [out, in] on the current grid. Confidence is the distance of
        `scaled + v` from its rounding boundary; an entry keeps the direction it rounds in
        now, so the codes do not change (up to exact ties of `W / step`)."""
        total = self.hard.numel()
        todo = min(total, round(fraction * total)) - int((self.hard != 0).sum())
        if todo <= 0:
            return
        soft = scaled.float() + self.value().float()
        up = soft.round() > scaled.float().floor()
        confidence = (soft - soft.floor() - 0.5).abs()
        confidence[self.hard != 0] = -1.0
        chosen = torch.topk(confidence.flatten(), todo).indices
        direction = torch.where(up, 1, -1).to(torch.int8).flatten()
        self.hard.view(-1)[chosen] = direction[chosen]


class ChannelScales(Learnable):
    """Named channel-scaling vectors, all initialised to 1; a block folds each one into the
    producer of an activation and the weights that consume it."""

    group = "scale"

    def __init__(self, sizes: dict[str, int], dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, size in sizes.items():
            self.register_parameter(name, nn.Parameter(torch.ones(size, dtype=dtype)))

    def get(self, name: str) -> nn.Parameter | None:
        return self._parameters.get(name)

    @torch.no_grad()
    def project_(self) -> None:
        """Move every entry with |s| < 0.01 to ±0.01 (in place, outside autograd)."""
        for p in self.parameters():
            sign = torch.where(p >= 0, 1.0, -1.0).to(p.dtype)
            p.copy_(torch.where(p.abs() < SCALE_MIN, sign * SCALE_MIN, p))


def weight_learnables(spec: LayerQuantSpec, out_features: int, in_features: int,
                      dtype: torch.dtype, generator: torch.Generator | None = None,
                      fmt: WeightFormat | None = None) -> dict[str, WeightLearnable]:
    """The per-weight learnables `spec` asks for, in the order `QuantLinear` applies them,
    for a weight in format `fmt` (default: the spec's)."""
    fmt = fmt or spec.weight_format
    found: dict[str, WeightLearnable] = {}
    if spec.lora_rank > 0:
        found["lora"] = LoRA(out_features, in_features, spec.lora_rank, dtype, generator)
    if spec.lwc and fmt.bits < 16:
        n_groups = 1 if fmt.group_size is None else in_features // fmt.group_size
        found["clip"] = Clipping(out_features, n_groups)
    if spec.rounding and fmt.bits < 16:
        found["round"] = Rounding(out_features, in_features, dtype)
    return found


def optimiser_groups(modules: list[nn.Module]) -> dict[str, list[nn.Parameter]]:
    """Every learnable parameter inside `modules`, by optimiser group."""
    groups: dict[str, list[nn.Parameter]] = {}
    for root in modules:
        for module in root.modules():
            if isinstance(module, Learnable):
                groups.setdefault(module.group, []).extend(module.parameters())
    return groups
