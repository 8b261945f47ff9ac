"""The CUDA path: windows visit the GPU, the model stays where it is, folding still equals the
student. Skipped where torch sees no CUDA device (CI has none)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_layer import CASES, randomise_learnables, stack_logits, wrap

from sliderquant import QuantConfig, quantize
from sliderquant.engine import Engine
from sliderquant.fold import fold_layers, install_activation_quantization
from sliderquant.quant.layer import LayerQuantSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
CALIB = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))


def config(**kw):
    base = dict(wbits=2, abits=16, epochs=8, batch_size=2, nsamples=8, seqlen=32,
                inference_batch_size=3, lora_lr=5e-3, shallow=2, deep=2)
    return QuantConfig.from_dict({**base, **kw})


def output_error(model, ids) -> float:
    with torch.no_grad():
        fp = tiny_model(layers=4)(ids).logits
        return (model.to("cpu")(ids).logits - fp).pow(2).mean().item()


def test_host_model_is_trained_on_cuda_and_stays_on_the_host():
    model = tiny_model(layers=4)
    result = quantize(model, None, config(), calib=CALIB, device="cuda", show_progress=False)
    assert result.report["device"] == "cuda"
    assert result.report["peak_gpu_mb"] > 0
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    windows = result.report["windows"]
    assert sum(w["epoch_losses"][-1] < w["epoch_losses"][0] for w in windows) >= 0.8 * len(windows)
    rtn = quantize(tiny_model(layers=4), None, config(method="rtn", lwc=False, lora_rank=0),
                   calib=CALIB, show_progress=False)
    ids = CALIB[:4]
    assert output_error(model, ids) < output_error(rtn.model, ids)


def test_model_on_cuda_stays_on_cuda():
    model = tiny_model(layers=4).to(CUDA)
    quantize(model, None, config(wbits=4, abits=4, channel_scaling=True), calib=CALIB,
             device="cuda", show_progress=False)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        assert torch.isfinite(model(CALIB[:2].to(CUDA)).logits).all()


def test_window_weights_are_the_models_own_tensors_after_a_visit():
    """A window goes to the GPU and back without leaving a second copy of its weights."""
    model = tiny_model(layers=4)
    adapter, layers = wrap(model, LayerQuantSpec(wbits=2, abits=16, lora_rank=4, lwc=True))
    x0 = adapter.embed(CALIB).detach()
    Engine(layers, adapter.rotary(x0[:1], 32), config(), CUDA, show_progress=False).run(x0)
    for i, layer in enumerate(layers):
        assert layer.attn.proj["q"].weight.data_ptr() == adapter.linears(i)["q"].weight.data_ptr()
        assert layer.attn.norm.data_ptr() == adapter.parts(i).attn.norm.data_ptr()
        assert {p.device.type for p in layer.parameters()} == {"cpu"}


@pytest.mark.parametrize(("family", "spec"), CASES)
def test_folded_model_equals_unfolded_student_on_cuda(family, spec):
    model = tiny_model(family)
    adapter, layers = wrap(model, spec)
    randomise_learnables(layers)  # on the host: its generator is a CPU one
    model.to(CUDA)
    for layer in layers:
        layer.to(CUDA)
    ids = torch.randint(0, 96, (2, 24), device=CUDA)
    student = stack_logits(adapter, layers, ids, True)
    fold_layers(adapter, layers)
    install_activation_quantization(adapter, spec.abits, spec.quantize_attention)
    with torch.no_grad():
        deployed = model(ids).logits
    # with activation quantization, GPU kernels' summation order can flip a per-token
    # rounding that the CPU path happens not to: one step of an 8-bit grid, ~1e-3 here
    tol = 1e-4 if spec.abits >= 16 else 2e-3
    assert torch.allclose(deployed, student, atol=tol, rtol=tol), \
        (deployed - student).abs().max()


def test_quantize_is_the_first_cuda_call_of_a_fresh_process():
    """Regression: resetting the peak-memory statistics before CUDA was initialised raised
    "Invalid device argument" when quantize was the process's first CUDA call."""
    here = str(Path(__file__).parent)
    code = (
        f"import torch, sys; sys.path.insert(0, {here!r}); from conftest import tiny_model\n"
        "from sliderquant import QuantConfig, quantize\n"
        "cfg = QuantConfig.from_dict(dict(wbits=4, epochs=1, nsamples=4, seqlen=16, shallow=2,"
        " deep=2, batch_size=2))\n"
        "ids = torch.randint(0, 96, (4, 16))\n"
        "r = quantize(tiny_model(layers=4), None, cfg, calib=ids, device='cuda',"
        " show_progress=False)\n"
        "assert r.report['peak_gpu_mb'] > 0\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
