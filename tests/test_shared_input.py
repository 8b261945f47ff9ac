"""Projections that read the same tensor (q/k/v, gate/up) quantize it once: the same
gradients as quantizing it once per projection."""

import pytest
import torch


@pytest.mark.parametrize("abits", [4, 16])
def test_layer_gradients_equal_the_unfused_per_projection_path(abits, monkeypatch):
    """The student step (shared input quantization, hand-written backward) gives the loss
    and learnable gradients of the reference: every projection quantizing its own input
    through autograd's fake_quantize."""
    from test_layer import student_step

    from sliderquant.quant import blocks
    from sliderquant.quant.learnables import LayerQuantSpec

    spec = LayerQuantSpec(wbits=3, abits=abits, group_size=16, channel_scaling=abits < 16,
                          rounding=True)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    _, fast = student_step(spec, x)

    def separate(self, w, name, h, rate, quantized, input_quantized=False):
        return self.proj[name](h, w[f"{name}.weight"], w[f"{name}.bias"], rate, quantized)

    monkeypatch.setattr(blocks.QuantBlock, "_shared_input", lambda self, h, *a: h)
    monkeypatch.setattr(blocks.QuantBlock, "_project", separate)
    _, reference = student_step(spec, x)
    assert fast.keys() == reference.keys() and len(fast) > 10
    for name in fast:
        assert torch.allclose(fast[name], reference[name], atol=1e-6, rtol=1e-3), name
