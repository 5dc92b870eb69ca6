"""The study planner: turns a spec into cells (one unit of work each, with its config, its
dependencies and a config hash that chains through them) and splits cells across shards.

Cells, in run order (``<stage>/<name>``; a fine-tuned model is named ``<category>-<size>-s<seed>``,
a restored one ``<model>-<strategy><k>``)::

    probe/annotations        mastery annotations (probe run, or an existing annotated folder)
    tasks/<family>           the lm-eval task family written from the annotations
    tasks/<family>_dev       the family of the split k is chosen on (restore.choose_on)
    eval/base                the base model on the family
    select/<model>           the SFT set            (per category x size x seed)
    train/<model>            the fine-tuned model
    eval/<model>             its CBQA accuracy
    kl/<model>               first-answer-token KL against the base model (docs/METHOD.md §5)
    updates/<model>          relative-change statistics (models being restored)
    restore/<model>          restored models, every k of the spec in one run (where it asks)
    eval/<model>-top<k>      each restored model's accuracy
    choose/<model>           k chosen on dev: the model and each restored one scored on the
                             choose_on family, choice.json (restore.choose_on)
    report/report            Markdown + PNG (always rewritten)

A cell's hash covers its own config and its dependencies' hashes, so a changed setting reruns
that cell and everything downstream of it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.study.spec import SHIPPED, StudySpec

SETUP = "setup"  # lineage of cells every shard needs (probe, tasks)
REPORT = "report"
BASE = "base"


@dataclass
class Cell:
    """One unit of work. ``lineage`` groups a fine-tuned model with everything derived from
    it; shards are made of whole lineages."""

    stage: str
    name: str
    config: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    lineage: str = SETUP
    hash: str = ""

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.name}"


def model_name(category: str, size: int | str, seed: int) -> str:
    return f"{category}-{size}-s{seed}"


def restored_name(model: str, strategy: str, k: float) -> str:
    return f"{model}-{strategy}{k:g}"


def choose_family(spec: StudySpec) -> str | None:
    """The task family of the split k is chosen on (``<family>_<split>``), or None."""
    if spec.restore is None or spec.restore.choose_on is None:
        return None
    return f"{spec.eval.family}_{spec.restore.choose_on}"


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _annotated_identity(annotated: str) -> dict[str, Any]:
    """What identifies an existing annotated folder: its path, its probe run id and a digest
    of its fact files (a re-probe with the same settings keeps the run id but may change the
    categories, and then everything downstream must rerun)."""
    from sftknow_eval.probe.annotated import CONFIG_FILE, SHIPPED_ANNOTATED

    folder = SHIPPED_ANNOTATED if annotated == SHIPPED else Path(annotated)
    run_id, digest = None, None
    if (folder / CONFIG_FILE).is_file():
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        run_id = config.get("run_id")
        hasher = hashlib.sha256()
        for relative in sorted((config.get("files") or {}).values()):
            if (folder / relative).is_file():
                hasher.update(relative.encode() + b"\0" + (folder / relative).read_bytes())
        digest = hasher.hexdigest()[:16]
    return {"annotated": annotated, "probe_run_id": run_id, "facts_sha256": digest}


def _recipe_identity(recipe: str) -> dict[str, Any]:
    from sftknow_eval.train.recipes import find_recipe

    try:
        path = find_recipe(recipe)
    except UserError:
        return {"recipe": recipe, "recipe_sha256": None}
    return {"recipe": recipe, "recipe_sha256": _file_digest(path)}


def plan(spec: StudySpec) -> list[Cell]:
    """Every cell of the study in a valid run order, hashes filled in."""
    cells: list[Cell] = []
    probe = spec.probe
    base = {"path": spec.model.path, "key": spec.model.key, "revision": spec.model.revision}
    if probe.annotated is not None:
        probe_config: dict[str, Any] = {"model": base, **_annotated_identity(probe.annotated)}
    else:
        probe_config = {"model": base, "facts": probe.facts, "backend": probe.backend,
                        "model_args": probe.model_args, "scheme": probe.scheme,
                        "templates": probe.templates, "samples": probe.samples,
                        "temperature": probe.temperature, "max_new_tokens": probe.max_new_tokens,
                        "seed": probe.seed}
    cells.append(Cell("probe", "annotations", probe_config))
    family = spec.eval.family
    cells.append(Cell("tasks", family, {"family": family, "splits": spec.eval.splits},
                      ["probe/annotations"]))
    # Settings that change scores (not batch size, device or process isolation).
    eval_config = {"backend": spec.eval.backend, "model_args": spec.eval.model_args,
                   "limit": spec.eval.limit}
    tasks_id = f"tasks/{family}"
    dev_family = choose_family(spec)
    if dev_family is not None:
        cells.append(Cell("tasks", dev_family, {"family": dev_family,
                                                "splits": [spec.restore.choose_on]},
                          ["probe/annotations"]))
    cells.append(Cell("eval", BASE, {**eval_config, "model": base}, [tasks_id], BASE))

    grid, train = spec.grid, spec.train
    restore = spec.restore
    restored_sizes = {str(s) for s in spec.restored_sizes()}
    train_config = {**_recipe_identity(train.recipe), "overrides": train.overrides,
                    "launcher": train.launcher, "accelerate_config": train.accelerate_config,
                    "base": base}
    for category in grid.categories:
        for size in grid.sizes:
            for seed in grid.seeds:
                m = model_name(category, size, seed)
                select = Cell("select", m, {"category": category, "size": size, "seed": seed,
                                            "allow_smaller": grid.allow_smaller,
                                            "split": grid.split}, ["probe/annotations"], m)
                trained = Cell("train", m, {**train_config, "seed": seed}, [select.id], m)
                cells += [select, trained,
                          Cell("eval", m, eval_config, [tasks_id, trained.id], m)]
                if spec.kl.enabled:
                    cells.append(Cell("kl", m, {"category": spec.kl.category,
                                                "full_vocab": spec.kl.full_vocab},
                                      ["probe/annotations", trained.id], m))
                if restore is None or str(size) not in restored_sizes:
                    continue
                if restore.categories is not None and category not in restore.categories:
                    continue
                if restore.seeds is not None and seed not in restore.seeds:
                    continue
                if spec.analysis.updates:
                    cells.append(Cell("updates", m, {"region": restore.region}, [trained.id], m))
                restored = Cell("restore", m, {"k": list(restore.k), "region": restore.region,
                                               "strategy": restore.strategy}, [trained.id], m)
                cells.append(restored)
                for k in restore.k:
                    cells.append(Cell("eval", restored_name(m, restore.strategy, k), eval_config,
                                      [tasks_id, restored.id], m))
                if dev_family is not None:  # scores k = 0 and every variant: no test data
                    cells.append(Cell("choose", m, {**eval_config, "family": dev_family,
                                                    "k": list(restore.k),
                                                    "strategy": restore.strategy},
                                      [f"tasks/{dev_family}", trained.id, restored.id], m))
    cells.append(Cell("report", "report", {}, [c.id for c in cells], REPORT))
    _hash(cells)
    return cells


def _hash(cells: Sequence[Cell]) -> None:
    by_id: dict[str, Cell] = {}
    for cell in cells:
        for dep in cell.deps:
            if dep not in by_id:
                raise AssertionError(f"{cell.id} depends on {dep}, planned later or never")
        blob = json.dumps({"stage": cell.stage, "config": cell.config,
                           "deps": [by_id[d].hash for d in cell.deps]}, sort_keys=True, default=str)
        cell.hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
        by_id[cell.id] = cell


# -- shards --------------------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """``i/n`` with 1 <= i <= n."""
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/n, e.g. 1/4") from None
    if n < 1 or not 1 <= i <= n:
        raise UserError(f"--shard {text!r}: need 1 <= i <= n")
    return i, n


def lineages(cells: Sequence[Cell]) -> list[str]:
    """The shardable lineages in plan order (the base model's first)."""
    return list(dict.fromkeys(c.lineage for c in cells if c.lineage not in (SETUP, REPORT)))


def shard_of(cells: Sequence[Cell], i: int, n: int) -> list[Cell]:
    """The cells shard ``i`` of ``n`` owns: lineages dealt round-robin in plan order (so each
    shard gets every n-th model, whole, with its restorations and evaluations). Setup cells
    are not owned by any shard (every shard runs them as prerequisites); the report is made by
    an unsharded run once every shard's cells are in the run folder."""
    owned = set(lineages(cells)[i - 1::n])
    return [c for c in cells if c.lineage in owned]


def select_cells(cells: Sequence[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    """What one invocation runs: everything, or a shard's cells plus the setup cells."""
    if shard is None or shard == (1, 1):
        return list(cells)
    return [c for c in cells if c.lineage == SETUP] + shard_of(cells, *shard)
