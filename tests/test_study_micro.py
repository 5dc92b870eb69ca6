"""A micro-study end to end on a quick tiny world: the study probes it itself, selects, trains,
evaluates with lm-eval, computes KL and update statistics, restores one k, evaluates again,
chooses k on the dev split and writes the report; a rerun does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftknow_eval.study import run_study, spec_from_dict


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sftknow_eval.world.build import BuildRecipe, build_world

    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, BuildRecipe.quick(seed=0), run_measurements=False, progress=False)
    return out


def test_micro_study_end_to_end(quick_world: Path, tmp_path: Path) -> None:
    spec = spec_from_dict({
        "name": "micro",
        "model": {"path": str(quick_world / "model"), "key": "quick"},
        "probe": {"annotated": None, "facts": [str(quick_world / "facts")], "templates": 2,
                  "samples": 2, "batch_size": 256, "device": "cpu"},
        "grid": {"categories": ["D0"], "sizes": [16], "seeds": [0]},
        "train": {"recipe": "tiny", "overrides": {"num_train_epochs": 1}},
        "eval": {"family": "sftknow_micro", "limit": 6, "model_args": "dtype=float32"},
        "kl": {"category": "D0"},
        "restore": {"k": [5], "choose_on": "dev"},
    }, "micro")
    result = run_study(spec, tmp_path, progress=False)
    assert result.ok, result.errors
    assert result.ran()[-1] == "report/report" and len(result.ran()) == len(result.cells)

    annotated = tmp_path / "probe" / "annotations" / "annotated"
    assert (annotated / "probe_config.json").is_file()
    rows = (tmp_path / "select" / "D0-16-s0" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 16 and json.loads(rows[0])["category"] == "D0"
    model = tmp_path / "train" / "D0-16-s0" / "model"
    assert (model / "model.safetensors").is_file() and (model / "training_run.json").is_file()
    restored = tmp_path / "restore" / "D0-16-s0" / "top5"
    assert (restored / "model.safetensors").is_file()
    for name in ("base", "D0-16-s0", "D0-16-s0-top5"):
        record = json.loads((tmp_path / "eval" / name / "cell.json").read_text())
        assert set(record["outputs"]["acc"]) == {"id", "ood"}
        assert (tmp_path / "eval" / name / "results_study.json").is_file()
    kl = json.loads((tmp_path / "kl" / "D0-16-s0" / "cell.json").read_text())["outputs"]
    assert kl["facts"] > 0 and kl["mean"] >= 0
    updates = json.loads((tmp_path / "updates" / "D0-16-s0" / "cell.json").read_text())["outputs"]
    assert 0 < updates["concentration"]["1"] <= 1

    _check_choice(tmp_path)

    report = (tmp_path / "report" / "report.md").read_text()
    for heading in ("Restored, k chosen on dev", "Accuracy per test category", "Paper (LLaMA-3-8B",
                    "Accuracy against training",
                    "Restoring the most-changed", "Where the updates are", "KL against training",
                    "What was run", "| train |"):
        assert heading in report
    for png in ("acc_vs_size", "restore_curves", "concentration", "kl_vs_size"):
        assert (tmp_path / "report" / f"{png}.png").stat().st_size > 1000

    again = run_study(spec, tmp_path, progress=False)
    assert again.ran() == ["report/report"]


def _check_choice(run: Path) -> None:
    """The choose cell scored the fine-tune and its variant on dev facts only, with lm-eval,
    and chose by choose_k's rule; the report's row holds the chosen model's test scores."""
    from sftknow_eval.choose_k import Candidate, pick

    dev = json.loads((run / "tasks" / "sftknow_micro_dev" / "cell.json").read_text())["outputs"]
    assert dev["splits"] == ["dev"] and sum(dev["items"]["sftknow_micro_dev_id"].values()) == 20
    choice = json.loads((run / "choose" / "D0-16-s0" / "choice.json").read_text())
    assert [c["name"] for c in choice["candidates"]] == ["tuned", "top5"]
    assert choice["family"] == "sftknow_micro_dev" and choice["domain"] == "id"
    candidates = [Candidate(**c) for c in choice["candidates"]]
    assert choice["chosen"] == pick(candidates).name and choice["rule"].startswith("highest macro")
    dev_ids = {json.loads(line)["id"] for line in
               (run / "probe" / "annotations" / "annotated" / "facts" / "dev.jsonl").open()}
    test_ids = {json.loads(line)["id"] for line in
                (run / "probe" / "annotations" / "annotated" / "facts" / "test.jsonl").open()}
    for name in ("tuned", "top5"):  # lm-eval's results JSON per candidate, dev facts only
        results = json.loads((run / "choose" / "D0-16-s0" / "dev_eval" / f"{name}.json").read_text())
        assert set(results["results"]) >= {"sftknow_micro_dev", "sftknow_micro_dev_id"}
        assert not any(task.startswith("sftknow_micro_id") for task in results["results"])
    scored = set()
    for data in (run / "tasks" / "sftknow_micro_dev" / "family" / "data").glob("*.jsonl"):
        scored |= {json.loads(line)["id"] for line in data.open()}
    assert scored == dev_ids and not scored & test_ids
    record = json.loads((run / "choose" / "D0-16-s0" / "cell.json").read_text())["outputs"]
    chosen = record["chosen_model"]
    assert chosen == ("D0-16-s0" if record["chosen_k"] == 0 else "D0-16-s0-top5")
    test_acc = json.loads((run / "eval" / chosen / "cell.json").read_text())["outputs"]["acc"]
    row = next(line for line in (run / "report" / "report.md").read_text().splitlines()
               if line.startswith(f"| D0 | 16 | s0: {record['chosen_k']:g} |"))
    columns = [cell.strip() for cell in row.split("|")]  # ... unrestored, chosen, change
    assert columns[6] == f"{100 * test_acc['id']:.1f} / {100 * test_acc['ood']:.1f}"


def test_eval_through_an_lm_eval_process(quick_world: Path, tmp_path: Path) -> None:
    """``eval.subprocess``: the stock ``lm_eval`` CLI per model (what vllm specs use) gives
    the same scores as the in-process path."""
    from sftknow_eval.study import plan, stages
    from sftknow_eval.study.runner import run_cell

    data = {"name": "proc", "model": {"path": str(quick_world / "model"), "key": "quick"},
            "probe": {"annotated": None, "facts": [str(quick_world / "facts")], "templates": 1,
                      "samples": 1, "batch_size": 256, "device": "cpu"},
            "grid": {"categories": ["D0"], "sizes": [8], "seeds": [0]},
            "eval": {"family": "sftknow_proc", "limit": 4, "model_args": "dtype=float32"},
            "kl": {"enabled": False}, "restore": None}
    spec = spec_from_dict(data)
    cells = {c.id: c for c in plan(spec)}
    ctx = stages.Context(spec, tmp_path / "a")
    for cell_id in ("probe/annotations", "tasks/sftknow_proc", "eval/base"):
        run_cell(cells[cell_id], ctx)
    inline = json.loads((tmp_path / "a" / "eval" / "base" / "cell.json").read_text())["outputs"]
    spec.eval.subprocess = True
    record = run_cell(cells["eval/base"], stages.Context(spec, tmp_path / "a"))
    assert record["outputs"]["acc"] == inline["acc"]
    assert record["outputs"]["buckets"] == inline["buckets"]
