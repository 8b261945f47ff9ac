"""Calibration data: where it comes from and how it becomes `[nsamples, seqlen]` token ids.

Sources (`QuantConfig.calib`, `--calib`):

- `wikitext2:train`, `wikitext2:valid`: WikiText-2 raw, from the data root or the hub.
- `c4`: C4 `en` documents (the data root's validation subset, else the hub's first shard).
- `hf:NAME[:CONFIG][:SPLIT][:COLUMN]`: a Hugging Face dataset through `datasets`. A hub id
  or a local dataset folder is streamed in its own order until about `CHARS_PER_TOKEN` x
  nsamples x seqlen characters are read; a folder written by `Dataset.save_to_disk` is read
  whole. Split default `train`; column default `text`, else `messages`.
- `FILE.jsonl`, `FILE.json`, `FILE.parquet`: a local table with a `text` column or a
  `messages` column.
- any other file: plain UTF-8 text.

Two ways of sampling, chosen by the kind of data:

- **Text** (the reference procedure, ALGORITHM.md §4): the documents are joined with
  blank lines, tokenized as one stream, and `nsamples` windows of `seqlen` tokens start at
  seeded random offsets. Every position is a real token, as in the paper.
- **Conversations** (`messages` = a list of `{"role", "content"}`), rendered with the
  tokenizer's chat template (`--chat-template`, required for them): shuffled with the seed
  and *packed*: each row starts at the beginning of a conversation and takes whole
  conversations until `seqlen` is reached; the conversation that overflows is cut and its
  rest dropped. Rows start where a chat model's inputs start (system prompt, role markers),
  which random windows of a concatenated stream would not, and packing instead of padding
  keeps every position a real token: the window loss has no padding mask, and padded
  positions would only cost compute.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from sliderquant.config import QuantConfig
from sliderquant.data import (
    DataError,
    c4_documents,
    hub_error,
    tokenize_stream,
    wikitext2_file,
    wikitext2_text,
)

BUILTIN_SOURCES = ("wikitext2:train", "wikitext2:valid", "c4")
HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
COLUMNS = ("text", "messages")
CHARS_PER_TOKEN = 6  # hub datasets are read until chars >= this x the tokens needed (~1.5x)
SOURCES_HELP = ("wikitext2:train, wikitext2:valid, c4, hf:NAME[:CONFIG][:SPLIT][:COLUMN] "
                "(a Hugging Face dataset), a .jsonl/.json/.parquet file with a text or a "
                "messages column, or a text file")


@dataclass(frozen=True)
class Source:
    """A parsed calibration source."""

    spec: str
    kind: str  # "wikitext2", "c4", "hf", "table" or "text"
    name: str = ""  # wikitext2 split, hf dataset name, or file path
    config: str | None = None  # hf dataset config
    split: str = "train"  # hf split
    column: str | None = None  # hf column (None: text, else messages)


def parse_source(spec: str) -> Source:
    """The source a `--calib` value names; raises DataError for an unknown one."""
    if spec.startswith("wikitext2:"):
        split = spec.split(":", 1)[1]
        if split == "test":
            raise DataError("wikitext2:test is the evaluation set; calibrate on "
                            "wikitext2:train, wikitext2:valid or c4")
        if split not in ("train", "valid"):
            raise DataError(f"unknown WikiText-2 split {split!r}; use wikitext2:train or "
                            "wikitext2:valid")
        return Source(spec, "wikitext2", split)
    if spec == "c4":
        return Source(spec, "c4")
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX):].split(":")
        if not parts[0] or len(parts) > 4:
            raise DataError(f"--calib {spec}: write hf:NAME[:CONFIG][:SPLIT][:COLUMN], e.g. "
                            "hf:wikitext:wikitext-2-raw-v1:train:text (empty fields take "
                            "their defaults: hf:NAME::validation)")
        name, config, split, column = (parts + [""] * 3)[:4]
        return Source(spec, "hf", name, config or None, split or "train", column or None)
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(spec, "table" if path.suffix.lower() in TABLE_SUFFIXES else "text",
                      str(path))
    raise DataError(f"unknown calibration source {spec!r}: use {SOURCES_HELP}")


def check_source(spec: str, data_root: Path | None, chat_template: bool) -> Source:
    """Parse `spec` and check what can be checked without loading a model: the local file
    or data-root split exists, and conversations come with `chat_template` (and only they).
    Hub datasets are checked when they are read."""
    source = parse_source(spec)
    if source.kind == "wikitext2" and data_root is not None:
        wikitext2_file(source.name, data_root)
    if source.kind == "table":
        _require_template(source, _table_column(Path(source.name)),
                          chat_template)
    elif source.kind in ("wikitext2", "c4", "text"):
        _require_template(source, "text", chat_template)
    return source


def calibration_ids(tokenizer, config: QuantConfig, data_root: Path | None = None
                    ) -> torch.Tensor:
    """The calibration rows a config asks for (`calib`, `nsamples`, `seqlen`, `seed`,
    `chat_template`), [nsamples, seqlen] token ids."""
    return source_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed,
                      data_root, config.chat_template)


def source_ids(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int,
               data_root: Path | None = None, chat_template: bool = False) -> torch.Tensor:
    """`nsamples` calibration rows of `seqlen` token ids from `spec` (see the module doc)."""
    source = check_source(spec, data_root, chat_template)
    column, records = _records(source, data_root, CHARS_PER_TOKEN * nsamples * seqlen)
    _require_template(source, column, chat_template)
    if column == "messages":
        return pack_conversations(render_conversations(tokenizer, records, source.spec),
                                  nsamples, seqlen, seed)
    return calibration_windows(tokenize_stream(tokenizer, "\n\n".join(records)), nsamples,
                               seqlen, seed)


def calibration_windows(
    tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`nsamples` random `seqlen`-token windows of a 1-D token stream, shape [nsamples, seqlen].

    The reference procedure (ALGORITHM.md §4): Python `random` seeded with `seed`, a uniform
    start in [0, n - seqlen - 1] per sample, then the list shuffled with the same generator.
    """
    n = tokens.numel()
    if n < seqlen + 1:
        raise DataError(f"the calibration text has {n} tokens, fewer than seqlen + 1 = "
                        f"{seqlen + 1}; use a shorter --seqlen or more text")
    if nsamples * seqlen > n:
        raise DataError(
            f"{nsamples} windows of {seqlen} tokens need {nsamples * seqlen} tokens but the "
            f"calibration text has only {n}; use at most --nsamples {n // seqlen} at this "
            "seqlen, a shorter --seqlen, or a larger source"
        )
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        start = rng.randint(0, n - seqlen - 1)
        windows.append(tokens[start:start + seqlen])
    rng.shuffle(windows)
    return torch.stack(windows)


