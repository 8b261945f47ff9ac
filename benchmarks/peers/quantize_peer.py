"""Quantize the shared FP model with one peer library, in that peer's own environment.

    WORK=/work/venvs/smollm2-hf
    /work/venvs/peer-autoround/bin/python benchmarks/peers/quantize_peer.py hqq \\
        --wbits 4 --group-size 64 --work $WORK --out OUT

Reads WORK/fp (the FP transformers folder) and WORK/inputs.pt (calibration ids and
evaluation windows, written by prepare.py). Writes OUT as a plain transformers folder whose
linear weights are the peer's dequantized (fake-quantized) weights, and OUT/peer.json with
the quantize wall and CPU time, the process's peak RSS and the library versions. Imports
nothing from sliderquant: the peers pin their own transformers.

With --abits 4 (auto-round only) the activation quantizer lives in auto-round's in-memory
wrappers and cannot travel in a plain folder, so the model is scored here, on prepare.py's
evaluation windows with the per-window loop of sliderquant's evaluator, and OUT/peer.json
also holds the perplexities (OUT then has no model files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEERS = ("hqq", "gptq", "autoround")
DISTS = {"hqq": "hqq", "gptq": "llmcompressor", "autoround": "auto-round"}


def projections(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The decoder's projection layers by name (lm_head and embeddings stay FP, as in
    sliderquant); a layer auto-round wrapped for activation quantization counts as its layer."""
    return {n: m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in PROJECTIONS
            and isinstance(getattr(m, "weight", None), torch.Tensor)}


