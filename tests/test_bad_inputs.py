"""Bad inputs fail before any work: push targets (train, probe, restore) and the analysis
commands' options (kl, updates)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hub_fixtures import tiny_rows

from sftknow_eval import hub
from sftknow_eval.cli import main
from sftknow_eval.errors import UserError

# problem -> what the error says
PUSH_PROBLEMS = {
    "bad-id": "invalid repo id",
    "no-token": "needs a token: set HF_TOKEN",
    "taken": "already has content",
}


def _never(what: str) -> Callable[..., None]:
    def called(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{what} ran although the push target was bad")
    return called


@pytest.fixture(params=sorted(PUSH_PROBLEMS))
def push_problem(request: pytest.FixtureRequest, local_hub, monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Path) -> tuple[Callable[..., str], str]:
    """(prepare, message): ``prepare(value, taken, repo_type)`` sets the problem up and returns
    the --push-to value to pass; ``taken`` is the repo that already holds a file."""
    kind = request.param

    def prepare(value: str, taken: str | None = None, repo_type: str = "model") -> str:
        if kind == "bad-id":
            return value.replace("/", "/not a repo ")
        if kind == "no-token":
            monkeypatch.delenv("HF_TOKEN")
            return value
        folder = tmp_path / "already-there"
        folder.mkdir()
        (folder / "notes.txt").write_text("pushed earlier")
        hub.push_folder(folder, taken or value, repo_type=repo_type)
        return value

    return prepare, PUSH_PROBLEMS[kind]


def _hub_repos(local_hub) -> set[str]:
    return {repo_id for _, repo_id in local_hub.state.repos}


def test_check_push_target_mirrors_push_folder(local_hub, tmp_path: Path, monkeypatch) -> None:
    hub.check_push_target("study/fresh")  # a repo not there yet is fine ...
    assert not local_hub.state.repos  # ... and is not created by the check
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    hub.push_folder(folder, "study/fresh")
    with pytest.raises(UserError, match="model repo study/fresh already has content .*a.txt"):
        hub.check_push_target("study/fresh")
    hub.check_push_target("study/fresh", overwrite=True)
    hub.check_push_target("study/fresh", repo_type="dataset")  # another repo type: free
    with pytest.raises(UserError, match="pushing needs 'namespace/name'"):
        hub.check_push_target("fresh")
    with pytest.raises(UserError, match="repo type 'space'"):
        hub.check_push_target("study/fresh", repo_type="space")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.check_push_target("study/other")


def test_train_checks_the_push_target_first(push_problem, local_hub, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from sftknow_eval.train import sft

    prepare, message = push_problem
    monkeypatch.setattr(sft, "load_recipe", _never("loading the recipe"))
    monkeypatch.setattr(sft, "_train_to", _never("training"))
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in tiny_rows(4)))
    push_to = prepare("study/tuned")
    before = _hub_repos(local_hub)
    with pytest.raises(UserError, match=message):
        sft.train("tiny", data, tmp_path / "model", push_to=push_to)
    assert not (tmp_path / "model").exists()
    assert _hub_repos(local_hub) == before


def test_probe_checks_the_push_target_first(push_problem, local_hub, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from sftknow_eval import readers
    from sftknow_eval.probe import run as probe_run

    prepare, message = push_problem
    monkeypatch.setattr(readers, "load_facts", _never("reading the facts"))
    monkeypatch.setattr(probe_run, "probe_facts", _never("probing"))
    push_to = prepare("study/mastery", repo_type="dataset")
    before = _hub_repos(local_hub)
    code = main(["probe", "--model-args", "pretrained=sftknow_eval/world_data/model",
                 "--facts", "shipped", "--out", str(tmp_path / "out"), "--push-to", push_to])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert _hub_repos(local_hub) == before


def test_restore_checks_every_variant_repo_first(push_problem, local_hub, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from sftknow_eval.restore import RestoreConfig, pipeline, restore

    prepare, message = push_problem
    monkeypatch.setattr(pipeline, "resolve_model", _never("reading a model"))
    # the second k's repo is the taken one: every derived repo id is checked
    push_to = prepare("study/restored", taken="study/restored-top5")
    before = _hub_repos(local_hub)
    with pytest.raises(UserError, match=message):
        restore(RestoreConfig(base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"),
                              out=tmp_path / "out", k=[1, 5], push_to=push_to, progress=False))
    assert not (tmp_path / "out").exists()
    assert _hub_repos(local_hub) == before


# -- kl / updates options --------------------------------------------------------------------


KL = ["kl", "--base", "base-model", "--tuned", "tuned-model", "--annotated", "shipped"]
UPDATES = ["updates", "--base", "base-model", "--tuned", "tuned-model"]


@pytest.mark.parametrize("flag", ["--batch-size", "--templates"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_kl_counts_are_usage_errors(flag: str, value: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*KL, "--out", str(tmp_path / "kl"), flag, value])
    assert exited.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [KL, UPDATES], ids=["kl", "updates"])
@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_that_is_a_file_fails_before_any_model(argv: list[str], where: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sftknow_eval.probe import annotated
    from sftknow_eval.weights import checkpoint as reader

    monkeypatch.setattr(hub, "resolve_model", _never("resolving a model"))
    monkeypatch.setattr(reader, "resolve_model", _never("resolving a model"))
    monkeypatch.setattr(annotated, "resolve_annotated", _never("reading the annotations"))
    file = tmp_path / "taken.txt"
    file.write_text("not a folder")
    out = file if where == "out" else file / "analysis"
    assert main([*argv, "--out", str(out)]) == 2
    assert f"--out {out}: not a folder" in capsys.readouterr().err
    assert file.read_text() == "not a folder"


def test_run_kl_checks_its_arguments_before_loading(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sftknow_eval.analysis.kl import run_kl
    from sftknow_eval.probe import annotated

    monkeypatch.setattr(annotated, "load_annotated", _never("reading the annotations"))
    with pytest.raises(UserError, match="--batch-size 0: must be an integer of at least 1"):
        run_kl("base", "tuned", "shipped", batch_size=0)
    with pytest.raises(UserError, match="--templates 0"):
        run_kl("base", "tuned", "shipped", templates=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        run_kl("base", "tuned", "shipped", out=tmp_path / "file")


def test_an_output_folder_under_a_file_is_a_usage_error(tmp_path: Path, capsys) -> None:
    """An --out whose parent is a file stops with a one-line error (exit 2), not a traceback,
    and the file is left as it was."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sftknow_eval.world.shipped import model_path

    tuned = tmp_path / "tuned"
    shutil.copytree(model_path(), tuned)
    weights = load_file(tuned / "model.safetensors")
    for name in weights:
        if "mlp" in name:
            weights[name] = weights[name] + 0.01
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main(["restore", "--base", str(model_path()), "--tuned", str(tuned), "--k", "5",
                 "--no-progress",
                 "--out", str(blocker / "restored")]) == 2
    assert "sftknow-eval: error: [Errno 20] Not a directory" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"
