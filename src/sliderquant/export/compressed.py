"""Compressed checkpoints in the compressed-tensors `pack-quantized` format.

The layout llm-compressor writes and transformers (through the `compressed-tensors`
package) and vLLM (its WNA16 scheme) read. Per quantized Linear:

- `weight_packed` int32 [out, ceil(in * bits / 32)]: the codes minus 2**(bits-1), offset
  back to unsigned and packed densely along the input axis, least significant bits first
  (32 codes fill `bits` words; for 2, 4 and 8 bits this is 32/bits codes per word);
- `weight_scale` [out, n_groups] (per channel: [out, 1]) in the checkpoint's float dtype;
- `weight_zero_point` int32 [ceil(out * bits / 32), n_groups]: asymmetric grids only, the
  zero points minus 2**(bits-1) packed the same way along the output axis;
- `weight_shape` int64 [2].

Dequantization is (q - zero_point) * scale, i.e. exactly the learned grid
W = step * (codes - zero): the integer codes are the method's, never re-quantized. A grid
whose zero points are all 2**(bits-1) (W = step * (codes - 2**(bits-1)), GGUF Q4_0's form)
is written symmetric, without zero points.

compressed-tensors 0.20 cannot load asymmetric checkpoints on transformers' default
(compressed) route: `PackedQuantizationCompressor.compress`, run on the empty (meta) model
before the weights are read, returns before packing the zero point, so the model expects
[out, n_groups] where the format stores [out * bits / 32, n_groups] and transformers
stops with a size mismatch. Such checkpoints (ours and llm-compressor's alike) load through
the `dequantize` route, which unpacks them correctly; an asymmetric export asks for that
route in its config.json so that a plain `from_pretrained` loads it.

MoE experts (fused 3-D parameters in the model) are written expert by expert under the
names checkpoints use (`mlp.experts.<e>.gate_proj`, Mixtral's `block_sparse_moe.experts.
<e>.w1`, ...): transformers' weight converters decompress them and fuse them again on load.
Its expert decompression (`CompressedTensorsDequantize`) drops the zero point, so only
symmetric MoE checkpoints load there; an asymmetric grid on an MoE model is refused. A router
is not a Linear module in transformers: a quantized one is stored as its (exact) float
weight.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sliderquant.atomic import atomic_dir
from sliderquant.config import QuantConfig
from sliderquant.export.source import (
    ExportError,
    ExportResult,
    TensorReport,
    grid_bits,
    grid_codes,
    is_quantized,
)
from sliderquant.export.target import write_marker
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.models.loading import FLOAT_DTYPES

FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"
VLLM_BITS = (4, 8)  # vLLM's WNA16 kernels
VLLM_GROUPS = (None, 32, 64, 128)


def write_compressed(
    model: nn.Module,
    grids: dict[str, torch.Tensor],
    config: QuantConfig,
    tokenizer,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    record: dict | None = None,
    drop_activation_quantization: bool = False,
) -> ExportResult:
    """Write the folded `model` with its weight `grids` (`<module>.step` / `.zero`, see
    `fold.fold_layers`) as a Hugging Face folder at `out`, staged and moved into place.

    `config` is the run's QuantConfig (bits, groups, activation bits). Unquantized tensors
    and scales are stored in `dtype` (default: the model config's dtype); the caller passes
    the source model's own dtype (see `models.loading.storage_dtype`). `record` (the run
    record) goes into the folder's `sliderquant_export.json`, which also marks the folder as
    this exporter's own. Activation quantization (W4A4) is described as dynamic per-token
    input quantization unless `drop_activation_quantization`.
    """
    group_size = config.group_size
    grids = {k: v.detach().cpu() for k, v in grids.items()}
    if not grids:
        raise ExportError("this run quantized no weights; there is nothing to compress "
                          "(the run folder itself is the full-precision model)")
    dtype = dtype or _config_dtype(model.config)
    if dtype not in FLOAT_DTYPES.values():
        raise ExportError(f"dtype {dtype}: use one of {', '.join(FLOAT_DTYPES)}")
    modules = [k.removesuffix(".step") for k in grids if k.endswith(".step")]
    bits_of = {m: grid_bits(grids, m, config.wbits) for m in modules}
    by_bits: dict[int, list[str]] = {}
    for module, bits in bits_of.items():
        by_bits.setdefault(bits, []).append(module)
    symmetric = {bits: all(bool((grids[f"{m}.zero"] == 2 ** (bits - 1)).all()) for m in names)
                 for bits, names in by_bits.items()}
    outside = {bits: sum(int(((grids[f"{m}.zero"] < 0) | (grids[f"{m}.zero"] > 2**bits - 1))
                             .sum()) for m in names) for bits, names in by_bits.items()}
    if any(outside.values()):
        bits, count = next((b, n) for b, n in outside.items() if n)
        raise ExportError(
            f"{count} weight groups have zero points outside 0..{2**bits - 1} (groups whose "
            f"weights all have one sign), which {FORMAT} cannot store; use --format gguf")
    act_bits = config.abits if config.abits < 16 and not drop_activation_quantization else None
    moe = bool(DecoderAdapter(model).fused_experts())
    if moe and not all(symmetric.values()):
        raise ExportError(
            "this MoE run has an asymmetric weight grid, which transformers 5 + "
            "compressed-tensors cannot load for experts (their expert decompression drops the "
            "zero point); quantize with `symmetric: true`, or export --format gguf")

    result = ExportResult(path=out, format=FORMAT, size_bytes=0)
    state = _compressed_state(model, grids, bits_of, dtype, symmetric, result.tensors)
    ignore = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and not is_quantized(grids, name)]
    hf_config = copy.deepcopy(model.config)
    hf_config.dtype = dtype
    schemes = [(bits, symmetric[bits], sorted(names)) for bits, names in sorted(by_bits.items())]
    hf_config.quantization_config = quantization_config(schemes, group_size, act_bits, ignore)
    result.notes = engine_notes(tuple(by_bits), group_size, all(symmetric.values()), act_bits,
                                config.quantize_attention)
    if moe and act_bits is not None:
        result.notes.append(
            f"MoE experts are not Linear modules: compressed-tensors describes no int{act_bits} "
            "input quantization for them, so engines run them with float inputs (sliderquant "
            "eval restores it from sliderquant_export.json)")
    with atomic_dir(out) as staging:
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        hf_config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_marker(staging, FORMAT, {
            "run": record, "dtype": str(dtype).removeprefix("torch."),
            "activation_bits": act_bits,
            "quantize_attention": bool(act_bits) and config.quantize_attention,
            "quantize_router": bool(act_bits) and config.quantize_router,
            "dropped_activation_quantization": config.abits < 16 and act_bits is None,
            "notes": result.notes})
    result.size_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return result


def _compressed_state(model: nn.Module, grids: dict[str, torch.Tensor],
                      bits_of: dict[str, int], dtype: torch.dtype, symmetric: dict[int, bool],
                      reports: list[TensorReport]) -> dict[str, torch.Tensor]:
    """The safetensors state: packed codes, scales and zero points per quantized Linear or
    expert at its own bits (each one reported in `reports`), every other tensor in `dtype`;
    `symmetric` says, per bit-width, whether its config group is written without zeros."""
    state: dict[str, torch.Tensor] = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    fused = DecoderAdapter(model).fused_experts()
    packable = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    packable |= {s.path for slices in fused.values() for s in slices}
    for name, tensor in model.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if name == "lm_head.weight" and tied:
            continue
        # a fused expert parameter is written expert by expert, under the names checkpoints
        # use (transformers' loader fuses them again)
        pieces = ([(s.path, "weight", tensor[s.expert][s.rows]) for s in fused[name]]
                  if name in fused else [(module, suffix, tensor)])
        for path, kind, value in pieces:
            if is_quantized(grids, path) and kind == "weight" and path in packable:
                bits = bits_of[path]
                state.update(_packed_weight(path, value, grids, bits, dtype, symmetric[bits],
                                            reports))
            else:
                state[f"{path}.{kind}"] = (value.to(dtype) if value.is_floating_point()
                                           else value).contiguous().cpu()
    return state


def _packed_weight(module: str, tensor: torch.Tensor, grids: dict[str, torch.Tensor],
                   bits: int, dtype: torch.dtype, symmetric: bool, reports: list[TensorReport]
                   ) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized weight (reported in `reports`)."""
    offset = 2 ** (bits - 1)
    state: dict[str, torch.Tensor] = {}
    step, zero = grids[f"{module}.step"], grids[f"{module}.zero"]
    _, _, codes = grid_codes(module, tensor, grids, bits)
    scale = step.to(dtype).contiguous()
    state[f"{module}.weight_packed"] = pack_int32(
        torch.from_numpy(codes).to(torch.int64) - offset, bits)
    state[f"{module}.weight_scale"] = scale
    if not symmetric:
        state[f"{module}.weight_zero_point"] = pack_int32(
            zero.to(torch.int64) - offset, bits, dim=0)
    state[f"{module}.weight_shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
    weight = tensor.detach().double().cpu()
    diff = dequantize(state[f"{module}.weight_packed"], scale.double(),
                      state.get(f"{module}.weight_zero_point"), tensor.shape, bits) - weight
    width = tensor.shape[1] // step.shape[1]
    reports.append(TensorReport(
        name=module, storage=f"int{bits} {'sym' if symmetric else 'asym'}",
        status="exact", params=tensor.numel(),
        max_step_error=float((diff.abs() / step.double().repeat_interleave(
            width, 1)).max()),
        rel_rms_error=float(diff.norm() / weight.norm())))
    return state


def quantization_config(schemes: list[tuple[int, bool, list[str]]], group_size: int | None,
                        act_bits: int | None, ignore: list[str]) -> dict:
    """The `quantization_config` entry of config.json: one config group per
    (bits, symmetric, module names) scheme. A single scheme targets every `Linear` (minus
    `ignore`); several (a mixed-precision run) target their modules by name."""

    def weights(bits: int, symmetric: bool) -> dict:
        return {"num_bits": bits, "type": "int", "symmetric": symmetric,
                "strategy": "channel" if group_size is None else "group",
                "group_size": group_size, "dynamic": False, "actorder": None,
                "block_structure": None, "observer": "minmax"}

    inputs = None
    if act_bits is not None:  # sliderquant's per-token min/max quantizer, made each call
        inputs = {"num_bits": act_bits, "type": "int", "symmetric": False,
                  "strategy": "token", "group_size": None, "dynamic": True,
                  "actorder": None, "block_structure": None, "observer": None}
    groups = {f"group_{i}": {"targets": ["Linear"] if len(schemes) == 1 else names,
                             "weights": weights(bits, symmetric), "input_activations": inputs,
                             "output_activations": None, "format": FORMAT}
              for i, (bits, symmetric, names) in enumerate(schemes)}
    config = {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    if not all(symmetric for _, symmetric, _ in schemes):  # see the module docstring
        config["dequantize"] = True
    return config


def engine_notes(widths: tuple[int, ...], group_size: int | None, symmetric: bool,
                 act_bits: int | None, quantize_attention: bool) -> list[str]:
    """One line per engine: whether it runs this checkpoint (weights at `widths` bits), and
    what is lost."""
    bits = "/".join(map(str, sorted(widths)))
    if symmetric:
        hf = ("transformers + compressed-tensors: loads as is on the compressed route (packed "
              "weights, unpacked on the first forward pass)")
        if act_bits is not None:
            hf += (f"; the int{act_bits} per-token input quantization is simulated "
                   "(fake-quantized), not faster")
    elif len(widths) > 1:
        hf = (f"transformers + compressed-tensors: does NOT load this mixed {bits}-bit "
              "checkpoint correctly: its dequantize route (the only one that reads asymmetric "
              "zero points) decodes every dense Linear with the first config group's bits "
              "(transformers 5.24); load it with sliderquant (api.load, sliderquant eval)")
    else:
        hf = ("transformers + compressed-tensors: loads as is on the dequantize route "
              "(compressed-tensors 0.20 cannot read asymmetric zero points on its compressed "
              "route); weights are unpacked to dense at load")
        if act_bits is not None:
            hf += (f"; that route drops the quantization scheme, so the int{act_bits} input "
                   f"quantization is not applied there (it runs W{bits}A16)")
    notes = [hf]
    why_not = []
    if set(widths) - set(VLLM_BITS):
        why_not.append(f"its WNA16 kernels take {' or '.join(map(str, VLLM_BITS))}-bit "
                       f"weights, not {bits}")

    if group_size not in VLLM_GROUPS:
        why_not.append(f"its kernels take per-channel scales or groups of 32, 64 or 128, "
                       f"not {group_size}")
    if act_bits is not None:
        why_not.append(f"it has no int{act_bits}-activation kernel")
    if why_not:
        notes.append(f"vLLM: cannot run it ({'; '.join(why_not)})")
    elif symmetric:
        notes.append("vLLM: its compressed-tensors WNA16 scheme should run it (not tried here)")
    else:
        notes.append("vLLM: recent versions' WNA16 scheme takes zero points, older ones only "
                     "symmetric weights (not tried here)")
    if len(widths) > 1 and not why_not:
        notes[-1] += ("; it fuses q/k/v and gate/up, which must then share a bit-width (a "
                      "per-layer allocation does, a per-projection one may not)")
    if act_bits is not None and quantize_attention:
        notes.append("q/k/v quantization inside attention is not expressible in "
                     "compressed-tensors: engines run attention in float (sliderquant "
                     "eval restores it from sliderquant_export.json)")
    return notes


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed `bits`-bit integers [rows, cols] -> int32 words packed along `dim` as
    compressed-tensors 0.20 does: offset by 2**(bits-1), each run of 32 entries laid out
    as one little-endian bit stream of `bits` words, zero-padded, cut to
    ceil(n * bits / 32) words."""
    if not 1 <= bits <= 8:
        raise ExportError(f"{bits}-bit codes cannot be packed (1 to 8 bits)")
    v = values.to(torch.int64) + 2 ** (bits - 1)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    groups = -(-cols // 32)
    v = nn.functional.pad(v, (0, groups * 32 - cols)).reshape(rows, groups, 32)
    start = torch.arange(32, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    packed = torch.zeros(rows, groups, bits + 1, dtype=torch.int64)
    packed.scatter_add_(2, word.expand(rows, groups, 32), (v << shift) & 0xFFFFFFFF)
    packed.scatter_add_(2, (word + 1).expand(rows, groups, 32), v >> (32 - shift))
    packed = packed[..., :bits].reshape(rows, groups * bits)[:, :math.ceil(cols * bits / 32)]
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> signed integers, `length` along `dim`."""
    p = (packed.t() if dim == 0 else packed).to(torch.int64) & 0xFFFFFFFF
    rows, words = p.shape
    groups = -(-words // bits)
    p = nn.functional.pad(p, (0, groups * bits - words, 0, 0)).reshape(rows, groups, bits)
    p = nn.functional.pad(p, (0, 1))  # a zero word past the end for straddling codes
    start = torch.arange(32, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    both = (p[..., word] >> shift) | (p[..., word + 1] << (32 - shift))
    v = (both & (2**bits - 1)).reshape(rows, groups * 32)[:, :length] - 2 ** (bits - 1)
    return v.t() if dim == 0 else v


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               shape, bits: int) -> torch.Tensor:
    """(q - zero_point) * scale per output channel or group, in the scale's dtype."""
    rows, cols = (int(x) for x in shape)
    q = unpack_int32(packed, bits, cols)
    groups = scale.shape[1] if scale.dim() == 2 else 1
    scale = scale.reshape(rows, groups, 1)
    zp = (unpack_int32(zero_point, bits, rows, dim=0).reshape(rows, groups, 1)
          if zero_point is not None else torch.zeros_like(scale))
    values = (q.reshape(rows, groups, -1).to(scale.dtype) - zp.to(scale.dtype)) * scale
    return values.reshape(rows, cols)


def is_compressed_folder(folder: Path) -> bool:
    """Whether `folder` holds a compressed-tensors pack-quantized model."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == FORMAT


def activation_bits(folder: Path) -> int | None:
    """Bits of the dynamic per-token input quantization a compressed folder describes (None
    unless every config group describes the same)."""
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    inputs = [g.get("input_activations") for g in qc.get("config_groups", {}).values()]
    bits = {int(i["num_bits"]) if i else None for i in inputs}
    return bits.pop() if len(bits) == 1 else None


def _module_bits(groups: list[dict], module: str) -> int:
    """The weight bits of the config group whose targets name `module`: by name or `re:`
    pattern first, else a group targeting every `Linear` (packed weights are Linears')."""
    def names(target: str) -> bool:
        return target == module or (target.startswith("re:") and bool(re.match(target[3:],
                                                                                module)))

    for wanted in (names, lambda target: target == "Linear"):
        for group in groups:
            if any(wanted(t) for t in group.get("targets", [])):
                return int(group["weights"]["num_bits"])
    raise ExportError(f"no config group targets {module}")


def load_compressed(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None) of a pack-quantized folder, weights unpacked to `dtype`
    without needing the compressed-tensors package. Activation quantization is not installed here
    (see `activation_bits`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    groups = list(qc.get("config_groups", {}).values())
    if not groups or any((g.get("weights") or {}).get("type") != "int" for g in groups):
        raise ExportError(f"{folder}: only int {FORMAT} models can be read without the "
                          "compressed-tensors package")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    raw = {}
    for file in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(str(file)))
    state = {}
    for name, tensor in raw.items():
        if name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            if f"{module}.weight_g_idx" in raw:
                raise ExportError(f"{folder}: activation-ordered groups (g_idx) are not "
                                  "supported here")
            state[f"{module}.weight"] = dequantize(
                tensor, raw[f"{module}.weight_scale"].to(torch.float64),
                raw.get(f"{module}.weight_zero_point"), raw[f"{module}.weight_shape"].tolist(),
                _module_bits(groups, module)).to(dtype)
        elif not name.rpartition(".")[2].startswith("weight_"):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing, unexpected = model.load_state_dict(_fuse_experts(model, state), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ExportError(f"{folder}: weights do not match the model (missing {missing}, "
                          f"unexpected {unexpected})")
    if tied:
        model.tie_weights()
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json",
                                                          "tokenizer_config.json"))
    return model.eval(), AutoTokenizer.from_pretrained(folder) if has_tokenizer else None


def _fuse_experts(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with per-expert weights (named as checkpoints name them) stacked into the
    model's fused expert parameters."""
    for param, slices in DecoderAdapter(model).fused_experts().items():
        keys = [f"{s.path}.weight" for s in slices]
        if not all(k in state for k in keys):
            continue
        value = torch.empty_like(model.get_parameter(param))
        for s, key in zip(slices, keys, strict=True):
            value[s.expert][s.rows] = state.pop(key)
        state[param] = value
    return state


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return FLOAT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype


def read_grids(folder: Path) -> dict[str, torch.Tensor]:
    """The weight grids (`<module>.step` / `.zero`, float32 [out, n_groups], as
    `fold.fold_layers` returns them) of a pack-quantized folder: the scales as stored, the
    zero points unpacked (2**(bits-1) for a symmetric grid), and `.bits` from the config
    group targeting the module (a mixed-precision checkpoint has one per bit-width)."""
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    groups = list(qc.get("config_groups", {}).values())
    raw = {}
    for file in sorted(folder.glob("*.safetensors")):
        raw.update(load_file(str(file)))
    grids = {}
    for name, scale in raw.items():
        if not name.endswith(".weight_scale"):
            continue
        module = name[: -len(".weight_scale")]
        bits = _module_bits(groups, module)
        step = scale.float().reshape(scale.shape[0], -1)
        packed_zero = raw.get(f"{module}.weight_zero_point")
        zero = (unpack_int32(packed_zero, bits, step.shape[0], dim=0) + 2 ** (bits - 1)
                if packed_zero is not None else torch.full_like(step, 2 ** (bits - 1)))
        grids[f"{module}.step"], grids[f"{module}.zero"] = step, zero.float().reshape(step.shape)
        grids[f"{module}.bits"] = torch.tensor([bits])
    return grids
