"""Writes an lm-eval task family for any mastery-annotated fact set (buckets belong to a base
model): one generate_until task per (domain, bucket), a group per domain whose score is the
unweighted mean over its buckets (the paper's Acc), and a top group holding both.

A family folder is self-contained: YAMLs, a ``utils.py`` shim over ``scoring.py`` and the
bucket data in ``data/``, found relative to ``utils.py``, so ``lm_eval --include_path <folder>``
works from any working directory. An empty bucket gets no task: the group lists the buckets
that exist and ``absent_buckets`` in its metadata names the others.

Rewriting a folder (``force``) replaces only the family's own files: those the new version
writes, those the previous version wrote (read from its ``family.json``), and any file named
like one of the family's (``_<family>*.yaml``, ``<family>_<id|ood>_<bucket>.yaml``,
``data/<id|ood>_<bucket>.jsonl``, ``utils.py``, ``family.json``, ``__pycache__/``). Anything
else in the folder is kept. The new folder is assembled beside the old one and swapped in.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from sftknow_eval.atomic import atomic_folder
from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact
from sftknow_eval.prompts import QUESTION_MARKER

logger = logging.getLogger(__name__)

FAMILY_FILE = "family.json"
DOMAINS = {"in": "id", "out": "ood"}
UTILS_SHIM = '''"""lm-eval hooks of this task family (written by `sftknow-eval tasks write`)."""

from pathlib import Path

from sftknow_eval.lm_tasks import scoring

FOLDER = Path(__file__).resolve().parent


def load_bucket(**kwargs):
    return scoring.load_bucket(FOLDER, **kwargs)


doc_to_text = scoring.doc_to_text
doc_to_target = scoring.doc_to_target
process_results = scoring.process_results
'''


def bucket_task(family: str, domain: str, bucket: str) -> str:
    """The task name of one bucket, e.g. ``sftknow_tiny_id_D2``."""
    return f"{family}_{DOMAINS[domain]}_{bucket}"


def domain_group(family: str, domain: str) -> str:
    return f"{family}_{DOMAINS[domain]}"


def _task_config(family: str, domain: str, bucket: str, data: str, model_key: str) -> dict:
    return {
        "task": bucket_task(family, domain, bucket),
        "custom_dataset": "!function utils.load_bucket",
        "dataset_kwargs": {"data": data},
        "test_split": "test",
        "output_type": "generate_until",
        # functions, not Jinja strings: lm-eval compiles a Jinja template anew for every
        # document, a third of an evaluation's time on the tiny world's 2,040 questions
        "doc_to_text": "!function utils.doc_to_text",
        "doc_to_target": "!function utils.doc_to_target",
        "target_delimiter": " ",
        "generation_kwargs": {"until": ["\n", QUESTION_MARKER], "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": 16},
        "filter_list": [{"name": "none", "filter": [{"function": "take_first"}]}],
        "process_results": "!function utils.process_results",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_per_item", "aggregation": "mean", "higher_is_better": True},
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "bucket": bucket, "domain": domain,
                     "mastery_model": model_key},
    }


def _group_config(family: str, domain: str, buckets: list[str], absent: list[str],
                  model_key: str, scheme: str) -> dict:
    unweighted = {"aggregation": "mean", "weight_by_size": False, "filter_list": ["none"]}
    return {
        "group": domain_group(family, domain),
        "task": [bucket_task(family, domain, b) for b in buckets],
        "aggregate_metric_list": [
            {"metric": "acc", **unweighted},
            {"metric": "exact_match", **unweighted},
            {"metric": "acc_per_item", "aggregation": "mean", "weight_by_size": True,
             "filter_list": ["none"]},
        ],
        "metadata": {"version": 1.0, "scheme": scheme, "mastery_model": model_key,
                     "buckets": buckets, "absent_buckets": absent},
    }


def _dump(config: dict, path: Path) -> None:
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=100)
    # lm-eval resolves "!function module.name" tags; safe_dump quotes them, so unquote.
    text = re.sub(r"'(!function utils\.\w+)'", r"\1", text)
    path.write_text(text, encoding="utf-8")


def _doc(fact: Fact, category: str) -> dict[str, Any]:
    return {"id": fact.id, "relation": fact.relation, "question": fact.question,
            "answer": fact.object, "aliases": fact.answers(), "category": category}


def family_files(family: str, buckets: tuple[str, ...] | list[str]) -> set[str]:
    """Every file name (relative, ``/``-separated) a family of these buckets may write."""
    names = {"utils.py", FAMILY_FILE, f"_{family}.yaml"}
    for domain in DOMAINS:
        names.add(f"_{domain_group(family, domain)}.yaml")
        for bucket in buckets:
            names.add(f"{bucket_task(family, domain, bucket)}.yaml")
            names.add(f"data/{DOMAINS[domain]}_{bucket}.jsonl")
    return names


def _previous_files(out: Path) -> set[str]:
    """The files the family already in ``out`` wrote, from its ``family.json`` (empty when
    there is none or it cannot be read)."""
    path = out / FAMILY_FILE
    if not path.is_file():
        return set()
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        family = previous["family"]
        buckets = {b for counts in previous["items"].values() for b in counts}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        logger.warning("%s is not a family.json of `tasks write`; only files named like the "
                       "new family's are replaced", path)
        return set()
    if not isinstance(family, str):
        return set()
    return family_files(family, sorted(buckets))


def write_family(
    facts: list[Fact], model_key: str, scheme: str, buckets: tuple[str, ...], family: str,
    out: str | os.PathLike[str], *, splits: tuple[str, ...] = ("test",), force: bool = False,
) -> dict[str, Any]:
    """Write the family ``family`` for ``facts`` (of ``splits``) into ``out``; returns a summary
    with the item count of every (domain, bucket), absent buckets included as 0."""
    if not family.replace("_", "").isalnum():
        raise UserError(f"family name {family!r} must be letters, digits and underscores")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; --out takes a folder (an lm-eval include path)")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace the "
                              "family's files in it (other files are kept)")
    chosen = [f for f in facts if f.split in splits]
    if not chosen:
        raise UserError(f"no facts of split(s) {', '.join(splits)} to write tasks for")
    docs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for fact in chosen:
        category = fact.category(model_key)
        if category is None:
            raise UserError(f"fact {fact.id} has no mastery category for {model_key!r}; "
                            "probe the data first (sftknow-eval probe)")
        if category not in buckets:
            raise UserError(f"fact {fact.id}: category {category!r} is not one of the "
                            f"{scheme} buckets {', '.join(buckets)}")
        docs[(fact.domain, category)].append(_doc(fact, category))

    summary: dict[str, Any] = {"family": family, "mastery_model": model_key, "scheme": scheme,
                               "groups": {}, "items": {}}
    owned = family_files(family, buckets) | _previous_files(out)

    def keep(relative: str) -> bool:
        return relative not in owned and relative.split("/")[0] != "__pycache__"

    with atomic_folder(out, keep=keep) as staging:
        (staging / "utils.py").write_text(UTILS_SHIM, encoding="utf-8")
        (staging / "data").mkdir()
        top_children = []
        for domain in DOMAINS:
            present = [b for b in buckets if docs.get((domain, b))]
            absent = [b for b in buckets if not docs.get((domain, b))]
            if not present:
                continue
            for bucket in present:
                data = f"data/{DOMAINS[domain]}_{bucket}.jsonl"
                rows = sorted(docs[(domain, bucket)], key=lambda d: d["id"])
                (staging / data).write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
                _dump(_task_config(family, domain, bucket, data, model_key),
                      staging / f"{bucket_task(family, domain, bucket)}.yaml")
            group = domain_group(family, domain)
            _dump(_group_config(family, domain, present, absent, model_key, scheme),
                  staging / f"_{group}.yaml")
            top_children.append(group)
            summary["groups"][group] = present
            summary["items"][group] = {b: len(docs.get((domain, b), [])) for b in buckets}
        _dump({"group": family, "task": top_children,
               "metadata": {"version": 1.0, "scheme": scheme, "mastery_model": model_key}},
              staging / f"_{family}.yaml")
        (staging / FAMILY_FILE).write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
        dropped = sorted(name for name in owned & _existing_files(out)
                         if not (staging / name).is_file())
        if dropped:
            logger.info("%s: removing %s (no longer part of family %s)", out, ", ".join(dropped),
                        family)
    return summary


def _existing_files(out: Path) -> set[str]:
    if not out.is_dir():
        return set()
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
