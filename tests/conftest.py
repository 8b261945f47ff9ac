"""Shared fixtures: tiny random models (fast unit tests) and the real data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _find_data_root() -> Path | None:
    for candidate in (os.environ.get("SLIDERQUANT_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "wikitext2" / "test.txt").is_file():
            return Path(candidate)
    return None


DATA_ROOT = _find_data_root()

# Where the device-aware tests (test_families.py) run: `SLIDERQUANT_TEST_DEVICE=cuda` on a
# machine with a GPU (benchmarks/gpu_families.sh), the host otherwise.
TEST_DEVICE = torch.device(os.environ.get("SLIDERQUANT_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if DATA_ROOT is None:
        pytest.skip("real data root not found: set SLIDERQUANT_DATA to the shared data folder")
    return DATA_ROOT


FAMILY_NAMES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def tiny_model(family: str = "llama", layers: int = 3, seed: int = 0, tied: bool = False,
               **overrides):
    """A random decoder of the given family: hidden 64, 4 heads / 2 kv heads of 16, vocab 96;
    MLP width 96, or (MoE) 4 experts of width 32, 2 per token. `overrides` go to the
    transformers config."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if family in ("qwen3", "qwen3_moe"):
        common.update(head_dim=16, use_sliding_window=False)
    if family == "qwen3_moe":
        common.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True)
    if family == "mixtral":
        common.update(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2":
        common.update(use_sliding_window=False)
    classes = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe",
               "mixtral": "Mixtral"}[family]
    config = getattr(tf, f"{classes}Config")(**{**common, **overrides})
    model = getattr(tf, f"{classes}ForCausalLM")(config)
    with torch.no_grad():  # non-trivial norm gains, biases and routing, so bugs show up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # MoE router: decisive, uneven routing
                p.copy_(0.5 * torch.randn_like(p))
    return model.float().eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer of 260 tokens (so models need a vocab of at least 260)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_qwen2():
    return tiny_model("qwen2")
