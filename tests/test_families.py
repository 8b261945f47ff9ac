"""Every family (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) on a tiny random model built from its
transformers config: the family entry reads the model, our FP view is transformers' function,
folding equals the student, rotation preserves the function, GGUF and compressed exports read
back to the folded weights, expert token counts match transformers' own routing, resume is
bit-identical.

Runs on `SLIDERQUANT_TEST_DEVICE` (default cpu; benchmarks/gpu_families.sh sets cuda). No
real checkpoint of these families is reachable offline, so tiny random models are what the
families are tested on.
"""

import json

import pytest
import torch
from conftest import FAMILY_NAMES, MOE_FAMILIES, TEST_DEVICE, tiny_model, tiny_tokenizer
from test_layer import randomise_learnables, stack_logits, wrap

from sliderquant import QuantConfig, quantize
from sliderquant.fold import fold_layers, install_activation_quantization
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import LayerQuantSpec
from sliderquant.rotation import rotate_model

if TEST_DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("SLIDERQUANT_TEST_DEVICE=cuda but torch sees no CUDA device",
                allow_module_level=True)

DEVICE = TEST_DEVICE
IDS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
# With activation quantization, GPU kernels' summation order can flip a per-token rounding
# that the CPU path happens not to (see test_cuda.py).
TOL = 1e-4 if DEVICE.type == "cpu" else 2e-3
FP_TOL = 1e-5 if DEVICE.type == "cpu" else 1e-4  # GPU attention kernels sum in other orders


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


def on_device(model):
    return model.to(DEVICE), IDS.to(DEVICE)


