"""The ``kl`` and ``updates`` commands: the token-level and parameter-level lenses."""

from __future__ import annotations

import argparse
from pathlib import Path


def _positive_int(text: str) -> int:
    """argparse type of a count: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    kl = subparsers.add_parser(
        "kl", help="first-answer-token KL(tuned || base) on well-known facts (docs/METHOD.md §5)",
        description="For each fact of a category (default D4) the base model sees its "
        "relation's best mapping template and the tuned model the SFT prompt; both first-token "
        "distributions are renormalised over the tuned model's top-10 ids and KL(tuned || base) "
        "is scored. Writes kl.jsonl and kl_summary.json per tuned model, and kl_vs_size.png when "
        "several tuned models carry training metadata.")
    kl.add_argument("--base", required=True, help="base model: folder or Hub id")
    kl.add_argument("--tuned", required=True, nargs="+", help="fine-tuned model(s): folder or Hub id")
    kl.add_argument("--annotated", required=True,
                    help="probe output folder (mastery of the base model), Hub dataset id, or "
                    "'shipped'")
    kl.add_argument("--category", default="D4", help="mastery category to analyse, or 'all'")
    kl.add_argument("--split", default="test", help="fact split to analyse (default: test)")
    kl.add_argument("--out", type=Path, required=True, help="output folder")
    kl.add_argument("--full-vocab", action="store_true", help="full-vocabulary KL instead")
    kl.add_argument("--templates", type=_positive_int, default=None,
                    help="consider only the first N mapping templates (default: all)")
    kl.add_argument("--batch-size", type=_positive_int, default=64,
                    help="prompts per forward pass (default 64)")
    kl.set_defaults(func=_kl)

    updates = subparsers.add_parser(
        "updates", help="statistics of the relative update of every weight (docs/METHOD.md §6)",
        description="Streams both checkpoints (one tensor at a time, through restore's reader) "
        "and writes updates.json (concentration curve for k = 1..60, thresholds, per-layer and "
        "per-module shares of the top-k elements, mass per layer / module, histogram of log10 r) "
        "and PNG plots.")
    updates.add_argument("--base", required=True, help="base model: folder or Hub id")
    updates.add_argument("--tuned", required=True, help="fine-tuned model: folder or Hub id")
    updates.add_argument("--region", default="transformer",
                         help="transformer (default, the paper's), attention, mlp, embedding, all, "
                         "or re:<regex>")
    updates.add_argument("--out", type=Path, required=True, help="output folder")
    updates.add_argument("--no-progress", action="store_true", help="hide progress bars")
    updates.set_defaults(func=_updates)


def _kl(args: argparse.Namespace) -> int:
    from sftknow_eval.analysis.checks import check_out_folder, strict_json
    from sftknow_eval.analysis.kl import run_kl
    from sftknow_eval.analysis.plots import plot_kl_vs_size
    from sftknow_eval.probe.annotated import resolve_annotated

    check_out_folder(args.out)  # before any download or model load
    annotated = resolve_annotated(args.annotated)
    category = None if args.category == "all" else args.category
    rows = []
    print("tuned\tfacts\tmean KL\tmedian KL\ttuned top-1 = answer")
    for index, tuned in enumerate(args.tuned):
        target = args.out if len(args.tuned) == 1 else args.out / f"{index:02d}-{Path(tuned).name}"
        summary = run_kl(args.base, tuned, annotated, category=category, split=args.split,
                         out=target, full_vocab=args.full_vocab, templates=args.templates,
                         batch_size=args.batch_size)
        print(f"{tuned}\t{summary['facts']}\t{summary['mean']:.4f}\t{summary['median']:.4f}\t"
              f"{summary['tuned_top1_is_answer']:.1%}")
        training = summary["training"]
        if {"category", "size"} <= set(training):
            rows.append({**training, "kl_mean": summary["mean"], "tuned": tuned})
    if len(rows) >= 2:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kl_by_training.json").write_text(
            strict_json(rows, "kl_by_training.json", indent=2) + "\n", "utf-8")
        print(f"plot: {plot_kl_vs_size(rows, args.out / 'kl_vs_size.png')}")
    return 0


def _updates(args: argparse.Namespace) -> int:
    from sftknow_eval.analysis.checks import check_out_folder
    from sftknow_eval.analysis.updates import run_updates

    check_out_folder(args.out)  # before any model is read
    stats = run_updates(args.base, args.tuned, args.out, region=args.region,
                        progress=not args.no_progress)
    print(f"{stats['elements']:,} elements in {stats['tensors']} tensors of region "
          f"{stats['region']}; mean r {stats['mean_r']:.4g}")
    for k in ("1", "10", "20"):
        print(f"top {k}% of elements hold {100 * stats['concentration'][k]:.1f}% of summed r "
              f"(threshold r {stats['threshold_r'].get(k, float('nan')):.4g})")
    shares = ", ".join(f"{m} {100 * v:.1f}%" for m, v in stats["module_shares"]["10"].items())
    print(f"top 10% by module: {shares}")
    print(f"wrote {args.out}/updates.json and PNG plots")
    return 0
