"""Quantize the shared FP model with one peer library, in that peer's own environment.

    WORK=/work/venvs/smollm2-hf
    /work/venvs/peer-autoround/bin/python benchmarks/peers/quantize_peer.py hqq \\
        --wbits 4 --group-size 64 --work $WORK --out OUT

Reads WORK/fp (the FP transformers folder) and WORK/inputs.pt (calibration ids and
evaluation windows, written by prepare.py). Writes OUT as a plain transformers folder whose
linear weights are the peer's dequantized (fake-quantized) weights, and OUT/peer.json with
the quantize wall and CPU time, the process's peak RSS and the library versions. Imports
nothing from sliderquant: the peers pin their own transformers.

With --avg-bits B (auto-round only) auto-round's own mixed-precision search (AutoScheme)
picks one of --options per projection under an average of B bits (codes, 16-bit scales and
zero points per group, as auto-round counts them), then tunes every layer at its width;
OUT/peer.json records each projection's bits and the search's own CPU time.

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
    search: dict = {}
    if args.avg_bits is not None:
        from auto_round.compressors.base import MIN_ITERS_FOR_TORCH_COMPILE

        # With an AutoScheme, auto-round 0.16.1 keeps torch.compile on at any iters (for
        # GPU memory); its own rule for plain runs turns it off below 10 iters, where the
        # per-block compile costs more than it saves (iters 1 on CPU: ~260 CPU s of
        # compiling). The CPU takes the plain-run rule.
        options = dict(scheme=_auto_scheme(calib, args, search), iters=args.iters,
                       nsamples=calib.shape[0], seqlen=calib.shape[1],
                       batch_size=args.batch_size,
                       enable_torch_compile=args.iters >= MIN_ITERS_FOR_TORCH_COMPILE)
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
    if args.avg_bits is None:
        return {"options": options}
    options["scheme"] = repr(options["scheme"])
    return {"options": options, "auto_scheme": search}


AUTOSCHEME_CALIB = "sliderquant-calibration-ids"


def _auto_scheme(calib: torch.Tensor, args: argparse.Namespace, search: dict):
    """auto-round's AutoScheme over asymmetric int weight-only options, scored on OUR
    calibration rows. auto-round 0.16.1 only takes a dataset *name* for the search
    (GenScheme._check_configs: "`dataset` must be a string") and loads it with
    `get_dataloader` from the hub (default NeelNanda/pile-10k), so the name is replaced by a
    tag that its loader maps to our rows, in batches of `batch_size`. Fills `search` with the
    search's CPU and wall time and each layer's chosen scheme."""
    import auto_round.auto_scheme.delta_loss as delta_loss
    from auto_round.auto_scheme import AutoScheme
    from auto_round.auto_scheme.gen_auto_scheme import GenScheme
    from auto_round.schemes import preset_name_to_scheme

    schemes = []
    for name in args.options.split(","):
        scheme = preset_name_to_scheme(name.strip())  # the presets are symmetric
        scheme.sym = False
        schemes.append(scheme)
    rows = [{"input_ids": calib[i:i + args.batch_size],
             "attention_mask": torch.ones_like(calib[i:i + args.batch_size])}
            for i in range(0, calib.shape[0], args.batch_size)]
    hub_loader = delta_loss.get_dataloader

    def our_rows(tokenizer, seqlen, dataset_name, **kw):
        if dataset_name != AUTOSCHEME_CALIB:
            return hub_loader(tokenizer, seqlen, dataset_name=dataset_name, **kw)
        if seqlen != calib.shape[1] or kw.get("nsamples") != calib.shape[0]:
            raise RuntimeError(f"AutoScheme asked for {kw.get('nsamples')} x {seqlen} "
                               f"calibration tokens, we have {list(calib.shape)}")
        return rows

    gen_init, gen_layer_config = GenScheme.__init__, GenScheme.get_layer_config

    def init(self, auto_scheme, model, quant_layer_names, fixed_layer_scheme,
             dataset="pile-10k", *a, **kw):
        if not isinstance(dataset, str):
            dataset = AUTOSCHEME_CALIB
        gen_init(self, auto_scheme, model, quant_layer_names, fixed_layer_scheme, dataset,
                 *a, **kw)
        search.update(range=[self.min_avg_bit, self.max_avg_bit],
                      options_avg_bits={repr(o): b for o, b in self._option_avg_bits},
                      layers_counted=len(list(quant_layer_names)),
                      fixed_layers=sorted(fixed_layer_scheme))

    def get_layer_config(self):
        began, cpu = time.perf_counter(), time.process_time()
        config = gen_layer_config(self)
        search.update(cpu_s=round(time.process_time() - cpu, 1),
                      wall_s=round(time.perf_counter() - began, 1),
                      layers={n: {k: c.get(k) for k in ("bits", "group_size", "sym",
                                                         "data_type", "act_bits")}
                              for n, c in config.items()})
        return config

    delta_loss.get_dataloader = our_rows
    GenScheme.__init__, GenScheme.get_layer_config = init, get_layer_config
    return AutoScheme(avg_bits=args.avg_bits, options=schemes, nsamples=calib.shape[0],
                      seqlen=calib.shape[1], batch_size=args.batch_size,
                      low_cpu_mem_usage=False)


def _rotate_outside_inference_mode() -> None:
    """auto-round 0.16.1 rotates the weights under torch.inference_mode, and then cannot
    train them on CPU ("Inference tensors cannot be saved for backward"): run the same
    rotation under no_grad instead (same arithmetic)."""
    from auto_round.algorithms.transforms.hadamard.inplace import apply

    apply._rotate_weights = torch.no_grad()(apply._rotate_weights.__wrapped__)


def check_grid(model: torch.nn.Module, formats: dict[str, tuple[int, int | None]]) -> None:
    """Fail unless every weight row (or group) of each projection holds at most 2**bits
    distinct values, with each projection's own (bits, group size or None) by name."""
    for name, m in projections(model).items():
        bits, group_size = formats[name]
        w = m.weight.detach()
        rows = w.reshape(-1, group_size) if group_size else w
        worst = max(torch.unique(r).numel() for r in rows[:64])
        if worst > 2 ** bits:
            raise RuntimeError(f"{name}: {worst} distinct values in a row/group, more than "
                               f"2**{bits}: the peer did not leave dequantized weights")


