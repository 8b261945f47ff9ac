"""`sliderquant eval`: evaluate a model or a quantized run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sliderquant.cli.options import (
    add_model_arguments,
    add_perplexity_arguments,
    parse_tasks,
    torch_dtype,
)
from sliderquant.cli.printing import print_perplexity

NAME = "eval"
HELP = "evaluate a model or a quantized run folder"
DESCRIPTION = "Perplexity of MODEL (a run folder, a model id or path)."


def add_arguments(e: argparse.ArgumentParser) -> None:
    add_model_arguments(e)
    add_perplexity_arguments(e, default_tasks="wikitext2,c4")
    e.add_argument("--json", type=Path, help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api

    loaded = api.load(args.model, args.data_dir, torch_dtype(args.dtype), args.trust_remote_code)
    tasks = parse_tasks(args.tasks)
    results = api.evaluate_perplexity(loaded.model, loaded.tokenizer, tasks, args.eval_seqlen,
                                      args.eval_windows, args.data_dir, not args.quiet)
    recorded = (loaded.run or {}).get("eval", {})
    print(f"model: {loaded.source}")
    if loaded.note:
        print(f"note: {loaded.note}")
    print_perplexity(results, None, recorded)
    if args.json:
        from sliderquant.atomic import write_text

        write_text(args.json, json.dumps({"model": loaded.source, "perplexity": results},
                                         indent=1))
    return 0


