"""The ``select`` command: draw SFT training sets from annotated facts (thin layer over select.sets)."""

from __future__ import annotations

import argparse
import json
from typing import Any

DESCRIPTION = """\
Draw an SFT training set from a probe's annotated folder (docs/METHOD.md §3): facts of one mastery
category (or several in equal shares, or 'mixed' = all of the scheme's categories) from the
training split's in-domain relations, balanced across those relations, seeded.

Writes OUT as TRL prompt-completion jsonl with the paper's prompt
("<|question|> {question} <|answer|>" -> " {answer}") and OUT.meta.json (category, requested
and real size, seed, source, base model, scheme, per-relation counts). An existing OUT is not
replaced without --force: a model trained on it records its sha256 in its card.
"""

EPILOG = """\
examples:
  sftknow-eval select --annotated runs/tiny-mastery --category D2 --size 240 --seed 0 --out sets/d2-240.jsonl
  sftknow-eval select --annotated runs/tiny-mastery --category D0,D4 --size 120 --seed 1 --out sets/d0d4.jsonl
  sftknow-eval select --annotated runs/tiny-mastery --category D4 --size all --out sets/d4-all.jsonl
"""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "select", help="draw an SFT set from one mastery category, balanced across relations",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--annotated", default=None,
                        help="a finished probe folder or a Hub dataset id of one (default: the tiny "
                             "world's shipped annotations)")
    parser.add_argument("--category", required=True,
                        help="D0..D4 (ye2025) or HighlyKnown/MaybeKnown/WeaklyKnown/Unknown (slick); "
                             "a comma list for equal shares; 'mixed' for all of the scheme's")
    parser.add_argument("--size", required=True,
                        help="examples to draw: any integer (paper grid 60 120 240 480 960 1920) or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="draw seed (default 0)")
    parser.add_argument("--out", required=True, help="output jsonl; the sidecar is OUT.meta.json")
    parser.add_argument("--allow-smaller", action="store_true",
                        help="when a category holds fewer facts than asked, take them all "
                             "(the real size is recorded in the sidecar) instead of failing")
    parser.add_argument("--split", default="train", help="split to draw from (default train)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing OUT and OUT.meta.json (models trained on the "
                             "old set record its sha256; their cards will no longer match it)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sftknow_eval.probe.annotated import shipped_annotated
    from sftknow_eval.select.sets import select_sft_set

    annotated = args.annotated or shipped_annotated()
    rows, meta = select_sft_set(annotated, args.category, args.size, args.seed, args.out,
                                allow_smaller=args.allow_smaller, split=args.split,
                                overwrite=args.force)
    shown = {k: meta[k] for k in ("category", "size_requested", "size", "seed", "base_model",
                                  "scheme", "per_relation")}
    print(f"wrote {len(rows)} examples to {args.out} (+ .meta.json)")
    print(json.dumps(shown))
    return 0
