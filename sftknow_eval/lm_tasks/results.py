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


def _results_in(path: Path) -> list[Path]:
    """The lm-eval results JSON of one given path: the file itself, or the newest
    ``results_*.json`` of every folder under it."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"no such lm-eval output: {path}")
    per_folder: dict[Path, list[Path]] = defaultdict(list)
    for file in path.rglob("results_*.json"):
        if file.is_file():
            per_folder[file.parent].append(file)
    return sorted(sorted(files)[-1] for files in per_folder.values())


def find_results_files(paths: list[str | Path]) -> list[Path]:
    """Every lm-eval results JSON under ``paths`` (the newest one per folder); a UserError
    naming each given folder that holds none."""
    found: list[Path] = []
    empty: list[str] = []
    for raw in paths:
        files = _results_in(Path(raw))
        if not files:
            empty.append(str(raw))
        found.extend(f for f in files if f.resolve() not in {g.resolve() for g in found})
    if empty:
        raise UserError("no lm-eval results_*.json under " + ", ".join(empty)
                        + " (give lm_eval --output_path folders or results files)")
    return sorted(found)


def recorded_model(data: dict[str, Any]) -> str | None:
    """The model an lm-eval results file names: ``pretrained=`` of ``config.model_args``,
    else lm-eval's ``model_name``; None when it records neither."""
    args = (data.get("config") or {}).get("model_args")
    if isinstance(args, dict) and args.get("pretrained"):
        return str(args["pretrained"])
    if isinstance(args, str):
        match = re.search(r"pretrained=([^,]+)", args)
        if match:
            return match.group(1)
    name = data.get("model_name")
    return str(name) if name else None


def _model_name(data: dict[str, Any], path: Path) -> str:
    return recorded_model(data) or path.parent.name


def read_results_file(path: Path) -> dict[str, Any]:
    """One lm-eval results file as a dict; a UserError naming it when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data["results"], dict):
            raise TypeError("no 'results' object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not an lm-eval results file ({error})") from None
    return data


def read_results(path: Path) -> list[FamilyScores]:
    """Our task families found in one lm-eval results file."""
    data = read_results_file(path)
    results = data["results"]
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
    """Our families' scores from every given path; a UserError naming each path that yields
    none (no results files, or results of other tasks only)."""
    find_results_files(paths)  # names every folder without results files, all at once
    scores: list[FamilyScores] = []
    seen: set[Path] = set()
    without: list[str] = []
    for raw in paths:
        files = [f for f in _results_in(Path(raw)) if f.resolve() not in seen]
        found = [s for file in files for s in read_results(file)]
        seen.update(f.resolve() for f in files)
        if not found and files:
            without.append(str(raw))
        scores.extend(found)
    if without:
        raise UserError("the results under " + ", ".join(without) + " hold none of our task "
                        "families (groups named <family>_id / <family>_ood with "
                        "<group>_<bucket> tasks)")
    return scores


def check_table_file(path: str | Path) -> Path:
    """A UserError when ``path`` cannot take a table file (a folder, or under a file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--save {path} is a folder; give a file name, e.g. {path / 'table.md'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--save {path}: {parent} is a file, not a folder")
            break
    return path


def save_table(text: str, path: str | Path) -> Path:
    """Write a rendered table to the file ``path`` (its folder is created)."""
    path = check_table_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        raise UserError(f"--save {path}: cannot write the table ({error.strerror})") from None
    return path


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
