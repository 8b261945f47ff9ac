"""The vocabulary of a family entry: where a transformers model keeps each part of a
decoder, and which equivalent transformations are valid on it.

Paths are module paths (as `nn.Module.get_submodule` takes them): model-level ones from the
`*ForCausalLM` model, layer-level ones from one decoder layer. Defaults are the Llama
layout, which most dense families share, so an entry names only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The channel-scaling vectors of ALGORITHM.md §5.3 (see quant/blocks.py for what each does).
ALL_SCALINGS = frozenset({"qkv", "out", "qkt", "fc1", "fc2"})


@dataclass(frozen=True)
class AttentionLayout:
    module: str = "self_attn"  # the attention module (run-time q/k/v quantizers attach here)
    norm: str = "input_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    q_norm: str | None = None  # per-head RMSNorm on q/k before RoPE (Qwen3)
    k_norm: str | None = None

    def projections(self) -> dict[str, str]:
        return {"q": self.q, "k": self.k, "v": self.v, "o": self.o}


@dataclass(frozen=True)
class GatedMLPLayout:
    """A SwiGLU-style MLP: down(act(gate(x)) * up(x))."""

    norm: str = "post_attention_layernorm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"

    def projections(self) -> dict[str, str]:
        return {"gate": self.gate, "up": self.up, "down": self.down}


@dataclass(frozen=True)
class Family:
    """One model family: the model types it covers and where everything is."""

    name: str
    model_types: tuple[str, ...]
    description: str
    gguf_architecture: str  # llama.cpp's `general.architecture` for this family
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    rotary: str = "model.rotary_emb"  # called as rotary(hidden, positions) -> (cos, sin)
    attention: AttentionLayout = field(default_factory=AttentionLayout)
    mlp: GatedMLPLayout = field(default_factory=GatedMLPLayout)
    # Channel-scaling vectors that are equivalent transformations on this family; the others
    # are not created even when the config asks for them.
    scalings: frozenset[str] = ALL_SCALINGS