def test_the_entry_reads_every_part_of_the_model(family, tmp_path):
    model = tiny_model(family)
    adapter = DecoderAdapter(model)
    assert adapter.family.name == family
    moe = family in MOE_FAMILIES
    assert [adapter.is_moe(i) for i in range(adapter.num_layers)] == [moe] * 3
    modules = dict(model.named_modules())
    for i in range(adapter.num_layers):
        for name, lin in adapter.linears(i).items():
            assert modules[adapter.linear_path(i, name)] is lin
        parts = adapter.parts(i)
        assert (parts.attn.q_norm is not None) == family.startswith("qwen3")
        assert (parts.attn.proj["q"].bias is not None) == (family == "qwen2")
        if moe:  # experts are views into the fused parameters, not copies
            fused = adapter.experts_module(i).gate_up_proj
            assert parts.mlp.proj["experts.2.up"].weight.data_ptr() == \
                fused[2][fused.shape[1] // 2:].data_ptr()
    if moe:  # per-expert grid keys are the names transformers writes in checkpoints
        model.save_pretrained(tmp_path)
        from safetensors import safe_open

        with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
        paths = {s.path + ".weight" for slices in adapter.fused_experts().values()
                 for s in slices}
        assert len(paths) == 3 * 4 * 3 and paths <= saved


def test_fp_view_equals_transformers_logits(family):
    model, ids = on_device(tiny_model(family))
    with torch.no_grad():
        reference = model(ids).logits
    adapter, layers = wrap(model, LayerQuantSpec(wbits=4, abits=4, channel_scaling=True))
    assert torch.allclose(stack_logits(adapter, layers, ids, False), reference, atol=FP_TOL)


SPECS = {"w4a4-scaled": dict(wbits=4, abits=4, channel_scaling=True),
         "w3a16-g16": dict(wbits=3, abits=16, group_size=16),
         "w4a4-router": dict(wbits=4, abits=4, channel_scaling=True, quantize_router=True)}


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_folded_model_equals_the_student(family, spec_name):
    """Scales, LoRA and clipping folded into plain weights (fused experts slice by slice),
    run-time activation quantizers installed: the transformers model computes the student."""
    if spec_name == "w4a4-router" and family not in MOE_FAMILIES:
        pytest.skip("no router")
    spec = LayerQuantSpec(**SPECS[spec_name])
    model = tiny_model(family)
    adapter, layers = wrap(model, spec)
    randomise_learnables(layers)  # on the host: its generator is a CPU one
    model, ids = on_device(model)
    for layer in layers:
        layer.to(DEVICE)
    student = stack_logits(adapter, layers, ids, True)
    grids = fold_layers(adapter, layers)
    install_activation_quantization(adapter, spec.abits, spec.quantize_attention,
                                    spec.quantize_router)
    with torch.no_grad():
        deployed = model(ids).logits
    tol = 1e-4 if spec.abits >= 16 else TOL
    assert torch.allclose(deployed, student, atol=tol, rtol=tol), (deployed - student).abs().max()
    # every quantized weight (each expert of a fused parameter included) sits on its grid
    quantized = 0
    for i in range(adapter.num_layers):
        paths = adapter.projection_paths(i)
        for block in adapter.parts(i).blocks().values():
            named = dict(block.proj)
            if hasattr(block, "router"):
                named["router"] = block.router
            for name, proj in named.items():
                path = paths[name]
                if f"{path}.step" not in grids:
                    assert name == "router" and not spec.quantize_router
                    continue
                quantized += 1
                step, zero = grids[f"{path}.step"], grids[f"{path}.zero"]
                w = proj.weight.view(proj.weight.shape[0], step.shape[1], -1)
                codes = torch.round(w / step[..., None]) + zero[..., None]
                assert codes.min() >= 0 and codes.max() <= 2**spec.wbits - 1
                assert torch.equal((codes - zero[..., None]) * step[..., None], w), path
    per_layer = 4 + (4 * 3 + spec.quantize_router if family in MOE_FAMILIES else 3)
    assert quantized == per_layer * adapter.num_layers


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_preserves_the_fp_function(family, tied):
    """The W4A4 rotation (norms fused, residual stream rotated, every expert and the router
    included) leaves the full-precision function unchanged."""
    model, ids = on_device(tiny_model(family, tied=tied))
    with torch.no_grad():
        before = model(ids).logits
        kind = rotate_model(DecoderAdapter(model), seed=3, center_embeddings=False)
        after = model(ids).logits
    assert kind == "random_hadamard"
    assert torch.allclose(after, before, atol=1e-4), (after - before).abs().max()
    adapter = DecoderAdapter(model)
    assert torch.equal(adapter.parts(1).mlp.norm, torch.ones(64, device=DEVICE))


def _folded_w4(family, symmetric=False, **overrides):
    """A tiny model of `family` (vocab 300, for the byte-level test tokenizer) with trained-
    looking learnables folded in at W4A16: (model, grids, config)."""
    model = tiny_model(family, vocab_size=300, **overrides)
    spec = LayerQuantSpec(wbits=4, abits=16, symmetric=symmetric, channel_scaling=True)
    adapter, layers = wrap(model, spec)
    randomise_learnables(layers)
    model, _ = on_device(model)
    for layer in layers:
        layer.to(DEVICE)
    grids = fold_layers(adapter, layers)
    config = QuantConfig.from_dict(dict(wbits=4, abits=16, symmetric=symmetric))
    return model.cpu(), {k: v.cpu() for k, v in grids.items()}, config


def _llama_rows(t, heads):
    """transformers' q/k rows (RoPE halves) in llama.cpp's interleaved-pair order."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(t.shape)


def test_gguf_reads_back_to_the_folded_weights(family, tmp_path):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    from sliderquant.export.gguf import write_gguf

    model, grids, config = _folded_w4(family)
    result = write_gguf(model, grids, config, tiny_tokenizer(), tmp_path / "m.gguf")
    assert {t.status for t in result.tensors if t.max_step_error is not None} == {"exact"}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    assert arch == DecoderAdapter(model).family.gguf_architecture
    tensors = {t.name: t for t in reader.tensors}
    adapter = DecoderAdapter(model)

    def back(name):
        t = tensors[name]
        values = quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(values.astype("float32")).reshape(
            [int(d) for d in reversed(t.shape.tolist())])

    checked = 0
    for i in range(adapter.num_layers):
        parts = adapter.parts(i)
        attn = {name: p.weight for name, p in parts.attn.proj.items()}
        expected = {"attn_q": attn["q"], "attn_k": attn["k"], "attn_v": attn["v"],
                    "attn_output": attn["o"]}
        if adapter.is_moe(i):
            for name, gg in (("gate", "ffn_gate_exps"), ("up", "ffn_up_exps"),
                             ("down", "ffn_down_exps")):
                expected[gg] = torch.stack([parts.mlp.proj[f"experts.{e}.{name}"].weight
                                            for e in range(parts.mlp.num_experts)])
            router = back(f"blk.{i}.ffn_gate_inp.weight")  # kept in F32: exact
            assert torch.equal(router, parts.mlp.router.weight)
        else:
            expected.update({"ffn_gate": parts.mlp.proj["gate"].weight,
                             "ffn_up": parts.mlp.proj["up"].weight,
                             "ffn_down": parts.mlp.proj["down"].weight})
        if adapter.family.gguf_architecture == "llama":
            expected["attn_q"] = _llama_rows(expected["attn_q"], adapter.num_heads)
            expected["attn_k"] = _llama_rows(expected["attn_k"], adapter.num_kv_heads)
        if parts.attn.q_norm is not None:
            assert torch.equal(back(f"blk.{i}.attn_q_norm.weight"), parts.attn.q_norm)
            assert torch.equal(back(f"blk.{i}.attn_k_norm.weight"), parts.attn.k_norm)
        for gg, want in expected.items():
            got = back(f"blk.{i}.{gg}.weight")
            assert got.shape == want.shape, gg
            # exact codes, fp16 scale and minimum: within a few fp16 ulps of the weight scale
            scale = want.abs().amax(dim=-1, keepdim=True)
            assert ((got - want).abs() / scale).max() < 2e-3, (i, gg)
            checked += 1
    assert checked == adapter.num_layers * 7


def test_llama_cpp_runs_the_exported_gguf_like_our_model(family, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from sliderquant.eval.llamacpp import llamacpp_window_nlls
    from sliderquant.eval.perplexity import window_nlls
    from sliderquant.export.gguf import write_gguf

    model, grids, config = _folded_w4(family)
    write_gguf(model, grids, config, tiny_tokenizer(), tmp_path / "m.gguf", float_type="f32")
    windows = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(2))
    ours = window_nlls(model, windows, show_progress=False)
    theirs = llamacpp_window_nlls(tmp_path / "m.gguf", windows, n_threads=1,
                                  show_progress=False)
    assert torch.allclose(torch.as_tensor(theirs), torch.as_tensor(ours), rtol=1e-3), \
        (theirs, ours)


@pytest.mark.parametrize(("overrides", "match"), [
    ({"mlp_only_layers": [1]}, "dense"), ({"norm_topk_prob": False}, "renormalise")])
def test_gguf_refuses_moe_layouts_llama_cpp_cannot_run(overrides, match, tmp_path):
    pytest.importorskip("gguf")
    from sliderquant.export.gguf import write_gguf
    from sliderquant.export.source import ExportError

    model, grids, config = _folded_w4("qwen3_moe", **overrides)
    with pytest.raises(ExportError, match=match):
        write_gguf(model, grids, config, tiny_tokenizer(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_compressed_checkpoint_reads_back_to_the_folded_weights(family, tmp_path):
    """Symmetric W4 (what transformers' expert decompression can load): our reader and, where
    compressed-tensors is installed, plain transformers give the folded model's logits."""
    from sliderquant.export.compressed import load_compressed, write_compressed

    model, grids, config = _folded_w4(family, symmetric=True)
    write_compressed(model, grids, config, tiny_tokenizer(), tmp_path / "c")
    with torch.no_grad():
        want = model(IDS).logits
        ours, _ = load_compressed(tmp_path / "c")
        assert torch.equal(ours(IDS).logits, want)
    for name, p in model.named_parameters():
        assert torch.equal(ours.get_parameter(name), p), name
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    engine = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    with torch.no_grad():
        assert torch.allclose(engine(IDS).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family_name", MOE_FAMILIES)
def test_compressed_refuses_an_asymmetric_moe_grid(family_name, tmp_path):
    from sliderquant.export.compressed import write_compressed
    from sliderquant.export.source import ExportError

    model, grids, config = _folded_w4(family_name)
    with pytest.raises(ExportError, match="symmetric"):
        write_compressed(model, grids, config, tiny_tokenizer(), tmp_path / "c")
    assert not (tmp_path / "c").exists()


CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))


def quant_config(**kw):
    base = dict(wbits=3, abits=16, epochs=2, batch_size=2, nsamples=4, seqlen=16,
                inference_batch_size=3, lora_lr=5e-3, shallow=1, deep=1, window_size=2)
    return QuantConfig.from_dict({**base, **kw})


@pytest.mark.parametrize("family_name", MOE_FAMILIES)
def test_expert_token_counts_are_transformers_routing(family_name):
    model = tiny_model(family_name)
    with torch.no_grad():
        routers = model(CALIB, output_router_logits=True).router_logits
    top_k = model.config.num_experts_per_tok
    want = {str(i): torch.bincount(torch.topk(r.float(), top_k, -1).indices.flatten(),
                                   minlength=4).tolist() for i, r in enumerate(routers)}
    result = quantize(model, None, quant_config(), calib=CALIB, device=DEVICE,
                      show_progress=False)
    experts = result.report["experts"]
    assert experts["tokens_per_expert"] == want
    assert sum(want["0"]) == CALIB.numel() * top_k
    low = {(e["layer"], e["expert"]) for e in experts["low_coverage"]}
    assert low == {(int(k), e) for k, v in want.items() for e, n in enumerate(v)
                   if n < experts["low_coverage_threshold"]}


@pytest.fixture
def deterministic():
    """On CUDA, index_add_ / index_put_ (experts and their gradients) use atomics unless
    deterministic algorithms are asked for (the GPU script sets CUBLAS_WORKSPACE_CONFIG)."""
    if DEVICE.type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def test_resume_is_bit_identical(family, tmp_path, deterministic):
    cfg = quant_config(wbits=4, abits=4, channel_scaling=True, rotate=True)
    full = tiny_model(family)
    quantize(full, None, cfg, calib=CALIB, device=DEVICE, output_dir=tmp_path / "a",
             show_progress=False)

    class Crash(Exception):
        pass

    def crash_after_second(record, seen=[]):  # noqa: B006 - counter shared by the calls
        seen.append(record)
        if len(seen) == 2:
            raise Crash

    with pytest.raises(Crash):
        quantize(tiny_model(family), None, cfg, calib=CALIB, device=DEVICE,
                 output_dir=tmp_path / "b", show_progress=False, on_unit_end=crash_after_second)
    resumed = tiny_model(family)
    result = quantize(resumed, None, cfg, calib=CALIB, device=DEVICE, output_dir=tmp_path / "b",
                      resume=True, show_progress=False)
    assert not (tmp_path / "b" / "checkpoint").exists()  # the saved model supersedes it
    for (name, pa), pb in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    record = json.loads((tmp_path / "b" / "sliderquant.json").read_text())
    assert record["family"]["name"] == family
    assert ("qkt" in record["family"]["dropped_scalings"]) == family.startswith("qwen3")
    assert record["rotation"] == "random_hadamard"
    assert len(result.report["windows"]) == len(record["windows"])


def test_quantize_command_on_a_qwen3_moe_folder_prints_expert_tokens(tmp_path, capsys):
    """`sliderquant quantize` end to end on a tiny random Qwen3-MoE saved with
    save_pretrained, calibrated on a text file: per-expert token counts are printed and
    recorded, the router stays in full precision unless --quantize-router."""
    from sliderquant.cli import main

    folder = tmp_path / "qwen3moe"
    tiny_model("qwen3_moe", vocab_size=300).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"the {w} sat on the mat" for w in range(200)))
    common = ["--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--epochs", "1",
              "--batch-size", "2", "--shallow", "1", "--deep", "1", "--tasks", "none",
              "--device", DEVICE.type, "--quiet"]
    assert main(["quantize", str(folder), "--out", str(tmp_path / "run"), *common]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "sliderquant.json").read_text())
    counts = record["experts"]["tokens_per_expert"]
    assert sorted(counts) == ["0", "1", "2"]
    for layer, row in counts.items():
        assert sum(row) == 4 * 32 * 2
        assert f"layer   {layer}: " + " ".join(map(str, row)) in out
    assert record["family"]["name"] == "qwen3_moe"
    grids = api_grids(tmp_path / "run")
    assert "model.layers.0.mlp.experts.3.down_proj.step" in grids
    assert "model.layers.0.mlp.gate.step" not in grids
    assert main(["quantize", str(folder), "--out", str(tmp_path / "router"), "--quantize-router",
                 *common]) == 0
    assert "model.layers.0.mlp.gate.step" in api_grids(tmp_path / "router")


