"""Qwen3-MoE: Qwen3's attention, a sparse feed-forward of top-k SwiGLU experts
(renormalised when `norm_topk_prob`), dense MLP layers where `mlp_only_layers` says."""

from sliderquant.families.base import AttentionLayout, Family, MoELayout
from sliderquant.families.qwen3 import QK_NORM_DROPS

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    description="Qwen3-MoE (per-head q/k RMSNorm, fused experts)",
    gguf_architecture="qwen3moe",
    attention=AttentionLayout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    moe=MoELayout(renormalize="norm_topk_prob"),
    dropped_scalings=QK_NORM_DROPS,
)
