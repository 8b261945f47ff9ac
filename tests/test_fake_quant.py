"""The training step's cheaper pieces against the plain autograd graphs they replace: the
fake quantizer's hand-written backwards (quant/quantizer.py `_GroupRange`, `_RoundTrip`)
and LoRA's single `addmm`. The same values and, bit for bit, the same gradients for every
input and learnable."""

import math

import pytest
import torch

from sliderquant.quant import quantizer
from sliderquant.quant.learnables import LoRA
from sliderquant.quant.quantizer import FULL_RATE, STEP_MAX, STEP_MIN, _grouped


def round_ste(t):
    return t + (t.round() - t).detach()


def reference_fake_quantize(x, bits, rate=1.0, group_size=None, upper=None, lower=None,
                            symmetric=False, offset=None):
    """The training path before the hand-written backwards, verbatim: autograd end to end."""
    if bits >= 16:
        return x
    groups = _grouped(x, group_size)
    hi = groups.amax(dim=-1, keepdim=True)
    lo = groups.amin(dim=-1, keepdim=True)
    if upper is not None:
        hi = torch.sigmoid(upper).unsqueeze(-1) * hi
        lo = torch.sigmoid(lower).unsqueeze(-1) * lo
    if symmetric:
        absmax = torch.maximum(hi.abs(), lo.abs())
        step = (2 * absmax / (2**bits - 1)).clamp(STEP_MIN, STEP_MAX)
        zero = torch.full_like(step, 2 ** (bits - 1))
    else:
        step = ((hi - lo) / (2**bits - 1)).clamp(STEP_MIN, STEP_MAX)
        zero = (-lo / step).clamp(-1e4, 1e4).round().detach()
    scaled = _grouped(x, group_size) / step
    if offset is not None:
        scaled = scaled + _grouped(offset, group_size)
    codes = (round_ste(scaled) + zero).clamp(0, 2**bits - 1)
    out = ((codes - zero) * step).reshape(x.shape)
    if rate < FULL_RATE:
        k = math.ceil(rate * x.shape[-1])
        out = torch.cat([out[..., :k], x[..., k:]], dim=-1)
    return out


def tied_weight(out: int, width: int, seed: int) -> torch.Tensor:
    """A weight on a coarse grid (like a dequantized GGUF source), so that rows and groups
    have tied maxima and minima; one row is constant."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-7, 8, (out, width), generator=g).float() * 0.03
    w = w + 0.001 * torch.randn(out, width, generator=g) * (torch.rand(out, 1, generator=g) > 0.5)
    w[1] = 0.02
    return w


def run(fn, base: torch.Tensor, learnables: dict, weight_like: bool, **kw):
    """Forward of `fn` on a differentiable function of `base` (LoRA-like for weights,
    a scaled activation otherwise), a fixed random upstream gradient, backward; returns the
    output and the gradient of every learnable."""
    params = {k: v.clone().requires_grad_(True) for k, v in learnables.items()}
    x = base + params["b"] @ params["a"] * 0.25 if weight_like else base * params["s"]
    args = {k: params[k] for k in ("upper", "lower", "offset") if k in params}
    out = fn(x, **kw, **args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * g).sum().backward()
    return out.detach(), {k: p.grad for k, p in params.items()}


def assert_same(fast, reference):
    out, grads = fast
    ref_out, ref_grads = reference
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, name
        assert torch.equal(grads[name], ref_grads[name]), (
            name, (grads[name] - ref_grads[name]).abs().max())


WEIGHT_CASES = [
    # bits, group_size, symmetric, clipping, offset, rate
    (4, None, False, True, False, 1.0),
    (2, 16, False, True, False, 1.0),
    (4, None, True, True, False, 1.0),
    (3, 16, True, False, False, 1.0),
    (2, 16, False, True, True, 1.0),
    (4, None, False, True, True, 0.5),
    (2, 16, False, False, False, 0.3),
    (8, None, False, True, False, 1.0),
]


@pytest.mark.parametrize("bits,group_size,symmetric,clipping,offset,rate", WEIGHT_CASES)
def test_weight_fake_quantization_matches_autograd_bit_for_bit(bits, group_size, symmetric,
                                                              clipping, offset, rate):
    out, width = 24, 64
    g = torch.Generator().manual_seed(bits)
    n_groups = 1 if group_size is None else width // group_size
    learnables = {"a": torch.randn(4, width, generator=g) * 0.1,
                  "b": torch.randn(out, 4, generator=g) * 0.1}
    if clipping:  # some logits low enough that many entries are clamped at the grid's ends
        learnables["upper"] = torch.randn(out, n_groups, generator=g) * 2 + 1
        learnables["lower"] = torch.randn(out, n_groups, generator=g) * 2 + 1
    if offset:
        learnables["offset"] = torch.rand(out, width, generator=g) - 0.5
    base = tied_weight(out, width, bits)
    kw = dict(bits=bits, rate=rate, group_size=group_size, symmetric=symmetric)
    assert_same(run(quantizer.fake_quantize, base, learnables, True, **kw),
                run(reference_fake_quantize, base, learnables, True, **kw))


@pytest.mark.parametrize("bits,rate", [(4, 1.0), (4, 0.5), (8, 1.0), (2, 1.0)])
@pytest.mark.parametrize("layout", ["tokens", "heads"])
def test_activation_fake_quantization_matches_autograd_bit_for_bit(bits, rate, layout):
    """Per-token activations, including the non-contiguous [B, H, T, d] view of q/k/v."""
    g = torch.Generator().manual_seed(3)
    if layout == "tokens":
        base = torch.randn(2, 10, 48, generator=g)
    else:
        base = torch.randn(2, 10, 3, 16, generator=g).transpose(1, 2)
    base[0, 0] = 0.5  # a constant row: max == min
    base[..., 3] = base.amax(dim=-1)  # ties at the maximum
    learnables = {"s": torch.rand(base.shape[-1], generator=g) + 0.5}
    kw = dict(bits=bits, rate=rate)
    assert_same(run(quantizer.fake_quantize, base, learnables, False, **kw),
                run(reference_fake_quantize, base, learnables, False, **kw))


def test_values_without_gradients_match_autograd():
    x = tied_weight(16, 32, 0)
    with torch.no_grad():
        for bits, group_size, symmetric in [(2, 8, False), (4, None, True), (4, None, False)]:
            kw = dict(bits=bits, group_size=group_size, symmetric=symmetric)
            assert torch.equal(quantizer.fake_quantize(x, **kw),
                               reference_fake_quantize(x, **kw))


def test_layer_step_matches_the_autograd_quantizer(monkeypatch):
    """A whole student layer (channel scaling, LoRA, clipping, learned rounding, W3 g16 and
    per-token A4 at a partial rate): loss and every learnable's gradient bit for bit."""
    from test_layer import student_step

    from sliderquant.quant import blocks, linear
    from sliderquant.quant.learnables import LayerQuantSpec

    spec = LayerQuantSpec(wbits=3, abits=4, group_size=16, channel_scaling=True,
                          rounding=True)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    loss, grads = student_step(spec, x)
    for module in (quantizer, linear, blocks):
        monkeypatch.setattr(module, "fake_quantize", reference_fake_quantize)
    ref_loss, ref_grads = student_step(spec, x)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("weight_grad", [False, True])
