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
class MoELayout:
    """A sparse mixture-of-experts feed-forward as transformers 5 keeps it: a router (a
    weight [experts, hidden]) and every expert's SwiGLU fused in two 3-D parameters,
    `gate_up` [experts, 2 * intermediate, hidden] (gate rows first) and `down` [experts,
    hidden, intermediate]. Routing: softmax over the router logits, top-k, then the top-k
    probabilities renormalised to sum to 1 when `renormalize` says so.

    A layer whose `experts` module is absent is a dense layer (the family's `mlp` layout
    serves it), as in Qwen3-MoE's `mlp_only_layers`.
    """

    norm: str = "post_attention_layernorm"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    gate_up: str = "gate_up_proj"  # parameter names inside the experts module
    down: str = "down_proj"
    act: str = "mlp.experts.act_fn"
    top_k: str = "num_experts_per_tok"  # the model config's attribute
    # The config attribute that switches the renormalisation, or True / False when the
    # family always / never renormalises.
    renormalize: str | bool = True
    # How checkpoints name one expert's projections ({experts}.{e}.{name}): what
    # `save_pretrained` writes and the compressed export must write for transformers'
    # loader to fuse them again.
    checkpoint_experts: str = "mlp.experts"
    checkpoint_names: tuple[tuple[str, str], ...] = (
        ("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


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
    moe: MoELayout | None = None  # the sparse feed-forward of MoE families
    # Channel-scaling vectors (ALL_SCALINGS) that are not equivalent transformations on this
    # family, each with the reason: they are never created, and a run reports them.
    dropped_scalings: tuple[tuple[str, str], ...] = ()

    @property
    def scalings(self) -> frozenset[str]:
        """The channel-scaling vectors that are equivalent transformations on this family."""
        return ALL_SCALINGS - {name for name, _ in self.dropped_scalings}
