"""Heavyweight study checks (``pytest -m slow``): the default tiny study within its 15-minute
budget, and training cells launched through ``accelerate launch``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sftknow_eval.study import load_spec, run_study, spec_from_dict

pytestmark = pytest.mark.slow


def test_tiny_study_within_budget(tmp_path: Path) -> None:
    spec = load_spec(None)
    started = time.perf_counter()
    result = run_study(spec, tmp_path, progress=False)
    elapsed = time.perf_counter() - started
    assert result.ok, result.errors
    assert elapsed < 15 * 60, f"the tiny study took {elapsed:.0f} s"
    assert "| D2 |" in (tmp_path / "report" / "report.md").read_text()


def test_accelerate_launcher(tmp_path: Path) -> None:
    from sftknow_eval.probe.annotated import shipped_annotated

    shipped_annotated()  # skip-free: the shipped annotations must exist
    spec = spec_from_dict({
        "name": "acc", "grid": {"categories": ["D4"], "sizes": [16], "seeds": [0]},
        "train": {"recipe": "tiny", "launcher": "accelerate",
                  "overrides": {"num_train_epochs": 1, "disable_tqdm": True}},
        "eval": {"limit": 2}, "kl": {"enabled": False}, "restore": None})
    result = run_study(spec, tmp_path, progress=False)
    assert result.ok, result.errors
    run = json.loads((tmp_path / "train" / "D4-16-s0" / "model" / "training_run.json").read_text())
    assert run["data"]["rows"] == 16
