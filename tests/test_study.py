"""The study orchestrator without heavy work: spec validation, the planner and dry run, shards,
and caching / resume (stage functions replaced by recorders)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from sftknow_eval import cli
from sftknow_eval.errors import UserError
from sftknow_eval.study import plan, run_study, spec_from_dict
from sftknow_eval.study import stages as study_stages
from sftknow_eval.study.plan import lineages, parse_shard, select_cells, shard_of
from sftknow_eval.study.spec import load_spec


def _shipped_pool_counts() -> Counter[str]:
    """Training facts per category in the shipped annotations' pool (what preflight counts)."""
    from sftknow_eval.probe.annotated import load_annotated, shipped_annotated
    from sftknow_eval.select.sets import training_pool

    facts, key, _ = load_annotated(shipped_annotated())
    return Counter(fact.category(key) for fact in training_pool(facts))


POOL_COUNTS = _shipped_pool_counts()  # read once: the shipped annotations hold 13,840 facts
SMALLEST = min(("D0", "D1", "D2", "D3", "D4"), key=POOL_COUNTS.__getitem__)  # the thinnest
POOL = POOL_COUNTS[SMALLEST]


def small_spec(**grid: Any) -> dict[str, Any]:
    # allow_smaller: a test world's pool may hold fewer facts of a category than size 240
    return {"name": "unit", "grid": {"categories": ["D0", "D4"], "sizes": [60, 240],
                                     "seeds": [0, 1], "allow_smaller": True, **grid},
            "restore": {"k": [1, 5]}}


# -- spec ----------------------------------------------------------------------------------


def test_unknown_keys_are_named_with_their_path() -> None:
    with pytest.raises(UserError, match=r"grid\.sizez: unknown key \(known: categories, sizes"):
        spec_from_dict({"grid": {"sizez": [60]}}, "x.yaml")
    with pytest.raises(UserError, match=r"^x\.yaml: colour, flavour: unknown keys"):
        spec_from_dict({"colour": 1, "flavour": 2}, "x.yaml")
    with pytest.raises(UserError, match=r"restore\.kk: unknown key"):
        spec_from_dict({"restore": {"kk": [1]}}, "x.yaml")