def test_lora_delta_in_one_addmm_matches_the_three_step_formula(weight_grad):
    """W + (B @ A) * alpha / r at the default rank 4, where the weight itself may carry a
    gradient (channel scaling)."""
    g = torch.Generator().manual_seed(5)
    lora = LoRA(48, 32, 4, torch.float32, g)
    with torch.no_grad():
        lora.b.copy_(torch.randn(48, 4, generator=g) * 0.05)
    base = torch.randn(48, 32, generator=g)
    upstream = torch.randn(48, 32, generator=g)

    def grads(adjust):
        w = base.clone().requires_grad_(weight_grad)
        lora.zero_grad()
        out = adjust(w)
        (out * upstream).sum().backward()
        return out.detach(), lora.a.grad.clone(), lora.b.grad.clone(), w.grad

    fast = grads(lora.adjust)
    reference = grads(lambda w: w + (lora.b @ lora.a) * (1.0 / lora.rank))
    for a, b in zip(fast, reference, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gradient_of_the_clipping_alone_and_no_second_backward():
    """Asking only for the clipping logits' gradient gives autograd's; a second backward
    through the same graph fails loudly (the backward reuses its saved tensors)."""
    x = tied_weight(24, 64, 1).requires_grad_(True)
    upper = torch.full((24, 1), 1.5, requires_grad=True)
    lower = torch.full((24, 1), 2.0, requires_grad=True)
    got = torch.autograd.grad(quantizer.fake_quantize(x, 3, upper=upper, lower=lower).sum(),
                              [upper], retain_graph=False)[0]
    ref = torch.autograd.grad(reference_fake_quantize(x, 3, upper=upper, lower=lower).sum(),
                              [upper])[0]
    assert torch.equal(got, ref)
    loss = quantizer.fake_quantize(x, 3, upper=upper, lower=lower).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clipping", [False, True])
def test_half_precision_inputs_match_autograd_bit_for_bit(dtype, clipping):
    """Half-precision weights or activations (autocast), also against float32 clipping
    logits (a float32 step): the same values and gradients."""
    results = []
    for fn in (quantizer.fake_quantize, reference_fake_quantize):
        x = tied_weight(24, 64, 0).to(dtype).requires_grad_(True)
        upper = torch.full((24, 4), 1.5, requires_grad=True)
        lower = torch.full((24, 4), 2.0, requires_grad=True)
        kw = {"upper": upper, "lower": lower} if clipping else {}
        out = fn(x, 3, group_size=16, **kw)
        (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
        results.append((out.detach(), x.grad, upper.grad if clipping else torch.zeros(())))
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
