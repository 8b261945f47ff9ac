"""`sliderquant eval`: evaluate a model or a quantized run folder."""

from __future__ import annotations

import argparse
import json

from sliderquant.cli import options
from sliderquant.cli.printing import print_results, say
from sliderquant.config import ConfigError

NAME = "eval"
HELP = "evaluate a model or a quantized run folder"
DESCRIPTION = ("Perplexity (WikiText-2, C4), optionally with the KL divergence from the FP "
               "model, and any lm-eval task (the six commonsense tasks from the data root) of "
               "MODEL: a run folder, a model id or path. A run folder is read with the data "
               "root it was made with unless --data-dir says otherwise.")


def add_arguments(e: argparse.ArgumentParser) -> None:
    options.add_model_arguments(e, run_folder=True)
    options.add_data_dir(e)
    options.add_device(e)
    options.add_quiet(e)
    options.add_eval_arguments(e, default_tasks="wikitext2,c4")
    e.add_argument("--kl", action="store_true",
                   help="on the perplexity sets, also the mean per-token KL(FP || MODEL) of "
                        "the next-token distributions and top-1 agreement against --reference")
    e.add_argument("--reference",
                   help="the FP model for --kl (default for a run folder: the model it was "
                        "quantized from, as recorded in its sliderquant.json)")
    options.add_json(e)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sliderquant import api
    from sliderquant.data import resolve_data_root
    from sliderquant.eval.perplexity import check_data

    tasks = options.parse_tasks(args.tasks)
    perplexity_sets, lm_eval_tasks = options.split_tasks(tasks)
    if not tasks:
        raise ConfigError("--tasks none leaves nothing to evaluate; name a task")
    if args.kl and not perplexity_sets:
        raise ConfigError("--kl is measured on the perplexity sets: add wikitext2 and/or "
                          "c4 to --tasks")
    dtype = options.torch_dtype(args.dtype)
    device = options.compute_device(args.device)
    run_record = None
    if (Path(args.model).expanduser() / api.RUN_FILE).is_file():
        run_record = api.read_run_record(Path(args.model).expanduser())
    data_dir = options.data_root_of(args, run_record)
    root = resolve_data_root(data_dir)
    check_data(perplexity_sets, root)
    if lm_eval_tasks:
        api.check_tasks(lm_eval_tasks)
    loaded = api.load(args.model, data_dir, dtype, args.trust_remote_code)
    loaded.model.to(device)
    seqlen = options.eval_length(loaded.model, args.eval_seqlen, args)
    reference = None
    if args.kl:
        if args.reference:
            reference = api.load(args.reference, data_dir, dtype, args.trust_remote_code)
        elif loaded.run is not None:
            reference = api.source_model(loaded.run, data_dir, dtype)
        else:
            raise ConfigError("--kl compares MODEL with its FP model: pass --reference "
                              "MODEL_FP (a run folder names its own)")
        reference.model.to(device)
        seqlen = options.eval_length(reference.model, seqlen, args)
        say(args, f"KL reference: {reference.source}")
    results: dict = {"model": loaded.source, "data_root": str(root.resolve()) if root else None}
    if perplexity_sets:
        results["perplexity"] = api.evaluate_perplexity(
            loaded.model, loaded.tokenizer, perplexity_sets, seqlen, args.eval_windows,
            data_dir, not args.quiet, reference.model if reference else None)
        if reference is not None:
            results["reference"] = reference.source
    if lm_eval_tasks:
        results["zeroshot"] = api.evaluate_zeroshot(
            loaded.model, loaded.tokenizer, lm_eval_tasks, args.limit, data_dir,
            not args.quiet)
        results["limit"] = args.limit
    if args.json == "-":
        print(json.dumps(results, indent=1))
        return 0
    print(f"model: {loaded.source}")
    if loaded.note:
        print(f"note: {loaded.note}")
    if reference is not None:
        print(f"KL reference (FP): {reference.source}")
    print_results({**results.get("perplexity", {}), **results.get("zeroshot", {})}, None,
                  (loaded.run or {}).get("eval", {}))
    if args.json:
        from sliderquant.atomic import write_text

        write_text(args.json, json.dumps(results, indent=1))
    return 0
