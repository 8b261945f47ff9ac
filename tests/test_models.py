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