def chosen_formats(layers: dict[str, dict], names: list[str]) -> dict[str, tuple[int, int]]:
    """Each projection's (bits, group size) from AutoScheme's layer config; every projection
    must have been given an asymmetric int weight-only grid."""
    formats = {}
    for name in names:
        c = layers.get(name)
        if c is None or c["data_type"] != "int" or c["sym"] or (c["act_bits"] or 16) < 16:
            raise RuntimeError(f"{name}: AutoScheme chose {c}, not an asymmetric int "
                               "weight-only grid")
        formats[name] = (c["bits"], c["group_size"] if c["group_size"] > 0 else None)
    return formats


def storage(model: torch.nn.Module, formats: dict[str, tuple[int, int | None]]) -> dict:
    """What the projections store, counted as docs/MIXED.md counts sliderquant's: per weight
    its code, and per row or group a 16-bit scale and a zero point of the grid's width."""
    bits = weights = 0
    widths: dict[int, int] = {}
    for name, m in projections(model).items():
        b, group = formats[name]
        rows, cols = m.weight.shape
        groups = rows * (math.ceil(cols / group) if group else 1)
        bits += b * rows * cols + groups * (16 + b)
        weights += rows * cols
        widths[b] = widths.get(b, 0) + 1
    return {"bits": bits, "weights": weights, "bits_per_weight": bits / weights,
            "projections_by_bits": {str(b): n for b, n in sorted(widths.items())}}


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
    ap.add_argument("--wbits", type=int, default=None, help="required unless --avg-bits")
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
    ap.add_argument("--avg-bits", type=float, default=None,
                    help="auto-round only: its AutoScheme search picks one of --options per "
                         "projection under this average (replaces --wbits/--group-size)")
    ap.add_argument("--options", default="W2A16G64,W3A16G64",
                    help="with --avg-bits: auto-round preset names, made asymmetric")
    ap.add_argument("--calib-rows", default=None,
                    help="comma-separated row indices of the calibration ids to use "
                         "(default: all)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if (args.abits < 16 or args.rotate) and args.peer != "autoround":
        ap.error("--abits/--rotate: only auto-round quantizes activations here")
    if args.rotate and args.abits == 16:
        ap.error("--rotate is for W4A4 here: add --abits 4")
    if args.avg_bits is not None and (args.peer != "autoround" or args.abits < 16
                                      or args.rotate or args.wbits is not None):
        ap.error("--avg-bits: auto-round weight-only, without --wbits/--abits/--rotate")
    if args.avg_bits is None and args.wbits is None:
        ap.error("give --wbits B (or --avg-bits B with auto-round)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    inputs = torch.load(args.work / "inputs.pt")
    if args.seed is not None:
        if args.seed not in inputs.get("calib_by_seed", {}):
            ap.error(f"no calibration ids for seed {args.seed} in {args.work / 'inputs.pt'}: "
                     f"run prepare.py --seeds {args.seed}")
        inputs["calib"] = inputs["calib_by_seed"][args.seed]
        inputs["calib_source"] = f"{inputs['calib_source'].split(',')[0]}, seed {args.seed}"
    if args.calib_rows is not None:
        try:
            picked = [int(i) for i in args.calib_rows.split(",")]
            inputs["calib"] = inputs["calib"][picked]
        except (ValueError, IndexError):
            ap.error(f"--calib-rows {args.calib_rows}: give indices below "
                     f"{inputs['calib'].shape[0]}, separated by commas")
        inputs["calib_source"] += f", rows {args.calib_rows}"
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
    names = list(projections(model))
    if args.avg_bits is None:
        formats = {name: (args.wbits, args.group_size) for name in names}
    else:
        formats = chosen_formats(settings["auto_scheme"]["layers"], names)
    check_grid(model, formats)
    record = {
        "peer": DISTS[args.peer], "settings": settings, "quantize_s": round(quantize_s, 1),
        "quantize_cpu_s": round(quantize_cpu_s, 1),
        # CPU time of finished child processes (e.g. compiler workers), not in quantize_cpu_s
        "children_cpu_s": round(children, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "versions": {d: version(d) for d in (DISTS[args.peer], "torch", "transformers")},
        "calib": f"{inputs['calib_source']}, {list(inputs['calib'].shape)} token ids",
        "storage": storage(model, formats),
    }
    if args.avg_bits is not None:
        record["bits"] = {name: bits for name, (bits, _) in formats.items()}
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
