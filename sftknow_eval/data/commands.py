"""The ``data`` command: fetch a real fact dataset into the layout the readers read."""

from __future__ import annotations

import argparse
from pathlib import Path

from sftknow_eval.data.entity_questions import DEFAULT_URL, PAPER_COUNTS

_EQ_DESCRIPTION = f"""\
Download EntityQuestions (Sciavolino et al., EMNLP 2021; MIT license) and write it to --out as
train/, dev/ and test/ folders of P<id>.<split>.json files (24 relations), the layout that
load_facts() and `sftknow-eval probe` read, with a README.md and manifest.json (source URL,
sha256 of the archive, counts, license) beside them.

The archive is checked before anything is written: all 24 relations x 3 splits must be
there, with the official row counts, and every row must load. The output appears only when
complete (built in a temporary folder beside it, then renamed): a failed download or a bad
archive leaves nothing behind. Prints the counts per split and how many in-domain training
facts have an answer already inside the question (flagged in each fact's
meta.answer_in_question).

The raw files hold 78,611 in-domain training, 9,828 in-domain test and 12,247
out-of-domain test facts. Ye et al. report {PAPER_COUNTS['train_in']:,} / {PAPER_COUNTS['test_in']:,} / \
{PAPER_COUNTS['test_out']:,}: exactly the rows
with a single answer, each question kept once per split, which --paper-filter keeps.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="download a real fact dataset (EntityQuestions) into the layout the readers read",
        description="Fetch real fact datasets into local folders that every stage reads.",
    )
    datasets = parser.add_subparsers(title="datasets", metavar="DATASET", required=True)
    eq = datasets.add_parser(
        "entity-questions", help="download EntityQuestions: 24 relations, train/dev/test",
        description=_EQ_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: sftknow-eval data entity-questions --out data/entity_questions",
    )
    eq.add_argument("--out", type=Path, default=Path("data/entity_questions"),
                    help="output folder (default: data/entity_questions, what "
                    "recipes/study/llama3-8b.yaml reads)")
    eq.add_argument("--url", default=DEFAULT_URL,
                    help=f"where the archive is: an http(s):// or file:// URL, or a local zip path "
                    f"(default: {DEFAULT_URL})")
    eq.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    eq.add_argument("--paper-filter", action="store_true",
                    help="keep only the rows Ye et al. count: one answer per row, each question "
                    "once per split")
    eq.set_defaults(func=_entity_questions)


def _entity_questions(args: argparse.Namespace) -> int:
    from sftknow_eval.data import entity_questions

    # The count table is read here, at run time, so a test can run the command on a small archive.
    manifest = entity_questions.fetch_entity_questions(
        args.out, url=args.url, force=args.force, paper_filter=args.paper_filter,
        expected_counts=entity_questions.OFFICIAL_COUNTS,
    )
    print(f"EntityQuestions -> {args.out} ({len(manifest['files'])} files; archive sha256 "
          f"{manifest['archive_sha256'][:16]}...)")
    print(entity_questions.format_counts(manifest))
    print(f'load with: sftknow_eval.readers.load_facts("{args.out}/train")')
    return 0
