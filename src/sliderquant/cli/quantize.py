"""`sliderquant quantize`: quantize, fold, save and evaluate a model.

Under `torchrun --nproc-per-node N` every rank quantizes (data parallel, see
docs/DISTRIBUTED.md); rank 0 alone evaluates, writes the run folder and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from sliderquant import distributed
from sliderquant.cli import options
from sliderquant.cli.options import finite_float, positive_int
from sliderquant.cli.printing import print_expert_tokens, print_results, print_summary, say
from sliderquant.config import (
    ALLOC_SCORES,
    ALLOC_UNITS,
    INTRA_MODES,
    METHODS,
    PRESETS,
    ROUND_UPDATES,
    SCHEMES,
    QuantConfig,
)

NAME = "quantize"
HELP = "quantize a model, save it, report its perplexity"
DESCRIPTION = (
    "Quantize MODEL, fold the learnables into plain weights, save it (by default as a "
    "compressed checkpoint that plain transformers loads; --format) with sliderquant.json, "
    "evaluate it against the FP model, and end with a summary table and "
    "where the time went. --scheme names what the quantized model is (auto-round / "
    "llm-compressor names: W4A16 = 4-bit weights in groups of 128, symmetric); --preset the "
    "training recipe (epochs, learning rates, learnables, rotation); without --preset a "
    "scheme picks the recipe for its bits; without either, w4a16 (per-channel asymmetric, as "
    "in the paper).")


def _widths(text: str) -> tuple[int, ...]:
    """`2,3` -> (2, 3)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bit-widths like 2,3") from None


# (flag, config key, type, help) for every QuantConfig field settable from the command line.
_CONFIG_FLAGS: list[tuple[str, str, object, str]] = [
    ("--method", "method", str, "algorithm (default sliderquant; with --preset w2a16 --fast "
     "and no --method: blockwise with signed learned rounding, the measured best there): "
     "fixed = 2-layer windows, "
     "stride 1 (CBQ-style); blockwise = one layer at a time (OmniQuant-style); rtn = "
     "round-to-nearest, no training and no calibration data"),
    ("--wbits", "wbits", int, "weight bits: 2, 3, 4, 8 or 16"),
    ("--abits", "abits", int, "activation bits: 4, 8 or 16 (16 = weight-only)"),
    ("--group-size", "group_size", positive_int, "weight group size (power of two dividing "
     "every input width); default: one scale per output channel"),
    ("--epochs", "epochs", positive_int,
     "training epochs per window, summed over the intra-layer stages"),
    ("--batch-size", "batch_size", positive_int, "calibration windows per optimiser step"),
    ("--nsamples", "nsamples", positive_int, "number of calibration windows"),
    ("--seqlen", "seqlen", positive_int, "tokens per calibration window"),
    ("--seed", "seed", int, "seed for calibration sampling, initialisation, shuffling, rotation"),
    ("--lora-rank", "lora_rank", int, "LoRA rank per projection (0 turns LoRA off)"),
    ("--lora-lr", "lora_lr", finite_float, "LoRA learning rate (per sample; times batch size)"),
    ("--scale-lr", "scale_lr", finite_float, "channel-scaling learning rate (per sample)"),
    ("--clip-lr", "clip_lr", finite_float,
     "learnable weight clipping learning rate (per sample)"),
    ("--round-lr", "round_lr", finite_float, "learned rounding learning rate (per sample; with "
     "--round-update sign the size of each signed step)"),
    ("--round-update", "round_update", str, "adam (default) or sign: signed-gradient steps "
     "for the rounding offsets (SignRound's update)"),
    ("--holdout", "holdout", int, "calibration rows kept out of training (the last ones): "
     "their window loss is recorded per epoch and judges --best-epoch (default 0: the "
     "training mean judges)"),
    ("--loss-mask", "loss_mask", finite_float, "fraction of the largest squared output errors "
     "left out of the window loss, e.g. 0.001 (default 0: plain MSE)"),
    ("--shallow", "shallow", positive_int, "layers covered by the growing windows (PESW), Ls"),
    ("--deep", "deep", positive_int, "layers covered by the shrinking windows (PCSW), Ld"),
    ("--window-size", "window_size", positive_int, "size s of the intermediate fixed windows"),
    ("--stride", "stride", positive_int, "stride i of the intermediate fixed windows"),
    ("--schedule", "schedule", str, "explicit schedule as inclusive ranges, e.g. 0-0,0-1,1-2 "
     "(overrides the method's schedule), or auto: shallow/deep from an RTN sensitivity scan "
     "on the calibration data (see `sliderquant sensitivity`)"),
    ("--intra-stages", "intra_stages", positive_int, "intra-layer sliding stages N "
     "(gamma = 1/N); 1 turns intra-layer sliding off"),
    ("--intra-mode", "intra_mode", str, "global_passes: whole-schedule passes per fraction "
     "(reference code, default); per_window: every fraction inside each window (paper)"),
    ("--inference-batch-size", "inference_batch_size", positive_int,
     "windows per no-grad forward when advancing caches"),
    ("--avg-bits", "avg_bits", finite_float, "mixed precision: average storage bits per projection "
     "weight (codes, scales, zero points), spent where a scan says the loss gains most "
     "(docs/MIXED.md); --wbits is the lowest width"),
    ("--alloc-unit", "alloc_unit", str, f"{' | '.join(ALLOC_UNITS)}: what one choice of bits "
     "covers (channel: a share of every projection's rows at the higher width; not exportable)"),
    ("--alloc-bits", "alloc_bits", _widths, "the widths to choose from, e.g. 2,3 (default "
     "--wbits and the next width)"),
    ("--alloc-score", "alloc_score", str, f"{' | '.join(ALLOC_SCORES)}: measured loss change "
     "of each choice with rounding to nearest (default), or its Fisher estimate"),
]
_CHOICES = {"method": METHODS, "intra_mode": INTRA_MODES, "round_update": ROUND_UPDATES,
            "alloc_unit": ALLOC_UNITS, "alloc_score": ALLOC_SCORES}