def render_conversations(tokenizer, conversations: list[list[dict]],
                         where: str = "the data") -> list[list[int]]:
    """Token ids of each conversation rendered with the tokenizer's chat template (the
    template writes the special tokens itself, so none are added on top)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--chat-template: this model's tokenizer has no chat template, so "
                        f"the conversations of {where} cannot be rendered; calibrate on "
                        "text instead")
    rendered = []
    for i, messages in enumerate(conversations):
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise DataError(f"{where}: conversation {i} is not a list of "
                            "{\"role\": ..., \"content\": ...} messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        rendered.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return rendered


def pack_conversations(conversations: list[list[int]], nsamples: int, seqlen: int,
                       seed: int) -> torch.Tensor:
    """`nsamples` rows of `seqlen` tokens, each starting at a conversation: conversations in
    a seeded random order, whole ones appended until the row is full, the last one cut."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    row: list[int] = []
    for i in order:
        row += conversations[i]
        if len(row) >= seqlen:
            rows.append(row[:seqlen])
            row = []
            if len(rows) == nsamples:
                return torch.tensor(rows, dtype=torch.long)
    total = sum(map(len, conversations))
    raise DataError(
        f"{len(conversations)} conversations ({total} tokens) fill only {len(rows)} rows of "
        f"{seqlen} tokens, and --nsamples asks for {nsamples}; use at most --nsamples "
        f"{len(rows)}, a shorter --seqlen, or more conversations")


