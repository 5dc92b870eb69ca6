"""SFT training sets from annotated facts: one category (or several, in equal shares), a size
and a seed, balanced across the in-domain relations, in TRL's prompt-completion format.

Output: ``<out>`` (jsonl) with one row per example::

    {"prompt": "<|question|> Where was X born? <|answer|>", "completion": " Y",
     "id": "P19-0042", "relation": "P19", "category": "D2"}

and the sidecar ``<out>.meta.json``::

    {"category": "D2", "size_requested": 240, "size": 240, "seed": 0,
     "source": "<annotated folder>", "base_model": "<model key>", "scheme": "ye2025", ...}

(``category`` reads ``"D0+D4"`` for a mixed set; ``categories``, ``per_category`` and
``per_relation`` give the detail; ``dataset_id`` and ``dataset_revision`` name the Hub dataset
the annotations came from, when they did). The pool is the annotated facts of one split
(``train``) whose relation is in-domain (docs/METHOD.md §1); ``size="all"`` takes every fact
of the category. An existing set is never replaced silently (a trained model's card records
its sha256): that takes ``overwrite=True`` (``--force``).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact
from sftknow_eval.lineage import folder_origin
from sftknow_eval.probe.annotated import load_annotated, read_config, resolve_annotated
from sftknow_eval.probe.categories import CATEGORIES, check_category
from sftknow_eval.prompts import qa_completion, qa_prompt
from sftknow_eval.relations import IN_DOMAIN
from sftknow_eval.select.balance import PAPER_SIZES, balanced_quotas, equal_shares

MIXED = "mixed"


@dataclass
class Selection:
    """The drawn facts (in training order) and what was asked for."""

    facts: list[Fact]
    categories: list[str]
    size_requested: int | str
    seed: int
    per_category: dict[str, int]
    per_relation: dict[str, int]


def parse_size(text: str | int) -> int | str:
    """An int >= 1 or "all" (the paper's grid: 60, 120, 240, 480, 960, 1920, all)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        value = int(text)
        if value < 1:
            raise UserError(f"size must be at least 1, got {value}")
        return value
    if str(text).strip().lower() == "all":
        return "all"
    raise UserError(f"size must be an integer or 'all' (e.g. {', '.join(map(str, PAPER_SIZES))}), "
                    f"got {text!r}")


def parse_categories(text: str | Sequence[str], scheme: str) -> list[str]:
    """One category, a comma list (equal shares), or "mixed" (every category of the scheme)."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if parts == [MIXED]:
        return list(CATEGORIES[scheme])
    if not parts:
        raise UserError("no category given")
    for part in parts:
        check_category(part, scheme)
    if len(set(parts)) != len(parts):
        raise UserError(f"category listed twice in {text!r}")
    return parts


def training_pool(facts: Sequence[Fact], split: str = "train",
                  relations: Sequence[str] = IN_DOMAIN) -> list[Fact]:
    """The facts SFT sets are drawn from: one split, the given (in-domain) relations."""
    wanted = set(relations)
    return [fact for fact in facts if fact.split == split and fact.relation in wanted]


def select_facts(
    facts: Sequence[Fact],
    model_key: str,
    categories: Sequence[str],
    size: int | str,
    seed: int,
    *,
    allow_smaller: bool = False,
    split: str = "train",
    relations: Sequence[str] = IN_DOMAIN,
) -> Selection:
    """Draw a training set; ``size`` is split equally over ``categories``, and each
    category's share equally over the relations (water-filling when a relation runs short).

    A category with fewer facts than its share raises a UserError, or with
    ``allow_smaller`` gives all it has (the real size is in ``Selection.per_category``).
    """
    rng = random.Random(f"select:{seed}")
    pool = training_pool(facts, split, relations)
    if not pool:
        raise UserError(f"no facts of split {split!r} with relations {', '.join(relations)}")
    by_category: dict[str, dict[str, list[Fact]]] = {c: {} for c in categories}
    for fact in sorted(pool, key=lambda f: f.id):
        category = fact.category(model_key)
        if category in by_category:
            by_category[category].setdefault(fact.relation, []).append(fact)
    shares = (equal_shares(size, list(categories), rng) if isinstance(size, int)
              else {c: None for c in categories})
    chosen: list[Fact] = []
    per_category: dict[str, int] = {}
    for category in categories:
        groups = by_category[category]
        available = sum(len(members) for members in groups.values())
        want = shares[category]
        if want is None:
            taken = [fact for members in groups.values() for fact in members]
        else:
            if want > available:
                if not allow_smaller:
                    raise UserError(
                        f"category {category} holds {available} facts in the pool ({split} split, "
                        f"{len(set(relations))} relations) but {want} were asked for; pass "
                        "--allow-smaller (allow_smaller=True) to take all of them"
                    )
                want = available
            quotas = balanced_quotas({r: len(m) for r, m in sorted(groups.items())}, want, rng)
            taken = [fact for relation, count in quotas.items() if count
                     for fact in rng.sample(groups[relation], count)]
        per_category[category] = len(taken)
        chosen.extend(taken)
    rng.shuffle(chosen)
    per_relation = dict(sorted(Counter(f.relation for f in chosen).items()))
    return Selection(chosen, list(categories), size, seed, per_category, per_relation)


def sft_rows(selection: Selection, model_key: str) -> list[dict[str, Any]]:
    """TRL prompt-completion rows with the paper's prompt (``prompts.qa_prompt``)."""
    return [{"prompt": qa_prompt(fact.question), "completion": qa_completion(fact.object),
             "id": fact.id, "relation": fact.relation, "category": fact.category(model_key)}
            for fact in selection.facts]


def meta_path(out: str | os.PathLike[str]) -> Path:
    """The sidecar of an SFT set file: ``<out>.meta.json``."""
    return Path(f"{os.fspath(out)}.meta.json")


def check_out(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """``out`` as a path an SFT set may be written to; a UserError for a folder (or a path
    under a file), a FileExistsError for an existing set or sidecar unless ``overwrite``."""
    out = Path(out)
    sidecar = meta_path(out)
    for path in (out, sidecar):
        if path.is_dir():
            raise UserError(f"{path} is a folder; --out takes the file name of the set, "
                            f"e.g. {out / 'D2-120-s0.jsonl'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {out}: {parent} is a file, not a folder")
            break
    existing = [str(path) for path in (out, sidecar) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; a model "
            "trained on that set records its "
            "sha256 in its card, so it is not replaced silently: pass --force "
            "(overwrite=True) to replace it, or pick another --out"
        )
    return out


def _atomic_text(path: Path, text: str) -> Path:
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         prefix=f".{path.name}.", delete=False)
    with handle:
        handle.write(text)
    return Path(handle.name)


def write_sft_set(rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                  out: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the rows and the sidecar; both land by rename (data first, sidecar last). An
    existing set is replaced only with ``overwrite`` (see :func:`check_out`)."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    temps = [_atomic_text(out, data),
             _atomic_text(meta_path(out), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")]
    try:
        os.replace(temps[0], out)
        os.replace(temps[1], meta_path(out))
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    return out


def select_sft_set(
    annotated: str | os.PathLike[str],
    category: str | Sequence[str],
    size: int | str,
    seed: int,
    out: str | os.PathLike[str] | None = None,
    *,
    allow_smaller: bool = False,
    split: str = "train",
    overwrite: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read annotated facts (a probe folder, ``shipped`` or a Hub dataset id), draw one SFT
    set, write it (when ``out`` is given; an existing set only with ``overwrite``)."""
    folder = resolve_annotated(annotated)
    config = read_config(folder)
    facts, model_key, scheme = load_annotated(folder)
    categories = parse_categories(category, scheme)
    size = parse_size(size)
    if out is not None:
        check_out(out, overwrite)  # before drawing
    dataset = folder_origin(folder, repo_type="dataset")
    selection = select_facts(facts, model_key, categories, size, seed,
                             allow_smaller=allow_smaller, split=split)
    rows = sft_rows(selection, model_key)
    meta = {
        "category": "+".join(categories),
        "size_requested": size,
        "size": len(rows),
        "seed": seed,
        "source": os.fspath(annotated),
        "dataset_id": dataset.repo_id if dataset else None,
        "dataset_revision": dataset.revision if dataset else None,
        "base_model": model_key,
        "scheme": scheme,
        "categories": categories,
        "per_category": selection.per_category,
        "per_relation": selection.per_relation,
        "split": split,
        "relations": list(IN_DOMAIN),
        "base_model_revision": config.get("model_revision"),
        "facts_source": config.get("facts_source"),
        "probe_run_id": config.get("run_id"),
        "prompt_format": "<|question|> {question} <|answer|> + ' {answer}'",
    }
    if out is not None:
        write_sft_set(rows, meta, out, overwrite=overwrite)
    return rows, meta