def api_grids(run):
    from sliderquant.api import load_grids

    return load_grids(run)


@pytest.mark.skipif(DEVICE.type != "cuda",
                    reason="measures GPU memory (SLIDERQUANT_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("family_name", MOE_FAMILIES)
def test_moe_windows_keep_gpu_memory_bounded_by_the_window(family_name):
    """A host model is trained window by window on the GPU: the peak GPU memory of a 6-layer
    MoE model is that of a 2-layer one (each layer's experts are 6 MiB of float32 here)."""
    widths = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  intermediate_size=256, vocab_size=300)
    if family_name == "qwen3_moe":
        widths.update(moe_intermediate_size=256, num_experts=8)
    else:
        widths.update(num_local_experts=8)
    peaks = {}
    for layers in (2, 6):
        model = tiny_model(family_name, layers=layers, **widths)
        result = quantize(model, None, quant_config(window_size=2, shallow=1, deep=1),
                          calib=CALIB, device=DEVICE, show_progress=False)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        peaks[layers] = result.report["peak_gpu_mb"]
    expert_mib = 8 * 3 * 256 * 256 * 4 / 2**20
    assert peaks[6] < peaks[2] + expert_mib, peaks


@pytest.mark.parametrize("family_name", MOE_FAMILIES)
def test_sensitivity_scans_quantize_experts_like_the_pipeline(family_name):
    """The RTN sensitivity scan's in-place W4A4 quantization of an MoE model (experts'
    inputs, a quantized router) is the deployed RTN model, and it restores the FP model."""
    from sliderquant.sensitivity import LayerQuantizer

    cfg = QuantConfig.from_preset("w4a4", method="rtn", rotate=False, channel_scaling=False,
                                  lwc=False, lora_rank=0, quantize_router=True, nsamples=4,
                                  seqlen=16)
    deployed = quantize(tiny_model(family_name), None, cfg, calib=CALIB, device=DEVICE,
                        show_progress=False).model
    model = tiny_model(family_name)
    with torch.no_grad():
        fp = model(IDS).logits
        want = deployed(IDS).logits
        with LayerQuantizer(model, cfg) as q:
            restore = q.quantize(0, 2)
            scanned = model(IDS).logits
            restore()
            assert torch.equal(model(IDS).logits, fp)
    assert torch.allclose(scanned, want, atol=1e-4), (scanned - want).abs().max()
    assert (want - fp).abs().max() > 1e-2


