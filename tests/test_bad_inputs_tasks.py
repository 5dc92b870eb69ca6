"""Bad inputs and lost data in tasks, select, results, card add-results, card lineage and the
temporary folders of killed runs: each gets a clear error (exit 2) or keeps what it must."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from probe_helpers import bucketed_test_facts

from sftknow_eval.cli import main

BUCKETS = ("D0", "D1", "D2", "D3", "D4")


def _cli_error(err: str) -> str:
    """The CLI's own error line (the last one; library warnings may come before it)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("sftknow-eval: error: "), err
    return last


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------
# tasks write --force


def test_tasks_write_force_replaces_only_the_familys_files(tmp_path: Path, caplog) -> None:
    from sftknow_eval.lm_tasks.family import write_family

    out = tmp_path / "fam"
    write_family(bucketed_test_facts({"D0": 2, "D2": 2, "D4": 1}), "tiny", "ye2025", BUCKETS, "fam", out)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "extra.csv").write_text("a,b\n")
    (out / "mine").mkdir()
    (out / "mine" / "deep.txt").write_text("deep")
    (out / "__pycache__").mkdir()
    (out / "__pycache__" / "utils.cpython-311.pyc").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        write_family(bucketed_test_facts({"D0": 2}), "tiny", "ye2025", BUCKETS, "fam", out)

    with caplog.at_level(logging.INFO, logger="sftknow_eval.lm_tasks.family"):
        write_family(bucketed_test_facts({"D0": 2, "D4": 1}), "tiny", "ye2025", BUCKETS, "fam", out,
                     force=True)
    files = _files(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "mine" / "deep.txt").read_text() == "deep"
    assert (out / "data" / "extra.csv").read_text() == "a,b\n"
    # D2 became empty: its tasks and data of the previous version are gone
    assert not {"fam_id_D2.yaml", "fam_ood_D2.yaml", "data/id_D2.jsonl"} & files
    assert {"fam_id_D0.yaml", "fam_ood_D4.yaml", "data/ood_D4.jsonl", "utils.py"} <= files
    assert not any(name.startswith("__pycache__") for name in files)
    assert json.loads((out / "family.json").read_text())["groups"]["fam_id"] == ["D0", "D4"]
    assert "fam_id_D2.yaml" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["fam"]  # no temporary folder left


def test_tasks_write_force_without_family_json_uses_the_name_pattern(tmp_path: Path) -> None:
    from sftknow_eval.lm_tasks.family import write_family

    out = tmp_path / "fam"
    write_family(bucketed_test_facts({"D1": 1, "D3": 1}), "tiny", "ye2025", BUCKETS, "fam", out)
    (out / "family.json").write_text("{broken")
    (out / "README.txt").write_text("keep me")
    write_family(bucketed_test_facts({"D1": 1}), "tiny", "ye2025", BUCKETS, "fam", out, force=True)
    files = _files(out)
    assert "fam_id_D3.yaml" not in files and "data/id_D3.jsonl" not in files
    assert (out / "README.txt").read_text() == "keep me"


