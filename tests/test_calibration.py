"""Calibration sources: parsing, local tables, chat templates, Hugging Face datasets, errors."""

import json
from pathlib import Path

import pytest
import torch

from sliderquant.calibration import (
    calibration_windows,
    check_source,
    pack_conversations,
    parse_source,
    source_ids,
)
from sliderquant.data import DataError

CHAT = Path(__file__).parent / "data" / "chat.jsonl"
# A ChatML template like SmolLM2-Instruct's, for tokenizers that come without one.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")


@pytest.fixture(scope="module")
def tokenizer(data_root):
    from sliderquant import load

    tok = load("stories260k", data_dir=data_root).tokenizer
    tok.chat_template = CHATML
    return tok


def _conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in CHAT.read_text().splitlines()]


# ---- parsing ------------------------------------------------------------------------------
def test_sources_parse_into_their_kinds(tmp_path):
    assert parse_source("wikitext2:valid").kind == "wikitext2"
    assert parse_source("c4").kind == "c4"
    hf = parse_source("hf:wikitext:wikitext-2-raw-v1:validation:text")
    assert (hf.kind, hf.name, hf.config, hf.split, hf.column) == (
        "hf", "wikitext", "wikitext-2-raw-v1", "validation", "text")
    short = parse_source("hf:allenai/c4::validation")
    assert (short.name, short.config, short.split, short.column) == (
        "allenai/c4", None, "validation", None)
    assert parse_source("hf:org/name").split == "train"
    (tmp_path / "a.txt").write_text("x")
    assert parse_source(str(tmp_path / "a.txt")).kind == "text"
    assert parse_source(str(CHAT)).kind == "table"


@pytest.mark.parametrize(("spec", "message"), [
    ("hf:", "write hf:NAME"),
    ("hf:a:b:c:d:e", "write hf:NAME"),
    ("wikitext2:test", "evaluation set"),
    ("wikitext2:dev", "unknown WikiText-2 split"),
    ("pile", "unknown calibration source 'pile'"),
])
def test_bad_sources_are_clear_errors(spec, message):
    with pytest.raises(DataError, match=message):
        parse_source(spec)


def test_train_split_offline_names_the_alternatives(data_root):
    with pytest.raises(DataError, match="wikitext2:valid") as err:
        check_source("wikitext2:train", data_root, chat_template=False)
    assert "c4" in str(err.value) and "hub" in str(err.value)


def test_conversations_need_the_chat_template_and_text_refuses_it(data_root, tmp_path):
    with pytest.raises(DataError, match="add --chat-template"):
        check_source(str(CHAT), data_root, chat_template=False)
    with pytest.raises(DataError, match="drop --chat-template"):
        check_source("wikitext2:valid", data_root, chat_template=True)
    table = tmp_path / "t.jsonl"
    table.write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="neither a text nor a messages column"):
        check_source(str(table), data_root, chat_template=False)


# ---- sampling -----------------------------------------------------------------------------
def test_text_windows_are_seeded_and_sized():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 8, 64, seed=2)
    b = calibration_windows(tokens, 8, 64, seed=2)
    c = calibration_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 64)) for row in a)


def test_text_windows_refuse_too_little_data():
    with pytest.raises(DataError, match="--nsamples 15"):
        calibration_windows(torch.arange(1000), 16, 64, seed=0)
    with pytest.raises(DataError, match="shorter --seqlen"):
        calibration_windows(torch.arange(50), 1, 64, seed=0)


def test_packing_starts_every_row_at_a_conversation():
    conversations = [[100 + i] * (5 + i) for i in range(10)]  # conversation i: 5 + i tokens
    rows = pack_conversations(conversations, nsamples=4, seqlen=12, seed=0)
    assert rows.shape == (4, 12)
    starts = {c[0] for c in conversations}
    for row in rows.tolist():
        assert row[0] in starts
        first = conversations[row[0] - 100]
        assert row[:len(first)] == first[:12]  # the first conversation whole (or cut at 12)
    assert torch.equal(rows, pack_conversations(conversations, 4, 12, seed=0))
    assert not torch.equal(rows, pack_conversations(conversations, 4, 12, seed=1))
    with pytest.raises(DataError, match="fill only 2 rows of 40 tokens"):
        pack_conversations(conversations, nsamples=3, seqlen=40, seed=0)


def test_chat_jsonl_is_rendered_with_the_template_and_packed(tokenizer, data_root):
    rows = source_ids(tokenizer, str(CHAT), nsamples=3, seqlen=96, seed=2,
                           data_root=data_root, chat_template=True)
    assert rows.shape == (3, 96)
    rendered = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False),
                          add_special_tokens=False)["input_ids"] for m in _conversations()]
    for row in rows.tolist():  # every row begins with a rendered conversation (cut at 96)
        assert any(row[:len(r)] == r[:96] for r in rendered)
    text = tokenizer.decode(rows[0].tolist())
    assert text.lstrip().startswith("<|im_start|>")


def test_a_tokenizer_without_a_template_is_a_clear_error(data_root):
    from sliderquant import load

    plain = load("stories260k", data_dir=data_root).tokenizer
    with pytest.raises(DataError, match="has no chat template"):
        source_ids(plain, str(CHAT), 2, 32, 0, data_root, chat_template=True)


def test_text_column_of_jsonl_and_parquet(tokenizer, data_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = (data_root / "wikitext2" / "valid.txt").read_text()[:20000]
    paragraphs = [p for p in text.split("\n") if p.strip()]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "id": i}) + "\n"
                             for i, p in enumerate(paragraphs)))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": paragraphs}), parquet)
    a = source_ids(tokenizer, str(jsonl), 4, 64, 2, data_root)
    b = source_ids(tokenizer, str(parquet), 4, 64, 2, data_root)
    assert a.shape == (4, 64) and torch.equal(a, b)


# ---- Hugging Face datasets ----------------------------------------------------------------
def test_hf_save_to_disk_folder(tokenizer, data_root, tmp_path):
    from datasets import Dataset, DatasetDict

    conversations = _conversations()
    DatasetDict({"train": Dataset.from_dict({"messages": conversations}),
                 "test": Dataset.from_dict({"messages": conversations[:2]})}
                ).save_to_disk(str(tmp_path / "chat"))
    spec = f"hf:{tmp_path / 'chat'}"
    rows = source_ids(tokenizer, spec, 2, 96, 2, data_root, chat_template=True)
    direct = source_ids(tokenizer, str(CHAT), 2, 96, 2, data_root, chat_template=True)
    assert torch.equal(rows, direct)
    with pytest.raises(DataError, match="no split 'validation'"):
        source_ids(tokenizer, spec + "::validation", 2, 96, 2, data_root, True)
    with pytest.raises(DataError, match="no column 'body'"):
        source_ids(tokenizer, spec + "::train:body", 2, 96, 2, data_root, True)


def test_hf_local_dataset_folder_is_streamed(tokenizer, data_root, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    text = (data_root / "wikitext2" / "valid.txt").read_text()[:30000]
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"text": p}) + "\n" for p in text.split("\n") if p.strip()))
    rows = source_ids(tokenizer, f"hf:{folder}", 2, 64, 2, data_root)
    assert rows.shape == (2, 64)


def test_unreachable_hub_dataset_is_one_clear_error(tokenizer, data_root, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        source_ids(tokenizer, "hf:someone/no-such-set", 2, 64, 2, data_root)
    text = str(err.value)
    assert "could not load the dataset 'someone/no-such-set'" in text and "\n" not in text
    assert "local .jsonl/.parquet file" in text
