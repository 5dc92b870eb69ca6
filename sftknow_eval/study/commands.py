"""The ``study`` command: run a study spec end to end (thin layer over ``study.runner``)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run the whole study of a spec (recipes/study/*.yaml): probe -> select -> train -> evaluate
(lm-eval) -> KL -> restore -> evaluate -> choose k on dev (restore.choose_on) -> report, one
cell at a time with a progress bar.

Each cell writes <out>/<stage>/<name>/ atomically, with cell.json (its config hash) written
last; a cell finished with the same config hash is never redone, so an interrupted study
resumes where it stopped and a changed spec reruns only the cells it changes (and what
depends on them). The report is <out>/report/report.md with its PNGs.
"""

EPILOG = """\
examples:
  sftknow-eval study                                  # the tiny world (recipes/study/tiny.yaml):
                                                      # 15 fine-tunes, about 11 min on 2 CPU cores
  sftknow-eval study tiny-sizes                       # the tiny world's full size grid:
                                                      # 50 fine-tunes, about an hour on 2 cores
  sftknow-eval study recipes/study/llama3-8b.yaml --dry-run
  sftknow-eval study llama3-8b --shard 2/8            # machine 2 of 8 runs every 8th model
  sftknow-eval study llama3-8b                        # after copying the shards' folders in:
                                                      # finds every cell done, writes the report
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from sftknow_eval.recipe_files import shipped_files

    specs = ", ".join(f.name for f in shipped_files() if f.kind == "study")
    parser = subparsers.add_parser(
        "study", help="run the whole pipeline from a study spec and write the report",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default=None,
                        help=f"study spec YAML, or a shipped spec name ({specs}); "
                             "default: recipes/study/tiny.yaml")
    parser.add_argument("--out", default=None,
                        help="run folder (default: the spec's `out`, else runs/study/<name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cells (done / changed / todo) and run nothing")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only shard I of N: every N-th fine-tuned model with its "
                             "evaluations, KL and restorations (plus the shared probe and "
                             "task cells); no report")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sftknow_eval.study.plan import parse_shard
    from sftknow_eval.study.runner import describe_plan, run_study
    from sftknow_eval.study.spec import load_spec

    spec = load_spec(args.spec)
    shard = parse_shard(args.shard) if args.shard else None
    if not args.dry_run:
        _quiet_libraries(args.verbose)
    result = run_study(spec, args.out, shard=shard, dry_run=args.dry_run,
                       progress=not args.no_progress)
    if args.dry_run:
        print(describe_plan(spec, result.run_dir, result.cells, shard))
        return 0
    done = sum(1 for state in result.status.values() if state == "done")
    print(f"study {spec.name}: {len(result.ran())} cells run, {done} already done, "
          f"{len(result.errors)} failed in {result.wall_seconds:.1f} s -> {result.run_dir}")
    per_stage: dict[str, list[float]] = {}
    for cell_id, seconds in result.seconds.items():
        per_stage.setdefault(cell_id.split("/")[0], []).append(seconds)
    if per_stage:
        print("  " + ", ".join(f"{stage} {len(times)} cells {sum(times):.1f} s"
                               for stage, times in per_stage.items()))
    for cell_id, error in result.errors.items():
        print(f"  failed: {cell_id}: {error}")
    blocked = [c for c, s in result.status.items() if s == "blocked"]
    if blocked:
        print(f"  blocked by a failure: {len(blocked)} cells")
    if result.report:
        print(f"report: {result.report}")
    return 0 if result.ok else 1


def _quiet_libraries(verbose: bool) -> None:
    """One progress bar for the study: the stages' own bars and per-call warnings (dataset
    maps, lm-eval's task notes, generation-length notices) are silenced unless --verbose."""
    if verbose:
        return
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lm_eval", "lm-eval", "matplotlib", "sftknow_eval.train.sft"):
        logging.getLogger(name).setLevel(logging.ERROR)
