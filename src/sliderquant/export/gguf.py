"""GGUF export for llama.cpp: the learned integer grids written as GGUF blocks.

Each quantized projection goes to the natural type of its own grid's bits (4-bit -> Q4_1,
2-bit -> Q2_K, 3-bit -> Q3_K, 8-bit -> Q8_0), so a mixed-precision run is written with a
type per tensor (GGUF's own mixing); `general.file_type` names the most common one. Where
the type reproduces the grid, the integer codes are written as they are and only the
format's fp16 scales round the step; where it cannot
(3-bit rows with a lopsided zero point, group sizes that straddle blocks, Q8_0's missing
zero point), the blocks are re-quantized to the nearest grid the type offers and the
error is measured and reported. A row length the type's block does not divide (e.g. 576
for the 256-long k-quant blocks) falls back to Q4_1, which holds every grid of 4 bits or
fewer exactly; a row length 32 does not divide is stored as float. `exact=True` never
re-quantizes: it stores such tensors as Q4_1 or float instead.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from sliderquant.atomic import atomic_path
from sliderquant.config import QuantConfig
from sliderquant.export.gguf_blocks import ENCODERS
from sliderquant.export.gguf_vocab import convert_tokenizer, copy_field, copy_tokenizer
from sliderquant.export.source import (
    ExportError,
    ExportResult,
    TensorReport,
    grid_bits,
    grid_codes,
    is_quantized,
)
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.version import __version__

NATURAL = {2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_1, 8: T.Q8_0}
FILE_TYPES = {T.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K, T.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
FLOAT_TYPES = {"f16": T.F16, "bf16": T.BF16, "f32": T.F32}
EMBEDDING_TYPES = (*FLOAT_TYPES, "q8_0")
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                 "qwen3": gguf.MODEL_ARCH.QWEN3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE}
# llama.cpp keeps an MoE layer's experts as three 3-D tensors [experts, rows, cols], named
# in the gguf package's tensor map by these merged module names
MERGED_EXPERTS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# general.* keys this exporter writes itself rather than copying from a source GGUF
_OWN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version",
             "general.quantized_by", "general.alignment"}


def write_gguf(
    model: torch.nn.Module,
    grids: dict[str, torch.Tensor],
    config: QuantConfig,
    tokenizer,
    out: Path,
    *,
    source: str = "",
    source_gguf: Path | None = None,
    vocab_from: Path | None = None,
    exact: bool = False,
    float_type: str = "f16",
    embedding_type: str | None = None,
    drop_activation_quantization: bool = False,
    warn: Callable[[str], None] = lambda _: None,
) -> ExportResult:
    """Write the folded `model` with its weight `grids` (see `fold.fold_layers`) as a GGUF
    file at `out` (atomically) and report every tensor.

    `config` is the run's QuantConfig; `source` names the model it was quantized from and
    `source_gguf` the GGUF it was loaded from, if any (its tokenizer and descriptive keys are
    copied; `vocab_from` names another GGUF to copy them from). Otherwise `tokenizer` (a
    Hugging Face fast tokenizer) is converted.
    """
    if config.abits < 16 and not drop_activation_quantization:
        raise ExportError(
            f"this run quantizes activations to {config.abits} bits (W{config.wbits}A"
            f"{config.abits}); GGUF holds weights only and llama.cpp would run it as "
            f"W{config.wbits}A16. Pass --drop-activation-quantization to export its weights "
            "anyway")
    adapter = DecoderAdapter(model)
    arch = ARCHITECTURES.get(adapter.family.gguf_architecture)
    if arch is None:
        raise ExportError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not "
                          f"{adapter.family.name}")
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float type {float_type!r}: use one of {', '.join(FLOAT_TYPES)}")
    embedding_type = embedding_type or float_type
    if embedding_type not in EMBEDDING_TYPES:
        raise ExportError(f"embedding type {embedding_type!r}: use one of "
                          f"{', '.join(EMBEDDING_TYPES)}")
    hf_config = model.config
    rope_theta, rope_type = _rope(hf_config)
    if rope_type not in ("default", None):
        raise ExportError(f"RoPE scaling {rope_type!r} is not exported to GGUF yet")
    _check_moe(adapter)

    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, adapter.num_layers)
    grids = {k: v.detach().cpu() for k, v in grids.items()}
    result = ExportResult(path=out, format="gguf", size_bytes=0)

    def note(text: str) -> None:
        result.warnings.append(text)
        warn(text)

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        _write_metadata(writer, hf_config, config, source, adapter, rope_theta)
        vocab = vocab_from or source_gguf
        if vocab is not None:
            _copy_general(vocab, writer)
            copy_tokenizer(vocab, writer, hf_config.vocab_size)
        else:
            with tempfile.TemporaryDirectory() as folder:
                tokenizer.save_pretrained(folder)
                convert_tokenizer(Path(folder), writer, hf_config.vocab_size, note)
        main_types = []
        tied = getattr(hf_config, "tie_word_embeddings", False)
        fused = adapter.fused_experts()
        for hf_name, tensor in model.state_dict().items():
            if hf_name == "lm_head.weight" and tied:
                continue
            module, _, suffix = hf_name.rpartition(".")
            pieces = ([(f"{module}.{MERGED_EXPERTS[name]}", "weight", group)
                       for name, group in _by_projection(fused[hf_name])]
                      if hf_name in fused else [(module, suffix, None)])
            for source, kind, experts in pieces:
                base = names.get_name(source)
                if base is None:
                    raise ExportError(f"no GGUF name for tensor {hf_name}")
                name = f"{base}.{kind}"
                qtype, encoded, report = _encode_tensor(
                    arch, name, base, tensor, module if kind == "weight" else None, experts,
                    grids, config, adapter, exact, float_type, embedding_type)
                if report.max_step_error is not None:
                    main_types.append(qtype)
                writer.add_tensor(name, encoded, raw_dtype=qtype)
                result.tensors.append(report)
        if main_types:
            writer.add_file_type(FILE_TYPES.get(max(set(main_types), key=main_types.count),
                                                gguf.LlamaFileType.MOSTLY_Q4_1))
        else:
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16"
                                 else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    for t in result.tensors:
        if t.status == "requantized":
            note(f"{t.name}: re-quantized to {t.storage} ({t.reason}); relative RMS error "
                 f"{t.rel_rms_error:.2e}, max {t.max_step_error:.2f} grid steps")
    result.size_bytes = out.stat().st_size
    return result


def _encode_tensor(arch, name: str, base: str, tensor: torch.Tensor, module: str | None,
                   experts, grids, config: QuantConfig, adapter, exact: bool, float_type: str,
                   embedding_type: str):
    """(type, bytes, report) of one GGUF tensor: a model tensor (the weight of `module`, which
    may have a grid, or another tensor), or (`experts`: its ExpertSlices) one projection of
    every expert of a fused parameter, [experts, rows, cols]."""
    if experts is None:
        data = _to_llama_layout(arch, name, tensor.detach().float().cpu(), adapter)
        paths, views = [module], [tensor]
    else:
        paths = [s.path for s in experts]
        views = [tensor[s.expert][s.rows] for s in experts]
        data = torch.stack([v.detach().float().cpu() for v in views])
    quantized = [p is not None and is_quantized(grids, p) for p in paths]
    if any(quantized) and not all(quantized):
        raise ExportError(f"{name}: some experts have a weight grid and some do not")
    if all(quantized) and data.dim() > 1:
        widths = {grid_bits(grids, p, config.wbits) for p in paths}  # a mixed run's own bits
        if len(widths) > 1:
            raise ExportError(f"{name}: its experts have different bit-widths {sorted(widths)}")
        bits = widths.pop()
        codes = [[_to_llama_layout(arch, name, torch.from_numpy(a), adapter).numpy()
                  for a in grid_codes(p, v, grids, bits)]
                 for p, v in zip(paths, views, strict=True)]
        s, z, c = (np.concatenate([x[k] for x in codes]) for k in range(3))
        rows = data.reshape(-1, data.shape[-1])
        qtype, encoded, report = _encode_quantized(name, rows.numpy(), s, z, c, bits,
                                                   exact, float_type)
        return qtype, encoded.reshape(*data.shape[:-1], -1), report
    if data.dim() == 1 or base.endswith("ffn_gate_inp"):  # norms; a full-precision router
        return T.F32, data.numpy().astype(np.float32), TensorReport(
            name, "F32", "float", data.numel())
    chosen = embedding_type if base == "token_embd" else float_type
    qtype, encoded, report = _encode_float(name, data.reshape(-1, data.shape[-1]).numpy(),
                                           chosen)
    return qtype, encoded.reshape(*data.shape[:-1], -1), report


def _by_projection(slices) -> list[tuple[str, list]]:
    """ExpertSlices grouped by projection (gate, up, down), each in expert order."""
    found: dict[str, list] = {}
    for s in slices:
        found.setdefault(s.name, []).append(s)
    return [(name, sorted(group, key=lambda s: s.expert)) for name, group in found.items()]


def _check_moe(adapter: DecoderAdapter) -> None:
    """Refuse MoE layouts llama.cpp's graphs do not run."""
    moe = [adapter.is_moe(i) for i in range(adapter.num_layers)]
    if any(moe) and not all(moe):
        dense = [i for i, m in enumerate(moe) if not m]
        raise ExportError(f"layers {dense} of this MoE model are dense; llama.cpp's "
                          f"{adapter.family.gguf_architecture} graph runs every layer as "
                          "MoE, so GGUF export cannot represent it")
    if any(moe) and not adapter.parts(moe.index(True)).mlp.renormalize:
        raise ExportError("this model does not renormalise its top-k routing weights "
                          "(norm_topk_prob false); llama.cpp always does, so its GGUF would "
                          "compute another function: export --format compressed instead")


