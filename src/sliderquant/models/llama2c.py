"""Convert a llama2.c checkpoint (legacy v0 `.bin`) and its `tok*.bin` into transformers objects.

llama2.c rotates adjacent pairs (2i, 2i+1) in RoPE while transformers' Llama rotates
halves (`rotate_half`); the q/k rows are permuted here so that the converted model
computes exactly what llama2.c computes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

_HEADER = struct.Struct("<7i")


class Llama2cFormatError(ValueError):
    """The file is not a whole llama2.c checkpoint or tokenizer; the message says why."""


def load_llama2c(model_path: Path, tokenizer_path: Path):
    """(LlamaForCausalLM, PreTrainedTokenizerFast) from llama2.c files, in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = model_path.read_bytes()
    if len(raw) < _HEADER.size:
        raise Llama2cFormatError(f"{model_path} is too small to be a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = _HEADER.unpack_from(raw)
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len) <= 0 or dim % n_heads:
        raise Llama2cFormatError(f"{model_path} does not start with a llama2.c header")
    tied = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv * head
    shapes = [
        ("embed", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)), ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
        ("rope_tables", (seq_len, head)),  # two legacy [seq_len, head/2] tables, unused
    ]
    if not tied:
        shapes.append(("output", (vocab, dim)))
    need = _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != need:
        raise Llama2cFormatError(
            f"{model_path} has {len(raw)} bytes where its header promises {need} (a legacy "
            "v0 llama2.c checkpoint): the file is truncated or of another format")
    offset, arrays = _HEADER.size, {}
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = torch.from_numpy(
            np.frombuffer(raw, dtype="<f4", count=count, offset=offset).reshape(shape).copy())
        offset += 4 * count

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
        max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, dtype="float32",
    )
    model = LlamaForCausalLM(config).float().eval()
    state = {"model.embed_tokens.weight": arrays["embed"], "model.norm.weight": arrays["rms_final"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = _to_rotate_half(arrays["wq"][i], n_heads)
        state[p + "self_attn.k_proj.weight"] = _to_rotate_half(arrays["wk"][i], n_kv)
        state[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        state[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        state[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        state[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        state[p + "mlp.up_proj.weight"] = arrays["w3"][i]
        state[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        state[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
    state["lm_head.weight"] = arrays["embed"] if tied else arrays["output"]
    model.load_state_dict(state, strict=True)
    if tied:
        model.tie_weights()
    return model, load_llama2c_tokenizer(tokenizer_path)


def _to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from interleaved pairs to halves (transformers' convention)."""
    out, cols = w.shape
    return w.view(heads, out // heads // 2, 2, cols).transpose(1, 2).reshape(out, cols)


def load_llama2c_tokenizer(path: Path):
    """A fast tokenizer equivalent to llama2.c's: score-ordered BPE merges, byte fallback,
    a dummy-prefix space, BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    raw = path.read_bytes()
    offset = 4  # int32 max_token_length
    pieces: list[tuple[str, float]] = []
    while offset < len(raw):
        try:
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if length < 0 or offset + length > len(raw):
                raise struct.error("piece runs past the end of the file")
            piece = raw[offset:offset + length].decode("utf-8")
        except (struct.error, UnicodeDecodeError) as e:
            raise Llama2cFormatError(f"{path} is not a whole llama2.c tokenizer (token "
                                     f"{len(pieces)}: {e}); it is truncated or corrupt") from e
        offset += length
        pieces.append((piece, score))
    if len(pieces) < 3:
        raise Llama2cFormatError(f"{path} holds {len(pieces)} tokens; it is not a llama2.c "
                                 "tokenizer")
    special = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab: dict[str, int] = {}
    for i, (piece, _) in enumerate(pieces):
        vocab[special.get(i, piece.replace(" ", "▁"))] = i
    scores = {special.get(i, p.replace(" ", "▁")): s for i, (p, s) in enumerate(pieces)}
    merges = []
    for piece in sorted((p for p in vocab if len(p) > 1 and not p.startswith("<")),
                        key=lambda p: -scores[p]):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=1 << 30)
