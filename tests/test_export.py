"""Export: GGUF blocks and compressed (pack-quantized) checkpoints hold the learned integer
codes; both load back, the compressed one in plain transformers too."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer
from gguf import GGMLQuantizationType as T
from gguf import quants

from sliderquant import QuantConfig, api, quantize
from sliderquant.cli import main
from sliderquant.export.compressed import pack_int32, unpack_int32, write_compressed
from sliderquant.export.gguf import write_gguf
from sliderquant.export.gguf_blocks import ENCODERS
from sliderquant.export.source import ExportError
from sliderquant.export.target import EXPORT_RECORD
from sliderquant.fold import install_activation_quantization
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.quantizer import quant_params

VOCAB = 300


def grid(rows, cols, bits, group_size, seed=0):
    """A random weight on a per-channel or group-wise grid: (w, step, zero, codes) per entry."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    step, zero = quant_params(w, bits, group_size)
    width = cols // step.shape[-2]
    s = step[..., 0].repeat_interleave(width, -1)
    z = zero[..., 0].repeat_interleave(width, -1)
    c = (torch.round(w / s) + z).clamp(0, 2**bits - 1)
    return ((c - z) * s).numpy(), s.numpy(), z.numpy(), c.numpy()


@pytest.mark.parametrize("qtype, bits, group_size", [
    (T.Q4_1, 4, None), (T.Q4_1, 4, 64), (T.Q4_1, 3, None), (T.Q4_1, 2, 32),
    (T.Q2_K, 2, None), (T.Q2_K, 2, 256), (T.Q3_K, 3, None), (T.Q8_0, 8, None)])
def test_block_encodings_reproduce_the_grid(qtype, bits, group_size):
    w, s, z, c = grid(16, 512, bits, group_size)
    data, exact = ENCODERS[qtype](w, s, z, c)
    decoded = quants.dequantize(data, qtype)  # the gguf package's reference decoder
    rows_exact = np.repeat(exact, w.size // exact.size).reshape(w.shape)
    assert exact.mean() > (0.8 if qtype in (T.Q3_K, T.Q8_0) else 0.999)
    # exact blocks: the integer codes come back, only the fp16 scales round the step
    assert np.array_equal(np.rint(decoded / s + z)[rows_exact], c[rows_exact])
    assert (np.abs(decoded - w) / s)[rows_exact].max() < 2.0**-11 * 2 * (2**bits + np.abs(z).max())
    # other blocks are re-quantized close to the grid
    assert np.sqrt(((decoded - w) ** 2).mean() / (w**2).mean()) < 0.1


@pytest.mark.parametrize("qtype, bits, group_size", [
    (T.Q4_1, 4, 16), (T.Q2_K, 2, 64), (T.Q3_K, 3, 32)])
def test_grids_a_block_type_cannot_hold_are_requantized_nearby(qtype, bits, group_size):
    w, s, z, c = grid(16, 512, bits, group_size)
    data, exact = ENCODERS[qtype](w, s, z, c)
    decoded = quants.dequantize(data, qtype)
    assert not exact.all()
    assert np.sqrt(((decoded - w) ** 2).mean() / (w**2).mean()) < 0.08


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_and_matches_compressed_tensors_layout(bits):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 40),
                      generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, -(-40 * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, 40), q)
    assert torch.equal(unpack_int32(pack_int32(q, bits, dim=0), bits, 6, dim=0), q)
    # entry 0 of row 0 sits in the lowest bits of word 0, offset to unsigned
    assert int(packed[0, 0]) & (2**bits - 1) == int(q[0, 0]) + 2 ** (bits - 1)
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(ct.pack_to_int32(q.to(torch.int8), bits), packed)
    assert torch.equal(ct.pack_to_int32(q.to(torch.int8), bits, packed_dim=0),
                       pack_int32(q, bits, dim=0))


# ---- whole runs on a tiny model with a real (byte-level BPE) tokenizer -------------------

