"""The quantized decoder layer: FP equivalence, scale folding, fold == student."""

import pytest
import torch
from conftest import tiny_model

from sliderquant.fold import fold_layers, install_activation_quantization
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import LayerQuantSpec, QuantDecoderLayer
from sliderquant.quant.quantizer import WeightFormat


def stack_logits(adapter, layers, ids, quantized, rate=1.0):
    with torch.no_grad():
        h = adapter.embed(ids)
        cos, sin = adapter.rotary(h, ids.shape[1])
        for layer in layers:
            h = layer(h, cos, sin, quantized, rate)
        return adapter.lm_head(adapter.final_norm(h))


def wrap(model, spec, seed=0):
    adapter = DecoderAdapter(model)
    g = torch.Generator().manual_seed(seed)
    layers = [QuantDecoderLayer(adapter.parts(i), spec, g) for i in range(adapter.num_layers)]
    return adapter, layers


def randomise_learnables(layers, seed=0, qk_pairs_equal=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for name, p in layer.named_parameters():
                if "scales" in name:
                    p.copy_(torch.empty_like(p).uniform_(0.5, 2.0, generator=g))
                    if qk_pairs_equal and name.endswith("qkt"):
                        blocks = p.view(-1, layer.attn.head_dim)
                        half = layer.attn.head_dim // 2
                        blocks[:, half:] = blocks[:, :half]
                elif "clip" in name:
                    p.copy_(torch.empty_like(p).uniform_(0.5, 5.0, generator=g))
                else:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))


def student_step(spec, x, rate=0.75):
    """(loss, every learnable's gradient) of one training step of a randomised one-layer
    student on `x`, quantized at `rate`."""
    adapter, layers = wrap(tiny_model(layers=1), spec)
    randomise_learnables(layers)
    cos, sin = adapter.rotary(x, x.shape[1])
    loss = layers[0](x, cos, sin, True, rate).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in layers[0].named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fp_wrapper_equals_transformers_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 24))
    reference = model(ids).logits
    adapter, layers = wrap(model, LayerQuantSpec(wbits=4, abits=4, channel_scaling=True))
    assert torch.allclose(stack_logits(adapter, layers, ids, False), reference, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_student_at_sixteen_bits_at_init_equals_fp(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 24))
    spec = LayerQuantSpec(wbits=16, abits=16, channel_scaling=True)
    adapter, layers = wrap(model, spec)
    fp = stack_logits(adapter, layers, ids, False)
    assert torch.allclose(stack_logits(adapter, layers, ids, True), fp, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_channel_scaling_is_an_equivalent_transformation(family):
    """With 16 bits and random scales (q/k pairs equal for RoPE), output == FP output."""
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 24))
    spec = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False, channel_scaling=True)
    adapter, layers = wrap(model, spec)
    randomise_learnables(layers, qk_pairs_equal=True)
    fp = stack_logits(adapter, layers, ids, False)
    scaled = stack_logits(adapter, layers, ids, True)
    assert torch.allclose(scaled, fp, atol=1e-4)
    attn = layers[0].attn
    assert not torch.equal(attn.student_weights()["q.weight"], attn.proj["q"].weight)


CASES = [
    ("llama", LayerQuantSpec(wbits=4, abits=4, channel_scaling=True)),
    ("qwen2", LayerQuantSpec(wbits=4, abits=4, channel_scaling=True)),
    ("llama", LayerQuantSpec(wbits=2, abits=16)),
    ("llama", LayerQuantSpec(wbits=3, abits=16, group_size=16)),
    ("qwen2", LayerQuantSpec(wbits=4, abits=8, channel_scaling=True, group_size=32)),
    # mixed precision: a projection at its own bits, one channel split, one left in float
    ("llama", LayerQuantSpec(wbits=2, abits=16, group_size=16, formats=(
        ("q", WeightFormat(3, 16)), ("v", WeightFormat(16, 16)),
        ("down", WeightFormat(2, 16, high_bits=4, high_rows=(0, 5, 7)))))),
]


@pytest.mark.parametrize(("family", "spec"), CASES)
def test_folded_model_equals_unfolded_student(family, spec):
    """Folding scales + LoRA + clipping into plain weights changes nothing at full rate."""
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 24))
    adapter, layers = wrap(model, spec)
    randomise_learnables(layers)
    student = stack_logits(adapter, layers, ids, True)
    grids = fold_layers(adapter, layers)
    install_activation_quantization(adapter, spec.abits, spec.quantize_attention)
    with torch.no_grad():
        deployed = model(ids).logits
    assert torch.allclose(deployed, student, atol=1e-4, rtol=1e-4), \
        (deployed - student).abs().max()
    # every deployed weight sits exactly on its recorded integer grid, at its own bits
    quantized = [n for n in adapter.linears(0) if spec.format_of(n).bits < 16]
    assert len(grids) == 3 * len(quantized) * adapter.num_layers
    for i in range(adapter.num_layers):
        for name, lin in adapter.linears(i).items():
            path = adapter.linear_path(i, name)
            if name not in quantized:
                continue
            step, zero = grids[f"{path}.step"], grids[f"{path}.zero"]
            bits = grids[f"{path}.bits"]
            fmt = spec.format_of(name)
            assert torch.equal(bits, fmt.row_bits(lin.weight.shape[0]) if fmt.split
                               else torch.tensor([fmt.bits]))
            w = lin.weight.view(lin.weight.shape[0], step.shape[1], -1)
            codes = torch.round(w / step[..., None]) + zero[..., None]
            top = (2 ** bits - 1).reshape(-1, 1, 1).to(codes.dtype)
            assert codes.min() >= 0 and (codes <= top).all()
            assert torch.equal((codes - zero[..., None]) * step[..., None], w)


def test_partial_rate_student_differs_from_full():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 16))
    adapter, layers = wrap(model, LayerQuantSpec(wbits=2, abits=16))
    fp = stack_logits(adapter, layers, ids, False)
    half = stack_logits(adapter, layers, ids, True, rate=0.5)
    full = stack_logits(adapter, layers, ids, True, rate=1.0)
    assert (half - fp).abs().mean() < (full - fp).abs().mean()
