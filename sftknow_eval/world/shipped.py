"""Where a built tiny world keeps its parts, and where the shipped one lives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sftknow_eval.facts import Fact, read_jsonl

SHIPPED_WORLD = Path(__file__).resolve().parent.parent / "world_data"
MANIFEST = "world.json"
MODEL_DIR = "model"
FACT_FILES = {
    "train": "facts/train.jsonl",
    "dev_in_domain": "facts/dev_in_domain.jsonl",
    "test_in_domain": "facts/test_in_domain.jsonl",
    "test_out_of_domain": "facts/test_out_of_domain.jsonl",
}


def world_dir(path: str | Path | None = None) -> Path:
    """A built world's folder: ``path`` if given, else the one shipped in the package."""
    folder = Path(path) if path is not None else SHIPPED_WORLD
    if not (folder / MANIFEST).is_file():
        hint = " (run `sftknow-eval world build`)" if path is None else ""
        raise FileNotFoundError(f"no tiny world at {folder}{hint}")
    return folder


def model_path(path: str | Path | None = None) -> Path:
    """The base model folder of a world (loadable by transformers, lm-eval and TRL)."""
    return world_dir(path) / MODEL_DIR


def manifest(path: str | Path | None = None) -> dict[str, Any]:
    return json.loads((world_dir(path) / MANIFEST).read_text(encoding="utf-8"))


def load_split(name: str, path: str | Path | None = None) -> list[Fact]:
    """One of the world's fact files: train, dev_in_domain, test_in_domain or test_out_of_domain."""
    if name not in FACT_FILES:
        raise ValueError(f"unknown split {name!r}; choose from {', '.join(FACT_FILES)}")
    return read_jsonl(world_dir(path) / FACT_FILES[name])


def load_all_facts(path: str | Path | None = None) -> list[Fact]:
    """The whole knowledge base (every split)."""
    return [fact for name in FACT_FILES for fact in load_split(name, path)]