def quantize_hqq(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """HQQ (no calibration): each projection's weight quantized and dequantized in place."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=args.wbits, group_size=args.group_size,
                                axis=1)["weight_quant_params"]
    params = {**params, "bitpack": False, "device": "cpu", "compute_dtype": torch.float32}
    for m in projections(model).values():
        w = m.weight
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
    for m in projections(model).values():
        # GPTQ leaves the dequantized weight in place; re-applying the grid is idempotent and
        # guarantees that what we save is exactly on it.
        m.weight.data = fake_quantize(m.weight.data, m.weight_scale, m.weight_zero_point,
                                      m.quantization_scheme.weights)
    return {"modifier": modifier.model_dump(exclude={"config_groups"}, mode="json"),
            "weights": weights.model_dump(mode="json")}


def quantize_autoround(model: torch.nn.Module, tokenizer, calib: torch.Tensor,
                       args: argparse.Namespace) -> dict:
    """AutoRound (signed-gradient rounding and clipping), iters reduced for the CPU. With
    abits < 16, its dynamic per-token asymmetric integer activation quantizer in front of
    every projection, in the loop while tuning and at inference."""
    from auto_round import AutoRound

    options = dict(bits=args.wbits, group_size=args.group_size or -1, sym=False,
                   iters=args.iters, nsamples=calib.shape[0], seqlen=calib.shape[1],
                   batch_size=args.batch_size)
    if args.abits < 16:
        options.update(act_bits=args.abits, act_group_size=-1, act_sym=False,
                       act_dynamic=True, act_data_type="int")
    if args.rotate:
        # auto-round's in-place (QuaRot-style) rotation: norms fused, a random Hadamard
        # on the residual stream merged into the weights. Full width is impossible on
        # SmolLM2: the fused path also rotates across the 9 attention heads, and no Hadamard
        # matrix of order 9 exists; 192 is the largest block that divides 576 and 1536 and
        # has one. auto-round 0.16.1 also installs online Hadamard hooks on the inputs of
        # o_proj and down_proj whenever it fuses (allow_online_rotation=False does not stop
        # them), so it rotates more than sliderquant (offline residual rotation only).
        # backend "auto" picks the in-place path when fusing is asked for; "inplace" would
        # mangle "random_hadamard" (it strips an "inplace_" prefix that is not there).
        options["rotation_config"] = {"backend": "auto", "hadamard_type": "random_hadamard",
                                      "block_size": 192, "fuse_online_to_weight": True,
                                      "allow_online_rotation": False}
        _rotate_outside_inference_mode()
    ar = AutoRound(model, tokenizer, dataset=[row.unsqueeze(0) for row in calib],
                   device_map="cpu", **options)
    ar.quantize()
    return {"options": options}


def _rotate_outside_inference_mode() -> None:
    """auto-round 0.16.1 rotates the weights under torch.inference_mode, and then cannot
    train them on CPU ("Inference tensors cannot be saved for backward"): run the same
    rotation under no_grad instead (same arithmetic)."""
    from auto_round.algorithms.transforms.hadamard.inplace import apply

    apply._rotate_weights = torch.no_grad()(apply._rotate_weights.__wrapped__)


def check_grid(model: torch.nn.Module, wbits: int, group_size: int | None) -> None:
    """Fail unless every weight row (or group) holds at most 2**wbits distinct values."""
    for name, m in projections(model).items():
        w = m.weight.detach()
        rows = w.reshape(-1, group_size) if group_size else w
        worst = max(torch.unique(r).numel() for r in rows[:64])
        if worst > 2 ** wbits:
            raise RuntimeError(f"{name}: {worst} distinct values in a row/group, more than "
                               f"2**{wbits}: the peer did not leave dequantized weights")


def save_plain(model: torch.nn.Module, fp: Path, out: Path) -> None:
    """Write FP's files with the quantized projections swapped in (same keys, dtype)."""
    shutil.copytree(fp, out, dirs_exist_ok=True)
    tensors = load_file(fp / "model.safetensors")
    for name, m in projections(model).items():
        key = f"{name}.weight"
        tensors[key] = m.weight.detach().to(tensors[key].dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """exp of the mean over windows of each window's mean next-token NLL (sliderquant's
    eval/perplexity.py loop, restated here because this process cannot import sliderquant)."""
    nlls = []
    for row in windows:
        ids = row.unsqueeze(0)
        logits = model(input_ids=ids, use_cache=False).logits
        nlls.append(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item())
    return math.exp(sum(nlls) / len(nlls))


def main() -> None:
    """Quantize, save OUT and OUT/peer.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("peer", choices=PEERS)
    ap.add_argument("--wbits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=None, help="default: per channel")
    ap.add_argument("--abits", type=int, default=16,
                    help="activation bits (auto-round only; < 16 scores the model here)")
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="with --abits: score only the first N windows per set (smoke runs)")
    ap.add_argument("--iters", type=int, default=50, help="auto-round tuning steps per block")
    ap.add_argument("--rotate", action="store_true",
                    help="auto-round only: residual-stream Hadamard rotation first (needs --abits)")
    ap.add_argument("--seed", type=int, default=None,
                    help="calibration ids drawn with this seed (prepare.py --seeds); default: "
                         "inputs.pt's `calib` (seed 2)")
    ap.add_argument("--batch-size", type=int, default=8, help="auto-round batch size")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if (args.abits < 16 or args.rotate) and args.peer != "autoround":
        ap.error("--abits/--rotate: only auto-round quantizes activations here")
    if args.rotate and args.abits == 16:
        ap.error("--rotate is for W4A4 here: add --abits 4")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = torch.load(args.work / "inputs.pt")
    if args.seed is not None:
        if args.seed not in inputs.get("calib_by_seed", {}):
            ap.error(f"no calibration ids for seed {args.seed} in {args.work / 'inputs.pt'}: "
                     f"run prepare.py --seeds {args.seed}")
        inputs["calib"] = inputs["calib_by_seed"][args.seed]
        inputs["calib_source"] = f"{inputs['calib_source'].split(',')[0]}, seed {args.seed}"
    model = AutoModelForCausalLM.from_pretrained(args.work / "fp", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.work / "fp")
    began, cpu, children = time.perf_counter(), time.process_time(), _children_cpu()
    if args.peer == "hqq":
        settings = quantize_hqq(model, args)
    elif args.peer == "gptq":
        settings = quantize_gptq(model, inputs["calib"], args)
    else:
        settings = quantize_autoround(model, tokenizer, inputs["calib"], args)
    quantize_s, quantize_cpu_s = time.perf_counter() - began, time.process_time() - cpu
    children = _children_cpu() - children
    check_grid(model, args.wbits, args.group_size)
    record = {
        "peer": DISTS[args.peer], "settings": settings, "quantize_s": round(quantize_s, 1),
        "quantize_cpu_s": round(quantize_cpu_s, 1),
        # CPU time of finished child processes (e.g. compiler workers), not in quantize_cpu_s
        "children_cpu_s": round(children, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "versions": {d: version(d) for d in (DISTS[args.peer], "torch", "transformers")},
        "calib": f"{inputs['calib_source']}, {list(inputs['calib'].shape)} token ids",
    }
    if args.abits < 16:
        args.out.mkdir(parents=True, exist_ok=True)
        model.eval()
        windows = {task: w[:args.eval_windows] for task, w in inputs["eval"].items()}
        record["ppl"] = {task: perplexity(model, w) for task, w in windows.items()}
        record["scored"] = (f"in auto-round's environment, {args.abits}-bit activations into "
                            "every projection, windows: "
                            + ", ".join(f"{t} {list(w.shape)}" for t, w in windows.items()))
    else:
        save_plain(model, args.work / "fp", args.out)
    (args.out / "peer.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
