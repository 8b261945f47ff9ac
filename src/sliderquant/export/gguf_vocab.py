"""The tokenizer of an exported GGUF: copied from a source GGUF, or converted from a
Hugging Face `tokenizer.json` (GPT-2 byte-level BPE, or SentencePiece-style BPE with byte
fallback) through the `gguf` package's vocabulary helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf

from sliderquant.export.source import ExportError

# GPT-2-style pre-tokenizers llama.cpp knows, recognised from tokenizer.json (the first
# entry whose test matches wins). Unknown ones become "default", with a warning.
_PRE_TOKENIZERS: tuple[tuple[str, Callable[[list[dict]], bool]], ...] = (
    ("smollm", lambda steps: [s["type"] for s in steps] == ["Digits", "ByteLevel"]
     and steps[0].get("individual_digits", False)),
    ("llama-bpe", lambda steps: any(r"\p{N}{1,3}" in _regex(s) for s in steps)),
    ("qwen2", lambda steps: any(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in _regex(s)
                                for s in steps)),
    ("gpt-2", lambda steps: [s["type"] for s in steps] == ["ByteLevel"]
     and steps[0].get("use_regex", True)),
)


def _regex(step: dict) -> str:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex", "") if isinstance(pattern, dict) else ""


def copy_tokenizer(source: Path, writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """Copy every `tokenizer.*` key of the GGUF `source` (the vocabulary llama.cpp and
    transformers will use) after checking its size matches the model's."""
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise ExportError(f"{source} holds no tokenizer (no {gguf.Keys.Tokenizer.LIST})")
    if len(tokens.data) != vocab_size:
        raise ExportError(f"{source} has {len(tokens.data)} tokens but the model's vocabulary "
                          f"has {vocab_size}; it is not this model's tokenizer")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            copy_field(field, writer)


def copy_field(field, writer: gguf.GGUFWriter) -> None:
    """Write one key-value field of a GGUFReader into `writer`, types unchanged."""
    vtype = field.types[0]
    if vtype == gguf.GGUFValueType.ARRAY:
        sub = field.types[1] if len(field.types) > 1 else None
        if sub == gguf.GGUFValueType.STRING:
            value = [bytes(field.parts[i]) for i in field.data]
        else:
            value = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    elif vtype == gguf.GGUFValueType.STRING:
        writer.add_key_value(field.name, bytes(field.parts[field.data[0]]), vtype)
    else:
        writer.add_key_value(field.name, field.parts[field.data[0]].tolist()[0], vtype)


def convert_tokenizer(folder: Path, writer: gguf.GGUFWriter, vocab_size: int,
                      warn: Callable[[str], None]) -> None:
    """Write the tokenizer of a Hugging Face folder (its `tokenizer.json`) into `writer`."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json to convert; pass --vocab-from "
                          "with a GGUF of the same model to copy its tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r} cannot be converted (only "
                          "BPE); pass --vocab-from with a GGUF of the same model")
    ids = {**model["vocab"], **{a["content"]: a["id"] for a in spec.get("added_tokens", [])}}
    tokens = sorted(ids, key=ids.__getitem__)
    if [ids[t] for t in tokens] != list(range(len(tokens))):
        raise ExportError(f"{path} has gaps in its token ids; cannot convert it")
    if len(tokens) > vocab_size:
        raise ExportError(f"{path} has {len(tokens)} tokens, more than the model's "
                          f"{vocab_size} embeddings")
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    padding = vocab_size - len(tokens)
    if padding:  # embeddings beyond the tokenizer: llama.cpp needs a token for each row
        pads = [f"[PAD{i}]" for i in range(padding)]
        added.update({p: {"special": False, "unused": True} for p in pads})
        tokens = [*tokens, *pads]
        warn(f"the model has {padding} embedding rows beyond the tokenizer; they are "
             "unused tokens [PAD…] in the GGUF")
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if model.get("byte_fallback"):
        _llama_vocab(spec, tokens, added, special, writer)
    else:
        _gpt2_vocab(spec, tokens, added, writer, warn)
    writer.add_token_list(tokens)
    special.add_to_gguf(writer, quiet=True)


def _token_type(token: str, added: dict) -> int:
    if token in added:
        if added[token].get("unused"):
            return gguf.TokenType.UNUSED
        return gguf.TokenType.CONTROL if added[token].get("special") else \
            gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _gpt2_vocab(spec: dict, tokens: list[str], added: dict, writer: gguf.GGUFWriter,
                warn: Callable[[str], None]) -> None:
    writer.add_tokenizer_model("gpt2")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    name = next((n for n, test in _PRE_TOKENIZERS if steps and test(steps)), None)
    if name is None:
        warn("unrecognised pre-tokenizer in tokenizer.json; llama.cpp will split text with "
             "its 'default' rules (token ids given directly are unaffected). Pass "
             "--vocab-from with a GGUF of this model to carry its exact tokenizer")
        name = "default"
    writer.add_tokenizer_pre(name)
    writer.add_token_types([_token_type(t, added) for t in tokens])


def _llama_vocab(spec: dict, tokens: list[str], added: dict, special: gguf.SpecialVocab,
                 writer: gguf.GGUFWriter) -> None:
    """SentencePiece-style BPE: llama.cpp merges by token score, so a token's score is
    minus the rank of the first merge that makes it."""
    writer.add_tokenizer_model("llama")
    rank: dict[str, int] = {}
    for i, merge in enumerate(special.merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, i)
    special.merges = []  # llama.cpp's SentencePiece tokenizer works from scores alone
    unk = spec["model"].get("unk_token")
    types = []
    for token in tokens:
        if token == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(_token_type(token, added))
    writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
    writer.add_token_types(types)
    normalizers = (spec.get("normalizer") or {}).get("normalizers", [])
    writer.add_add_space_prefix(any(n.get("type") == "Prepend" and n.get("prepend") == "▁"
                                    for n in normalizers))
