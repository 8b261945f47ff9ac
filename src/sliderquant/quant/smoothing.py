"""Learnable channel scaling (equivalent transformations), ALGORITHM.md §5.3.

Each vector divides an activation and multiplies the weight that consumes it. The division
is never a separate op: it is absorbed into the producer of the activation (an RMSNorm gain,
or the rows of the previous linear). `transform` is the single implementation of that
rule; the training forward calls it every step (differentiably) and `fold` calls it once
to write the result into the model.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_MIN = 0.01  # scales are projected to |s| >= 0.01 before every use

# A layer's weights by name: "input_norm", "post_norm", "<proj>.weight", "<proj>.bias"
# (bias entries are None when the projection has none).
LayerWeights = dict[str, "torch.Tensor | None"]


class ChannelScales(nn.Module):
    """The five scaling vectors of one decoder layer (all initialised to 1).

    qkv  [hidden]        input-norm output  -> columns of q, k, v (shared)
    fc1  [hidden]        post-norm output   -> columns of up, gate (shared)
    out  [kv_dim]        rows of v          -> columns of o (expanded over the query heads)
    qkt  [kv_dim]        rows of q (expanded, divided), rows of k (multiplied); pre-RoPE
    fc2  [intermediate]  rows of up         -> columns of down
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate: int,
        qk_scaling: bool = True,
        down_scaling: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        kv_dim = num_kv_heads * head_dim
        self.qkv = nn.Parameter(torch.ones(hidden, dtype=dtype))
        self.fc1 = nn.Parameter(torch.ones(hidden, dtype=dtype))
        self.out = nn.Parameter(torch.ones(kv_dim, dtype=dtype))
        self.qkt = nn.Parameter(torch.ones(kv_dim, dtype=dtype)) if qk_scaling else None
        self.fc2 = nn.Parameter(torch.ones(intermediate, dtype=dtype)) if down_scaling else None

    @torch.no_grad()
    def project_(self) -> None:
        """Move every entry with |s| < 0.01 to ±0.01 (in place, outside autograd)."""
        for p in self.parameters():
            sign = torch.where(p >= 0, 1.0, -1.0).to(p.dtype)
            p.copy_(torch.where(p.abs() < SCALE_MIN, sign * SCALE_MIN, p))

    def expand_kv(self, v: torch.Tensor) -> torch.Tensor:
        """[kv_heads * d] -> [heads * d]: each kv-head block repeated for its query heads."""
        blocks = v.view(self.num_kv_heads, 1, self.head_dim)
        return blocks.expand(self.num_kv_heads, self.group, self.head_dim).reshape(-1)

    def transform(self, w: LayerWeights) -> LayerWeights:
        """Return the weights with every scaling vector folded in (`w` is not modified)."""
        w = dict(w)
        w["input_norm"] = w["input_norm"] / self.qkv
        for name in ("q", "k", "v"):
            w[f"{name}.weight"] = w[f"{name}.weight"] * self.qkv
        w["post_norm"] = w["post_norm"] / self.fc1
        for name in ("up", "gate"):
            w[f"{name}.weight"] = w[f"{name}.weight"] * self.fc1
        _scale_rows(w, "v", 1 / self.out)
        w["o.weight"] = w["o.weight"] * self.expand_kv(self.out)
        if self.qkt is not None:
            _scale_rows(w, "q", 1 / self.expand_kv(self.qkt))
            _scale_rows(w, "k", self.qkt)
        if self.fc2 is not None:
            _scale_rows(w, "up", 1 / self.fc2)
            w["down.weight"] = w["down.weight"] * self.fc2
        return w


def _scale_rows(w: LayerWeights, name: str, factor: torch.Tensor) -> None:
    w[f"{name}.weight"] = w[f"{name}.weight"] * factor.unsqueeze(1)
    if w[f"{name}.bias"] is not None:
        w[f"{name}.bias"] = w[f"{name}.bias"] * factor