@pytest.mark.parametrize("data, message", [
    ({"grid": {"sizes": "60"}}, r"grid\.sizes: expected a list"),
    ({"grid": {"sizes": [0]}}, r"grid\.sizes: 0 must be a positive integer"),
    ({"grid": {"categories": ["D7"]}}, r"grid\.categories: 'D7' is not a ye2025 category"),
    ({"grid": {"seeds": [0, 0]}}, r"grid\.seeds: lists a value twice"),
    ({"grid": {"seeds": ["a"]}}, r"grid\.seeds\[0\]: expected int"),
    ({"restore": {"k": [0]}}, r"restore\.k: 0 is not a percentage"),
    ({"restore": {"sizes": [999]}}, r"restore\.sizes: \[999\] not in grid\.sizes"),
    ({"eval": {"backend": "openai"}}, r"eval\.backend: 'openai' is not one of hf, vllm"),
    ({"train": {"launcher": "slurm"}}, r"train\.launcher"),
    ({"kl": {"enabled": "yes"}}, r"kl\.enabled: expected bool"),
    ({"restore": {"k": [100]}}, r"restore\.k: 100 is not a percentage restore accepts "
                                r"\(--k 100: k must lie strictly between 0 and 100"),
    ({"restore": {"region": "attn"}}, r"restore\.region: --region 'attn': use one of"),
    ({"restore": {"categories": []}}, r"restore\.categories: empty, so nothing would be restored"),
    ({"restore": {"sizes": []}}, r"restore\.sizes: empty"),
    ({"eval": {"splits": []}}, r"eval\.splits: must not be empty"),
    ({}, r"^x\.yaml: the spec is empty"),
    ({"grid": None}, r"^x\.yaml: grid: empty"),
    ({"grid": {}}, r"^x\.yaml: grid: empty"),
    ({"kl": {"batch_size": 0}}, r"kl\.batch_size: 0 must be at least 1"),
    ({"probe": {"templates": 0}}, r"probe\.templates: 0 must be at least 1"),
    ({"eval": {"batch_size": "many"}}, r"eval\.batch_size: 'many' must be a positive integer"),
])
def test_bad_values_are_refused(data: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        spec_from_dict(data, "x.yaml")


def test_shipped_specs_load() -> None:
    tiny = load_spec(None)
    assert tiny.name == "tiny" and tiny.source.endswith("recipes/study/tiny.yaml")
    grid = tiny.grid
    assert grid.categories == ["D0", "D1", "D2", "D3", "D4"] and len(grid.sizes) >= 3
    assert max(grid.sizes) >= 16 * min(grid.sizes)  # the default spans the paper's 16x
    assert {1.0, 5.0, 20.0} <= set(tiny.restore.k) and tiny.restored_sizes() == [max(grid.sizes)]
    assert tiny.restore.choose_on == "dev"
    sizes = load_spec("tiny-sizes")
    assert sizes.grid.sizes == [40, 80, 160, 320, 640] and len(sizes.grid.seeds) >= 2
    assert sizes.restore.k == [1, 5, 10, 20, 40] and sizes.restored_sizes() == sizes.grid.sizes
    assert max(sizes.grid.sizes) <= POOL  # every category's pool holds the largest size
    paper = load_spec("llama3-8b")
    assert paper.grid.categories == ["D0", "D1", "D2", "D3", "D4"]
    assert paper.grid.sizes[0] == 60 and paper.grid.sizes[-1] == 1920 and paper.grid.seeds == [0, 1, 2]
    assert paper.restore.k == [1, 3, 5, 10, 20, 40, 60]
    assert paper.eval.backend == "vllm" and paper.train.launcher == "accelerate"
    assert paper.model.path == "meta-llama/Meta-Llama-3-8B"


# -- planner, dry run, shards ---------------------------------------------------------------


def test_plan_lists_every_cell_in_dependency_order() -> None:
    cells = plan(spec_from_dict(small_spec()))
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids))
    seen: set[str] = set()
    for cell in cells:
        assert set(cell.deps) <= seen, cell.id
        seen.add(cell.id)
    count = lambda stage: sum(c.stage == stage for c in cells)  # noqa: E731
    models = 2 * 2 * 2
    assert count("train") == count("select") == count("kl") == models
    restored = 2 * 2 * 2  # largest size only: 2 categories x 2 seeds x 2 k
    assert count("restore") == 4 and count("updates") == 4  # one restore per model, every k
    assert count("eval") == 1 + models + restored
    assert ids[-1] == "report/report" and "restore/D0-240-s1" in ids
    assert "eval/D0-240-s1-top5" in ids and "restore/D0-60-s0" not in ids
    restore = next(c for c in cells if c.id == "restore/D0-240-s1")
    assert restore.config["k"] == [1, 5]
    assert next(c for c in cells if c.id == "eval/D0-240-s1-top5").deps[-1] == restore.id


