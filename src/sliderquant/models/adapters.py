"""The reader: a transformers model + its family entry (families/) -> the parts the
quantized blocks, folding, rotation and the run-time quantizers need.

Nothing here knows a family by name: every path comes from the entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sliderquant.config import ConfigError
from sliderquant.families import Family, find_family, supported_architectures
from sliderquant.quant.blocks import (
    ATTENTION_SCALINGS,
    EXPERT_PROJECTIONS,
    MLP_SCALINGS,
    AttentionParts,
    MLPParts,
    MoEParts,
)
from sliderquant.quant.layer import LayerParts
from sliderquant.quant.linear import Projection


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry."""


class ContextLengthError(ValueError):
    """A sequence length the model cannot attend over."""


@dataclass(frozen=True)
class ExpertSlice:
    """One expert's projection inside a fused expert parameter: the rows `rows` of
    `param[expert]`, whose grid is recorded under `path` (the checkpoint's per-expert module
    path, e.g. `model.layers.0.mlp.experts.3.gate_proj`)."""

    path: str
    name: str  # gate, up or down
    expert: int
    rows: slice


class DecoderAdapter:
    """Uniform access to a transformers decoder-only causal LM of a supported family."""

    def __init__(self, model: nn.Module, family: Family | None = None):
        config = model.config
        model_type = getattr(config, "model_type", None)
        family = family or find_family(model_type)
        if family is None:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not supported. Supported: "
                f"{supported_architectures()}."
            )
        self.family = family
        self.model = model
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps

    # ---- model-level parts ----------------------------------------------------------------
    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_submodule(self.family.embed)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.final_norm)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_submodule(self.family.lm_head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def rotary(self, hidden: torch.Tensor, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) for positions 0..seqlen-1, shaped [1, seqlen, head_dim]."""
        positions = torch.arange(seqlen, device=hidden.device).unsqueeze(0)
        return self.model.get_submodule(self.family.rotary)(hidden, positions)

    # ---- one layer ------------------------------------------------------------------------
    def is_moe(self, index: int) -> bool:
        """Whether layer `index` has a sparse mixture-of-experts feed-forward."""
        moe = self.family.moe
        return moe is not None and _has_submodule(self.layers[index], moe.experts)

    def parts(self, index: int) -> LayerParts:
        """Layer `index`'s tensors by block (the model's own parameters, not copies; an
        expert's projections are views into the fused parameters)."""
        layer = self.layers[index]
        att, mlp = self.family.attention, self.family.mlp

        def norm(path: str | None) -> torch.Tensor | None:
            return None if path is None else layer.get_submodule(path).weight

        def projections(paths: dict[str, str]) -> dict[str, Projection]:
            found = {}
            for name, path in paths.items():
                module = layer.get_submodule(path)
                found[name] = Projection(module.weight, module.bias)
            return found

        attn = AttentionParts(
            norm=norm(att.norm), proj=projections(att.projections()), eps=self.eps,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, q_norm=norm(att.q_norm), k_norm=norm(att.k_norm),
            scalings=self.family.scalings & ATTENTION_SCALINGS,
        )
        if self.is_moe(index):
            return LayerParts(attn=attn, mlp=self._moe_parts(index))
        return LayerParts(attn=attn, mlp=MLPParts(
            norm=norm(mlp.norm), proj=projections(mlp.projections()), eps=self.eps,
            act_fn=layer.get_submodule(mlp.act),
            scalings=self.family.scalings & MLP_SCALINGS,
        ))

    def _moe_parts(self, index: int) -> MoEParts:
        moe = self.family.moe
        layer = self.layers[index]
        experts = layer.get_submodule(moe.experts)
        fused = {"gate_up": getattr(experts, moe.gate_up), "down": getattr(experts, moe.down)}
        proj = {f"experts.{s.expert}.{s.name}":
                Projection(fused["down" if s.name == "down" else "gate_up"][s.expert][s.rows])
                for s in self._expert_slices(index)}
        router = layer.get_submodule(moe.router)
        renormalize = (getattr(self.config, moe.renormalize)
                       if isinstance(moe.renormalize, str) else moe.renormalize)
        return MoEParts(
            norm=layer.get_submodule(moe.norm).weight, proj=proj, eps=self.eps,
            router=Projection(router.weight, getattr(router, "bias", None)),
            num_experts=fused["down"].shape[0], top_k=getattr(self.config, moe.top_k),
            renormalize=bool(renormalize), act_fn=layer.get_submodule(moe.act),
            scalings=self.family.scalings & MLP_SCALINGS,
        )

    def _expert_slices(self, index: int) -> list[ExpertSlice]:
        moe = self.family.moe
        experts = self.layers[index].get_submodule(moe.experts)
        count, rows, _ = getattr(experts, moe.gate_up).shape
        hidden = getattr(experts, moe.down).shape[1]
        where = {"gate": slice(0, rows // 2), "up": slice(rows // 2, rows),
                 "down": slice(0, hidden)}
        files = dict(moe.checkpoint_names)
        prefix = f"{self.family.layers}.{index}.{moe.checkpoint_experts}"
        return [ExpertSlice(f"{prefix}.{e}.{files[name]}", name, e, where[name])
                for e in range(count) for name in EXPERT_PROJECTIONS]

    def fused_experts(self) -> dict[str, list[ExpertSlice]]:
        """Every fused expert parameter of the model by its path (as in `state_dict`), with
        the expert projections it holds."""
        moe = self.family.moe
        found: dict[str, list[ExpertSlice]] = {}
        for i in range(self.num_layers):
            if not self.is_moe(i):
                continue
            prefix = f"{self.family.layers}.{i}.{moe.experts}"
            for s in self._expert_slices(i):
                param = moe.down if s.name == "down" else moe.gate_up
                found.setdefault(f"{prefix}.{param}", []).append(s)
        return found

    def _projection_paths(self, index: int) -> dict[str, str]:
        """The nn.Linear projections of layer `index` (an MoE layer's experts and router are
        not Linear modules)."""
        paths = dict(self.family.attention.projections())
        if not self.is_moe(index):
            paths.update(self.family.mlp.projections())
        return paths

    def linears(self, index: int) -> dict[str, nn.Module]:
        """The modules that hold layer `index`'s Linear projections (nn.Linear or a run-time
        replacement), by projection name."""
        layer = self.layers[index]
        return {name: layer.get_submodule(path)
                for name, path in self._projection_paths(index).items()}

    def linear_path(self, index: int, name: str) -> str:
        """Module path of projection `name` of layer `index` inside the model; for an expert
        projection, its per-expert path in checkpoints (the key of its grid)."""
        return self.projection_paths(index)[name]

    def projection_paths(self, index: int) -> dict[str, str]:
        """`linear_path` of every projection of layer `index` (router and experts included)."""
        prefix = f"{self.family.layers}.{index}"
        paths = {name: f"{prefix}.{path}" for name, path in self._projection_paths(index).items()}
        if self.is_moe(index):
            paths["router"] = f"{prefix}.{self.family.moe.router}"
            paths.update({f"experts.{s.expert}.{s.name}": s.path
                          for s in self._expert_slices(index)})
        return paths

    def set_linear(self, index: int, name: str, module: nn.Module) -> None:
        """Replace the module of projection `name` of layer `index`."""
        parent, _, attr = self._projection_paths(index)[name].rpartition(".")
        setattr(self.layers[index].get_submodule(parent), attr, module)

    def attention_module(self, index: int) -> nn.Module:
        return self.layers[index].get_submodule(self.family.attention.module)

    def experts_module(self, index: int) -> nn.Module | None:
        """The fused experts module of layer `index` (None in a dense layer)."""
        return self.layers[index].get_submodule(self.family.moe.experts) \
            if self.is_moe(index) else None

    def router_module(self, index: int) -> nn.Module | None:
        return self.layers[index].get_submodule(self.family.moe.router) \
            if self.is_moe(index) else None

    # ---- checks ---------------------------------------------------------------------------
    def check_context(self, seqlen: int) -> None:
        """Raise if `seqlen` exceeds what the model can attend to."""
        if seqlen > self.max_positions:
            raise ContextLengthError(
                f"seqlen {seqlen} is longer than the model's context "
                f"({self.max_positions} positions); use --seqlen {self.max_positions} or less"
            )
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True) and seqlen > window:
            raise ContextLengthError(
                f"seqlen {seqlen} exceeds the model's sliding attention window ({window}); "
                f"sliderquant uses full causal attention, so use --seqlen {window} or less"
            )

    def check_group_size(self, group_size: int | None) -> None:
        """Raise ConfigError unless `group_size` divides every projection's input width."""
        if group_size is None:
            return
        widths = sorted({p.weight.shape[-1] for i in range(self.num_layers)
                         for block in self.parts(i).blocks().values()
                         for p in block.proj.values()})
        bad = [w for w in widths if w % group_size]
        if bad:
            raise ConfigError(f"group_size {group_size} does not divide the input width(s) "
                              f"{bad} of this model (widths: {widths}); pick a divisor such as "
                              f"{_largest_common_pow2(widths)}")


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _largest_common_pow2(widths: list[int]) -> int:
    g = 1
    while all(w % (g * 2) == 0 for w in widths) and g < 256:
        g *= 2
    return g
