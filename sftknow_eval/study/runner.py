"""The study runner: runs a plan's cells in order with progress, skips every cell already
finished with the same config hash, writes each cell's folder atomically, times every stage.

Run folder layout: ``<run>/<stage>/<name>/`` per cell, each holding its outputs and
``cell.json`` (hash, config, dependencies, seconds, outputs summary; its presence with the
right hash is what marks the cell done), ``<run>/spec.yaml`` (the spec of the last run),
``<run>/runs.jsonl`` (one line per invocation: wall time, cells run, per-stage seconds) and
``<run>/report/`` (report.md and its PNGs).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from sftknow_eval.atomic import atomic_folder
from sftknow_eval.study import stages
from sftknow_eval.study.plan import Cell, plan, select_cells
from sftknow_eval.study.preflight import check_inputs
from sftknow_eval.study.spec import StudySpec
from sftknow_eval.versions import library_versions

logger = logging.getLogger(__name__)

CELL_FILE = "cell.json"
RUNS_FILE = "runs.jsonl"


@dataclass
class StudyRun:
    """What one invocation did."""

    run_dir: Path
    cells: list[Cell]
    status: dict[str, str]  # cell id -> done | todo | ran | failed | blocked | skipped
    seconds: dict[str, float] = field(default_factory=dict)  # cell id -> seconds (this run)
    errors: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    report: Path | None = None

    def ran(self) -> list[str]:
        return [cell_id for cell_id, state in self.status.items() if state == "ran"]

    @property
    def ok(self) -> bool:
        return not self.errors and "blocked" not in self.status.values()


def read_cell(run_dir: Path, cell: Cell) -> dict[str, Any] | None:
    path = run_dir / cell.id / CELL_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def cell_status(spec: StudySpec, run_dir: Path, cells: Sequence[Cell]) -> dict[str, str]:
    """``done`` (finished with this config), ``changed`` (finished with another) or ``todo``;
    the report is always ``todo`` (it is rewritten on every run)."""
    status = {}
    for cell in cells:
        record = read_cell(run_dir, cell)
        if cell.stage == "report" or record is None:
            status[cell.id] = "todo"
        else:
            status[cell.id] = "done" if record.get("hash") == cell.hash else "changed"
    return status


def describe_plan(spec: StudySpec, run_dir: Path, cells: Sequence[Cell],
                  shard: tuple[int, int] | None = None) -> str:
    """The dry-run listing: one line per cell with its state, then counts per stage."""
    status = cell_status(spec, run_dir, cells)
    width = max(len(c.id) for c in cells)
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    lines = [f"study {spec.name}: {len(cells)} cells{where} -> {run_dir}"]
    for cell in cells:
        lines.append(f"  {status[cell.id]:7s} {cell.id:{width}s}  {cell.hash}")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for cell in cells:
        counts[cell.stage][status[cell.id]] += 1
    lines.append("per stage: " + "; ".join(
        f"{stage} " + ", ".join(f"{n} {state}" for state, n in sorted(c.items()))
        for stage, c in counts.items()))
    return "\n".join(lines)


def run_study(spec: StudySpec, out: str | Path | None = None, *,
              shard: tuple[int, int] | None = None, dry_run: bool = False,
              progress: bool = True) -> StudyRun:
    """Run (or, with ``dry_run``, list) the study's cells; returns what happened.

    A failing cell is recorded and its dependents are blocked; independent cells still run.
    The report is written by unsharded runs only (a shard holds part of the grid). What the
    spec names is checked first (``preflight``), for a dry run as for a real one.
    """
    started = time.perf_counter()
    check_inputs(spec)
    run_dir = spec.run_dir(out)
    all_cells = plan(spec)
    cells = select_cells(all_cells, shard)
    if shard is not None and shard != (1, 1):
        cells = [c for c in cells if c.stage != "report"]
    status = cell_status(spec, run_dir, cells)
    result = StudyRun(run_dir, cells, dict(status))
    if dry_run:
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False), "utf-8")
    ctx = stages.Context(spec, run_dir)
    failed: set[str] = set()
    todo = [c for c in cells if status[c.id] != "done"]
    logger.info("study %s: %d cells, %d to run, %d already done -> %s", spec.name, len(cells),
                len(todo), len(cells) - len(todo), run_dir)
    bar = tqdm(todo, desc=f"study {spec.name}", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.id)
        if cell.stage != "report" and any(dep in failed for dep in cell.deps):
            result.status[cell.id] = "blocked"
            failed.add(cell.id)
            continue
        if cell.stage == "report":
            from sftknow_eval.study.report import write_report

            t0 = time.perf_counter()
            result.report = write_report(spec, run_dir, all_cells,
                                         invocation_seconds=time.perf_counter() - started)
            result.seconds[cell.id] = time.perf_counter() - t0
            result.status[cell.id] = "ran"
            continue
        t0 = time.perf_counter()
        try:
            run_cell(cell, ctx)
        except Exception as error:  # record, block dependents, go on with the rest
            logger.error("%s failed: %s: %s", cell.id, type(error).__name__, error)
            logger.debug("traceback", exc_info=True)
            result.status[cell.id] = "failed"
            result.errors[cell.id] = f"{type(error).__name__}: {error}"
            failed.add(cell.id)
            continue
        result.seconds[cell.id] = time.perf_counter() - t0
        result.status[cell.id] = "ran"
    result.wall_seconds = time.perf_counter() - started
    _log_invocation(run_dir, spec, result, shard)
    return result


def run_cell(cell: Cell, ctx: stages.Context) -> dict[str, Any]:
    """One cell: build its folder in staging, write ``cell.json`` last, rename into place."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    target = ctx.cell_dir(cell.id)
    # Staging folders a killed run left behind (atomic_folder names them ".<name>.<random>");
    # only this cell's, which no other shard runs. A fine-tuned 8B model is 16 GB of them.
    if target.parent.is_dir():
        for stale in target.parent.glob(f".{cell.name}.*"):
            logger.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(target) as staging:
        outputs = stages.RUNNERS[cell.stage](cell, ctx, staging)
        record = {"hash": cell.hash, "stage": cell.stage, "name": cell.name,
                  "config": cell.config, "deps": cell.deps, "started": started_at,
                  "seconds": round(time.perf_counter() - t0, 3), "outputs": outputs,
                  "versions": library_versions()}
        (staging / CELL_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", "utf-8")
    return record


def _log_invocation(run_dir: Path, spec: StudySpec, result: StudyRun,
                    shard: tuple[int, int] | None) -> None:
    per_stage: dict[str, float] = defaultdict(float)
    for cell_id, seconds in result.seconds.items():
        per_stage[cell_id.split("/")[0]] += seconds
    line = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "spec": spec.source, "shard": list(shard) if shard else None,
            "wall_seconds": round(result.wall_seconds, 2), "cells_run": len(result.ran()),
            "cells_failed": sorted(result.errors), "stage_seconds":
            {k: round(v, 2) for k, v in per_stage.items()}}
    with (run_dir / RUNS_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
