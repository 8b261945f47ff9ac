"""The pieces of the redesign: self-describing learnables, QuantLinear over a slice of a fused
parameter, family entries and the reader, the per-head q/k norm slot of the attention block."""

import dataclasses

import pytest
import torch
from conftest import tiny_model
from test_layer import randomise_learnables, stack_logits
from torch import nn

from sliderquant.config import QuantConfig
from sliderquant.families import FAMILIES, find_family
from sliderquant.families.qwen3 import QWEN3
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import QuantDecoderLayer
from sliderquant.quant.learnables import (
    LayerQuantSpec,
    Learnable,
    optimiser_groups,
)
from sliderquant.quant.linear import QuantLinear


def layers_of(model, spec, family=None):
    adapter = DecoderAdapter(model, family)
    g = torch.Generator().manual_seed(0)
    return adapter, [QuantDecoderLayer(adapter.parts(i), spec, g)
                     for i in range(adapter.num_layers)]


@pytest.mark.parametrize(("spec", "groups"), [
    (LayerQuantSpec(wbits=2, abits=16), {"lora", "clip"}),
    (LayerQuantSpec(wbits=4, abits=4, channel_scaling=True), {"lora", "clip", "scale"}),
    (LayerQuantSpec(wbits=4, abits=16, lora_rank=0, lwc=False), set()),
])
def test_optimiser_groups_come_from_the_learnables_present(spec, groups):
    _, layers = layers_of(tiny_model(), spec)
    found = optimiser_groups(layers)
    assert set(found) == groups
    assert groups <= set(QuantConfig().learning_rates)  # every group has a learning rate
    every = {id(p) for p in layers[0].parameters()}
    assert {id(p) for p in optimiser_groups(layers[:1]).get("lora", [])} <= every
    assert sum(len(v) for v in optimiser_groups(layers[:1]).values()) == len(every)


def test_a_new_learnable_joins_the_groups_without_engine_changes():
    class Offset(Learnable):
        group = "round"

        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.zeros(3))

    _, layers = layers_of(tiny_model(), LayerQuantSpec(wbits=2, abits=16))
    layers[0].attn.proj["q"].learnables["round"] = Offset()
    assert optimiser_groups(layers)["round"] == [layers[0].attn.proj["q"].learnables["round"].v]


def test_lora_draws_in_projection_order_from_one_generator():
    """Layer by layer q k v o gate up down: the order a fixed seed's results depend on."""
    model = tiny_model(layers=2)
    _, layers = layers_of(model, LayerQuantSpec(wbits=2, abits=16))
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            a = layer.projections()[name].learnables["lora"].a
            bound = 1 / a.shape[1] ** 0.5
            expected = torch.empty(a.shape).uniform_(-bound, bound, generator=g)
            assert torch.equal(a, expected), name


def test_quant_linear_serves_and_folds_into_a_slice_of_a_fused_parameter():
    torch.manual_seed(0)
    experts = nn.Parameter(torch.randn(4, 24, 16))  # [E, out, in], as transformers 5 keeps them
    before = experts.detach().clone()
    view = experts[2]
    lin = QuantLinear(view, None, LayerQuantSpec(wbits=3, abits=16, group_size=8))
    assert lin.weight.data_ptr() == experts.data_ptr() + 2 * 24 * 16 * experts.element_size()
    x = torch.randn(5, 16)
    assert torch.equal(lin(x, quantized=False), x @ before[2].T)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1 * torch.randn_like(p))
        student = lin(x, quantized=True)
        folded, grid = lin.folded(lin.weight)
        view.copy_(folded)  # what fold does: write into the model's own tensor
    assert torch.equal(experts[[0, 1, 3]], before[[0, 1, 3]])
    assert torch.equal(experts[2], grid.dequantize())
    assert torch.allclose(x @ experts[2].T, student, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_family_entries_describe_the_tiny_models(family):
    model = tiny_model(family)
    adapter = DecoderAdapter(model)
    assert adapter.family is find_family(model.config.model_type)
    assert adapter.family.gguf_architecture == family
    modules = dict(model.named_modules())
    for i in range(adapter.num_layers):
        for name, lin in adapter.linears(i).items():
            assert modules[adapter.linear_path(i, name)] is lin
        parts = adapter.parts(i)
        assert parts.attn.norm is model.model.layers[i].input_layernorm.weight
        assert parts.mlp.proj["down"].weight is model.model.layers[i].mlp.down_proj.weight
        has_bias = parts.attn.proj["q"].bias is not None
        assert has_bias == (family == "qwen2")
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def tiny_qwen3():
    return tiny_model("qwen3", layers=2)


def test_per_head_qk_norm_slot_matches_transformers_and_drops_qkt():
    model = tiny_qwen3()
    ids = torch.randint(0, 96, (2, 20))
    spec = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False, channel_scaling=True)
    adapter, layers = layers_of(model, spec)
    assert adapter.family is QWEN3
    with torch.no_grad():
        reference = model(ids).logits
    assert torch.allclose(stack_logits(adapter, layers, ids, False), reference, atol=1e-5)
    assert layers[0].attn.scales.get("qkt") is None
    randomise_learnables(layers)
    assert torch.allclose(stack_logits(adapter, layers, ids, True), reference, atol=1e-4)


def test_qkt_is_not_an_equivalent_transformation_under_qk_norm():
    """Why the entry leaves `qkt` out: with it, the 16-bit student no longer equals FP."""
    model = tiny_qwen3()
    ids = torch.randint(0, 96, (2, 20))
    spec = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False, channel_scaling=True)
    with_qkt = dataclasses.replace(QWEN3, dropped_scalings=())
    adapter, layers = layers_of(model, spec, with_qkt)
    randomise_learnables(layers, qk_pairs_equal=True)
    fp = stack_logits(adapter, layers, ids, False)
    assert (stack_logits(adapter, layers, ids, True) - fp).abs().max() > 1e-2
