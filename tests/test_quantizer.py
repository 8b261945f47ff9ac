"""The fake quantizer (ALGORITHM.md §5.1)."""

import math

import pytest
import torch

from sliderquant.quant.learnables import Clipping
from sliderquant.quant.quantizer import WeightFormat, fake_quantize, quant_params, weight_grid


def test_sixteen_bits_is_identity():
    x = torch.randn(4, 32)
    assert fake_quantize(x, 16) is x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_land_on_a_grid_with_half_step_error(bits):
    torch.manual_seed(0)
    x = torch.randn(6, 64)
    q = fake_quantize(x, bits)
    step, zero = quant_params(x, bits)
    for row in range(6):
        assert q[row].unique().numel() <= 2**bits
        codes = q[row] / step[row, 0] + zero[row, 0]
        assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert (q - x).abs().max() <= step.max() / 2 + 1e-6


def test_min_and_max_are_represented_exactly_without_clipping():
    x = torch.tensor([[-1.0, -0.3, 0.2, 2.0]])
    q = fake_quantize(x, 2)
    assert torch.allclose(q[0, [0, 3]], x[0, [0, 3]], atol=1e-6)


def test_partial_rate_quantizes_leading_entries_with_full_row_statistics():
    torch.manual_seed(1)
    x = torch.randn(3, 10)
    full = fake_quantize(x, 3)
    half = fake_quantize(x, 3, rate=0.5)
    k = math.ceil(0.5 * 10)
    assert torch.equal(half[:, :k], full[:, :k])
    assert torch.equal(half[:, k:], x[:, k:])
    assert torch.equal(fake_quantize(x, 3, rate=0.995), full)


def test_groups_with_partial_rate_keep_each_column_in_its_own_group():
    torch.manual_seed(2)
    x = torch.randn(4, 16)
    grouped = fake_quantize(x, 2, rate=0.4, group_size=4)
    k = math.ceil(0.4 * 16)
    manual = torch.cat([fake_quantize(x[:, g:g + 4], 2) for g in range(0, 16, 4)], dim=1)
    assert torch.equal(grouped[:, :k], manual[:, :k])
    assert torch.equal(grouped[:, k:], x[:, k:])


def test_straight_through_gradient_and_clipping_gradient():
    torch.manual_seed(3)
    x = torch.randn(5, 8, requires_grad=True)
    fake_quantize(x, 4).sum().backward()
    # identity gradient through the rounding; the row min/max also feed the step size
    inner = torch.ones_like(x, dtype=torch.bool)
    inner[torch.arange(5), x.argmax(1)] = False
    inner[torch.arange(5), x.argmin(1)] = False
    assert torch.allclose(x.grad[inner], torch.ones(int(inner.sum())))
    clip = Clipping(5, 1)
    (fake_quantize(x.detach(), 2, **clip.quantizer_args()) ** 2).sum().backward()
    assert clip.upper.grad.abs().sum() > 0 and clip.lower.grad.abs().sum() > 0


def test_clipping_shrinks_the_range():
    x = torch.linspace(-1, 1, 33).unsqueeze(0)
    clip = Clipping(1, 1)
    with torch.no_grad():
        clip.upper.fill_(-1.0)  # sigmoid(-1) ≈ 0.27 of the max
    assert fake_quantize(x, 4, **clip.quantizer_args()).max() < 0.3


def test_integers_reconstruct_the_fake_quantized_weight():
    torch.manual_seed(4)
    w = torch.randn(6, 32)
    clip = Clipping(6, 4)
    with torch.no_grad():
        clip.upper.uniform_(1, 4)
    grid = weight_grid(w, WeightFormat(3, 8), **clip.quantizer_args())
    codes, step, zero = grid.codes, grid.step, grid.zero
    assert codes.min() >= 0 and codes.max() <= 7
    rebuilt = ((codes.view(6, 4, 8) - zero[..., None]) * step[..., None]).view(6, 32)
    fake = fake_quantize(w, 3, group_size=8, **clip.quantizer_args()).detach()
    assert torch.equal(rebuilt, fake)
    assert torch.equal(grid.dequantize(), fake)
