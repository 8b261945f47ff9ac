"""The fake quantizer (ALGORITHM.md §5.1)."""

import math

import numpy as np
import pytest
import torch

from sliderquant.quant.learnables import Clipping
from sliderquant.quant.quantizer import (
    QuantGrid,
    WeightFormat,
    fake_quantize,
    quant_params,
    weight_grid,
)


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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_symmetric_grid_has_the_fixed_mid_zero_point(bits, group_size):
    torch.manual_seed(5)
    x = torch.randn(6, 64)
    step, zero = quant_params(x, bits, group_size, symmetric=True)
    assert torch.equal(zero, torch.full_like(zero, 2 ** (bits - 1)))
    groups = x.view(6, -1, group_size or 64)
    assert torch.allclose(step[..., 0], 2 * groups.abs().amax(-1) / (2**bits - 1))
    q = fake_quantize(x, bits, group_size=group_size, symmetric=True)
    err = (q - x).view_as(groups).abs()
    # half a step everywhere except where the positive end lies beyond the last level
    # (2^(b-1) - 1 steps), which is clipped by less than one step
    inside = groups <= (2 ** (bits - 1) - 1) * step
    assert (err[inside] <= (step / 2 + 1e-6).expand_as(groups)[inside]).all()
    assert (err <= step + 1e-6).all()


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [None, 8])
def test_folding_and_training_share_one_path_to_the_codes(symmetric, group_size):
    torch.manual_seed(6)
    w = torch.randn(5, 32)
    clip = Clipping(5, 1 if group_size is None else 4)
    with torch.no_grad():
        clip.upper.uniform_(0, 4)
        clip.lower.uniform_(0, 4)
    grid = weight_grid(w, WeightFormat(3, group_size, symmetric), **clip.quantizer_args())
    trained = fake_quantize(w, 3, group_size=group_size, symmetric=symmetric,
                            **clip.quantizer_args())
    assert torch.equal(grid.dequantize(), trained.detach())
    assert torch.equal(grid.codes, grid.codes.round())


def test_four_bit_symmetric_is_gguf_q4_0():
    """W = step * (q - 8), q in 0..15: written as Q4_0 blocks (d = step as fp16, 32 codes
    per block), the gguf package's reference decoder gives back exactly our grid."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    torch.manual_seed(7)
    grid = weight_grid(torch.randn(4, 64), WeightFormat(4, 32, symmetric=True))
    assert torch.equal(grid.zero, torch.full_like(grid.zero, 8))
    step = grid.step.half()  # Q4_0 keeps d in fp16
    ours = QuantGrid(grid.codes, step.float(), grid.zero, 4, 32).dequantize()
    c = grid.codes.to(torch.uint8).view(-1, 32).numpy()
    blocks = np.concatenate([step.view(-1, 1).numpy().view(np.uint8),
                             c[:, :16] | (c[:, 16:] << 4)], axis=1)
    decoded = quants.dequantize(blocks.reshape(4, -1), T.Q4_0)
    assert np.array_equal(decoded, ours.numpy())
