"""Reading a finished probe folder: ``load_annotated(path) -> (facts, model_key, scheme)``.

Later stages (select, lm-eval tasks, the study) read mastery only through this module::

    from sftknow_eval.probe.annotated import load_annotated, shipped_annotated
    facts, model_key, scheme = load_annotated("runs/llama3-mastery")
    facts[0].category(model_key)          # "D3" (ye2025) or "MaybeKnown" (slick)
    facts, key, scheme = load_annotated(shipped_annotated())   # the tiny world's annotations

A folder counts as finished only when its ``probe_config.json`` says ``"complete": true``
(it is written last); an interrupted run's folder is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact, read_jsonl

# The annotated folder's format (written by ``probe.run``, read here).
FORMAT = "sftknow-eval/annotated-v1"
CONFIG_FILE = "probe_config.json"
FACTS_DIR = "facts"
DATASET_DIR = "dataset"
CARD_FILE = "README.md"
PARTIAL_DIR = ".probe-partial"
FINAL_TMP_DIR = ".probe-final"

SHIPPED_ANNOTATED = Path(__file__).resolve().parent.parent / "world_data" / "annotated"


def shipped_annotated() -> Path:
    """The tiny world's shipped annotations (its base model probed on every split)."""
    if not (SHIPPED_ANNOTATED / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no shipped annotations at {SHIPPED_ANNOTATED}")
    return SHIPPED_ANNOTATED


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``probe_config.json`` of a finished probe folder (UserError if unfinished or absent)."""
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        if (folder / PARTIAL_DIR).is_dir():
            raise UserError(f"{folder} holds an unfinished probe run; rerun the same probe "
                            "command to finish it")
        raise UserError(f"{folder} is not a probe output folder (no {CONFIG_FILE})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not config.get("complete"):
        raise UserError(f"{folder}: the probe run is not complete")
    return config


def load_annotated(path: str | os.PathLike[str]) -> tuple[list[Fact], str, str]:
    """The annotated facts of a finished probe folder, the model key and the scheme."""
    folder = Path(path)
    config = read_config(folder)
    facts: list[Fact] = []
    for relative in config["files"].values():
        facts.extend(read_jsonl(folder / relative))
    if len(facts) != config["facts"]:
        raise UserError(f"{folder}: expected {config['facts']} facts, found {len(facts)}")
    return facts, config["model_key"], config["scheme"]


def resolve_annotated(source: str | os.PathLike[str]) -> Path:
    """An annotated folder from what a user typed: ``shipped`` (the tiny world's), a local
    folder, or a Hub dataset id (downloaded through hub.py)."""
    if str(source) == "shipped":
        return shipped_annotated()
    if Path(source).exists():
        return Path(source)
    from sftknow_eval import hub

    return hub.resolve_dataset(source)

