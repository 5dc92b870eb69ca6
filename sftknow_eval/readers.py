"""Readers that turn fact sources into ``facts.Fact`` lists: EntityQuestions files, our jsonl,
and ``datasets`` datasets (in memory, saved to disk, or a Hub dataset id).

``load_facts(source)`` picks the reader from what ``source`` is. Every reader validates each
row and raises ``FactFormatError`` naming the file, the line (or row index) and the field;
with ``skip_bad=True`` bad rows are skipped and their count is logged.

EntityQuestions facts carry two ``meta`` entries: ``answer_count`` (the length of the row's
``answers`` list as written in the file) and ``answer_in_question`` (True when an accepted
answer already occurs in the question, by ``matching.contains_answer``, e.g. "What is the
capital of Gmina Kiernozia?" -> "Kiernozia").
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from sftknow_eval.errors import FactFormatError
from sftknow_eval.facts import Fact, fact_from_dict, read_jsonl, report_skipped
from sftknow_eval.matching import contains_answer
from sftknow_eval.relations import RELATIONS

logger = logging.getLogger(__name__)

# EntityQuestions names its files "<relation>.<split>.json" (a JSON list) or ".jsonl".
_EQ_NAME = re.compile(r"^(?P<relation>P\d+)\.(?P<split>[A-Za-z]+)\.jsonl?$")


def read_entity_questions_file(path: str | os.PathLike[str], *, skip_bad: bool = False) -> list[Fact]:
    """Read one EntityQuestions file (``P17.train.json`` or ``.jsonl``).

    Each row is ``{"question": ..., "answers": [...]}``; the relation and split come from the
    file name, the subject is recovered from the relation's question template, and the
    first answer is the object (the others are its aliases).
    """
    path = Path(path)
    match = _EQ_NAME.match(path.name)
    if not match:
        raise FactFormatError(
            str(path), None, None, "not an EntityQuestions file name (expected e.g. P17.train.json)"
        )
    relation_id, split = match.group("relation"), match.group("split")
    if relation_id not in RELATIONS:
        raise FactFormatError(str(path), None, "relation", f"unknown relation {relation_id!r}")
    facts: list[Fact] = []
    skipped = 0
    for line, row in _eq_rows(path):
        try:
            facts.append(_eq_fact(row, relation_id, split, path, line, len(facts)))
        except FactFormatError:
            if not skip_bad:
                raise
            skipped += 1
    report_skipped(path, skipped)
    return facts


def _eq_rows(path: Path) -> list[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                # Kept in place of the row, raised (or skipped) when the row is read.
                rows.append((number, FactFormatError(str(path), number, None, f"invalid JSON: {error}")))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FactFormatError(str(path), error.lineno, None, f"invalid JSON: {error.msg}") from None
    if not isinstance(data, list):
        raise FactFormatError(str(path), None, None, "expected a JSON list of {question, answers}")
    # A JSON list has no per-row line numbers that survive parsing; report the 1-based item.
    return [(index, row) for index, row in enumerate(data, start=1)]


def _eq_fact(row: Any, relation_id: str, split: str, path: Path, line: int, index: int) -> Fact:
    where = str(path)
    unit = "line" if path.suffix == ".jsonl" else "item"
    if isinstance(row, FactFormatError):
        raise row
    if not isinstance(row, dict):
        raise FactFormatError(where, line, None, "expected an object with question and answers", unit)
    question = row.get("question")
    if question is None:
        raise FactFormatError(where, line, "question", "missing field", unit)
    if not isinstance(question, str) or not question.strip():
        raise FactFormatError(where, line, "question", "expected a non-empty string", unit)
    answers = row.get("answers")
    if answers is None:
        raise FactFormatError(where, line, "answers", "missing field", unit)
    if not isinstance(answers, list):
        raise FactFormatError(where, line, "answers", f"expected list, got {type(answers).__name__}", unit)
    if not answers:
        raise FactFormatError(where, line, "answers", "empty answer list", unit)
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise FactFormatError(where, line, "answers", "every answer must be a non-empty string", unit)
    relation = RELATIONS[relation_id]
    subject = relation.subject_from_question(question)
    if subject is None:
        templates = " or ".join(repr(t) for t in relation.questions)
        noun = "template" if len(relation.questions) == 1 else "templates"
        raise FactFormatError(
            where, line, "question", f"does not match the {relation_id} {noun} {templates}", unit,
        )
    return Fact(
        id=f"{relation_id}.{split}.{index:06d}",
        relation=relation_id,
        subject=subject,
        object=answers[0],
        aliases=list(dict.fromkeys(answers)),
        question=question.strip(),
        split=split,
        domain=relation.domain,
        meta={"answer_count": len(answers),
              "answer_in_question": contains_answer(question, answers)},
    )


def read_entity_questions_dir(
    folder: str | os.PathLike[str], *, splits: tuple[str, ...] | None = None, skip_bad: bool = False
) -> list[Fact]:
    """Read every ``P*.<split>.json[l]`` file below ``folder`` (EntityQuestions' layout)."""
    files = sorted(p for p in Path(folder).rglob("P*.*") if _EQ_NAME.match(p.name))
    if splits is not None:
        files = [p for p in files if _EQ_NAME.match(p.name).group("split") in splits]
    if not files:
        raise FileNotFoundError(f"no EntityQuestions files (P17.train.json, ...) under {folder}")
    facts: list[Fact] = []
    for path in files:
        facts.extend(read_entity_questions_file(path, skip_bad=skip_bad))
    given_away = sum(bool(fact.meta.get("answer_in_question")) for fact in facts)
    logger.info("read %d EntityQuestions facts from %s; %d (%.1f%%) have an answer inside the "
                "question (meta.answer_in_question)", len(facts), folder, given_away,
                100.0 * given_away / len(facts) if facts else 0.0)
    return facts


def read_dataset(dataset: Any, *, name: str = "<dataset>", skip_bad: bool = False) -> list[Fact]:
    """Read facts from a ``datasets.Dataset`` whose columns follow our schema."""
    facts: list[Fact] = []
    skipped = 0
    for index, row in enumerate(dataset):
        row = dict(row)
        for key in ("mastery", "meta"):
            if isinstance(row.get(key), str):  # stored as JSON text to keep Arrow columns simple
                row[key] = json.loads(row[key]) if row[key] else {}
        try:
            facts.append(fact_from_dict(row, path=name, line=index, unit="row"))
        except FactFormatError:
            if not skip_bad:
                raise
            skipped += 1
    report_skipped(name, skipped)
    return facts


# What a missing source's error suggests (the data command writes the readers' layout).
EQ_HINT = "to download EntityQuestions run `sftknow-eval data entity-questions --out DIR`"


def load_facts(source: Any, *, split: str | None = None, skip_bad: bool = False) -> list[Fact]:
    """Load facts from any supported source.

    ``source`` may be a ``datasets.Dataset``; a path to our jsonl file, an EntityQuestions file
    or folder, or a folder written by ``Dataset.save_to_disk``; or a Hub dataset id
    (``org/name``, loaded with ``datasets.load_dataset``; ``split`` picks the split).
    """
    if not isinstance(source, (str, os.PathLike)):
        return read_dataset(source, skip_bad=skip_bad)
    path = Path(source)
    if path.is_file():
        if _EQ_NAME.match(path.name):
            return read_entity_questions_file(path, skip_bad=skip_bad)
        return read_jsonl(path, skip_bad=skip_bad)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            import datasets

            return read_dataset(datasets.load_from_disk(str(path)), name=str(path), skip_bad=skip_bad)
        if any(_EQ_NAME.match(p.name) for p in path.rglob("P*.*")):
            return read_entity_questions_dir(path, skip_bad=skip_bad)
        files = sorted(path.glob("*.jsonl"))
        if files:
            facts: list[Fact] = []
            for file in files:
                facts.extend(read_jsonl(file, skip_bad=skip_bad))
            return facts
        raise FileNotFoundError(f"{path} holds no facts (jsonl, EntityQuestions or a saved dataset)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        import datasets

        try:
            loaded = datasets.load_dataset(str(source), split=split or "train")
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise FileNotFoundError(
                f"{source} is not a local file or folder, nor a loadable Hub dataset ({error}); "
                f"{EQ_HINT}"
            ) from error
        return read_dataset(loaded, name=str(source), skip_bad=skip_bad)
    raise FileNotFoundError(f"no such file, folder or Hub dataset id: {source}; {EQ_HINT}")

