"""The hand-written backward of fake quantization equals autograd's through the reference
`fake_quantize`: same values, same gradients (activations, weights with clipping, groups,
learned rounding offsets, partial rates, clamped entries and tied maxima)."""

import pytest
import torch

from sliderquant.quant.fused import fake_quantize_fast
from sliderquant.quant.quantizer import fake_quantize


def both(x, bits, rate=1.0, group_size=None, clip=False, offset=False, symmetric=False,
         seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = x.shape[0]
    n_groups = 1 if group_size is None else x.shape[-1] // group_size
    upper = torch.empty(rows, n_groups).uniform_(0.5, 4, generator=g) if clip else None
    lower = torch.empty(rows, n_groups).uniform_(0.5, 4, generator=g) if clip else None
    off = torch.empty(x.shape).uniform_(-0.5, 0.5, generator=g) if offset else None
    weight = torch.randn(x.shape, generator=g)
    results = []
    for fn in (fake_quantize, fake_quantize_fast):
        inputs = [t.clone().requires_grad_(True) if t is not None else None
                  for t in (x, upper, lower, off)]
        out = fn(inputs[0], bits, rate, group_size, inputs[1], inputs[2], symmetric,
                 offset=inputs[3])
        (out * weight).sum().backward()
        results.append((out.detach(), [t.grad if t is not None else None for t in inputs]))
    return results


CASES = [
    dict(bits=4),  # per-token activations
    dict(bits=4, rate=0.5),
    dict(bits=2, group_size=8, clip=True),
    dict(bits=3, clip=True, offset=True),
    dict(bits=2, group_size=8, clip=True, offset=True, rate=0.6),
    dict(bits=4, group_size=16, symmetric=True, clip=True),  # autograd path
]


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_the_autograd_path(case):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3)) * 2
    x[1, 5] = 30.0  # far outside what clipping keeps: a clamped entry
    (ref, ref_grads), (fast, fast_grads) = both(x, **case)
    assert torch.equal(ref, fast)
    for a, b in zip(ref_grads, fast_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_tied_maxima_share_the_gradient_as_amax_does():
    x = torch.randint(-3, 4, (4, 16)).float()  # many ties, as in dequantized GGUF weights
    (ref, ref_grads), (fast, fast_grads) = both(x, 2, group_size=8, clip=True)
    assert torch.equal(ref, fast)
    for a, b in zip(ref_grads[:3], fast_grads[:3], strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_attention_shaped_input_and_sixteen_bits():
    x = torch.randn(2, 3, 5, 8)
    (ref, ref_grads), (fast, fast_grads) = both(x.reshape(6, 5, 8), 4)
    assert torch.equal(ref, fast)
    assert torch.allclose(ref_grads[0], fast_grads[0], atol=1e-5, rtol=1e-4)
    assert fake_quantize_fast(x, 16) is x


@pytest.mark.parametrize("abits", [4, 16])
def test_layer_gradients_equal_the_unfused_per_projection_path(abits, monkeypatch):
    """The student step (shared input quantization, hand-written backward) gives the loss
    and learnable gradients of the reference: every projection quantizing its own input
    through autograd's fake_quantize."""
    from conftest import tiny_model
    from test_layer import randomise_learnables, wrap

    from sliderquant.quant import blocks, linear
    from sliderquant.quant.learnables import LayerQuantSpec

    spec = LayerQuantSpec(wbits=3, abits=abits, group_size=16, channel_scaling=abits < 16,
                          rounding=True)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))

    def step():
        adapter, layers = wrap(tiny_model(layers=1), spec)
        randomise_learnables(layers)
        cos, sin = adapter.rotary(x, x.shape[1])
        layers[0](x, cos, sin, True, 0.75).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in layers[0].named_parameters()}

    fast = step()

    def separate(self, w, name, h, rate, quantized, input_quantized=False):
        return self.proj[name](h, w[f"{name}.weight"], w[f"{name}.bias"], rate, quantized)

    monkeypatch.setattr(linear, "fake_quantize_fast", fake_quantize)
    monkeypatch.setattr(blocks, "fake_quantize_fast", fake_quantize)
    monkeypatch.setattr(blocks.QuantBlock, "_shared_input", lambda self, h, *a: h)
    monkeypatch.setattr(blocks.QuantBlock, "_project", separate)
    reference = step()
    assert fast.keys() == reference.keys() and len(fast) > 10
    for name in fast:
        assert torch.allclose(fast[name], reference[name], atol=1e-6, rtol=1e-3), name
