"""The ``world`` command: build a tiny world from its seed, or describe the shipped one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sftknow_eval.world.shipped import SHIPPED_WORLD


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "world",
        help="build or describe the embedded tiny world (knowledge base, corpus, base model)",
        description="The tiny world: a synthetic knowledge base over the 24 EntityQuestions "
        "relations and a tiny Llama model pretrained on it, shipped in the package so every "
        "stage runs offline on a CPU.",
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)

    build = actions.add_parser(
        "build", help="build a world from its seed (knowledge base, corpus, tokenizer, model)",
        description="Generate the knowledge base and corpus, build the tokenizer, pretrain the "
        "base model, measure its graded and extractable knowledge, and write it all to --out. "
        "The same seed reproduces the same knowledge base and corpus. The default world takes "
        "about 25 minutes on 2 CPU cores (--quick: seconds).",
    )
    build.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    build.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default: the shipped world, {SHIPPED_WORLD}; "
                       "replacing it, probe annotations included, needs --force)")
    build.add_argument("--quick", action="store_true",
                       help="a small world for tests: builds in well under a minute")
    build.add_argument("--no-measure", action="store_true",
                       help="skip the knowledge measurements (faster)")
    build.add_argument("--force", action="store_true", help="replace an existing output folder")
    build.set_defaults(func=_build)

    info = actions.add_parser(
        "info", help="print a world's size and a sample of what its model knows and does not",
        description="Describe a built world: fact counts, corpus and model size, the measured "
        "knowledge, and a live sample of the base model's greedy answers.",
    )
    info.add_argument("--world", type=Path, default=None,
                      help="a built world's folder (default: the shipped world)")
    info.add_argument("--sample", type=int, default=8, help="facts to sample (default: 8)")
    info.add_argument("--seed", type=int, default=0, help="seed for choosing the sample")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(func=_info)


def _build(args: argparse.Namespace) -> int:
    from sftknow_eval.world.build import BuildRecipe, build_world

    recipe = BuildRecipe.quick(args.seed) if args.quick else BuildRecipe.full(args.seed)
    out = args.out or SHIPPED_WORLD
    manifest = build_world(out, recipe, force=args.force, run_measurements=not args.no_measure)
    print(f"built the tiny world in {manifest['build_seconds']} s -> {out}")
    print(json.dumps(manifest["counts"]), json.dumps(manifest["measurements"], indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    from sftknow_eval.world.info import describe_world

    print(describe_world(args.world, sample=args.sample, seed=args.seed, as_json=args.json))
    return 0

