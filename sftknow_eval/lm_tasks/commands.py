"""The ``tasks``, ``results`` and ``card`` commands: write lm-eval task families, read their
results into the paper's table, and put the scores on a model card."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    tasks = subparsers.add_parser(
        "tasks", help="write lm-eval tasks (CBQA per mastery bucket) for annotated data",
        description="lm-eval task families: one task per mastery bucket and domain, groups "
        "whose score is the unweighted mean over buckets (the paper's Acc).")
    actions = tasks.add_subparsers(title="actions", metavar="ACTION", required=True)
    write = actions.add_parser(
        "write", help="write a task family for an annotated dataset",
        description="Write a self-contained lm-eval task family (YAMLs, utils.py, bucket data) "
        "for probe output; run it with `lm_eval --include_path OUT --tasks NAME`.")
    write.add_argument("--annotated", required=True,
                       help="probe output folder, Hub dataset id, or 'shipped' (the tiny world's)")
    write.add_argument("--name", required=True,
                       help="family name: the top group; subgroups NAME_id and NAME_ood")
    write.add_argument("--out", type=Path, required=True, help="folder to write (an include path)")
    write.add_argument("--splits", default="test",
                       help="comma-separated fact splits to include (default: test)")
    write.add_argument("--force", action="store_true",
                       help="write into a non-empty OUT: replaces only the family's own files "
                       "(YAMLs, data/, utils.py, family.json, also those of its previous "
                       "version); other files in OUT are kept")
    write.set_defaults(func=_write)

    results = subparsers.add_parser(
        "results", help="print the paper-style table from lm-eval output folders",
        description="Read lm-eval results JSON (and samples files when present) of our task "
        "families: per-bucket accuracy, Acc in-domain and Acc out-of-domain, one row per "
        "model and family.")
    results.add_argument("paths", nargs="+",
                         help="lm-eval --output_path folders or results files; each must hold "
                         "results of one of our task families")
    results.add_argument("--format", choices=("md", "csv", "json"), default="md")
    results.add_argument("--save", type=Path, help="also write the table to this file "
                         "(not a folder; missing parent folders are created)")
    results.set_defaults(func=_results)

    card = subparsers.add_parser("card", help="model card helpers",
                                 description="Model card helpers.")
    card_actions = card.add_subparsers(title="actions", metavar="ACTION", required=True)
    add = card_actions.add_parser(
        "add-results", help="write per-bucket scores into a model card's eval results",
        description="Put the per-bucket CBQA scores of lm-eval output into the model-index "
        "of a model card: a local model folder's README.md, or a Hub repo's (needs HF_TOKEN). "
        "The results must be for that model (lm-eval's pretrained=...); each (task, dataset, "
        "metric) appears once, the newest results winning. A card whose YAML metadata does not "
        "parse is refused, not rewritten.")
    add.add_argument("--results", nargs="+", required=True, help="lm-eval output folders or files")
    add.add_argument("--model", required=True, help="model folder or Hub repo id")
    add.add_argument("--force", action="store_true",
                     help="write results whose recorded model is not --model (or is not recorded)")
    add.set_defaults(func=_add_results)


def _write(args: argparse.Namespace) -> int:
    from sftknow_eval.errors import UserError
    from sftknow_eval.lm_tasks.family import write_family
    from sftknow_eval.probe.annotated import load_annotated, resolve_annotated
    from sftknow_eval.probe.categories import CATEGORIES

    facts, model_key, scheme = load_annotated(resolve_annotated(args.annotated))
    if scheme not in CATEGORIES:
        raise UserError(f"unknown mastery scheme {scheme!r} in {args.annotated}; known: "
                        f"{', '.join(CATEGORIES)}")
    summary = write_family(facts, model_key, scheme, CATEGORIES[scheme], args.name, args.out,
                           splits=tuple(s.strip() for s in args.splits.split(",")),
                           force=args.force)
    for group, counts in summary["items"].items():
        shown = ", ".join(f"{b} {n}" if n else f"{b} absent" for b, n in counts.items())
        print(f"{group}: {shown}")
    print(f"wrote {args.out}; run: lm_eval --include_path {args.out} --tasks {args.name} ...")
    return 0


def _results(args: argparse.Namespace) -> int:
    from sftknow_eval.lm_tasks.results import check_table_file, collect, render, save_table

    if args.save:
        check_table_file(args.save)  # before any reading
    text = render(collect(args.paths), args.format)
    print(text)
    if args.save:
        save_table(text, args.save)
    return 0


def _add_results(args: argparse.Namespace) -> int:
    from sftknow_eval.lm_tasks.card_results import add_results
    from sftknow_eval.lm_tasks.results import collect

    print(add_results(args.model, collect(args.results), force=args.force))
    return 0
