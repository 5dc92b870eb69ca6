"""Running lm-eval on one of our task families for one model: in this process
(``lm_eval.simple_evaluate``) or as an ``lm_eval`` process, writing lm-eval's own results JSON
and returning the family's scores. The study's eval cells and ``restore --choose-on`` use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.lm_tasks.results import FamilyScores, read_results


@dataclass
class EvalSettings:
    """The lm-eval knobs: any backend lm-eval has (``hf``, ``vllm``, ...) with its model args."""

    backend: str = "hf"
    model_args: str = ""  # added after pretrained=<model>, e.g. dtype=bfloat16
    batch_size: int | str = 8
    device: str | None = None
    limit: int | float | None = None
    subprocess: bool = False  # run `python -m lm_eval` (a fresh process per model)


def check_backend(name: str) -> None:
    """A UserError unless lm-eval knows the backend and its packages import (``vllm`` needs the
    vllm package): checked before any model is evaluated."""
    from lm_eval.api.registry import get_model

    try:
        get_model(name)
    except (ValueError, KeyError, ImportError, ModuleNotFoundError) as error:
        raise UserError(f"lm-eval model backend {name!r} is not usable here: {error}") from None


def task_manager(*family_dirs: Path) -> Any:
    """lm-eval's task index over the given family folders only (lm-eval's own task library is
    left out: indexing it takes tens of seconds and our families need none of it). Build one and
    pass it to every :func:`evaluate_family` call on those families."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(d) for d in family_dirs], include_defaults=False)


def evaluate_family(model: str | Path, family_dir: Path, family: str, settings: EvalSettings,
                    results_file: Path, *, tasks: Any = None) -> FamilyScores:
    """lm-eval on ``family`` (its folder ``family_dir``) for ``model``; lm-eval's results JSON
    goes to ``results_file`` and the family's scores are returned."""
    model_args = ",".join(a for a in (f"pretrained={model}", settings.model_args) if a)
    results_file.parent.mkdir(parents=True, exist_ok=True)
    if settings.subprocess:
        output = results_file.parent / f".{results_file.name}.lm_eval"
        command = [sys.executable, "-m", "lm_eval", "--model", settings.backend, "--model_args",
                   model_args, "--tasks", family, "--include_path", str(family_dir),
                   "--batch_size", str(settings.batch_size), "--output_path", str(output)]
        if settings.device:
            command += ["--device", settings.device]
        if settings.limit:
            command += ["--limit", str(settings.limit)]
        subprocess.run(command, check=True)
        found = sorted(output.rglob("results_*.json"))
        if not found:
            raise UserError(f"lm_eval wrote no results for {model}")
        os.replace(found[-1], results_file)
    else:
        from lm_eval import simple_evaluate
        from lm_eval.utils import handle_non_serializable

        results = simple_evaluate(model=settings.backend, model_args=model_args, tasks=[family],
                                  task_manager=tasks or task_manager(family_dir),
                                  batch_size=settings.batch_size, device=settings.device,
                                  limit=settings.limit, log_samples=False, verbosity="ERROR")
        results = dict(results or {})
        results.pop("samples", None)
        results_file.write_text(json.dumps(results, indent=2, default=handle_non_serializable)
                                + "\n", encoding="utf-8")
    scores = [s for s in read_results(results_file) if s.family == family]
    if not scores:
        raise UserError(f"{results_file}: the results hold no {family} scores")
    return scores[0]