def test_tiny_dry_run_lists_a_choose_cell_per_restored_model(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # the shipped annotations hold the dev split, disjoint from the pool (else preflight fails)
    assert cli.main(["study", "tiny", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    tiny = load_spec("tiny")
    largest = max(tiny.grid.sizes)
    restored = len(tiny.grid.categories) * len(tiny.grid.seeds)
    assert f"choose {restored} todo" in out and "todo    tasks/sftknow_tiny_dev " in out
    assert f"todo    choose/D2-{largest}-s{tiny.grid.seeds[-1]} " in out
    assert not (tmp_path / "run").exists()


EQ_FIXTURE = Path(__file__).parent / "fixtures" / "entity_questions" / "dataset"


def test_llama3_8b_dry_run(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    # the spec probes data/entity_questions (what `sftknow-eval data entity-questions` writes)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["study", "llama3-8b", "--dry-run", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "probe.facts: data/entity_questions: no such file or folder" in capsys.readouterr().err
    shutil.copytree(EQ_FIXTURE, tmp_path / "data" / "entity_questions")
    code = cli.main(["study", "llama3-8b", "--dry-run", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert "train/D0-60-s0" in out and "train/D4-1920-s2" in out
    assert "restore/D2-1920-s1 " in out and "eval/D2-1920-s1-top60" in out
    assert "restore/D2-1920-s1-top60" not in out  # one restore cell per model writes every k
    assert "train 90 todo" in out and "restore 15 todo" in out and "eval 196 todo" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


# What the spec names: refused by the dry run, before anything is written (shipped annotations:
# POOL facts of category SMALLEST in the training pool).
NAMED_INPUTS = {
    "unknown recipe": ({"train": {"recipe": "no-such-recipe"}},
                       r"train\.recipe: recipe no-such-recipe: no such file"),
    "unknown override": ({"train": {"overrides": {"lerning_rate": 1e-4}}},
                         r"train\.overrides: .*unknown recipe key\(s\) lerning_rate"),
    "bad override value": ({"train": {"overrides": {"num_train_epochs": "many"}}},
                           r"train\.recipe: .*tiny\.yaml: num_train_epochs.*invalid float value: .many."),
    "missing model": ({"model": {"path": "/nonexistent/sftknow-base"}},
                      r"model\.path: /nonexistent/sftknow-base: no such folder"),
    "size above pool": ({"grid": {"categories": ["D0", SMALLEST], "sizes": [60, POOL + 1, 2 * POOL],
                                  "allow_smaller": False}},
                        rf"grid\.sizes: {POOL + 1}, {2 * POOL} > the {POOL} {SMALLEST} facts in "
                        "the 'train' pool"),
    "wrong model key": ({"model": {"key": "someone-else"}},
                        r"model\.key: 'someone-else', but .* holds mastery for 'tiny-world'"),
    "split not annotated": ({"eval": {"splits": ["validation"]}},
                            r"eval\.splits: no facts of split validation"),
    "missing accelerate config": ({"train": {"launcher": "accelerate",
                                             "accelerate_config": "no-such-config"}},
                                  r"train\.accelerate_config: accelerate config no-such-config: "
                                  r"no such file \(shipped accelerate configs: deepspeed-zero3, fsdp\)"),
    "missing facts": ({"probe": {"annotated": None, "facts": ["/nonexistent/facts"]}},
                      r"probe\.facts: /nonexistent/facts: no such file or folder; to download "
                      r"EntityQuestions run `sftknow-eval data entity-questions"),
    "facts offline": ({"probe": {"annotated": None, "facts": ["someone/facts"]}},
                      r"probe\.facts: someone/facts: no such file or folder, and HF_HUB_OFFLINE"),
}


@pytest.mark.parametrize("case", sorted(NAMED_INPUTS))
def test_dry_run_checks_what_the_spec_names(case: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in CI: a source that is not local is unreadable
    change, message = NAMED_INPUTS[case]
    data = small_spec()
    for section, values in change.items():
        data[section] = {**data.get(section, {}), **values}
    spec = spec_from_dict(data, "x.yaml")  # the values themselves are fine ...
    with pytest.raises(UserError, match=message):  # ... what they name is not
        run_study(spec, tmp_path / "run", dry_run=True, progress=False)
    assert not (tmp_path / "run").exists()


def test_problems_are_listed_together_and_the_real_run_checks_first(
        recorded: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    above = POOL + 1
    assert 2 * POOL < POOL_COUNTS["D0"]
    data = small_spec(categories=["D0", SMALLEST], sizes=[60, above], allow_smaller=False)
    data["train"] = {"recipe": "no-such-recipe"}
    with pytest.raises(UserError, match=r"^x\.yaml: 2 problems:\n  train\.recipe: .*\n  "
                                        rf"grid\.sizes: {above} > the {POOL} {SMALLEST}"):
        run_study(spec_from_dict(data, "x.yaml"), tmp_path / "run", progress=False)
    assert recorded == [] and not (tmp_path / "run").exists()
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    assert cli.main(["study", str(spec_file), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "train.recipe: recipe no-such-recipe" in err and f"grid.sizes: {above}" in err
    assert not (tmp_path / "run").exists()
    data["train"] = {"recipe": "tiny"}
    data["grid"]["allow_smaller"] = True  # takes every fact of the thinnest category
    assert run_study(spec_from_dict(data), tmp_path / "run", dry_run=True).cells


def test_shards_partition_the_cells() -> None:
    cells = plan(load_spec("llama3-8b"))
    shardable = [c for c in cells if c.lineage not in ("setup", "report")]
    for n in (1, 2, 3, 7):
        owned = [shard_of(cells, i, n) for i in range(1, n + 1)]
        ids = [c.id for part in owned for c in part]
        assert sorted(ids) == sorted(c.id for c in shardable)  # every cell exactly once
        sizes = [len({c.lineage for c in part}) for part in owned]
        assert max(sizes) - min(sizes) <= 1  # whole models, dealt evenly
        for part in owned:  # a model's cells stay together
            for cell in part:
                assert all(cells_by_id(cells)[d].lineage in (cell.lineage, "setup")
                           or d.startswith("tasks/") for d in cell.deps)
    again = [c.id for c in shard_of(plan(load_spec("llama3-8b")), 2, 3)]
    assert again == [c.id for c in shard_of(cells, 2, 3)]  # deterministic
    chosen = select_cells(cells, (2, 3))
    assert [c.id for c in chosen[:2]] == ["probe/annotations", "tasks/sftknow_eq_llama3"]
    assert len(lineages(cells)) == 1 + 90


def cells_by_id(cells: list) -> dict:
    return {c.id: c for c in cells}


@pytest.mark.parametrize("text", ["0/2", "3/2", "a/b", "2"])
def test_bad_shard(text: str) -> None:
    with pytest.raises(UserError):
        parse_shard(text)


# -- caching and resume -----------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every stage replaced by a recorder that writes a marker file."""
    calls: list[str] = []

    def fake(cell: Any, ctx: Any, staging: Path) -> dict[str, Any]:
        calls.append(cell.id)
        (staging / "out.txt").write_text(cell.id)
        if cell.stage == "eval":
            return {"acc": {"id": 0.5, "ood": 0.25}, "buckets": {"id": {"D0": 0.0, "D4": 1.0}}}
        return {}

    for stage in list(study_stages.RUNNERS):
        monkeypatch.setitem(study_stages.RUNNERS, stage, fake)
    return calls


def test_rerun_does_nothing_and_a_changed_size_reruns_only_its_cells(
        recorded: list[str], tmp_path: Path) -> None:
    spec = spec_from_dict(small_spec())
    first = run_study(spec, tmp_path, progress=False)
    assert first.ok and len(recorded) == len(first.cells) - 1  # all but the report
    assert (tmp_path / "report" / "report.md").is_file()
    assert (tmp_path / "train" / "D0-60-s0" / "cell.json").is_file()

    recorded.clear()
    second = run_study(spec, tmp_path, progress=False)
    assert recorded == [] and second.ran() == ["report/report"]

    changed = spec_from_dict(small_spec(sizes=[60, 480]), "changed")
    changed.restore.sizes = "largest"
    recorded.clear()
    run_study(changed, tmp_path, progress=False)
    assert recorded and all("-480-" in cell_id for cell_id in recorded)
    assert not any("-60-" in cell_id for cell_id in recorded)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [r["cells_run"] for r in runs] == [len(first.cells), 1, len(recorded) + 1]


def test_a_changed_setting_reruns_downstream_only(recorded: list[str], tmp_path: Path) -> None:
    data = small_spec()
    run_study(spec_from_dict(data), tmp_path, progress=False)
    data["restore"]["k"] = [1, 20]
    recorded.clear()
    run_study(spec_from_dict(data), tmp_path, progress=False)
    models = [f"{c}-240-s{s}" for c in ("D0", "D4") for s in (0, 1)]
    assert sorted(recorded) == sorted(  # each model's one restore cell, and its restored evals
        [f"restore/{m}" for m in models] + [f"eval/{m}-top{k}" for m in models for k in (1, 20)])
    data["kl"] = {"category": "D3"}
    recorded.clear()
    run_study(spec_from_dict(data), tmp_path, progress=False)
    assert recorded and all(cell_id.startswith("kl/") for cell_id in recorded)


def test_a_failed_cell_blocks_its_dependents_and_leaves_no_folder(
        recorded: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = study_stages.RUNNERS["train"]

    def failing(cell: Any, ctx: Any, staging: Path) -> dict[str, Any]:
        if cell.name == "D4-60-s1":
            (staging / "partial").write_text("half")
            raise RuntimeError("out of memory")
        return fake(cell, ctx, staging)

    monkeypatch.setitem(study_stages.RUNNERS, "train", failing)
    result = run_study(spec_from_dict(small_spec()), tmp_path, progress=False)
    assert not result.ok and list(result.errors) == ["train/D4-60-s1"]
    assert result.status["eval/D4-60-s1"] == "blocked" and result.status["eval/D4-60-s0"] == "ran"
    assert not (tmp_path / "train" / "D4-60-s1").exists()
    assert not [p for p in (tmp_path / "train").iterdir() if p.name.startswith(".")]
    monkeypatch.setitem(study_stages.RUNNERS, "train", fake)
    stale = tmp_path / "train" / ".D4-60-s1.x1y2z3"  # as a killed run leaves it
    stale.mkdir()
    (tmp_path / "train" / ".D4-60-s1-top5.keep").mkdir()  # another cell's: not touched
    recorded.clear()
    run_study(spec_from_dict(small_spec()), tmp_path, progress=False)  # resume: just that model
    assert {c.split("/")[1] for c in recorded if c != "report/report"} == {"D4-60-s1"}
    assert not stale.exists() and (tmp_path / "train" / ".D4-60-s1-top5.keep").exists()


def test_shard_runs_its_models_and_no_report(recorded: list[str], tmp_path: Path) -> None:
    spec = spec_from_dict(small_spec())
    result = run_study(spec, tmp_path, shard=(2, 3), progress=False)
    owned = {c.id for c in shard_of(plan(spec), 2, 3)}
    assert set(recorded) == owned | {"probe/annotations", "tasks/sftknow_study"}
    assert result.report is None and not (tmp_path / "report").exists()


def test_cli_dry_run_marks_done_cells(recorded: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump(small_spec()))
    run_study(load_spec(spec_file), tmp_path / "run", progress=False)
    assert cli.main(["study", str(spec_file), "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "done    train/D0-60-s0" in out and "todo    report/report" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {sizes: [60], colour: red}\n")
    assert cli.main(["study", str(bad), "--dry-run"]) == 2
    assert "grid.colour: unknown key" in capsys.readouterr().err


def test_reprobed_annotations_rerun_everything(tmp_path: Path) -> None:
    """A re-probe with the same settings keeps the probe's run id; the content digest still
    tells the study its categories may have changed."""
    folder = tmp_path / "annotated"
    (folder / "facts").mkdir(parents=True)
    (folder / "probe_config.json").write_text(json.dumps(
        {"run_id": "same", "files": {"train": "facts/train.jsonl"}, "complete": True}))
    (folder / "facts" / "train.jsonl").write_text('{"id": "a", "category": "D1"}\n')
    data = {**small_spec(), "probe": {"annotated": str(folder)}}
    before = {c.id: c.hash for c in plan(spec_from_dict(data))}
    (folder / "facts" / "train.jsonl").write_text('{"id": "a", "category": "D2"}\n')
    after = {c.id: c.hash for c in plan(spec_from_dict(data))}
    assert all(before[cell_id] != after[cell_id] for cell_id in before)
