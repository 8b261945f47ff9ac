"""`sliderquant quantize`: quantize, fold, save and evaluate a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from sliderquant.cli.options import (
    add_model_arguments,
    add_perplexity_arguments,
    compute_device,
    parse_tasks,
    torch_dtype,
)
from sliderquant.cli.printing import print_perplexity, say
from sliderquant.config import (
    ALLOC_SCORES,
    ALLOC_UNITS,
    INTRA_MODES,
    METHODS,
    PRESETS,
    QuantConfig,
)

NAME = "quantize"
HELP = "quantize a model, save it, report its perplexity"
DESCRIPTION = ("Quantize MODEL, fold the learnables into plain weights, save a Hugging Face "
               "folder with sliderquant.json, and evaluate it.")


def _widths(text: str) -> tuple[int, ...]:
    """`2,3` -> (2, 3)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bit-widths like 2,3") from None


# (flag, config key, type, help) for every QuantConfig field settable from the command line.
_CONFIG_FLAGS: list[tuple[str, str, type, str]] = [
    ("--method", "method", str, f"algorithm: {', '.join(METHODS)} (default sliderquant). "
     "fixed = 2-layer windows, stride 1 (CBQ-style); blockwise = one layer at a time "
     "(OmniQuant-style); rtn = round-to-nearest, no training"),
    ("--wbits", "wbits", int, "weight bits: 2, 3, 4, 8 or 16"),
    ("--abits", "abits", int, "activation bits: 4, 8 or 16 (16 = weight-only)"),
    ("--group-size", "group_size", int, "weight group size (power of two dividing every input "
     "width); default: one scale per output channel"),
    ("--epochs", "epochs", int, "training epochs per window, summed over the intra-layer stages"),
    ("--batch-size", "batch_size", int, "calibration windows per optimiser step"),
    ("--nsamples", "nsamples", int, "number of calibration windows"),
    ("--seqlen", "seqlen", int, "tokens per calibration window"),
    ("--calib", "calib", str, "calibration data: wikitext2:train, wikitext2:valid, c4, or a "
     "text file (wikitext2:train is not in the offline data root)"),
    ("--seed", "seed", int, "seed for calibration sampling, initialisation, shuffling, rotation"),
    ("--lora-rank", "lora_rank", int, "LoRA rank per projection (0 turns LoRA off)"),
    ("--lora-lr", "lora_lr", float, "LoRA learning rate (per sample; times batch size)"),
    ("--scale-lr", "scale_lr", float, "channel-scaling learning rate (per sample)"),
    ("--clip-lr", "clip_lr", float, "learnable weight clipping learning rate (per sample)"),
    ("--shallow", "shallow", int, "layers covered by the growing windows (PESW), Ls"),
    ("--deep", "deep", int, "layers covered by the shrinking windows (PCSW), Ld"),
    ("--window-size", "window_size", int, "size s of the intermediate fixed windows"),
    ("--stride", "stride", int, "stride i of the intermediate fixed windows"),
    ("--schedule", "schedule", str, "explicit schedule as inclusive ranges, e.g. 0-0,0-1,1-2 "
     "(overrides the method's schedule), or auto: shallow/deep from an RTN sensitivity scan "
     "on the calibration data (see `sliderquant sensitivity`)"),
    ("--intra-stages", "intra_stages", int, "intra-layer sliding stages N (gamma = 1/N); "
     "1 turns intra-layer sliding off"),
    ("--intra-mode", "intra_mode", str, f"{' | '.join(INTRA_MODES)}: whole-schedule passes "
     "per fraction (reference code, default) or every fraction inside each window (paper)"),
    ("--inference-batch-size", "inference_batch_size", int,
     "windows per no-grad forward when advancing caches"),
    ("--avg-bits", "avg_bits", float, "mixed precision: average storage bits per projection "
     "weight (codes, scales, zero points), spent where a scan says the loss gains most "
     "(docs/MIXED.md); --wbits is the lowest width"),
    ("--alloc-unit", "alloc_unit", str, f"{' | '.join(ALLOC_UNITS)}: what one choice of bits "
     "covers (channel: a share of every projection's rows at the higher width; not exportable)"),
    ("--alloc-bits", "alloc_bits", _widths, "the widths to choose from, e.g. 2,3 (default "
     "--wbits and the next width)"),
    ("--alloc-score", "alloc_score", str, f"{' | '.join(ALLOC_SCORES)}: measured loss change "
     "of each choice with rounding to nearest (default), or its Fisher estimate"),
]
_CONFIG_SWITCHES: list[tuple[str, str, str]] = [
    ("lwc", "lwc", "learnable weight clipping"),
    ("channel-scaling", "channel_scaling", "learnable channel scaling (needs abits < 16)"),
    ("qk-scaling", "qk_scaling", "the extra q/k scaling vector (reference code)"),
    ("down-scaling", "down_scaling", "the up/down scaling vector"),
    ("quantize-attention", "quantize_attention", "quantize q/k/v inside attention (abits < 16)"),
    ("rotate", "rotate", "fused norms + random Hadamard rotation (on in the w4a4 preset)"),
    ("center-embeddings", "center_embeddings", "centre embedding rows before rotating (QuaRot)"),
    ("lr-times-batch", "lr_times_batch", "multiply learning rates by the batch size (reference)"),
    ("alloc-pairs", "alloc_pairs", "measure neighbouring units together (default: for layer "
     "units with rtn scores)"),
]


