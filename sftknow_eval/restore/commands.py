"""The ``restore`` sub-command: argparse flags over :func:`sftknow_eval.restore.restore`."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from sftknow_eval.choose_k import add_choose_arguments, run_choose
from sftknow_eval.errors import UserError
from sftknow_eval.restore.pipeline import DEFAULT_K, RestoreConfig, restore
from sftknow_eval.weights.regions import REGIONS


def parse_k_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {text!r}") \
            from error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="reset the most-changed fine-tuned weights to their base values (one model per k)",
        description=(
            "Parameter restoration (Ye et al., EMNLP 2025, docs/METHOD.md §6). r = |tuned - base| / "
            "(|base| + 1e-8) in float32; within --region, the k% of elements with the largest "
            "r (top), smallest (bottom) or a seeded random k% go back to the base values. "
            "Exact global selection, ties broken by position (tensors in natural name order, "
            "elements row-major). Streams shards; writes <out>/<strategy><k>/ per k."
        ),
    )
    parser.add_argument("--base", required=True, help="base model: Hub id or local folder")
    parser.add_argument("--tuned", required=True, help="fine-tuned model: Hub id or local folder")
    parser.add_argument("--base-revision", default=None, help="Hub revision of --base")
    parser.add_argument("--tuned-revision", default=None, help="Hub revision of --tuned")
    parser.add_argument("--k", type=parse_k_list, default=None,
                        help="percentages, comma-separated (default "
                             f"{','.join(f'{k:g}' for k in DEFAULT_K)})")
    parser.add_argument("--region", default="transformer",
                        help=f"{', '.join(REGIONS)}, or re:<regex> on tensor names "
                             "(default transformer: the layers' q,k,v,o,gate,up,down matrices)")
    parser.add_argument("--strategy", choices=("top", "bottom", "random"), default="top")
    parser.add_argument("--seed", type=int, default=0, help="seed of --strategy random")
    parser.add_argument("--layers", default=None,
                        help="restore whole layer groups instead of a top k%%, e.g. 0-3,4-7 "
                             "(one model per group, named layers0-3 ...)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (one subfolder "
                        "per variant)")
    parser.add_argument("--push-to", default=None, metavar="ORG/PREFIX",
                        help="push each variant to the Hub repo ORG/PREFIX-<variant>, e.g. "
                             "me/llama-restored-top5")
    parser.add_argument("--public", action="store_true", help="create public repos (default "
                        "private)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickle (*.bin) checkpoints; only for files you trust")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs left by a different run in --out")
    parser.add_argument("--chunk-elements", type=int, default=1 << 20, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0,
                        help="worker threads that read chunks and run the compiled element "
                             "loops (default 0: one per core, at most 2)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_choose_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.push_to is not None and args.push_to.count("/") != 1:
        raise UserError(f"--push-to {args.push_to!r}: expected ORG/PREFIX")
    same = {f.name: getattr(args, f.name) for f in fields(RestoreConfig) if hasattr(args, f.name)}
    config = RestoreConfig(**same, private=not args.public, progress=not args.no_progress)
    if args.choose_on:
        return run_choose(config, args)
    if args.push_all:
        raise UserError("--push-all goes with --choose-on (without it every variant is pushed)")
    result = restore(config)
    for name, folder in result.folders.items():
        state = "already complete" if name in result.skipped else "written"
        line = f"{name}\t{folder}\t{state}"
        if name in result.pushed:
            line += f"\t{result.pushed[name]}"
        print(line)
    return 0

