"""Quantize the shared FP model with one peer library, in that peer's own environment.

    WORK=/work/venvs/smollm2-hf
    /work/venvs/peer-autoround/bin/python benchmarks/peers/quantize_peer.py hqq \\
        --wbits 4 --group-size 64 --work $WORK --out OUT

Reads WORK/fp (the FP transformers folder) and WORK/inputs.pt (calibration ids and
evaluation windows, written by prepare.py). Writes OUT as a plain transformers folder whose
linear weights are the peer's dequantized (fake-quantized) weights, and OUT/peer.json with
the quantize wall and CPU time, the process's peak RSS and the library versions. Imports
nothing from sliderquant: the peers pin their own transformers.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEERS = ("hqq", "gptq", "autoround")
DISTS = {"hqq": "hqq", "gptq": "llmcompressor", "autoround": "auto-round"}


def linear_names(model: torch.nn.Module) -> list[str]:
    """The decoder's projection layers (lm_head and embeddings stay FP, as in sliderquant)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS]


def quantize_hqq(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """HQQ (no calibration): each projection's weight quantized and dequantized in place."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=args.wbits, group_size=args.group_size,
                                axis=1)["weight_quant_params"]
    params = {**params, "bitpack": False, "device": "cpu", "compute_dtype": torch.float32}
    modules = dict(model.named_modules())
    for name in linear_names(model):
        w = modules[name].weight
        w_q, meta = Quantizer.quantize(w.data, **params)
        w.data = Quantizer.dequantize(w_q, meta).to(w.dtype).reshape(w.shape)
    return {"params": {k: v for k, v in params.items() if k != "compute_dtype"}}


def quantize_gptq(model: torch.nn.Module, calib: torch.Tensor,
                  args: argparse.Namespace) -> dict:
    """llm-compressor's GPTQModifier (default dampening and ordering) on our calibration ids."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=args.wbits, type="int", symmetric=False,
                               strategy="group" if args.group_size else "channel",
                               group_size=args.group_size)
    scheme = QuantizationScheme(targets=[f"re:.*{p}$" for p in PROJECTIONS], weights=weights)
    modifier = GPTQModifier(config_groups={"group_0": scheme})
    dataset = Dataset.from_dict({"input_ids": calib.tolist(),
                                 "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=dataset, recipe=modifier, max_seq_length=calib.shape[1],
            num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False)
    modules = dict(model.named_modules())
    for name in linear_names(model):
        m = modules[name]
        # GPTQ leaves the dequantized weight in place; re-applying the grid is idempotent and
        # guarantees that what we save is exactly on it.
        m.weight.data = fake_quantize(m.weight.data, m.weight_scale, m.weight_zero_point,
                                      m.quantization_scheme.weights)
    return {"modifier": modifier.model_dump(exclude={"config_groups"}, mode="json"),
            "weights": weights.model_dump(mode="json")}


def quantize_autoround(model: torch.nn.Module, tokenizer, calib: torch.Tensor,
                       args: argparse.Namespace) -> dict:
    """AutoRound (signed-gradient rounding and clipping), iters reduced for the CPU."""
    from auto_round import AutoRound

    options = dict(bits=args.wbits, group_size=args.group_size or -1, sym=False,
                   iters=args.iters, nsamples=calib.shape[0], seqlen=calib.shape[1],
                   batch_size=args.batch_size)
    ar = AutoRound(model, tokenizer, dataset=[row.unsqueeze(0) for row in calib],
                   device_map="cpu", **options)
    ar.quantize()
    return {"options": options}


def check_grid(model: torch.nn.Module, wbits: int, group_size: int | None) -> None:
    """Fail unless every weight row (or group) holds at most 2**wbits distinct values."""
    modules = dict(model.named_modules())
    for name in linear_names(model):
        w = modules[name].weight.detach()
        rows = w.reshape(-1, group_size) if group_size else w
        worst = max(torch.unique(r).numel() for r in rows[:64])
        if worst > 2 ** wbits:
            raise RuntimeError(f"{name}: {worst} distinct values in a row/group, more than "
                               f"2**{wbits}: the peer did not leave dequantized weights")


def save_plain(model: torch.nn.Module, fp: Path, out: Path) -> None:
    """Write FP's files with the quantized projections swapped in (same keys, dtype)."""
    shutil.copytree(fp, out, dirs_exist_ok=True)
    tensors = load_file(fp / "model.safetensors")
    state = model.state_dict()
    for name in linear_names(model):
        key = f"{name}.weight"
        tensors[key] = state[key].detach().to(tensors[key].dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    """Quantize, save OUT and OUT/peer.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("peer", choices=PEERS)
    ap.add_argument("--wbits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=None, help="default: per channel")
    ap.add_argument("--iters", type=int, default=50, help="auto-round tuning steps per block")
    ap.add_argument("--batch-size", type=int, default=8, help="auto-round batch size")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = torch.load(args.work / "inputs.pt")
    model = AutoModelForCausalLM.from_pretrained(args.work / "fp", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.work / "fp")
    began, cpu = time.perf_counter(), time.process_time()
    if args.peer == "hqq":
        settings = quantize_hqq(model, args)
    elif args.peer == "gptq":
        settings = quantize_gptq(model, inputs["calib"], args)
    else:
        settings = quantize_autoround(model, tokenizer, inputs["calib"], args)
    quantize_s, quantize_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    check_grid(model, args.wbits, args.group_size)
    save_plain(model, args.work / "fp", args.out)
    record = {
        "peer": DISTS[args.peer], "settings": settings, "quantize_s": round(quantize_s, 1),
        "quantize_cpu_s": round(quantize_cpu_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "versions": {d: version(d) for d in (DISTS[args.peer], "torch", "transformers")},
        "calib": f"{inputs['calib_source']}, {list(inputs['calib'].shape)} token ids",
    }
    (args.out / "peer.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
