"""The report's "restored, k chosen on dev" section: per restored training category and size,
the test accuracy of the variant each seed's choose cell picked on dev data, beside the
unrestored model's, with the chosen k of every seed and a plain verdict per category.

The numbers are read from the finished cells: ``choose/<model>`` says which k was chosen (on
dev facts only); the test accuracies come from the eval cells that already scored the
fine-tune (k = 0) and each restored variant on the test family.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from sftknow_eval.study.plan import model_name
from sftknow_eval.study.spec import StudySpec

Value = Callable[[str, str], "float | None"]  # (eval cell name, domain) -> test accuracy


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _points(after: float | None, before: float | None) -> str:
    return "–" if after is None or before is None else f"{100 * (after - before):+.1f}"


def chosen_rows(spec: StudySpec, records: dict[str, dict[str, Any]],
                value: Value) -> list[dict[str, Any]]:
    """One row per restored (category, size) with a finished choose cell: the chosen k per
    seed and the mean over those seeds of the unrestored and the chosen model's test Acc
    (in-domain ``id``, out-of-domain ``ood``) and of their dev Acc."""
    restore = spec.restore
    if restore is None or restore.choose_on is None:
        return []
    rows = []
    for category in restore.categories or spec.grid.categories:
        for size in spec.restored_sizes():
            seeds: list[tuple[int, dict[str, Any]]] = []
            for seed in restore.seeds or spec.grid.seeds:
                record = records.get(f"choose/{model_name(category, size, seed)}")
                if record is not None:
                    seeds.append((seed, record["outputs"]))
            if not seeds:
                continue
            row: dict[str, Any] = {"category": category, "size": size,
                                   "chosen_k": {seed: out["chosen_k"] for seed, out in seeds}}
            for domain in ("id", "ood"):
                pairs = [(value(out["tuned"], domain), value(out["chosen_model"], domain))
                         for _, out in seeds]
                pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
                row[f"unrestored_{domain}"] = _mean([b for b, _ in pairs])
                row[f"chosen_{domain}"] = _mean([a for _, a in pairs])
            dev = [(out["dev_acc"].get("tuned"), out["dev_acc"].get(out["chosen"]))
                   for _, out in seeds]
            row["unrestored_dev"] = _mean([b for b, _ in dev if b is not None])
            row["chosen_dev"] = _mean([a for _, a in dev if a is not None])
            rows.append(row)
    return rows


def _verdict(row: dict[str, Any]) -> str:
    name = f"{row['category']}-{row['size']}"
    if all(k == 0 for k in row["chosen_k"].values()):
        return (f"{name}: no k beat the unrestored model on dev for any seed, so the unrestored "
                "model is kept and test accuracy is unchanged")
    parts = []
    for domain, label in (("id", "in-domain"), ("ood", "out-of-domain")):
        before, after = row[f"unrestored_{domain}"], row[f"chosen_{domain}"]
        if before is None or after is None:
            parts.append(f"{label} not measured")
        elif after > before:
            parts.append(f"beat the unrestored model {label} ({_points(after, before)} points)")
        elif after < before:
            parts.append(f"fell below the unrestored model {label} ({_points(after, before)} points)")
        else:
            parts.append(f"tied with it {label}")
    return f"{name}: choosing on dev " + ", ".join(parts)


def chosen_section(spec: StudySpec, records: dict[str, dict[str, Any]], value: Value) -> list[str]:
    """Markdown lines of the section (none when the spec chooses no k)."""
    restore = spec.restore
    if restore is None or restore.choose_on is None:
        return []
    rows = chosen_rows(spec, records, value)
    ks = ", ".join(f"{k:g}" for k in sorted(restore.k))
    lines = ["## Restored, k chosen on dev", "",
             f"For each restored fine-tune, k was chosen among the unrestored model (k = 0) and "
             f"k = {ks}% by the highest macro Acc over the mastery buckets of the "
             f"`{restore.choose_on}` split (ties to the smaller k; `choose/<model>/choice.json`). "
             "Test data played no part in the choice: the test accuracies below are those the "
             "eval cells measured for the chosen variant and for the unrestored model "
             "(%, mean over seeds).", ""]
    if not rows:
        return lines + ["No choose cell has finished yet.", ""]
    lines += ["| train | size | k chosen per seed | dev Acc: unrestored -> chosen | unrestored: "
              "Acc / Acc OOD | restored, k chosen on dev: Acc / Acc OOD | change, points: "
              "Acc / Acc OOD |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        chosen_k = ", ".join(f"s{seed}: {k:g}" for seed, k in row["chosen_k"].items())
        lines.append(
            f"| {row['category']} | {row['size']} | {chosen_k} | {_pct(row['unrestored_dev'])} -> "
            f"{_pct(row['chosen_dev'])} | {_pct(row['unrestored_id'])} / "
            f"{_pct(row['unrestored_ood'])} | {_pct(row['chosen_id'])} / {_pct(row['chosen_ood'])} "
            f"| {_points(row['chosen_id'], row['unrestored_id'])} / "
            f"{_points(row['chosen_ood'], row['unrestored_ood'])} |")
    lines += [""] + [f"- {_verdict(row)}." for row in rows]
    return lines + [""]