def add_arguments(q: argparse.ArgumentParser) -> None:
    add_model_arguments(q)
    q.add_argument("--out", required=True, type=Path,
                   help="output folder (refused if it holds a finished run, unless --overwrite)")
    q.add_argument("--preset", choices=list(PRESETS), default="w4a16",
                   help="paper/reference settings to start from (default w4a16)")
    q.add_argument("--fast", action="store_true",
                   help="the preset's CPU-sized variant (fewer, shorter samples; fewer epochs)")
    q.add_argument("--config", type=Path, help="YAML file of QuantConfig keys (applied after "
                   "the preset, before command-line flags)")
    for flag, key, kind, text in _CONFIG_FLAGS:
        q.add_argument(flag, dest=key, type=kind, default=None, help=text)
    for name, key, text in _CONFIG_SWITCHES:
        q.add_argument(f"--{name}", dest=key, action=argparse.BooleanOptionalAction,
                       default=None, help=text)
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its last finished window")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a finished or unfinished run in --out")
    add_perplexity_arguments(q, default_tasks="wikitext2,c4")
    q.add_argument("--no-fp-reference", dest="fp_reference", action="store_false",
                   help="skip evaluating the unquantized model for comparison (cached per "
                        "model and protocol)")


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides = {key: getattr(args, key) for _, key, _, _ in _CONFIG_FLAGS}
    overrides.update({key: getattr(args, key) for _, key, _ in _CONFIG_SWITCHES})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    file_values = QuantConfig.read_yaml(args.config) if args.config else {}
    file_values.pop("preset", None)
    return QuantConfig.from_preset(args.preset, args.fast, **{**file_values, **overrides})


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.models.adapters import DecoderAdapter
    from sliderquant.sensitivity import allocation_summary

    config = _config_from_args(args)
    tasks = parse_tasks(args.tasks)
    device = compute_device(args.device)
    loaded = api.load(args.model, args.data_dir, torch_dtype(args.dtype), args.trust_remote_code)
    if loaded.run is not None:
        raise api.RunFolderError(f"{args.model} is already a quantized run; quantize the "
                                 "original model instead")
    api.preflight(loaded.model, config)
    if tasks:
        DecoderAdapter(loaded.model).check_context(args.eval_seqlen)
    fp = None
    if tasks and args.fp_reference:
        say(args, "evaluating the unquantized model (cached after the first time)")
        fp = api.fp_reference(loaded.model.to(device), loaded.tokenizer, tasks,
                              args.eval_seqlen, args.eval_windows, args.data_dir, not args.quiet)
        loaded.model.to("cpu")  # quantization keeps the model on the host, windows on `device`
    say(args, f"quantizing {loaded.source}: {config.method} W{config.wbits}A{config.abits} "
         f"({config.preset}), {config.nsamples}x{config.seqlen} tokens of {config.calib}, "
         f"{config.epochs} epochs per window")
    result = api.quantize(loaded.model, loaded.tokenizer, config, data_dir=args.data_dir,
                          device=device, output_dir=args.out, resume=args.resume,
                          overwrite=args.overwrite, show_progress=not args.quiet)
    entries = {"model": loaded.source, "model_ref": api.loadable_ref(args.model),
               "model_note": loaded.note}
    if tasks:
        entries["eval"] = api.evaluate_perplexity(
            result.model.to(device), loaded.tokenizer, tasks, args.eval_seqlen, args.eval_windows,
            args.data_dir, not args.quiet)
        if fp is not None:
            entries["eval_fp"] = fp
    api.update_run_record(args.out, **entries)
    report = result.report
    print(f"saved {args.out}  (quantization {report['timings']['total_s']:.0f} s, "
          f"peak RSS {report['peak_rss_mb']:.0f} MiB)")
    if loaded.note:
        print(f"note: {loaded.note}")
    if report.get("auto_schedule"):
        print(f"schedule auto: {report['auto_schedule']['reasoning']}")
    if report.get("allocation"):
        print(f"allocation: {allocation_summary(report['allocation'])}")
    print_perplexity(entries.get("eval", {}), fp)
    return 0


