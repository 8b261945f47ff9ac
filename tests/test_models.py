"""Model loading: llama2.c conversion, adapters, unsupported architectures."""

import pytest
import torch

from sliderquant.models.adapters import DecoderAdapter, UnsupportedModelError
from sliderquant.models.loading import ModelLoadError, load_model


@pytest.fixture(scope="module")
def stories(data_root):
    return load_model("stories260k", data_root)


def test_stories260k_reproduces_the_upstream_sample(stories):
    ids = torch.tensor([[1]])
    out = stories.model.generate(ids, max_new_tokens=40, do_sample=False)
    text = stories.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved "
                           "to play outside in the park.")


def _llama2c_encode(text, vocab, scores):
    """llama2.c's reference encoder: dummy prefix, then merge the best-scoring pair."""
    ids = [vocab[" "]]
    for ch in text:
        if ch in vocab:
            ids.append(vocab[ch])
        else:
            ids += [b + 3 for b in ch.encode("utf-8")]
    pieces = {i: p for p, i in vocab.items()}
    while True:
        best, where = None, None
        for k in range(len(ids) - 1):
            merged = pieces[ids[k]] + pieces[ids[k + 1]]
            if merged in vocab and (best is None or scores[merged] > scores[best]):
                best, where = merged, k
        if best is None:
            return [1, *ids]
        ids[where:where + 2] = [vocab[best]]


def test_stories_tokenizer_matches_llama2c(stories, data_root):
    import json

    table = json.loads((data_root / "models/stories260K/tok512_vocab.json").read_text())
    entries = [e for e in table["vocab"] if e["id"] > 2]
    vocab = {e["piece"]: e["id"] for e in entries}
    scores = {e["piece"]: e["score"] for e in entries}
    for text in ["Once upon a time, Lily saw a big red ball.", "Tim's dog é ñ € 42!\nNew line",
                 " leading  double  spaces"]:
        assert stories.tokenizer(text)["input_ids"] == _llama2c_encode(text, vocab, scores)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*Supported: llama"):
        DecoderAdapter(model)


def test_unknown_reference_is_a_clear_error(tmp_path):
    (tmp_path / "weird.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(str(tmp_path / "weird.txt"))
    with pytest.raises(ModelLoadError, match="data root"):
        load_model("stories260k", None)


def test_context_check(stories):
    adapter = DecoderAdapter(stories.model)
    with pytest.raises(ValueError, match="longer than the model's context"):
        adapter.check_context(1024)


# ---- truncated files: one clear error, not a traceback ------------------------------------

def _truncated_copy(src, dst, keep=0.5):
    data = src.read_bytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.001])
def test_truncated_gguf_is_a_clear_error(tmp_path, keep):
    from test_export import tiny_run

    from sliderquant import api

    tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "gguf", tmp_path / "m.gguf")
    bad = _truncated_copy(tmp_path / "m.gguf", tmp_path / "cut" / "m.gguf", keep)
    with pytest.raises(ModelLoadError, match=r"not a readable GGUF file.*truncated or corrupt"):
        load_model(str(bad))


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_safetensors_in_a_folder_is_a_clear_error(tmp_path, keep):
    from conftest import tiny_model
    from test_export import tiny_tokenizer

    tiny_model().save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    _truncated_copy(tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "model.safetensors",
                    keep)
    with pytest.raises(ModelLoadError, match="safetensors file is truncated or corrupt"):
        load_model(str(tmp_path / "hf"))


def test_truncated_llama2c_files_are_clear_errors(tmp_path, data_root, capsys):
    from sliderquant.cli import main

    source = data_root / "models" / "stories260K"
    bad = _truncated_copy(source / "stories260K.bin", tmp_path / "a" / "stories260K.bin")
    (tmp_path / "a" / "tok512.bin").write_bytes((source / "tok512.bin").read_bytes())
    with pytest.raises(ModelLoadError, match=r"header promises .* truncated"):
        load_model(str(bad))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stories260K.bin").write_bytes((source / "stories260K.bin").read_bytes())
    _truncated_copy(source / "tok512.bin", tmp_path / "b" / "tok512.bin", 0.6)
    with pytest.raises(ModelLoadError, match=r"not a whole llama2\.c tokenizer"):
        load_model(str(tmp_path / "b" / "stories260K.bin"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stories260K.bin").write_bytes(b"\0" * 100)
    (tmp_path / "c" / "tok512.bin").write_bytes((source / "tok512.bin").read_bytes())
    with pytest.raises(ModelLoadError, match=r"does not start with a llama2\.c header"):
        load_model(str(tmp_path / "c" / "stories260K.bin"))
    # the command line: exit 2 and one line
    assert main(["eval", str(bad), "--tasks", "wikitext2", "--data-dir", str(data_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0], err


# ---- the dtype a model's own weights are stored in ----------------------------------------

def test_storage_dtype_follows_the_source_files(tmp_path, data_root):
    import json

    from conftest import tiny_model

    from sliderquant.models.loading import storage_dtype

    tiny_model().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert storage_dtype(str(tmp_path / "hf"))[0] == torch.bfloat16
    del config["dtype"]
    config["torch_dtype"] = "float16"  # the older spelling
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert storage_dtype(str(tmp_path / "hf"))[0] == torch.float16
    assert storage_dtype("stories260k", data_root)[0] == torch.float32
    assert storage_dtype("") is None
    assert storage_dtype("no-such-org/no-such-model") is None


def test_storage_dtype_of_a_gguf_is_its_float_matrices_or_float16(tmp_path):
    from test_export import tiny_run

    from sliderquant import api
    from sliderquant.models.loading import storage_dtype

    tiny_run(tmp_path / "run", wbits=4)
    api.export(tmp_path / "run", "gguf", tmp_path / "bf.gguf", float_type="bf16")
    assert storage_dtype(str(tmp_path / "bf.gguf"))[0] == torch.bfloat16  # the embedding
    api.export(tmp_path / "run", "gguf", tmp_path / "q.gguf", embedding_type="q8_0")
    dtype, why = storage_dtype(str(tmp_path / "q.gguf"))
    assert dtype == torch.float16 and "every matrix" in why