_CONFIG_SWITCHES: list[tuple[str, str, str]] = [
    ("lwc", "lwc", "learnable weight clipping"),
    ("channel-scaling", "channel_scaling", "learnable channel scaling (needs abits < 16)"),
    ("qk-scaling", "qk_scaling", "the extra q/k scaling vector (reference code)"),
    ("down-scaling", "down_scaling", "the up/down scaling vector"),
    ("quantize-attention", "quantize_attention", "quantize q/k/v inside attention (abits < 16)"),
    ("quantize-router", "quantize_router", "quantize MoE routers like the experts (default: "
     "routers stay in full precision)"),
    ("rotate", "rotate", "fused norms + random Hadamard rotation (on in the w4a4 preset)"),
    ("center-embeddings", "center_embeddings", "centre embedding rows before rotating (QuaRot)"),
    ("rounding", "rounding", "learned rounding: one offset per weight, hardened across the "
     "windows of its layer (beyond the paper)"),
    ("search-start", "search_start", "clipping starts at the activation-weighted searched "
     "value, also for rtn (beyond the paper)"),
    ("best-epoch", "best_epoch", "keep each window's learnables from its lowest-loss epoch "
     "(beyond the paper)"),
    ("lr-times-batch", "lr_times_batch", "multiply learning rates by the batch size (reference)"),
    ("alloc-pairs", "alloc_pairs", "measure neighbouring units together (default: for layer "
     "units with rtn scores)"),
    ("symmetric", "symmetric", "symmetric weight grid (zero point in the middle); set by the "
     "_SYM/_ASYM spelling of --scheme"),
]


def add_arguments(q: argparse.ArgumentParser) -> None:
    options.add_model_arguments(q)
    options.add_data_dir(q)
    options.add_device(q)
    options.add_quiet(q)
    options.add_out(q, "the Hugging Face folder, sliderquant.json and checkpoints (refused if "
                    "it holds a finished run, unless --overwrite)", required=True)
    q.add_argument("--scheme", help="what the quantized model is, by the names of auto-round "
                   "and llm-compressor: " + ", ".join(SCHEMES) + "; _SYM / _ASYM picks the "
                   "weight grid (e.g. W4A16_ASYM). W{b}A16 = groups of 128, symmetric. "
                   "Recorded in sliderquant.json")
    q.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="training recipe (epochs, learning rates, learnables, rotation); "
                        "default: the recipe for --scheme's bits, else w4a16")
    q.add_argument("--fast", action="store_true",
                   help="the preset's CPU-sized variant (fewer, shorter samples; fewer epochs)")
    q.add_argument("--paper", action="store_true",
                   help="the paper's recipe exactly (docs/ALGORITHM.md), without the default "
                        "recipe's measured improvements (README, Recipes)")
    q.add_argument("--config", type=Path, help="YAML file of QuantConfig keys (applied after "
                   "the preset, before command-line flags)")
    options.add_calibration_arguments(q, default_calib=None)
    for flag, key, kind, text in _CONFIG_FLAGS:
        q.add_argument(flag, dest=key, type=kind, default=None, help=text,
                       choices=_CHOICES.get(key))
    for name, key, text in _CONFIG_SWITCHES:
        q.add_argument(f"--{name}", dest=key, action=argparse.BooleanOptionalAction,
                       default=None, help=text)
    q.add_argument("--format", default=None,
                   help="what to write, comma-separated: compressed (compressed-tensors "
                        "pack-quantized, loads in plain transformers; the default where it "
                        "can hold the result, else fake, with a note), gguf "
                        "(OUT/model.gguf, llama.cpp), fake (fp32 fake-quantized folder). The "
                        "first of compressed/fake fills --out itself, a second goes to "
                        "OUT/<format>")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its last finished window, "
                        "or finish its evaluation")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a finished or unfinished run in --out")
    options.add_eval_arguments(q, default_tasks="wikitext2,c4")
    q.add_argument("--no-fp-reference", dest="fp_reference", action="store_false",
                   help="skip evaluating the unquantized model for comparison (cached per "
                        "model and protocol)")