def _rope(config) -> tuple[float, str | None]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return float(theta), rope_type


def _write_metadata(writer: gguf.GGUFWriter, config, quant: QuantConfig, source: str, adapter,
                    rope_theta: float) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_quantized_by(f"sliderquant {__version__}")
    writer.add_context_length(adapter.max_positions)
    writer.add_embedding_length(adapter.hidden_size)
    writer.add_block_count(adapter.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    if adapter.family.moe is not None:
        parts = adapter.parts(0).mlp
        writer.add_expert_count(parts.num_experts)
        writer.add_expert_used_count(parts.top_k)
        writer.add_expert_feed_forward_length(parts.proj["experts.0.up"].weight.shape[0])
    writer.add_head_count(adapter.num_heads)
    writer.add_head_count_kv(adapter.num_kv_heads)
    writer.add_rope_dimension_count(adapter.head_dim)
    if adapter.head_dim * adapter.num_heads != adapter.hidden_size:
        writer.add_key_length(adapter.head_dim)
        writer.add_value_length(adapter.head_dim)
    writer.add_layer_norm_rms_eps(adapter.eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_string("sliderquant.config", json.dumps(quant.to_dict()))
    writer.add_string("sliderquant.source", source)


def _copy_general(source: Path, writer: gguf.GGUFWriter) -> None:
    """The source model's descriptive general.* keys (name, license, …)."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith("general.") and key not in _OWN_KEYS and key != "general.type":
            copy_field(field, writer)


def _to_llama_layout(arch, name: str, t: torch.Tensor, adapter) -> torch.Tensor:
    """llama.cpp's Llama graph expects q/k rows in interleaved-pair RoPE order; transformers
    stores them as halves. Permute rows back (transformers' GGUF loader undoes this)."""
    if arch != gguf.MODEL_ARCH.LLAMA or not name.startswith("blk."):
        return t
    kind = name.split(".")[2]
    if kind not in ("attn_q", "attn_k"):
        return t
    heads = adapter.num_heads if kind == "attn_q" else adapter.num_kv_heads
    rows = t.shape[0]
    return (t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2)
            .reshape(t.shape).contiguous())


def _encode_quantized(name: str, w: np.ndarray, s: np.ndarray, z: np.ndarray, c: np.ndarray,
                      bits: int, exact: bool, float_type: str):
    """(type, bytes, report) for one quantized projection, following the module docstring."""
    natural = NATURAL[bits]
    cols = w.shape[1]
    container = T.Q4_1 if bits < 4 and cols % 32 == 0 else None
    first = natural if cols % gguf.GGML_QUANT_SIZES[natural][0] == 0 else container
    if first is not None:
        data, exact_blocks = ENCODERS[first](w, s, z, c)
        reason = _reason(first, natural, cols)
        if exact_blocks.all():
            return first, data, _report(name, first, "exact", data, w, s, reason)
        if not exact:
            bad = f"{int((~exact_blocks).sum())} of {exact_blocks.size} blocks cannot hold " \
                  "the learned grid"
            return first, data, _report(name, first, "requantized", data, w, s,
                                        f"{reason}; {bad}" if reason else bad)
        if container is not None and first != container:
            data, exact_blocks = ENCODERS[container](w, s, z, c)
            if exact_blocks.all():
                return container, data, _report(name, container, "exact", data, w, s,
                                                f"--exact: {natural.name} would re-quantize")
    why = ("--exact: no GGUF block type holds this grid exactly" if first is not None
           else f"rows of {cols} are not a multiple of 32")
    qtype, data, report = _encode_float(name, w, float_type, s)
    report.reason = why
    return qtype, data, report


def _reason(qtype, natural, cols: int) -> str:
    if qtype == natural:
        return ""
    block = gguf.GGML_QUANT_SIZES[natural][0]
    return f"rows of {cols} are not a multiple of {block}, which {natural.name} needs"


def _encode_float(name: str, w: np.ndarray, kind: str, s: np.ndarray | None = None):
    if kind == "q8_0":
        qtype = T.Q8_0
        data = gguf.quants.quantize(w.astype(np.float32), qtype)
        decoded = gguf.quants.dequantize(data, qtype)
    else:
        qtype = FLOAT_TYPES[kind]
        data = gguf.quants.quantize(w.astype(np.float32), qtype) if qtype == T.BF16 else \
            w.astype(np.float16 if qtype == T.F16 else np.float32)
        decoded = gguf.quants.dequantize(data, qtype) if qtype == T.BF16 else data
    return qtype, data, _measure(name, qtype, "float", decoded, w, s)


def _report(name: str, qtype, status: str, data: np.ndarray, w: np.ndarray, s: np.ndarray,
            reason: str) -> TensorReport:
    report = _measure(name, qtype, status, gguf.quants.dequantize(data, qtype), w, s)
    report.reason = reason
    return report


def _measure(name: str, qtype, status: str, decoded: np.ndarray, w: np.ndarray,
             s: np.ndarray | None) -> TensorReport:
    diff = decoded.astype(np.float64) - w
    norm = float(np.sqrt((w.astype(np.float64) ** 2).sum())) or 1.0
    return TensorReport(
        name=name, storage=qtype.name, status=status, params=int(w.size),
        max_step_error=None if s is None else float((np.abs(diff) / s).max()),
        rel_rms_error=float(np.sqrt((diff ** 2).sum())) / norm)
