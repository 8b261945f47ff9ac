"""Command line: argument parsing and printing only; the work happens in `sliderquant.api`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sliderquant.config import INTRA_MODES, METHODS, PRESETS, ConfigError, QuantConfig

DTYPES = ("float32", "bfloat16", "float16")

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
     "(overrides the method's schedule)"),
    ("--intra-stages", "intra_stages", int, "intra-layer sliding stages N (gamma = 1/N); "
     "1 turns intra-layer sliding off"),
    ("--intra-mode", "intra_mode", str, f"{' | '.join(INTRA_MODES)}: whole-schedule passes "
     "per fraction (reference code, default) or every fraction inside each window (paper)"),
    ("--inference-batch-size", "inference_batch_size", int,
     "windows per no-grad forward when advancing caches"),
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
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sliderquant",
        description="Post-training quantization of LLMs with sliding-layer windows.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model, save it, report its perplexity",
                       description="Quantize MODEL, fold the learnables into plain weights, "
                       "save a Hugging Face folder with sliderquant.json, and evaluate it.")
    _add_model_args(q)
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
    q.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    _add_ppl_args(q, default_tasks="wikitext2,c4")
    q.add_argument("--no-fp-reference", dest="fp_reference", action="store_false",
                   help="skip evaluating the unquantized model for comparison (cached per "
                        "model and protocol)")

    e = sub.add_parser("eval", help="evaluate a model or a quantized run folder",
                       description="Perplexity of MODEL (a run folder, a model id or path).")
    _add_model_args(e)
    _add_ppl_args(e, default_tasks="wikitext2,c4")
    e.add_argument("--json", type=Path, help="also write the results to this JSON file")

    s = sub.add_parser("schedule", help="print the window schedule for a number of layers",
                       description="Print the windows a method trains, in order.")
    s.add_argument("--layers", type=int, required=True, help="number of decoder layers L")
    s.add_argument("--method", choices=[m for m in METHODS if m != "rtn"],
                   default="sliderquant", help="schedule family (default sliderquant)")
    s.add_argument("--shallow", type=int, default=4, help="Ls (sliderquant)")
    s.add_argument("--deep", type=int, default=4, help="Ld (sliderquant)")
    s.add_argument("--window-size", type=int, default=None,
                   help="window size s (default 2; blockwise 1)")
    s.add_argument("--stride", type=int, default=1, help="stride i")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="smollm2-135m (embedded default), stories260k (data root), a "
                   ".gguf file, a llama2.c .bin, a Hugging Face folder or hub id, or (eval) a "
                   "sliderquant run folder")
    p.add_argument("--data-dir", help="data root with wikitext2/ and c4/ (default: "
                   "$SLIDERQUANT_DATA, else the Hugging Face hub)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="dtype to load and save the model in (default float32)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the hub (off unless you pass it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_ppl_args(p: argparse.ArgumentParser, default_tasks: str) -> None:
    p.add_argument("--tasks", default=default_tasks,
                   help=f"comma-separated: wikitext2, c4, or none (default {default_tasks})")
    p.add_argument("--eval-seqlen", type=int, default=2048,
                   help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="evaluate only the first N windows of each set (default: all; "
                        "WikiText-2 test ~150 and C4 256 windows at 2048)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sliderquant.api import USER_ERRORS

    try:
        return {"quantize": _quantize, "eval": _eval, "schedule": _schedule}[args.command](args)
    except USER_ERRORS as e:
        print(f"sliderquant: error: {e}", file=sys.stderr)
        return 2


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    overrides = {key: getattr(args, key) for _, key, _, _ in _CONFIG_FLAGS}
    overrides.update({key: getattr(args, key) for _, key, _ in _CONFIG_SWITCHES})
    overrides = {k: v for k, v in overrides.items() if v is not None}
    file_values = QuantConfig.read_yaml(args.config) if args.config else {}
    file_values.pop("preset", None)
    return QuantConfig.from_preset(args.preset, args.fast, **{**file_values, **overrides})


def _quantize(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.models.adapters import DecoderAdapter

    config = _config_from_args(args)
    tasks = _tasks(args.tasks)
    loaded = api.load(args.model, args.data_dir, _dtype(args.dtype), args.trust_remote_code)
    if loaded.run is not None:
        raise api.RunFolderError(f"{args.model} is already a quantized run; quantize the "
                                 "original model instead")
    api.preflight(loaded.model, config)
    if tasks:
        DecoderAdapter(loaded.model).check_context(args.eval_seqlen)
    fp = None
    if tasks and args.fp_reference:
        _say(args, "evaluating the unquantized model (cached after the first time)")
        fp = api.fp_reference(loaded.model, loaded.tokenizer, tasks, args.eval_seqlen,
                              args.eval_windows, args.data_dir, not args.quiet)
    _say(args, f"quantizing {loaded.source}: {config.method} W{config.wbits}A{config.abits} "
         f"({config.preset}), {config.nsamples}x{config.seqlen} tokens of {config.calib}, "
         f"{config.epochs} epochs per window")
    result = api.quantize(loaded.model, loaded.tokenizer, config, data_dir=args.data_dir,
                          device=args.device, output_dir=args.out, resume=args.resume,
                          overwrite=args.overwrite, show_progress=not args.quiet)
    entries = {"model": loaded.source, "model_note": loaded.note}
    if tasks:
        entries["eval"] = api.evaluate_perplexity(
            result.model, loaded.tokenizer, tasks, args.eval_seqlen, args.eval_windows,
            args.data_dir, not args.quiet)
        if fp is not None:
            entries["eval_fp"] = fp
    api.update_run_record(args.out, **entries)
    report = result.report
    print(f"saved {args.out}  (quantization {report['timings']['total_s']:.0f} s, "
          f"peak RSS {report['peak_rss_mb']:.0f} MiB)")
    if loaded.note:
        print(f"note: {loaded.note}")
    _print_ppl(entries.get("eval", {}), fp)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from sliderquant import api

    loaded = api.load(args.model, args.data_dir, _dtype(args.dtype), args.trust_remote_code)
    tasks = _tasks(args.tasks)
    results = api.evaluate_perplexity(loaded.model, loaded.tokenizer, tasks, args.eval_seqlen,
                                      args.eval_windows, args.data_dir, not args.quiet)
    recorded = (loaded.run or {}).get("eval", {})
    print(f"model: {loaded.source}")
    if loaded.note:
        print(f"note: {loaded.note}")
    _print_ppl(results, None, recorded)
    if args.json:
        from sliderquant.atomic import write_text

        write_text(args.json, json.dumps({"model": loaded.source, "perplexity": results},
                                         indent=1))
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from sliderquant.schedule import build_schedule, describe, fixed, visit_counts

    if args.method == "sliderquant":
        windows = build_schedule(args.layers, args.shallow, args.deep,
                                 args.window_size or 2, args.stride)
    else:
        size = args.window_size or (1 if args.method == "blockwise" else 2)
        windows = fixed(args.layers, size, args.stride)
    rows = describe(windows, sliding=args.method == "sliderquant")
    if args.json:
        print(json.dumps({"layers": args.layers, "windows": rows,
                          "visits": visit_counts(windows, args.layers)}))
        return 0
    print(f"{args.method} schedule, L = {args.layers}: {len(windows)} windows")
    print(f"{'#':>3}  {'kind':<5}  {'layers':<22} slide")
    for row in rows:
        layers = row["layers"]
        span = f"[{layers[0]}]" if len(layers) == 1 else f"[{layers[0]}..{layers[-1]}]"
        slide = "-" if row["slide"] is None else str(row["slide"])
        print(f"{row['index']:>3}  {row['kind']:<5}  {span:<22} {slide}")
    print("visits per layer:", " ".join(map(str, visit_counts(windows, args.layers))))
    return 0


def _tasks(text: str) -> tuple[str, ...]:
    from sliderquant.eval.perplexity import DATASETS

    if text.strip().lower() == "none":
        return ()
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; available: {', '.join(DATASETS)}, none")
    return tasks


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _print_ppl(results: dict, fp: dict | None, recorded: dict | None = None) -> None:
    for name, r in results.items():
        line = f"{name:<10} ppl {r['ppl']:.3f}  ({r['windows']} windows x {r['seqlen']} tokens)"
        if fp and name in fp:
            line += f"   FP {fp[name]['ppl']:.3f}"
        if recorded and name in recorded and recorded[name]["windows"] == r["windows"]:
            line += f"   at quantization time {recorded[name]['ppl']:.3f}"
        print(line)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
