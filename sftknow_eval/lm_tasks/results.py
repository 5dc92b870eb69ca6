"""Reads lm-eval's own results JSON (and samples files when present) for our task families and
renders the paper's table: accuracy per mastery bucket, Acc in-domain, Acc out-of-domain.

Nothing is recomputed from scratch: bucket and group scores are lm-eval's ``acc,none`` values
(the group's is the unweighted mean over its buckets). Samples files, when present, add the
per-relation accuracy, which lm-eval does not report.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError

_METRIC = "acc,none"


@dataclass
class FamilyScores:
    """One model's scores on one task family."""

    model: str
    family: str
    source: str
    buckets: dict[str, dict[str, float | None]] = field(default_factory=dict)  # domain -> b -> acc
    acc: dict[str, float | None] = field(default_factory=dict)  # domain -> group acc
    acc_per_item: dict[str, float | None] = field(default_factory=dict)
    exact_match: dict[str, float | None] = field(default_factory=dict)
    items: dict[str, dict[str, int]] = field(default_factory=dict)
    per_relation: dict[str, dict[str, float]] = field(default_factory=dict)


def find_results_files(paths: list[str | Path]) -> list[Path]:
    """Every lm-eval results JSON under ``paths`` (the newest one per folder)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            per_folder: dict[Path, list[Path]] = defaultdict(list)
            for file in path.rglob("results_*.json"):
                per_folder[file.parent].append(file)
            found.extend(sorted(files)[-1] for files in per_folder.values())
        else:
            raise UserError(f"no such lm-eval output: {path}")
    if not found:
        raise UserError("no lm-eval results_*.json found under " + ", ".join(map(str, paths)))
    return sorted(found)


def _model_name(data: dict[str, Any], path: Path) -> str:
    args = (data.get("config") or {}).get("model_args")
    if isinstance(args, dict) and args.get("pretrained"):
        return str(args["pretrained"])
    if isinstance(args, str):
        match = re.search(r"pretrained=([^,]+)", args)
        if match:
            return match.group(1)
    return data.get("model_name") or path.parent.name


def read_results(path: Path) -> list[FamilyScores]:
    """Our task families found in one lm-eval results file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        results = data["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not an lm-eval results file ({error})") from None
    subtasks: dict[str, list[str]] = data.get("group_subtasks", {})
    model = _model_name(data, path)
    families: dict[str, FamilyScores] = {}
    for group, children in subtasks.items():
        match = re.fullmatch(r"(?P<family>.+)_(?P<domain>id|ood)", group)
        if not match or not children:
            continue
        family, domain = match.group("family"), match.group("domain")
        prefix = f"{group}_"
        if not all(child.startswith(prefix) for child in children):
            continue
        scores = families.setdefault(family, FamilyScores(model, family, str(path)))
        group_result = results.get(group, {})
        scores.acc[domain] = group_result.get(_METRIC)
        scores.acc_per_item[domain] = group_result.get("acc_per_item,none")
        scores.exact_match[domain] = group_result.get("exact_match,none")
        scores.buckets[domain] = {c[len(prefix):]: results.get(c, {}).get(_METRIC)
                                  for c in children}
        scores.items[domain] = {
            c[len(prefix):]: int((data.get("n-samples", {}).get(c) or {}).get("effective", 0))
            for c in children
        }
        scores.per_relation.update(_per_relation(path, children, domain))
    return list(families.values())


def _per_relation(results_path: Path, tasks: list[str], domain: str) -> dict[str, dict[str, float]]:
    stamp = results_path.stem.removeprefix("results_")
    correct: dict[str, list[int]] = defaultdict(list)
    for task in tasks:
        samples = results_path.parent / f"samples_{task}_{stamp}.jsonl"
        if not samples.is_file():
            return {}
        for line in samples.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            correct[row["doc"]["relation"]].append(int(row["acc"]))
    return {f"{domain}:{relation}": {"acc": sum(v) / len(v), "items": len(v)}
            for relation, v in sorted(correct.items())}


def collect(paths: list[str | Path]) -> list[FamilyScores]:
    scores = [s for file in find_results_files(paths) for s in read_results(file)]
    if not scores:
        raise UserError("the results hold none of our task families (groups named <family>_id "
                        "/ <family>_ood with <group>_<bucket> tasks)")
    return scores


def _columns(scores: list[FamilyScores]) -> list[str]:
    buckets: list[str] = []
    for score in scores:
        for bucket in score.buckets.get("id", {}):
            if bucket not in buckets:
                buckets.append(bucket)
    known = ["D0", "D1", "D2", "D3", "D4", "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"]
    buckets.sort(key=lambda b: known.index(b) if b in known else len(known))
    # An absent bucket of one model stays a column when another model has it; the paper's
    # ye2025 columns are always shown.
    if any(b.startswith("D") for b in buckets):
        buckets = ["D0", "D1", "D2", "D3", "D4"] + [b for b in buckets if not b.startswith("D")]
    return buckets


def table_rows(scores: list[FamilyScores]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, family, each in-domain bucket, Acc, Acc OOD (in percent)."""
    buckets = _columns(scores)
    header = ["model", "family", *buckets, "Acc", "Acc OOD"]
    rows = []
    for score in scores:
        cells = [score.model, score.family]
        for bucket in buckets:
            cells.append(_percent(score.buckets.get("id", {}).get(bucket, None),
                                  bucket in score.buckets.get("id", {})))
        cells.append(_percent(score.acc.get("id"), "id" in score.acc))
        cells.append(_percent(score.acc.get("ood"), "ood" in score.acc))
        rows.append(cells)
    return header, rows


def _percent(value: float | None, present: bool) -> str:
    if not present or value is None:
        return "absent"
    return f"{100 * value:.2f}"


def render(scores: list[FamilyScores], fmt: str = "md") -> str:
    """The table as Markdown, CSV or JSON (JSON carries every number, unrounded)."""
    if fmt == "json":
        return json.dumps([score.__dict__ for score in scores], indent=2)
    header, rows = table_rows(scores)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt != "md":
        raise UserError(f"unknown format {fmt!r}; choose md, csv or json")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
