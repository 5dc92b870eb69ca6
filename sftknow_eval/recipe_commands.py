"""The ``recipes`` command: list the shipped recipes, study specs, accelerate configs and task
families, print where one lives, and export a recipe that ``trl sft --config`` runs anywhere."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
The files this package ships: SFT recipes (flat TRL configs, `train --recipe NAME`), study specs
(`study NAME`), accelerate configs for several GPUs, and lm-eval task families (an include path
for `lm_eval --include_path`). In a checkout they are the top-level recipes/ and tasks/ folders;
an installed wheel carries the same files inside the package.
"""

EPILOG = """\
examples:
  sftknow-eval recipes list
  sftknow-eval recipes path tiny                     # the tiny SFT recipe
  sftknow-eval recipes path tiny --kind study        # the default study spec
  lm_eval --include_path "$(sftknow-eval recipes path sftknow_tiny)" --tasks sftknow_tiny ...
  sftknow-eval recipes export tiny --out tiny.yaml && trl sft --config tiny.yaml --dataset_name DATA
"""

KIND_CHOICES = ("sft", "study", "accelerate", "tasks")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list, locate and export the shipped recipes, study specs and task families",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every shipped file: kind, name, path",
                                 description="Every shipped file, one per line: kind, name, path.")
    listing.set_defaults(func=_list)

    path = actions.add_parser(
        "path", help="print the path of one shipped file or task family",
        description="Print the path of a shipped file by name: a recipe, study spec or accelerate "
        "config (a YAML file), or a task family (its folder, an lm-eval include path).")
    path.add_argument("name", help="e.g. tiny, llama3-8b, fsdp, sftknow_tiny")
    path.add_argument("--kind", choices=KIND_CHOICES,
                      help="which kind when a name is shipped as several (tiny is an SFT recipe "
                           "and a study spec; default: sft first, then study, accelerate, tasks)")
    path.set_defaults(func=_path)

    export = actions.add_parser(
        "export", help="write a recipe that `trl sft --config` runs from any directory",
        description="Write a copy of an SFT recipe with its paths into this package (the tiny "
        "world's model) made absolute, so `trl sft --config OUT` runs from any working directory.")
    export.add_argument("name", help="a shipped recipe name (tiny) or a recipe file")
    export.add_argument("--out", required=True, help="the YAML file to write")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=_export)


def _list(args: argparse.Namespace) -> int:
    from sftknow_eval.recipe_files import shipped_files

    for item in shipped_files():
        print(f"{item.kind}\t{item.name}\t{item.path}")
    return 0


def _path(args: argparse.Namespace) -> int:
    from sftknow_eval.errors import UserError
    from sftknow_eval.recipe_files import shipped_files

    matches = [f for f in shipped_files()
               if args.name in (f.name, f.path.name) and args.kind in (None, f.kind)]
    if not matches:
        names = sorted({f.name for f in shipped_files() if args.kind in (None, f.kind)})
        kind = f" of kind {args.kind}" if args.kind else ""
        raise UserError(f"nothing shipped is called {args.name!r}{kind} (shipped: {', '.join(names)})")
    matches.sort(key=lambda f: KIND_CHOICES.index(f.kind))
    print(matches[0].path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from sftknow_eval.recipe_files import export_recipe

    target = export_recipe(args.name, args.out, force=args.force)
    print(f"wrote {target}: run it with `trl sft --config {target} --dataset_name <data>`")
    return 0
