"""Command line: argument parsing and printing only; the work happens in `sliderquant.api`.

Each command is a module with NAME, HELP, DESCRIPTION, `add_arguments(parser)` and
`run(args) -> exit code`, optionally `interrupted(args) -> str` (what to do after Ctrl-C);
add a command by listing its module in COMMANDS. Shared flags come from `cli.options`.
"""

from __future__ import annotations

import argparse
import sys

from sliderquant import __version__
from sliderquant.cli import evaluate, export, quantize, ranges, report, schedule, sensitivity

COMMANDS = (quantize, evaluate, export, schedule, sensitivity, ranges, report)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sliderquant",
        description="Post-training quantization of LLMs with sliding-layer windows.")
    parser.add_argument("--version", action="version", version=f"sliderquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP,
                                             description=command.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from sliderquant.cli.options import silence_libraries

        silence_libraries()
    from sliderquant.api import USER_ERRORS

    command = next(c for c in COMMANDS if args.command == c.NAME)
    try:
        return command.run(args)
    except USER_ERRORS as e:
        print(f"sliderquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = command.interrupted(args) if hasattr(command, "interrupted") else ""
        print(f"\nsliderquant: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
