"""Qwen3 (dense): the Llama layout with a per-head RMSNorm on q and k before RoPE."""

from sliderquant.families.base import AttentionLayout, Family

# RMSNorm over each head of q and k divides by the head's own RMS, so a per-channel factor
# on the rows of q_proj / k_proj does not pass through it: `qkt` is not an equivalent
# transformation here (tests/test_families.py measures the difference).
QK_NORM_DROPS = (("qkt", "the per-head q/k RMSNorm between q_proj/k_proj and RoPE does not "
                         "commute with scaling their rows"),)

QWEN3 = Family(
    name="qwen3",
    model_types=("qwen3",),
    description="Qwen3 (per-head q/k RMSNorm)",
    gguf_architecture="qwen3",
    attention=AttentionLayout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    dropped_scalings=QK_NORM_DROPS,
)
