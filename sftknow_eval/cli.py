"""Command-line entry point: a thin argparse layer over the stage modules.

Each stage module that offers a command exposes ``register(subparsers)``, which adds its
sub-command and sets ``func`` on the parsed namespace; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from sftknow_eval import __version__
from sftknow_eval.errors import UserError

# Modules that add a sub-command, in pipeline order. Each has register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "sftknow_eval.world.commands",
    "sftknow_eval.data.commands",
    "sftknow_eval.probe.commands",
    "sftknow_eval.select.commands",
    "sftknow_eval.train.commands",
    "sftknow_eval.lm_tasks.commands",
    "sftknow_eval.restore.commands",
    "sftknow_eval.analysis.commands",
    "sftknow_eval.study.commands",
    "sftknow_eval.recipe_commands",
)

PIPELINE = """\
pipeline (docs: README.md):
  facts --probe--> mastery-annotated data --select--> SFT sets
        --train--> fine-tuned checkpoints --lm_eval (tasks/)--> accuracy per mastery bucket
        --restore--> restored variants --lm_eval--> accuracy again
        --kl / updates--> analysis --report--> tables and plots
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftknow-eval",
        description=(
            "Study, and repair, what supervised fine-tuning does to a language model's "
            "factual knowledge (Ye et al., EMNLP 2025), as an extension of lm-eval."
        ),
        epilog=PIPELINE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(title="stages", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as error:
        print(f"sftknow-eval: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as error:  # a path the user gave that cannot be used
        print(f"sftknow-eval: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
