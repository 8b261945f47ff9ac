"""`sliderquant eval`: evaluate a model or a quantized run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sliderquant.cli.options import (
    add_model_arguments,
    add_perplexity_arguments,
    compute_device,
    parse_tasks,
    torch_dtype,
)
from sliderquant.cli.printing import print_perplexity, print_zeroshot, say
from sliderquant.config import ConfigError

NAME = "eval"
HELP = "evaluate a model or a quantized run folder"
DESCRIPTION = ("Perplexity (WikiText-2, C4), optionally with the KL divergence from the FP "
               "model, and zero-shot accuracy (lm-eval tasks) of MODEL: a run folder, a model "
               "id or path.")


def add_arguments(e: argparse.ArgumentParser) -> None:
    add_model_arguments(e)
    add_perplexity_arguments(e, default_tasks="wikitext2,c4", zeroshot=True)
    e.add_argument("--limit", type=int, default=None,
                   help="score only the first N items of each zero-shot task (for CPU-sized "
                        "runs; reported with every result it affects). Default: all")
    e.add_argument("--kl", action="store_true",
                   help="on the perplexity sets, also the mean per-token KL(FP || MODEL) of "
                        "the next-token distributions and top-1 agreement against --reference")
    e.add_argument("--reference",
                   help="the FP model for --kl (default for a run folder: the model it was "
                        "quantized from, as recorded in its sliderquant.json)")
    e.add_argument("--json", type=Path, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api
    from sliderquant.eval.perplexity import DATASETS

    tasks = parse_tasks(args.tasks, zeroshot=True)
    perplexity_sets = tuple(t for t in tasks if t in DATASETS)
    zeroshot_tasks = tuple(t for t in tasks if t not in DATASETS)
    if args.kl and not perplexity_sets:
        raise ConfigError("--kl is measured on the perplexity sets: add wikitext2 and/or "
                              "c4 to --tasks")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of items (got {args.limit})")
    dtype = torch_dtype(args.dtype)
    device = compute_device(args.device)
    loaded = api.load(args.model, args.data_dir, dtype, args.trust_remote_code)
    loaded.model.to(device)
    reference = None
    if args.kl:
        if args.reference:
            reference = api.load(args.reference, args.data_dir, dtype, args.trust_remote_code)
        elif loaded.run is not None:
            reference = api.source_model(loaded.run, args.data_dir, dtype)
        else:
            raise ConfigError("--kl compares MODEL with its FP model: pass --reference "
                                  "MODEL_FP (a run folder names its own)")
        reference.model.to(device)
        say(args, f"KL reference: {reference.source}")
    results: dict = {"model": loaded.source}
    if perplexity_sets:
        results["perplexity"] = api.evaluate_perplexity(
            loaded.model, loaded.tokenizer, perplexity_sets, args.eval_seqlen, args.eval_windows,
            args.data_dir, not args.quiet, reference.model if reference else None)
        if reference is not None:
            results["reference"] = reference.source
    if zeroshot_tasks:
        results["zeroshot"] = api.evaluate_zeroshot(
            loaded.model, loaded.tokenizer, zeroshot_tasks, args.limit, args.data_dir,
            not args.quiet)
        results["limit"] = args.limit
    print(f"model: {loaded.source}")
    if loaded.note:
        print(f"note: {loaded.note}")
    if reference is not None:
        print(f"KL reference (FP): {reference.source}")
    print_perplexity(results.get("perplexity", {}), None, (loaded.run or {}).get("eval", {}))
    print_zeroshot(results.get("zeroshot", {}))
    if args.json:
        from sliderquant.atomic import write_text

        write_text(args.json, json.dumps(results, indent=1))
    return 0
