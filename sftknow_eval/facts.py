"""The one schema for a closed-book QA fact, shared by every stage, and its jsonl form.

A fact is (subject, relation, object) plus the object's aliases and the question asked
about it. One jsonl line holds one fact::

    {"id": "P17-0001", "relation": "P17", "subject": "Varo", "object": "Tessia",
     "aliases": ["Tessia", "Republic of Tessia"], "question": "Which country is Varo located in?",
     "split": "train", "domain": "in", "mastery": {}, "meta": {}}

Fields:
    id        unique within a file.
    relation  Wikidata property id, one of ``relations.RELATIONS``.
    subject   the entity asked about.
    object    the canonical answer.
    aliases   every accepted answer string; always contains ``object``.
    question  the question text (no SFT markers; see ``prompts.qa_prompt``).
    split     "train" (SFT pool), "test", or another name a reader gives.
    domain    "in" or "out" (docs/METHOD.md §1), derived from the relation when absent.
    mastery   per base model: ``{model_key: {"scheme": "ye2025", "score": R, "category": "D3",
              ...}}``, filled by the probe stage; categories belong to a (model, fact) pair.
    meta      free-form extras (e.g. the tiny world's corpus exposure count).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftknow_eval.errors import FactFormatError
from sftknow_eval.relations import RELATIONS

logger = logging.getLogger(__name__)
DOMAINS = ("in", "out")


@dataclass
class Fact:
    """One closed-book QA item; see the module docstring for the meaning of each field."""

    id: str
    relation: str
    subject: str
    object: str
    aliases: list[str]
    question: str
    split: str
    domain: str
    mastery: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def answers(self) -> list[str]:
        """The accepted answers: the object first, then the other aliases."""
        return [self.object] + [a for a in self.aliases if a != self.object]

    def category(self, model_key: str) -> str | None:
        """This fact's mastery category for ``model_key``, or None if it was not probed."""
        return self.mastery.get(model_key, {}).get("category")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "relation": str,
    "subject": str,
    "object": str,
    "aliases": list,
    "question": str,
}


def fact_from_dict(
    row: Any, *, path: str = "<memory>", line: int | None = None, unit: str = "line"
) -> Fact:
    """Validate one row of our schema and build a Fact; errors name file, line and field."""

    def bad(name: str | None, problem: str) -> FactFormatError:
        return FactFormatError(path, line, name, problem, unit)

    if not isinstance(row, dict):
        raise bad(None, f"expected a JSON object, got {type(row).__name__}")
    for name, kind in _REQUIRED.items():
        if name not in row:
            raise bad(name, "missing field")
        if not isinstance(row[name], kind):
            raise bad(name, f"expected {kind.__name__}, got {type(row[name]).__name__}"
            )
    for name in ("id", "relation", "subject", "object", "question"):
        if not row[name].strip():
            raise bad(name, "empty string")
    relation = row["relation"]
    if relation not in RELATIONS:
        raise bad("relation", f"unknown relation {relation!r}")
    aliases = row["aliases"]
    if not all(isinstance(a, str) and a.strip() for a in aliases):
        raise bad("aliases", "every alias must be a non-empty string")
    if row["object"] not in aliases:
        aliases = [row["object"], *aliases]
    split = row.get("split", "test")
    if not isinstance(split, str) or not split:
        raise bad("split", "expected a non-empty string")
    domain = row.get("domain", RELATIONS[relation].domain)
    if domain not in DOMAINS:
        raise bad("domain", f"expected one of {DOMAINS}, got {domain!r}")
    for name in ("mastery", "meta"):
        if not isinstance(row.get(name, {}), dict):
            raise bad(name, "expected an object")
    return Fact(
        id=row["id"],
        relation=relation,
        subject=row["subject"],
        object=row["object"],
        aliases=list(aliases),
        question=row["question"],
        split=split,
        domain=domain,
        mastery=dict(row.get("mastery", {})),
        meta=dict(row.get("meta", {})),
    )


def read_jsonl(path: str | os.PathLike[str], *, skip_bad: bool = False) -> list[Fact]:
    """Read facts in our jsonl schema.

    A malformed line raises FactFormatError naming the file, the line and the field. With
    ``skip_bad=True`` bad lines are skipped instead, and their count is logged as a warning.
    """
    facts, skipped = _read_jsonl(Path(path), skip_bad)
    report_skipped(path, skipped)
    return facts


def report_skipped(source: str | os.PathLike[str], skipped: int) -> None:
    """Say how many malformed rows a reader skipped (only ever when asked to skip)."""
    if skipped:
        logger.warning("skipped %d malformed row(s) in %s", skipped, source)


def _read_jsonl(path: Path, skip_bad: bool) -> tuple[list[Fact], int]:
    if not path.is_file():
        raise FileNotFoundError(f"no such fact file: {path}")
    facts: list[Fact] = []
    seen: set[str] = set()
    skipped = 0
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as error:
                    raise FactFormatError(str(path), number, None, f"invalid JSON: {error}") from None
                fact = fact_from_dict(row, path=str(path), line=number)
                if fact.id in seen:
                    raise FactFormatError(str(path), number, "id", f"duplicate id {fact.id!r}")
            except FactFormatError:
                if not skip_bad:
                    raise
                skipped += 1
                continue
            seen.add(fact.id)
            facts.append(fact)
    return facts, skipped


def iter_dicts(facts: Iterable[Fact]) -> Iterator[dict[str, Any]]:
    for fact in facts:
        yield fact.to_dict()


def write_jsonl(facts: Iterable[Fact], path: str | os.PathLike[str]) -> Path:
    """Write facts atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False
    )
    try:
        with handle:
            for row in iter_dicts(facts):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
