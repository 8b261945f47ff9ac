"""Packed integer checkpoints in the compressed-tensors `pack-quantized` format.

This is what llm-compressor writes and vLLM (CompressedTensorsWNA16) and transformers
(through the `compressed-tensors` package) load. Per quantized Linear: `weight_packed`
(int32, codes offset to signed and packed LSB-first along the input axis),
`weight_scale` [out, n_groups] (= the grid step, in the model's dtype),
`weight_zero_point` (signed zero points packed along the output axis) and `weight_shape`.
Dequantization is (q - zero_point) * scale, which reproduces the folded weights
bit-exactly in the model's dtype.

Only settings the engines' kernels run are written: weight-only (no activation
quantization), 4 or 8 bits, one scale per output channel or groups of 32, 64 or 128.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sliderquant.export.source import ExportError, ExportResult, QuantizedRun, TensorReport

FORMAT = "pack-quantized"
PACKED_BITS = (4, 8)
PACKED_GROUPS = (None, 32, 64, 128)
EXPORT_RECORD = "sliderquant_export.json"
WEIGHTS = "model.safetensors"
# run-folder files not carried into the packed folder (nor weights, nor exported GGUFs)
_NOT_CARRIED = {"model.safetensors.index.json", "config.json", "sliderquant.json"}


def check_packable(run: QuantizedRun, drop_activation_quantization: bool = False) -> None:
    """Raise ExportError, saying why, for a run the packed format or its kernels cannot hold."""
    if run.abits < 16 and not drop_activation_quantization:
        raise ExportError(
            f"this run quantizes activations to {run.abits} bits (W{run.wbits}A{run.abits}); "
            "the packed format holds weights only, so an engine would run it as "
            f"W{run.wbits}A16. Pass --drop-activation-quantization to export its weights "
            "anyway")
    if run.wbits not in PACKED_BITS:
        raise ExportError(
            f"{run.wbits}-bit weights: the {FORMAT} kernels (vLLM's WNA16) run "
            f"{' and '.join(map(str, PACKED_BITS))} bits only; use --format gguf for "
            f"{run.wbits}-bit models")
    if run.group_size not in PACKED_GROUPS:
        raise ExportError(
            f"group size {run.group_size}: the {FORMAT} kernels take per-channel scales or "
            "groups of 32, 64 or 128; use --format gguf, or quantize with one of those")


def export_packed(run: QuantizedRun, out: Path, drop_activation_quantization: bool = False
                  ) -> ExportResult:
    """Write `run` as a Hugging Face folder in the packed format at `out` (staged, then
    moved into place)."""
    check_packable(run, drop_activation_quantization)
    bits, offset = run.wbits, 2 ** (run.wbits - 1)
    state: dict[str, torch.Tensor] = {}
    result = ExportResult(path=out, format=FORMAT, size_bytes=0)
    tied = getattr(run.model.config, "tie_word_embeddings", False)
    for name, tensor in run.model.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if name == "lm_head.weight" and tied:
            continue
        if not (run.is_quantized(module) and suffix == "weight"):
            state[name] = tensor.contiguous()
            continue
        step, zero = run.grids[f"{module}.step"], run.grids[f"{module}.zero"]
        if zero.min() < 0 or zero.max() > 2 ** bits - 1:
            raise ExportError(f"{module} has zero points outside 0..{2 ** bits - 1}, which "
                              f"{FORMAT} cannot store; use --format gguf")
        _, _, codes = run.element_grid(module, tensor)
        q = torch.from_numpy(codes).to(torch.int32) - offset
        state[f"{module}.weight_packed"] = pack_int32(q, bits)
        state[f"{module}.weight_scale"] = step.to(tensor.dtype).contiguous()
        state[f"{module}.weight_zero_point"] = pack_int32(
            zero.to(torch.int32) - offset, bits, dim=0)
        state[f"{module}.weight_shape"] = torch.tensor(list(tensor.shape), dtype=torch.int64)
        restored = dequantize(state[f"{module}.weight_packed"], state[f"{module}.weight_scale"],
                              state[f"{module}.weight_zero_point"], tensor.shape, bits)
        diff = (restored.double() - tensor.double())
        result.tensors.append(TensorReport(
            name=module, storage=f"packed int{bits}", status="exact", params=tensor.numel(),
            max_step_error=float((diff.abs() / step.double().repeat_interleave(
                tensor.shape[1] // step.shape[1], 1)).max()),
            rel_rms_error=float(diff.norm() / tensor.double().norm())))
    config = json.loads((run.folder / "config.json").read_text())
    config["quantization_config"] = quantization_config(bits, run.group_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.staging-") as tmp:
        staging = Path(tmp) / out.name
        staging.mkdir()
        save_file(state, str(staging / WEIGHTS), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for item in run.folder.iterdir():
            if item.is_file() and item.name not in _NOT_CARRIED and \
                    item.suffix not in (".safetensors", ".gguf") and not item.name.startswith("."):
                shutil.copy2(item, staging / item.name)
        (staging / EXPORT_RECORD).write_text(json.dumps(
            {"run": run.record, "format": FORMAT,
             "dropped_activation_quantization": run.abits < 16}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    result.size_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return result


def quantization_config(bits: int, group_size: int | None) -> dict:
    """The `quantization_config` entry of config.json for asymmetric int weights."""
    weights = {"num_bits": bits, "type": "int", "symmetric": False,
               "strategy": "channel" if group_size is None else "group",
               "group_size": group_size, "dynamic": False, "actorder": None,
               "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None,
                                      "format": FORMAT}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed `bits`-bit integers [rows, cols] -> int32 words, 32/bits per word, LSB first,
    packed along `dim` (zero-padded to whole words)."""
    per_word = 32 // bits
    v = values.to(torch.int64) + 2 ** (bits - 1)
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    words = -(-cols // per_word)
    v = torch.nn.functional.pad(v, (0, words * per_word - cols)).view(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (v << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.t() if dim == 0 else packed).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> signed integers with `length` entries along
    `dim`."""
    per_word = 32 // bits
    p = (packed.t() if dim == 0 else packed).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    v = ((p.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(p.shape[0], -1)[:, :length]
    v = v - 2 ** (bits - 1)
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


def is_packed_folder(folder: Path) -> bool:
    """Whether `folder` holds a compressed-tensors pack-quantized model."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") == FORMAT


def load_packed(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a packed folder, weights unpacked to `dtype` without needing
    the compressed-tensors package."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    groups = list(qc.get("config_groups", {}).values())
    if len(groups) != 1 or (groups[0].get("weights") or {}).get("type") != "int" or \
            groups[0].get("input_activations"):
        raise ExportError(f"{folder}: only weight-only int {FORMAT} models with one config "
                          "group can be read without the compressed-tensors package")
    bits = int(groups[0]["weights"]["num_bits"])
    if 32 % bits:
        raise ExportError(f"{folder}: {bits}-bit packing is not supported here")
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
                tensor, raw[f"{module}.weight_scale"].float(),
                raw.get(f"{module}.weight_zero_point"), raw[f"{module}.weight_shape"].tolist(),
                bits).to(dtype)
        elif not name.rpartition(".")[2].startswith("weight_"):
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise ExportError(f"{folder}: weights do not match the model (missing {missing}, "
                          f"unexpected {unexpected})")
    if tied:
        model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(folder)
