"""What lm-eval calls while it runs one of our tasks: the bucket loader, the prompt and the
scorer.

A family's ``utils.py`` (written by ``family.write_family``) is a thin shim over this module,
so the prompt (``prompts.qa_prompt``, the one SFT trains on) and the scoring rule (the shared
containment matcher of docs/METHOD.md §4, with exact match beside it) each live in one place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftknow_eval.matching import contains_answer, exact_match
from sftknow_eval.prompts import qa_prompt


def load_bucket(folder: Path, data: str, **_ignored: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset``: the bucket's jsonl (relative to the family folder) as a
    ``test`` split. Extra keyword arguments (lm-eval's ``--metadata``) are ignored."""
    import datasets

    path = (folder / data).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"task data {path} is missing; rewrite the family with "
                                "`sftknow-eval tasks write`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    features = datasets.Features({
        "id": datasets.Value("string"), "relation": datasets.Value("string"),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "aliases": datasets.Sequence(datasets.Value("string")),
        "category": datasets.Value("string"),
    })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)})


def doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval ``doc_to_text``: the SFT prompt of the item's question (prompts.qa_prompt)."""
    return qa_prompt(doc["question"])


def doc_to_target(doc: dict[str, Any]) -> str:
    """lm-eval ``doc_to_target``: the item's answer."""
    return doc["answer"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, int]:
    """Score one generation: ``acc`` (an alias contained in the output, the paper's rule),
    ``acc_per_item`` (the same number; its group aggregate is weighted by bucket size, i.e.
    per-item accuracy over all buckets) and ``exact_match`` (first line equals an alias)."""
    output = results[0] if results else ""
    correct = int(contains_answer(output, doc["aliases"]))
    return {"acc": correct, "acc_per_item": correct,
            "exact_match": int(exact_match(output, doc["aliases"]))}
