"""Export: GGUF blocks and packed integers reproduce the learned grid; both load back."""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from sliderquant import QuantConfig, api, quantize
from sliderquant.cli import main
from sliderquant.export.gguf_blocks import ENCODERS
from sliderquant.export.packed import pack_int32, unpack_int32
from sliderquant.export.source import ExportError
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


def test_packing_round_trips_and_matches_compressed_tensors_layout():
    q = torch.randint(-8, 8, (6, 40))
    packed = pack_int32(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (6, 5)
    assert torch.equal(unpack_int32(packed, 4, 40), q)
    assert torch.equal(unpack_int32(pack_int32(q, 4, dim=0), 4, 6, dim=0), q)
    # word 0 holds entries 0..7 of row 0 (offset by +8), least significant nibble first
    assert int(packed[0, 0]) & 0xF == int(q[0, 0]) + 8
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    assert torch.equal(ct.pack_to_int32(q.to(torch.int8), 4), packed)
    assert torch.equal(ct.pack_to_int32(q.to(torch.int8), 4, packed_dim=0),
                       pack_int32(q, 4, dim=0))


# ---- whole runs on a tiny model with a real (byte-level BPE) tokenizer -------------------

def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(sorted(alphabet))}}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


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


def test_exported_gguf_and_packed_load_back_through_sliderquant(tmp_path):
    folded = tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "gguf")
    api.export(tmp_path / "run", "packed")
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = folded(input_ids=ids).logits
        from_gguf = api.load(str(tmp_path / "run" / "model.gguf"))
        from_packed = api.load(str(tmp_path / "run" / "packed"))
        assert torch.allclose(from_gguf.model(input_ids=ids).logits, want, atol=2e-2)
        assert torch.allclose(from_packed.model(input_ids=ids).logits, want, atol=1e-5)
    assert from_gguf.tokenizer("the the")["input_ids"] == tiny_tokenizer()("the the")["input_ids"]
    for module, weight in projections(folded).items():  # packed: bit-exact
        assert torch.equal(from_packed.model.get_parameter(f"{module}.weight"), weight)


@pytest.mark.parametrize("group_size", [None, 64])
def test_packed_folder_loads_in_transformers_with_compressed_tensors(tmp_path, group_size):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed "
                        "(pip install -e '.[deploy]')")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    folded = tiny_run(tmp_path / "run", wbits=4, group_size=group_size)
    api.export(tmp_path / "run", "packed")
    config = json.loads((tmp_path / "run" / "packed" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    # dequantize=True: compressed-tensors 0.20 builds the compressed module layout with an
    # unpacked zero point, so asymmetric packed checkpoints only load through this route
    engine = AutoModelForCausalLM.from_pretrained(
        tmp_path / "run" / "packed", dtype=torch.float32,
        quantization_config=CompressedTensorsConfig(dequantize=True))
    for module, weight in projections(folded).items():
        assert torch.equal(engine.get_parameter(f"{module}.weight"), weight)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(engine(input_ids=ids).logits, folded(input_ids=ids).logits,
                              atol=1e-5)


def test_packed_refuses_what_its_kernels_cannot_run(tmp_path):
    tiny_run(tmp_path / "w2", wbits=2)
    with pytest.raises(ExportError, match="4 and 8 bits only"):
        api.export(tmp_path / "w2", "packed")
    tiny_run(tmp_path / "g16", wbits=4, group_size=16)
    with pytest.raises(ExportError, match="groups of 32, 64 or 128"):
        api.export(tmp_path / "g16", "packed")
    tiny_run(tmp_path / "w4a4", wbits=4, abits=4)
    for fmt in ("packed", "gguf"):
        with pytest.raises(ExportError, match="activations to 4 bits"):
            api.export(tmp_path / "w4a4", fmt)
    assert not (tmp_path / "w4a4" / "packed").exists()
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