def test_tasks_write_cli_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x.txt").write_text("x")
    (tmp_path / "a-file").write_text("x")
    for out, message in ((tmp_path / "occupied", "pass --force"),
                         (tmp_path / "a-file", "is a file")):
        assert main(["tasks", "write", "--annotated", "shipped", "--name", "f",
                     "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "occupied" / "x.txt").read_text() == "x"


# ---------------------------------------------------------------------------------------
# select


def test_select_refuses_to_overwrite_a_set(tmp_path: Path, capsys) -> None:
    from sftknow_eval.probe.annotated import shipped_annotated
    from sftknow_eval.select.sets import meta_path, select_sft_set

    out = tmp_path / "d2.jsonl"
    args = ["select", "--category", "D2", "--size", "10", "--seed", "0", "--out", str(out)]
    assert main(args) == 0
    before = out.read_bytes(), meta_path(out).read_bytes()
    assert main([*args[:-3], "1", "--out", str(out)]) == 2  # another seed, same file
    err = capsys.readouterr().err
    err = _cli_error(err)
    assert "already exist" in err and "--force" in err
    assert (out.read_bytes(), meta_path(out).read_bytes()) == before
    assert main([*args[:-3], "1", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() != before[0]
    assert json.loads(meta_path(out).read_text())["seed"] == 1

    out.unlink()  # only the sidecar is left: still refused
    with pytest.raises(FileExistsError, match="meta.json"):
        select_sft_set(shipped_annotated(), "D2", 10, 0, out)
    select_sft_set(shipped_annotated(), "D2", 10, 0, out, overwrite=True)
    assert out.is_file()


def test_select_out_must_be_a_file_path(tmp_path: Path, capsys) -> None:
    (tmp_path / "sets").mkdir()
    (tmp_path / "plain").write_text("x")
    for out, message in ((tmp_path / "sets", "is a folder"),
                         (tmp_path / "plain" / "d2.jsonl", "is a file, not a folder")):
        assert main(["select", "--category", "D2", "--size", "5", "--out", str(out)]) == 2
        assert message in _cli_error(capsys.readouterr().err)
    assert list((tmp_path / "sets").iterdir()) == []


def test_select_records_the_hub_dataset_it_drew_from(tmp_path: Path, local_hub) -> None:
    from sftknow_eval import hub
    from sftknow_eval.probe.annotated import shipped_annotated
    from sftknow_eval.select.sets import select_sft_set

    url = hub.push_folder(shipped_annotated(), "study/tiny-mastery", repo_type="dataset")
    _, meta = select_sft_set("study/tiny-mastery", "D4", 10, 0, tmp_path / "d4.jsonl")
    assert meta["source"] == "study/tiny-mastery"
    assert (meta["dataset_id"], meta["dataset_revision"]) == ("study/tiny-mastery",
                                                              url.rsplit("/", 1)[-1])
    _, local = select_sft_set(shipped_annotated(), "D4", 10, 0)
    assert local["dataset_id"] is None


# ---------------------------------------------------------------------------------------
# results


def _lm_eval_results(folder: Path, model: str, *, acc: float = 0.5, date: float = 1.0e9,
                     family: str = "fam", name: str = "results_2025-01-01T00-00-00.json") -> Path:
    """A results file in lm-eval's schema (keys as `lm_eval` writes them) for one family."""
    results, subtasks, samples = {}, {}, {}
    for domain in ("id", "ood"):
        group = f"{family}_{domain}"
        children = [f"{group}_D0", f"{group}_D4"]
        subtasks[group] = children
        results[group] = {"alias": group, "acc,none": acc, "acc_per_item,none": acc}
        for child in children:
            results[child] = {"alias": child, "acc,none": acc}
            samples[child] = {"original": 4, "effective": 4}
    subtasks[family] = [f"{family}_id", f"{family}_ood"]
    data = {"results": results, "group_subtasks": subtasks, "n-samples": samples,
            "config": {"model": "hf", "model_args": f"pretrained={model},dtype=float32"},
            "model_name": model, "date": date}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder / name


def test_results_save_to_a_folder_is_an_error(tmp_path: Path, capsys) -> None:
    good = _lm_eval_results(tmp_path / "eval", "org/model").parent
    (tmp_path / "tables").mkdir()
    assert main(["results", str(good), "--save", str(tmp_path / "tables")]) == 2
    captured = capsys.readouterr()
    assert "is a folder" in _cli_error(captured.err)
    assert captured.out == ""  # refused before any work
    assert main(["results", str(good), "--save", str(tmp_path / "new" / "t.md")]) == 0
    assert "| org/model | fam |" in (tmp_path / "new" / "t.md").read_text()


def test_results_name_every_path_without_results(tmp_path: Path, capsys) -> None:
    good = _lm_eval_results(tmp_path / "eval", "org/model").parent
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    _lm_eval_results(other, "org/model", family="fam")
    data = json.loads((other / "results_2025-01-01T00-00-00.json").read_text())
    data["group_subtasks"] = {}  # results of tasks that are not one of our families
    (other / "results_2025-01-01T00-00-00.json").write_text(json.dumps(data))
    assert main(["results", str(good), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and str(good) not in err
    assert main(["results", str(good), str(other)]) == 2
    assert str(other) in capsys.readouterr().err
    assert main(["results", str(good), str(good / "results_2025-01-01T00-00-00.json")]) == 0
    assert capsys.readouterr().out.count("| org/model |") == 1  # one file, one row


# ---------------------------------------------------------------------------------------
# card add-results


def _metrics(readme: Path) -> list[tuple]:
    from huggingface_hub import ModelCard

    return [(r.dataset_type, r.metric_name, r.metric_value)
            for r in ModelCard.load(readme).data.eval_results]


def test_add_results_refuses_a_malformed_card(tmp_path: Path, capsys) -> None:
    results = _lm_eval_results(tmp_path / "eval", str(tmp_path / "model"))
    (tmp_path / "model").mkdir()
    readme = tmp_path / "model" / "README.md"
    for text in ("---\nlicense: [mit\n---\n# my model\n",
                 "---\n- a list\n---\n# my model\n",
                 "---\nmodel-index: 3\n---\n# my model\n",
                 "---\nlicense: mit\n# my model, and the block is never closed\n"):
        readme.write_text(text)
        assert main(["card", "add-results", "--results", str(results), "--model",
                     str(tmp_path / "model")]) == 2
        err = _cli_error(capsys.readouterr().err)
        assert str(readme) in err and "malformed YAML" in err
        assert readme.read_text() == text  # nothing written


def test_add_results_checks_the_model(tmp_path: Path, capsys, monkeypatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    other = _lm_eval_results(tmp_path / "eval-other", "org/someone-else")
    assert main(["card", "add-results", "--results", str(other), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert "org/someone-else" in err and str(model) in err and "--force" in err
    assert not (model / "README.md").exists()
    assert main(["card", "add-results", "--results", str(other), "--model", str(model),
                 "--force"]) == 0
    assert (model / "README.md").is_file()

    # the same folder, written as lm_eval saw it from another working directory
    monkeypatch.chdir(tmp_path)
    relative = _lm_eval_results(tmp_path / "eval-rel", "./model/../model")
    assert main(["card", "add-results", "--results", str(relative), "--model", str(model)]) == 0
    unrecorded = _lm_eval_results(tmp_path / "eval-none", "x")
    data = json.loads(unrecorded.read_text())
    del data["config"], data["model_name"]
    unrecorded.write_text(json.dumps(data))
    assert main(["card", "add-results", "--results", str(unrecorded), "--model", str(model)]) == 2
    assert "does not record its model" in capsys.readouterr().err


def test_add_results_merges_duplicates_newest_first(tmp_path: Path) -> None:
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from sftknow_eval.lm_tasks.card_results import add_results
    from sftknow_eval.lm_tasks.results import collect

    model = tmp_path / "model"
    model.mkdir()
    card = ModelCard.from_template(ModelCardData(model_name="m"))
    keep = {"task_type": "text-generation", "dataset_type": "other", "dataset_name": "Other",
            "metric_type": "f1"}
    card.data.eval_results = [EvalResult(**keep, metric_value=1.0),
                              EvalResult(**keep, metric_value=2.0)]  # an older duplicate
    card.save(model / "README.md")
    newer = _lm_eval_results(tmp_path / "second", str(model), acc=0.75, date=2.0e9).parent
    older = _lm_eval_results(tmp_path / "first", str(model), acc=0.25, date=1.0e9).parent
    add_results(str(model), collect([newer, older]))
    add_results(str(model), collect([older, newer]))  # a rerun, in another order
    metrics = _metrics(model / "README.md")
    keys = [(d, n) for d, n, _ in metrics]
    assert len(keys) == len(set(keys)) == 1 + 2 * 3  # other + (D0, D4, mean) x (id, ood)
    assert {v for d, _, v in metrics if d.startswith("fam")} == {75.0}
    assert ("other", None, 2.0) in metrics


def test_add_results_on_a_hub_repo(tmp_path: Path, local_hub, capsys) -> None:
    from huggingface_hub import ModelCard

    from sftknow_eval import hub

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# remote\n")
    hub.push_folder(folder, "study/remote")
    mine = _lm_eval_results(tmp_path / "eval", "study/remote")
    theirs = _lm_eval_results(tmp_path / "eval2", "study/elsewhere")
    assert main(["card", "add-results", "--results", str(theirs), "--model", "study/remote"]) == 2
    assert "study/elsewhere" in capsys.readouterr().err
    assert main(["card", "add-results", "--results", str(mine), "--model", "study/remote"]) == 0
    card = ModelCard.load("study/remote")
    assert card.data.license == "mit" and len(card.data.eval_results) == 6

    (folder / "README.md").write_text("---\nmodel-index: [oops\n---\n# remote\n")
    hub.push_folder(folder, "study/remote", overwrite=True)
    commits = len(local_hub.state.requests)
    assert main(["card", "add-results", "--results", str(mine), "--model", "study/remote"]) == 2
    assert "the card (README.md) of study/remote" in capsys.readouterr().err
    assert not [p for m, p in local_hub.state.requests[commits:] if m == "POST"]  # nothing pushed


# ---------------------------------------------------------------------------------------
# model-card lineage (train and restore)


def _train_card(base_id: str, base_is_hub: bool, revision: str | None, meta: dict,
                tmp_path: Path):
    from sftknow_eval.train import load_recipe
    from sftknow_eval.train.sft import build_card

    data = tmp_path / "d.jsonl"
    data.write_text("")
    return build_card(base_id=base_id, base_revision=revision, base_is_hub=base_is_hub,
                      data=data, data_sha256="0" * 64, n_rows=3, meta=meta,
                      recipe=load_recipe("tiny", []), versions={"trl": "x"},
                      metrics={"train_loss": 1.0}, name="out")


def test_train_card_for_a_local_base_and_local_data(tmp_path: Path, tiny_model_dir: Path) -> None:
    card = _train_card(str(tiny_model_dir), False, None,
                       {"source": str(tmp_path / "probe-out"), "category": "D2", "size": 3},
                       tmp_path)
    metadata = card.data.to_dict()
    assert "base_model" not in metadata and "datasets" not in metadata
    assert str(tmp_path) not in card.data.to_yaml()  # no local path in the metadata
    assert f"the local model `{tiny_model_dir}`" in card.text
    assert f"local probe output `{tmp_path / 'probe-out'}`" in card.text


def test_train_card_for_a_hub_base_and_hub_data(tmp_path: Path, local_hub,
                                                tiny_model_dir: Path) -> None:
    from sftknow_eval import hub
    from sftknow_eval.train.sft import _record_push

    sha = hub.push_folder(tiny_model_dir, "study/tiny-base").rsplit("/", 1)[-1]
    meta = {"source": "study/probe", "dataset_id": "study/probe", "dataset_revision": "abc"}
    card = _train_card("study/tiny-base", True, sha, meta, tmp_path)
    assert (card.data.base_model, card.data.base_model_revision) == ("study/tiny-base", sha)
    assert card.data.base_model_relation == "finetune" and card.data.datasets == ["study/probe"]
    assert f"at revision `{sha}`" in card.text
    assert card.data.sft_training_data["dataset_revision"] == "abc"

    # a local copy that records its Hub repo: the cache snapshot, or a pushed train output
    snapshot = hub.resolve_model("study/tiny-base")
    card = _train_card(str(snapshot), False, None, {}, tmp_path)
    assert (card.data.base_model, card.data.base_model_revision) == ("study/tiny-base", sha)
    assert str(snapshot) not in card.data.to_yaml() and str(snapshot) in card.text
    pushed = tmp_path / "pushed"
    pushed.mkdir()
    (pushed / "training_run.json").write_text(json.dumps({"config_key": "k"}))
    _record_push(pushed, "study/tuned", f"{local_hub.url}/study/tuned/commit/{'a' * 40}")
    run = json.loads((pushed / "training_run.json").read_text())
    assert run["config_key"] == "k" and run["pushed_to"]["revision"] == "a" * 40
    card = _train_card(str(pushed), False, None, {}, tmp_path)
    assert (card.data.base_model, card.data.base_model_revision) == ("study/tuned", "a" * 40)


def _perturbed_copy(source: Path, out: Path) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    weights = load_file(out / "model.safetensors")
    torch.manual_seed(1)
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_restore_card_lineage_local_and_hub(tmp_path: Path, local_hub,
                                            tiny_model_dir: Path) -> None:
    from huggingface_hub import ModelCard

    from sftknow_eval import hub
    from sftknow_eval.restore.pipeline import RestoreConfig, restore

    tuned = _perturbed_copy(tiny_model_dir, tmp_path / "tuned")
    local = restore(RestoreConfig(base=str(tiny_model_dir), tuned=str(tuned),
                                  out=tmp_path / "local", k=[5], progress=False))
    card = ModelCard.load(local.folders["top5"] / "README.md")
    assert "base_model" not in card.data.to_dict()
    assert str(tmp_path) not in card.data.to_yaml() and str(tiny_model_dir) not in card.data.to_yaml()
    assert f"`{tuned}`" in card.text and f"`{tiny_model_dir}`" in card.text

    base_sha = hub.push_folder(tiny_model_dir, "study/base").rsplit("/", 1)[-1]
    tuned_sha = hub.push_folder(tuned, "study/tuned").rsplit("/", 1)[-1]
    remote = restore(RestoreConfig(base="study/base", tuned="study/tuned",
                                   out=tmp_path / "remote", k=[5], progress=False))
    card = ModelCard.load(remote.folders["top5"] / "README.md")
    assert (card.data.base_model, card.data.base_model_revision) == ("study/tuned", tuned_sha)
    assert card.data.restore["base"] == {"hub_id": "study/base", "revision": base_sha}
    assert str(tmp_path) not in card.data.to_yaml()
    assert f"[study/base](https://huggingface.co/study/base) at revision `{base_sha}`" in card.text


# ---------------------------------------------------------------------------------------
# temporary folders of killed runs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folders_are_cleaned(tmp_path: Path, caplog) -> None:
    from sftknow_eval.atomic import _host, atomic_folder, clean_stale_work

    out = tmp_path / "result"
    dead = tmp_path / f".result.tmp-{_dead_pid()}-{_host()}-abc123_x"
    live = tmp_path / f".result.tmp-{os.getpid()}-{_host()}-def456"
    elsewhere = tmp_path / f".result.tmp-{_dead_pid()}-another_host-ghi789"
    other_output = tmp_path / f".other.tmp-{_dead_pid()}-{_host()}-jkl012"
    legacy = tmp_path / ".result.tmp-k3j4h5g6"
    for folder in (dead, live, elsewhere, other_output, legacy):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"0" * 10)
    with caplog.at_level(logging.INFO, logger="sftknow_eval.atomic"):
        assert clean_stale_work(out) == [dead]
    assert str(dead) in caplog.text and "interrupted run" in caplog.text
    assert all(p.is_dir() for p in (live, elsewhere, other_output, legacy))

    dead.mkdir()
    with atomic_folder(out) as staging:  # every atomic output cleans before it starts
        (staging / "x").write_text("x")
    assert not dead.exists() and (out / "x").is_file()
    assert {p.name for p in tmp_path.iterdir()} == {"result", live.name, elsewhere.name,
                                                    other_output.name, legacy.name}


def test_train_cleans_its_stale_work_folder(tmp_path: Path, tiny_model_dir: Path, caplog) -> None:
    from hub_fixtures import tiny_rows

    from sftknow_eval.atomic import _host
    from sftknow_eval.train import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_rows(4)))
    out = tmp_path / "runs" / "model"
    out.parent.mkdir()
    stale = out.parent / f".model.tmp-{_dead_pid()}-{_host()}-zz9y8x7w"
    (stale / "trainer").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="sftknow_eval.atomic"):
        train("tiny", data, out, overrides=[f"model_name_or_path={tiny_model_dir}",
                                            "num_train_epochs=1", "max_steps=1"])
    assert not stale.exists() and str(stale) in caplog.text
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_atomic_folder_refuses_a_file(tmp_path: Path) -> None:
    from sftknow_eval.atomic import atomic_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"), atomic_folder(tmp_path / "f"):
        pass
    assert (tmp_path / "f").read_text() == "x"