# ---- reading ------------------------------------------------------------------------------
def _records(source: Source, data_root: Path | None, chars: int) -> tuple[str, list]:
    """(column, rows): "text" with strings, or "messages" with conversations; a streamed
    hub dataset is read until it has given `chars` characters."""
    if source.kind == "wikitext2":
        return "text", [wikitext2_text(source.name, data_root)]
    if source.kind == "c4":
        # Documents are joined so that any seqlen works with the 2,000-document subset.
        return "text", list(c4_documents(data_root, "validation" if data_root else "train"))
    if source.kind == "text":
        return "text", [Path(source.name).read_text(encoding="utf-8")]
    if source.kind == "table":
        path = Path(source.name)
        column = _table_column(path)
        return column, _table_rows(path, column)
    return _hf_records(source, chars)


def _require_template(source: Source, column: str, chat_template: bool) -> None:
    if column == "messages" and not chat_template:
        raise DataError(f"--calib {source.spec} holds conversations (a messages column): "
                        "add --chat-template to render them with the tokenizer's chat template")
    if column == "text" and chat_template:
        raise DataError(f"--chat-template renders conversations, but --calib {source.spec} "
                        "is plain text; drop --chat-template or calibrate on a messages column")


def _pick_column(columns, wanted: str | None, where: str) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where} has no column {wanted!r}; its columns: {columns}")
        return wanted
    for name in COLUMNS:
        if name in columns:
            return name
    raise DataError(f"{where} has neither a text nor a messages column (columns: {columns}); "
                    "name the column with hf:NAME:CONFIG:SPLIT:COLUMN or rename it")


def _table_column(path: Path) -> str:
    """The column of a local table to read (text, else messages), from its schema or its
    first record."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"cannot read {path} as Parquet: {e}") from e
        return _pick_column(names, None, str(path))
    first = _json_rows(path, limit=1)
    if not first:
        raise DataError(f"{path} holds no records")
    return _pick_column(first[0], None, str(path))


def _json_rows(path: Path, limit: int | None = None) -> list[dict]:
    """Records of a JSON Lines file, or of a .json file holding a list of records."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for line in text.splitlines():
                if line.strip():
                    rows.append(json.loads(line))
                    if limit and len(rows) >= limit:
                        break
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON Lines: {e}") from e
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: every record must be a JSON object with a text or a "
                        "messages field")
    return rows


def _table_rows(path: Path, column: str) -> list:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=[column]).column(column).to_pylist()
    rows = _json_rows(path)
    missing = [i for i, r in enumerate(rows) if column not in r]
    if missing:
        raise DataError(f"{path}: record {missing[0]} has no {column!r} field")
    return [r[column] for r in rows]


def _hf_records(source: Source, chars: int) -> tuple[str, list]:
    """A Hugging Face dataset: a `save_to_disk` folder (read whole), else streamed through
    `datasets.load_dataset` in its own order until `chars` characters are read."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"--calib {source.spec} needs the datasets package: "
                        "pip install datasets") from e
    folder = Path(source.name).expanduser()
    where = f"--calib {source.spec}"
    try:
        if folder.is_dir() and ((folder / "state.json").is_file()
                                or (folder / "dataset_dict.json").is_file()):
            data = datasets.load_from_disk(str(folder))
            if isinstance(data, datasets.DatasetDict):
                if source.split not in data:
                    raise DataError(f"{folder} has no split {source.split!r}; its splits: "
                                    f"{list(data)}")
                data = data[source.split]
            column = _pick_column(data.column_names, source.column, where)
            return column, list(data[column])
        stream = datasets.load_dataset(source.name, source.config, split=source.split,
                                       streaming=True)
        column, rows, read = None, [], 0
        for record in stream:
            column = column or _pick_column(record, source.column, where)
            rows.append(record[column])
            read += len(json.dumps(record[column])) if column == "messages" else len(rows[-1])
            if read >= chars:
                break
    except DataError:
        raise
    except Exception as e:  # network, missing dataset/config/split: datasets raises many types
        raise hub_error(f"the dataset {source.name!r} of {where}", e,
                        "check the name and the network, or pass a local .jsonl/.parquet "
                        "file or a Dataset.save_to_disk folder") from e
    if not rows:
        raise DataError(f"{where}: the split {source.split!r} is empty")
    return column, rows