def tiny_llama(hidden=256, intermediate=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model.float().eval()


def tiny_run(path, wbits=4, abits=16, group_size=None, **model_kw):
    cfg = QuantConfig.from_dict(dict(method="rtn", lwc=False, lora_rank=0, wbits=wbits,
                                     abits=abits, group_size=group_size, nsamples=2, seqlen=32,
                                     batch_size=1))
    calib = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    result = quantize(tiny_llama(**model_kw), tiny_tokenizer(), cfg, calib=calib,
                      output_dir=path, show_progress=False)
    return result.model


def projections(model):
    return {n.removesuffix(".weight"): p for n, p in model.named_parameters()
            if "layers" in n and n.endswith("proj.weight")}


def snap_to_grid(model, bits, group_size, symmetric):
    """Put every projection of `model` on a min/max grid in place; its grids (what
    fold.fold_layers returns). Symmetric: W = step * (codes - 2**(bits-1))."""
    grids = {}
    with torch.no_grad():
        for module, weight in projections(model).items():
            width = weight.shape[1] if group_size is None else group_size
            w = weight.reshape(weight.shape[0], -1, width)
            if symmetric:
                step = w.abs().amax(-1) / (2 ** (bits - 1) - 0.5)
                zero = torch.full_like(step, 2 ** (bits - 1))
            else:
                step, zero = quant_params(weight, bits, group_size)
                step, zero = step[..., 0], zero[..., 0].clamp(0, 2**bits - 1)
            codes = (torch.round(w / step[..., None]) + zero[..., None]).clamp(0, 2**bits - 1)
            weight.copy_(((codes - zero[..., None]) * step[..., None]).reshape(weight.shape))
            grids[f"{module}.step"], grids[f"{module}.zero"] = step, zero
    return grids


def config(wbits=4, abits=16, group_size=None, **kw):
    return QuantConfig.from_dict(dict(method="rtn", lwc=False, lora_rank=0, wbits=wbits,
                                      abits=abits, group_size=group_size, **kw))


@pytest.mark.parametrize("wbits, group_size, storage", [
    (2, None, "Q2_K"), (4, 32, "Q4_1"), (3, None, "Q3_K")])
def test_gguf_export_reproduces_the_folded_weights(tmp_path, wbits, group_size, storage):
    folded = tiny_run(tmp_path / "run", wbits, group_size=group_size)
    result = api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    kinds = {(t.storage, t.status) for t in result.tensors if t.max_step_error is not None}
    expected_status = "requantized" if storage == "Q3_K" else "exact"
    assert kinds <= {(storage, expected_status), (storage, "exact")}, kinds
    # transformers' GGUF loader: dequantizes with the gguf package, undoes the q/k permutation
    reloaded = api.load(str(tmp_path / "m.gguf")).model
    grids = api.load_grids(tmp_path / "run")
    for module, weight in projections(folded).items():
        step, zero = grids[f"{module}.step"], grids[f"{module}.zero"]
        width = weight.shape[1] // step.shape[1]
        s, z = step.repeat_interleave(width, 1), zero.repeat_interleave(width, 1)
        back = reloaded.get_parameter(f"{module}.weight")
        codes = torch.round(weight / s) + z
        if expected_status == "exact":
            assert torch.equal(torch.round(back / s) + z, codes), module
            assert ((back - weight).abs() / s).max() < 2.0**-11 * 2 * (2**wbits + z.abs().max())
        else:
            assert ((back - weight).norm() / weight.norm()) < 0.05


def test_gguf_falls_back_to_exact_q4_1_when_rows_do_not_fit_k_blocks(tmp_path):
    tiny_run(tmp_path / "run", wbits=2, hidden=96, intermediate=160)  # 96, 160: not /256
    result = api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    quantized = [t for t in result.tensors if t.max_step_error is not None]
    assert {(t.storage, t.status) for t in quantized} == {("Q4_1", "exact")}
    assert all("not a multiple of 256" in t.reason for t in quantized)
    tiny_run(tmp_path / "w3", wbits=3)  # 3-bit: Q3_K re-quantizes some blocks ...
    lossy = api.export(tmp_path / "w3", "gguf", tmp_path / "w3.gguf")
    assert any(t.status == "requantized" for t in lossy.tensors)
    exact = api.export(tmp_path / "w3", "gguf", tmp_path / "e.gguf", exact=True)
    assert {(t.storage, t.status) for t in exact.tensors if t.max_step_error is not None} <= {
        ("Q3_K", "exact"), ("Q4_1", "exact")}  # ... --exact keeps every grid in Q4_1


def test_exported_gguf_and_compressed_load_back_through_sliderquant(tmp_path):
    folded = tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "gguf")
    api.export(tmp_path / "run", "compressed")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = folded(input_ids=ids).logits
        from_gguf = api.load(str(tmp_path / "run" / "model.gguf"))
        from_compressed = api.load(str(tmp_path / "run" / "compressed"))
        assert torch.allclose(from_gguf.model(input_ids=ids).logits, want, atol=2e-2)
        assert torch.equal(from_compressed.model(input_ids=ids).logits, want)
    assert from_gguf.tokenizer("the the")["input_ids"] == tiny_tokenizer()("the the")["input_ids"]
    assert from_compressed.run["config"]["wbits"] == 4  # the run record travels along
    for module, weight in projections(folded).items():  # compressed: bit-exact
        assert torch.equal(from_compressed.model.get_parameter(f"{module}.weight"), weight)


