"""Fused-norm + random Hadamard rotation (ALGORITHM.md §3.2)."""

import pytest
import torch
from conftest import tiny_model

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.rotation import hadamard_matrix, random_orthogonal, rotate_model


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 896, 5120])
def test_hadamard_orders(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert set(h.unique().tolist()) <= {-1.0, 1.0}


def test_no_hadamard_falls_back_to_random_orthogonal():
    assert hadamard_matrix(52) is None
    q, kind = random_orthogonal(52, torch.Generator().manual_seed(0))
    assert kind == "random_orthogonal"
    assert torch.allclose(q @ q.T, torch.eye(52, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_rotation_preserves_the_function(family, tied):
    model = tiny_model(family, tied=tied)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        before = model(ids).logits
        kind = rotate_model(DecoderAdapter(model), seed=2, center_embeddings=False)
        after = model(ids).logits
    assert kind == "random_hadamard"
    assert torch.allclose(after, before, atol=1e-4)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_embedding_centring_changes_an_rmsnorm_model_slightly():
    model = tiny_model()
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        before = model(ids).logits.softmax(-1)
        rotate_model(DecoderAdapter(model), seed=2, center_embeddings=True)
        after = model(ids).logits.softmax(-1)
    assert 0 < (after - before).abs().max() < 0.5