def _config_from_args(args: argparse.Namespace) -> QuantConfig:
    keys = [key for _, key, _, _ in _CONFIG_FLAGS] + [key for _, key, _ in _CONFIG_SWITCHES]
    overrides = {key: getattr(args, key) for key in (*keys, "calib", "chat_template")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    file_values = QuantConfig.read_yaml(args.config) if args.config else {}
    file_values.pop("preset", None)
    scheme = args.scheme or file_values.pop("scheme", None)
    file_values.pop("scheme", None)
    return QuantConfig.from_preset(args.preset, args.fast, scheme=scheme, paper=args.paper,
                                   **{**file_values, **overrides})


def interrupted(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C, from what the run left in --out."""
    from sliderquant.runfolder import state_of

    state = state_of(args.out) if args.out.is_dir() else "new"
    if state == "finished":
        return (f"the quantized model is saved in {args.out}; evaluate it with "
                f"`sliderquant eval {args.out}`")
    if state == "quantized":
        return (f"the quantized model is saved in {args.out} but its evaluation did not "
                "finish; run the same command with --resume to finish it")
    if state == "partial":
        return (f"the windows finished so far are checkpointed in {args.out}; run the same "
                "command with --resume to continue")
    return "no window had finished, so there is nothing to --resume; run the command again"


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.calibration import check_source
    from sliderquant.data import resolve_data_root
    from sliderquant.eval.perplexity import check_data
    from sliderquant.sensitivity import allocation_summary

    clock = Clock()
    config = _config_from_args(args)
    if args.format is None:
        formats, format_note = api.default_formats(config)
    else:
        formats, format_note = api.parse_formats(args.format), None
        api.check_formats(formats, config)
    tasks = options.parse_tasks(args.tasks)
    perplexity_sets, lm_eval_tasks = options.split_tasks(tasks)
    device = distributed.launch(options.compute_device(args.device))
    main = distributed.Collective().is_main
    args.quiet = args.quiet or not main
    data_root = resolve_data_root(args.data_dir)
    if config.trains:
        check_source(config.calib, data_root, config.chat_template)
    check_data(perplexity_sets, data_root)
    if lm_eval_tasks:
        api.check_tasks(lm_eval_tasks)
    comm = distributed.Collective()
    # rank 0 alone opens and locks the folder; the others learn of its errors and its state
    opened = comm.on_main(lambda: api.open_run(args.out, args.resume, args.overwrite),
                          share=False)
    state = comm.on_main(lambda: opened.state)
    with opened if main else contextlib.nullcontext() as out:
        with clock("load"):
            loaded = api.load(args.model, args.data_dir, options.torch_dtype(args.dtype),
                              args.trust_remote_code)
        if loaded.run is not None:
            raise api.RunFolderError(f"{args.model} is already a quantized run; quantize the "
                                     "original model instead")
        api.preflight(loaded.model, config)
        if args.format is None:
            formats, format_note = api.default_formats(config, loaded.model)
        else:
            api.check_formats(formats, config, loaded.model)
        if format_note:
            say(args, format_note)
        eval_seqlen = options.eval_length(loaded.model, args.eval_seqlen, args)
        fp = None
        if tasks and args.fp_reference and main:
            say(args, "evaluating the unquantized model (cached after the first time)")
            with clock("FP reference"):
                fp = api.fp_reference(loaded.model.to(device), loaded.tokenizer, tasks, eval_seqlen,
                                      args.eval_windows, args.data_dir, not args.quiet, args.limit)
            loaded.model.to("cpu")  # quantization keeps the model on the host, windows on `device`
        calib = (f"{config.nsamples}x{config.seqlen} tokens of {config.calib}"
                 + (" (chat template)" if config.chat_template else "") if config.trains
                 else "no calibration data")
        if state != "quantized":
            say(args, f"quantizing {loaded.source}: {config.method} {_bits(config)} "
                      f"({config.preset}), {calib}"
                      + (f", {config.epochs} epochs per window" if config.trains else ""))
        entries = {"model": loaded.source, "model_ref": api.loadable_ref(args.model),
                   "model_note": loaded.note,
                   "data_root": str(data_root.resolve()) if data_root else None}
        if state == "quantized" and not main:
            return 0
        if state == "quantized":
            say(args, f"{args.out} holds the quantized model: finishing its evaluation")
            result = api.resume_evaluation(out)
        else:
            with clock("quantize"):
                result = api.quantize(loaded.model, loaded.tokenizer, config,
                                      data_dir=args.data_dir, device=device,
                                      output_dir=out if main else args.out,
                                      formats=formats, resume=args.resume, evaluation=tasks,
                                      record=entries, show_progress=not args.quiet,
                                      warn=lambda text: say(args, f"warning: {text}"))
        if not main:
            return 0
        if tasks:
            scores = {}
            with clock("evaluation"):
                model = result.model.to(device)
                if perplexity_sets:
                    scores.update(api.evaluate_perplexity(
                        model, loaded.tokenizer, perplexity_sets, eval_seqlen, args.eval_windows,
                        args.data_dir, not args.quiet))
                if lm_eval_tasks:
                    scores.update(api.evaluate_zeroshot(model, loaded.tokenizer, lm_eval_tasks,
                                                        args.limit, args.data_dir, not args.quiet))
            entries["eval"] = scores
            if fp is not None:
                entries["eval_fp"] = fp
        entries["phases"] = clock.record(result.report["timings"])
        api.update_run_record(args.out, finished=True, **entries)
    report = result.report
    peak = api.peak_rss_mb()
    print(f"saved {args.out}: {config.method} {_bits(config)}"
          + (f" ({config.scheme})" if config.scheme else "") + f", preset {config.preset}")
    if loaded.note:
        print(f"note: {loaded.note}")
    for line in api.read_run_record(args.out).get("notes", []):
        print(f"note: {line}")
    if report.get("experts"):
        print_expert_tokens(report["experts"])
    if report.get("auto_schedule"):
        print(f"schedule auto: {report['auto_schedule']['reasoning']}")
    if report.get("allocation"):
        print(f"allocation: {allocation_summary(report['allocation'])}")
    print_results(entries.get("eval", {}), fp)
    print_summary(entries.get("eval", {}), fp, size_bytes=_folder_bytes(args.out),
                  peak_rss_mb=peak, peak_gpu_mb=report.get("peak_gpu_mb"),
                  phases=entries["phases"], windows=report.get("windows") or [])
    return 0


def _bits(config: QuantConfig) -> str:
    group = f"g{config.group_size}" if config.group_size else "per-channel"
    grid = "sym" if config.symmetric else "asym"
    return f"W{config.wbits}A{config.abits} {group} {grid}"


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files the run folder holds, without its training checkpoint."""
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and "checkpoint" not in f.relative_to(folder).parts)


class Clock:
    """Wall and CPU seconds of named phases, and of everything since it was made."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.began = time.perf_counter(), time.process_time()

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - wall
            self.cpu[name] = time.process_time() - cpu

    def record(self, quantize: dict[str, float]) -> dict[str, dict]:
        """{phase: {"wall_s", "cpu_s"}} in order plus "total"; the quantize phase also has
        "parts": calibration, training, fold, save (wall seconds, from the pipeline's own
        timings)."""
        phases: dict[str, dict] = {
            name: {"wall_s": round(self.wall[name], 1), "cpu_s": round(self.cpu[name], 1)}
            for name in self.wall}
        if "quantize" in phases:
            parts = {"calibration": quantize.get("calibration_data_s", 0.0)
                     + quantize.get("capture_s", 0.0),
                     "rotation": quantize.get("rotation_s", 0.0),
                     "auto schedule": quantize.get("auto_schedule_s", 0.0),
                     "training": quantize.get("train_s", 0.0),
                     "fold": quantize.get("fold_s", 0.0)}
            parts["save"] = max(self.wall["quantize"] - sum(parts.values()), 0.0)
            phases["quantize"]["parts"] = {k: round(v, 1) for k, v in parts.items()
                                           if k in ("training", "fold", "save") or v >= 0.05}
        phases["total"] = {"wall_s": round(time.perf_counter() - self.began[0], 1),
                           "cpu_s": round(time.process_time() - self.began[1], 1)}
        return phases
