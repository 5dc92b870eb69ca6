"""The study's "k chosen on dev" cells without heavy work: the spec key, the planned cells, the
dry-run listing, the preflight checks on the dev split, and the report's row (the end-to-end
choose cell runs in tests/test_study_micro.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftknow_eval import cli
from sftknow_eval.errors import UserError
from sftknow_eval.probe.annotated import SHIPPED_ANNOTATED
from sftknow_eval.study import plan, run_study, spec_from_dict
from sftknow_eval.study import stages as study_stages
from sftknow_eval.study.choice_report import chosen_rows


def choose_spec(annotated: Path | str = "shipped", **restore: Any) -> dict[str, Any]:
    return {"name": "unit", "probe": {"annotated": str(annotated)},
            "grid": {"categories": ["D0", "D4"], "sizes": [60, 120], "seeds": [0, 1]},
            "restore": {"k": [1, 5], "choose_on": "dev", **restore}}


def annotated_copy(folder: Path, dev: str) -> Path:
    """The shipped annotations with a dev split made for the test: ``held-out`` relabels 40
    in-domain test facts (none in the SFT pool), ``overlap`` copies 3 pool facts under new ids,
    ``none`` has no dev facts."""
    config = json.loads((SHIPPED_ANNOTATED / "probe_config.json").read_text())
    rows = [json.loads(line) for relative in config["files"].values()
            for line in (SHIPPED_ANNOTATED / relative).read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row["split"] != "dev"]
    if dev == "held-out":
        for row in [r for r in rows if r["split"] == "test" and r["domain"] == "in"][:40]:
            row["split"] = "dev"
    elif dev == "overlap":
        pool = [r for r in rows if r["split"] == "train" and r["domain"] == "in"][:3]
        rows += [{**row, "id": f"dev-{row['id']}", "split": "dev"} for row in pool]
    (folder / "facts").mkdir(parents=True)
    files = {}
    for split in sorted({row["split"] for row in rows}):
        files[split] = f"facts/{split}.jsonl"
        (folder / files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows
                                                   if r["split"] == split))
    (folder / "probe_config.json").write_text(json.dumps({**config, "files": files,
                                                          "facts": len(rows)}))
    return folder


# -- spec and plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("choose_on, message", [
    ("test", r"restore\.choose_on: 'test' is one of eval\.splits \(test\): k is chosen on "
             r"held-out dev facts"),
    ("train", r"restore\.choose_on: 'train' is the split SFT sets are drawn from"),
    ("dev set", r"restore\.choose_on: 'dev set' must be a split name"),
    (5, r"restore\.choose_on: expected str, got 5"),
])
def test_choose_on_refuses_the_splits_it_must_not_see(choose_on: Any, message: str) -> None:
    with pytest.raises(UserError, match=message):
        spec_from_dict(choose_spec(choose_on=choose_on), "x.yaml")


def test_plan_adds_a_dev_family_and_one_choose_cell_per_restored_model() -> None:
    without = plan(spec_from_dict({**choose_spec(), "restore": {"k": [1, 5]}}))
    cells = plan(spec_from_dict(choose_spec()))
    assert not [c for c in without if c.stage == "choose"]
    ids = [c.id for c in cells]
    assert "tasks/sftknow_study_dev" in ids and "tasks/sftknow_study_dev" not in [c.id for c in without]
    dev_tasks = cells[ids.index("tasks/sftknow_study_dev")]
    assert dev_tasks.config == {"family": "sftknow_study_dev", "splits": ["dev"]}
    chosen = [c for c in cells if c.stage == "choose"]
    assert [c.name for c in chosen] == [f"{c}-120-s{s}" for c in ("D0", "D4") for s in (0, 1)]
    choose = chosen[0]
    assert choose.deps == ["tasks/sftknow_study_dev", "train/D0-120-s0", "restore/D0-120-s0"]
    assert choose.lineage == "D0-120-s0" and choose.config["k"] == [1, 5]
    assert choose.config["family"] == "sftknow_study_dev"
    assert ids.index(choose.id) > ids.index("eval/D0-120-s0-top5")
    assert not any(d.startswith("tasks/sftknow_study") and not d.endswith("_dev")
                   for d in choose.deps)  # the test family is not an input of the choice
    # choosing adds cells and changes none: a study that turns it on reruns nothing it had
    before = {c.id: c.hash for c in without if c.stage != "report"}
    assert all(cells[ids.index(cell_id)].hash == h for cell_id, h in before.items())
    restricted = plan(spec_from_dict(choose_spec(categories=["D4"], seeds=[1])))
    assert [c.id for c in restricted if c.stage == "choose"] == ["choose/D4-120-s1"]


# -- preflight and dry run ----------------------------------------------------------------------


def test_dry_run_lists_the_choose_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotated = annotated_copy(tmp_path / "annotated", "held-out")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(choose_spec(annotated)))
    assert cli.main(["study", str(spec_file), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "todo    tasks/sftknow_study_dev" in out
    for name in ("D0-120-s0", "D0-120-s1", "D4-120-s0", "D4-120-s1"):
        assert f"todo    choose/{name} " in out
    assert "choose/D0-60-s0" not in out
    assert "tasks 2 todo" in out and "choose 4 todo" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dev, message", [
    ("none", r"restore\.choose_on: no facts of split dev in .* \(splits: test, train\); probe "
             r"the dev facts"),
    ("overlap", r"restore\.choose_on: 3 dev fact\(s\) of .* are also in the 'train' pool SFT "
                r"sets are drawn from \(dev-P"),
])
def test_preflight_refuses_a_missing_or_overlapping_dev_split(
        dev: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    annotated = annotated_copy(tmp_path / "annotated", dev)
    spec = spec_from_dict(choose_spec(annotated), "x.yaml")
    with pytest.raises(UserError, match=message):
        run_study(spec, tmp_path / "run", dry_run=True, progress=False)
    assert not (tmp_path / "run").exists()
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(choose_spec(annotated)))
    assert cli.main(["study", str(spec_file), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    assert "sftknow-eval: error:" in capsys.readouterr().err and not (tmp_path / "run").exists()


# -- the report's row ---------------------------------------------------------------------------

TEST_ACC = {  # eval cell -> (Acc, Acc OOD) on the test family
    "D0-120-s0": (0.40, 0.30), "D0-120-s0-top1": (0.50, 0.20), "D0-120-s0-top5": (0.90, 0.90),
    "D0-120-s1": (0.20, 0.10), "D0-120-s1-top1": (0.30, 0.10), "D0-120-s1-top5": (0.10, 0.10),
    "D4-120-s0": (0.60, 0.50), "D4-120-s0-top1": (0.70, 0.70), "D4-120-s0-top5": (0.80, 0.80),
    "D4-120-s1": (0.60, 0.50), "D4-120-s1-top1": (0.70, 0.70), "D4-120-s1-top5": (0.80, 0.80),
}
CHOSEN_K = {"D0-120-s0": 1.0, "D0-120-s1": 1.0, "D4-120-s0": 0.0, "D4-120-s1": 0.0}


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages replaced by fakes with known scores: the chosen k differs from the k with the
    best test accuracy (D0 s0: top5), so a row that read test data to choose would show it."""

    def fake(cell: Any, ctx: Any, staging: Path) -> dict[str, Any]:
        if cell.stage == "eval":
            acc, ood = TEST_ACC.get(cell.name, (0.1, 0.1))
            return {"acc": {"id": acc, "ood": ood}, "buckets": {}}
        if cell.stage == "choose":
            k = CHOSEN_K[cell.name]
            name = "tuned" if k == 0 else f"top{k:g}"
            return {"tuned": cell.name, "chosen": name, "chosen_k": k, "restored": k > 0,
                    "chosen_model": cell.name if k == 0 else f"{cell.name}-{name}",
                    "dev_acc": {"tuned": 0.25, "top1": 0.5 if k else 0.2, "top5": 0.1}}
        return {}

    for stage in list(study_stages.RUNNERS):
        monkeypatch.setitem(study_stages.RUNNERS, stage, fake)


