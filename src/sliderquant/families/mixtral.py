"""Mixtral: the Llama/Mistral attention and a sparse feed-forward of top-k SwiGLU experts
(always renormalised); checkpoints name the experts `block_sparse_moe.experts.{e}.w1/w3/w2`."""

from sliderquant.families.base import Family, MoELayout

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    description="Mixtral (fused experts)",
    gguf_architecture="llama",
    moe=MoELayout(checkpoint_experts="block_sparse_moe.experts",
                  checkpoint_names=(("gate", "w1"), ("up", "w3"), ("down", "w2"))),
)
