"""Command line: argument parsing and printing only; the work happens in `sliderquant.api`.

Each command is a module with NAME, HELP, DESCRIPTION, `add_arguments(parser)` and
`run(args) -> exit code`; add a command by listing its module in COMMANDS.
"""

from __future__ import annotations

import argparse
import sys

from sliderquant.cli import evaluate, export, quantize, ranges, report, schedule, sensitivity

COMMANDS = (quantize, evaluate, export, schedule, sensitivity, ranges, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sliderquant",
        description="Post-training quantization of LLMs with sliding-layer windows.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP,
                                             description=command.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sliderquant.api import USER_ERRORS

    run = {command.NAME: command.run for command in COMMANDS}[args.command]
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"sliderquant: error: {e}", file=sys.stderr)
        return 2