def test_a_resumed_moe_run_places_no_more_layers_than_a_window(tmp_path, monkeypatch):
    """Catching up after a resume (the quantized cache and the FP targets up to a late
    window) visits the device one layer at a time: never more layers than a window."""
    from sliderquant.engine import Engine

    placed_at_once = []
    original = Engine._placed

    def spy(self, layers):
        placed_at_once.append(len(layers))
        return original(self, layers)

    monkeypatch.setattr(Engine, "_placed", spy)
    cfg = quant_config(window_size=1, stride=1)

    def crash_after_sixth(record, seen=[]):  # noqa: B006 - counter shared by the calls
        seen.append(record)
        if len(seen) == 6:  # stage 2, windows [0] and [1] done: resume at layer 2
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        quantize(tiny_model("qwen3_moe", layers=4), None, cfg, calib=CALIB, device=DEVICE,
                 output_dir=tmp_path, show_progress=False, on_unit_end=crash_after_sixth)
    placed_at_once.clear()
    result = quantize(tiny_model("qwen3_moe", layers=4), None, cfg, calib=CALIB, device=DEVICE,
                      output_dir=tmp_path, resume=True, show_progress=False)
    window = max(len(w) for w in result.report["schedule"])
    assert placed_at_once and max(placed_at_once) <= window, (placed_at_once, window)