def test_report_row_reads_the_chosen_variants_test_scores(faked: None, tmp_path: Path) -> None:
    spec = spec_from_dict(choose_spec(annotated_copy(tmp_path / "annotated", "held-out")))
    result = run_study(spec, tmp_path, progress=False)
    assert result.ok, result.errors
    report = (tmp_path / "report" / "report.md").read_text()
    section = report.split("## Restored, k chosen on dev", 1)[1].split("\n## ", 1)[0]
    assert "k = 1, 5%" in section and "`dev` split" in section
    # D0: k = 1 chosen for both seeds; test Acc 0.5 / 0.3 against 0.4 / 0.2 unrestored
    assert "| D0 | 120 | s0: 1, s1: 1 | 25.0 -> 50.0 | 30.0 / 20.0 | 40.0 / 15.0 | +10.0 / -5.0 |" \
        in section
    assert "| D4 | 120 | s0: 0, s1: 0 | 25.0 -> 25.0 | 60.0 / 50.0 | 60.0 / 50.0 | +0.0 / +0.0 |" \
        in section
    assert ("- D0-120: choosing on dev beat the unrestored model in-domain (+10.0 points), fell "
            "below the unrestored model out-of-domain (-5.0 points).") in section
    assert "- D4-120: no k beat the unrestored model on dev for any seed" in section
    assert "| choose | 4 |" in report  # its compute time is listed with the other stages
    rows = chosen_rows(spec, {f"choose/{m}": {"outputs": {
        "tuned": m, "chosen": "top1", "chosen_k": 1.0, "chosen_model": f"{m}-top1", "dev_acc": {}}}
        for m in ("D0-120-s0",)}, lambda name, domain: TEST_ACC[name][domain == "ood"])
    assert [(r["category"], r["chosen_k"], r["chosen_id"]) for r in rows] == [("D0", {0: 1.0}, 0.5)]


def test_no_section_without_choose_on(faked: None, tmp_path: Path) -> None:
    run_study(spec_from_dict({**choose_spec(), "restore": {"k": [1, 5]}}), tmp_path, progress=False)
    assert "k chosen on dev" not in (tmp_path / "report" / "report.md").read_text()


def test_a_probed_study_without_dev_facts_fails_at_the_dev_family(tmp_path: Path) -> None:
    """Facts the study probes itself have no split check before the probe cell ran: the dev
    family's cell is where a missing dev split stops the choose cells (and only them)."""
    from sftknow_eval.study.runner import run_cell

    spec = spec_from_dict(choose_spec(annotated_copy(tmp_path / "annotated", "none")))
    cells = {c.id: c for c in plan(spec)}
    ctx = study_stages.Context(spec, tmp_path / "run")
    run_cell(cells["probe/annotations"], ctx)
    run_cell(cells["tasks/sftknow_study"], ctx)
    with pytest.raises(UserError, match=r"restore\.choose_on: the annotations hold no facts of "
                                        r"split dev to choose k on \(splits: test, train\)"):
        run_cell(cells["tasks/sftknow_study_dev"], ctx)
    assert not (tmp_path / "run" / "tasks" / "sftknow_study_dev").exists()