def _plain_transformers(folder):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed "
                        "(pip install -e '.[deploy]')")
    return transformers.AutoModelForCausalLM.from_pretrained(folder)  # no extra config


def _check_plain_load(folder, folded, symmetric):
    """Plain from_pretrained loads `folder` on the expected route, generates, and gives
    `folded`'s logits."""
    engine = _plain_transformers(folder)
    lin = engine.model.layers[0].self_attn.q_proj
    if symmetric:  # compressed route: packed integers until the first forward pass
        assert str(lin.quantization_status) == "QuantizationStatus.COMPRESSED"
        assert lin.weight_packed.dtype == torch.int32 and not hasattr(lin, "weight")
    else:  # dequantize route (see export/compressed.py): dense weights from the start
        assert not hasattr(lin, "quantization_scheme")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(engine(input_ids=ids).logits, folded(input_ids=ids).logits,
                              atol=1e-5, rtol=0)
        out = engine.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, folded.generate(ids, max_new_tokens=4, do_sample=False))
    for module, weight in projections(folded).items():
        assert torch.equal(engine.get_parameter(f"{module}.weight"), weight), module


@pytest.mark.parametrize("wbits, group_size", [(4, None), (4, 64), (8, None), (3, None),
                                               (2, 32)])
def test_compressed_run_loads_in_plain_transformers(tmp_path, wbits, group_size):
    folded = tiny_run(tmp_path / "run", wbits, group_size=group_size)
    result = api.export(tmp_path / "run", "compressed")
    folder = tmp_path / "run" / "compressed"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], weights["num_bits"], weights["group_size"], weights["symmetric"]) == \
        ("pack-quantized", wbits, group_size, False)
    assert {t.status for t in result.tensors} == {"exact"}
    vllm = next(n for n in result.notes if n.startswith("vLLM"))
    assert ("cannot run" in vllm) == (wbits not in (4, 8))
    _check_plain_load(folder, folded, symmetric=False)


@pytest.mark.parametrize("wbits, group_size", [(4, None), (4, 64), (2, 32), (8, None)])
def test_symmetric_grids_load_on_the_compressed_route(tmp_path, wbits, group_size):
    folded = tiny_llama()
    grids = snap_to_grid(folded, wbits, group_size, symmetric=True)
    write_compressed(folded, grids, config(wbits, group_size=group_size), tiny_tokenizer(),
                     tmp_path / "c")
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert "dequantize" not in qc
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert not any(k.endswith("weight_zero_point") for k in names)
    _check_plain_load(tmp_path / "c", folded, symmetric=True)


def test_unquantized_tensors_are_stored_in_the_given_half_dtype(tmp_path):
    from safetensors.torch import load_file

    folded = tiny_llama()
    grids = snap_to_grid(folded, 4, 64, symmetric=False)
    write_compressed(folded, grids, config(4, group_size=64), tiny_tokenizer(), tmp_path / "c",
                     dtype=torch.bfloat16)
    state = load_file(str(tmp_path / "c" / "model.safetensors"))
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert set(floats.values()) == {torch.bfloat16}
    assert "model.embed_tokens.weight" in floats and any(k.endswith("weight_scale") for k in floats)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["dtype"] == "bfloat16"
    # reloaded: the folded model with its floats and steps rounded to bfloat16, codes intact;
    # sliderquant multiplies in float32 (exact), transformers in the checkpoint's bfloat16
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    ours = api.load(str(tmp_path / "c")).model
    engine = _plain_transformers(tmp_path / "c")
    assert engine.dtype == torch.bfloat16  # transformers' default dtype: the checkpoint's own
    for product, reloaded in ((lambda d, s: d * s.bfloat16().float(), ours),
                              (lambda d, s: (d.bfloat16() * s.bfloat16()).float(), engine)):
        want = tiny_llama()
        with torch.no_grad():
            for name, p in want.named_parameters():
                module = name.removesuffix(".weight")
                if f"{module}.step" in grids:
                    step = grids[f"{module}.step"]
                    s = step.repeat_interleave(p.shape[1] // step.shape[1], 1)
                    # round(W / step) = codes - zero, the integers the file holds
                    p.copy_(product(torch.round(folded.get_parameter(name) / s), s))
                    assert torch.equal(reloaded.get_parameter(name).float(), p), name
                else:
                    p.copy_(folded.get_parameter(name).bfloat16().float())
            reloaded.float()
            assert torch.allclose(reloaded(input_ids=ids).logits, want(input_ids=ids).logits,
                                  atol=1e-5)


def test_w4a4_is_described_as_dynamic_per_token_int4_inputs(tmp_path):
    folded = tiny_run(tmp_path / "run", wbits=4, abits=4)
    result = api.export(tmp_path / "run", "compressed")
    folder = tmp_path / "run" / "compressed"
    group = json.loads((folder / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]
    inputs = group["input_activations"]
    assert (inputs["num_bits"], inputs["strategy"], inputs["dynamic"]) == (4, "token", True)
    assert any("no int4-activation kernel" in n for n in result.notes)
    assert any("q/k/v quantization inside attention" in n for n in result.notes)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # sliderquant's loader restores linears and q/k/v quantization
        assert torch.equal(api.load(str(folder)).model(input_ids=ids).logits,
                           folded(input_ids=ids).logits)
    api.export(tmp_path / "run", "compressed", tmp_path / "w4", drop_activation_quantization=True)
    group = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]
    assert group["input_activations"] is None


def test_symmetric_w4a4_runs_its_input_quantization_in_transformers(tmp_path):
    folded = tiny_llama()
    grids = snap_to_grid(folded, 4, None, symmetric=True)
    install_activation_quantization(DecoderAdapter(folded), 4, quantize_attention=False)
    write_compressed(folded, grids, config(4, abits=4, quantize_attention=False),
                     tiny_tokenizer(), tmp_path / "c")
    engine = _plain_transformers(tmp_path / "c")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = engine(input_ids=ids).logits, folded(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5)
        # ... and the activation quantization is really applied there
        plain = tiny_llama()
        plain.load_state_dict(folded.state_dict())
        assert (got - plain(input_ids=ids).logits).abs().max() > 1e-2


def test_writers_take_an_in_memory_model(tmp_path):
    """What `quantize --format` will call: model, grids, config, tokenizer, destination."""
    folded = tiny_llama()
    grids = snap_to_grid(folded, 4, 32, symmetric=False)
    cfg = config(4, group_size=32)
    gguf_result = write_gguf(folded, grids, cfg, tiny_tokenizer(), tmp_path / "m.gguf")
    assert {t.status for t in gguf_result.tensors if t.max_step_error is not None} == {"exact"}
    write_compressed(folded, grids, cfg, tiny_tokenizer(), tmp_path / "c")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(api.load(str(tmp_path / "c")).model(input_ids=ids).logits,
                           folded(input_ids=ids).logits)
    bad = {k: v * 1.01 if k.endswith(".step") else v for k, v in grids.items()}
    with pytest.raises(ExportError, match="does not sit on its recorded 4-bit grid"):
        write_compressed(folded, bad, cfg, tiny_tokenizer(), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_gguf_refuses_activation_quantization_unless_dropped(tmp_path):
    tiny_run(tmp_path / "w4a4", wbits=4, abits=4)
    with pytest.raises(ExportError, match="activations to 4 bits"):
        api.export(tmp_path / "w4a4", "gguf")
    assert not (tmp_path / "w4a4" / "model.gguf").exists()
    api.export(tmp_path / "w4a4", "gguf", drop_activation_quantization=True)


def test_export_command(tmp_path, capsys):
    tiny_run(tmp_path / "run", wbits=4)
    assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--json",
                 str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "model.gguf" in out and "Q4_1" in out and "exact" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["size_bytes"] == (tmp_path / "run" / "model.gguf").stat().st_size
    assert main(["export", str(tmp_path / "run"), "--format", "gguf"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # the old format name is an alias with its old default folder
    assert main(["export", str(tmp_path / "run"), "--format", "packed"]) == 0
    out = capsys.readouterr().out
    assert "note: vLLM" in out and "note: transformers" in out
    assert (tmp_path / "run" / "packed" / EXPORT_RECORD).is_file()


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys):
    tiny_run(tmp_path / "run", wbits=4)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own files")
    capsys.readouterr()
    for fmt, target in (("compressed", mine), ("gguf", mine / "notes.txt")):
        code = main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(target),
                     "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "earlier sliderquant export" in err, err
        assert len(err.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "my own files"
    # its own export is replaced; one the user added files to is not
    out = tmp_path / "c"
    api.export(tmp_path / "run", "compressed", out)
    api.export(tmp_path / "run", "compressed", out, overwrite=True)
    (out / "extra.txt").write_text("added by hand")
    with pytest.raises(ExportError, match="holds files the export did not write"):
        api.export(tmp_path / "run", "compressed", out, overwrite=True)
    assert (out / "extra.txt").is_file()
    api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "m.gguf", "mine", "run"]


def test_llama_cpp_runs_the_exported_gguf_like_our_model(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                        "(pip install -e '.[deploy]')")
    from sliderquant.eval.llamacpp import llamacpp_window_nlls
    from sliderquant.eval.perplexity import window_nlls

    folded = tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "gguf")
    windows = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    ours = window_nlls(folded, windows, show_progress=False)
    theirs = llamacpp_window_nlls(tmp_path / "run" / "model.gguf", windows, n_threads=1,
                                  show_progress=False)
    assert np.allclose(theirs, ours, rtol=1e-3), (theirs, ours)


def test_tokenizer_conversion_matches_the_original_gguf(tmp_path):
    import gguf

    from sliderquant.export.gguf_vocab import convert_tokenizer
    from sliderquant.models.embedded import embedded_gguf

    try:
        source = embedded_gguf("smollm2-135m", download=False)
    except FileNotFoundError:
        pytest.skip("the embedded SmolLM2 GGUF is not cached")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp_path)
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    convert_tokenizer(tmp_path, writer, 49152, warn=lambda _: None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = gguf.GGUFReader(tmp_path / "t.gguf"), gguf.GGUFReader(source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        a, b = ours.fields[key], theirs.fields[key]
        assert [bytes(a.parts[i]) for i in a.data] == [bytes(b.parts[i]) for i in b.data], key
