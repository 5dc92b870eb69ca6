"""What a wheel install needs: every package and run-time file ships, the shipped recipes, study
specs and task families are found by name, and the tiny recipe exports for `trl sft --config`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from sftknow_eval.cli import main
from sftknow_eval.errors import UserError
from sftknow_eval.recipe_files import (
    PACKAGE_ROOT,
    export_recipe,
    find_task_family,
    shipped_files,
    shipped_folder,
)

REPO = PACKAGE_ROOT.parent

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_pyproject_lists_every_package_folder() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in PACKAGE_ROOT.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    mapped = _pyproject()["tool"]["setuptools"]["package-dir"]
    assert mapped == {"sftknow_eval.recipes": "recipes", "sftknow_eval.tasks": "tasks"}


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_wheel_carries_every_run_time_file(tmp_path: Path) -> None:
    """The built wheel holds the synonyms, the tiny world, and every tracked file of recipes/ and
    tasks/ (under sftknow_eval/), and no test or benchmark."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("sftknow_eval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("sftknow_eval/data/synonyms.json",
                     "sftknow_eval/world_data/model/model.safetensors",
                     "sftknow_eval/world_data/annotated/probe_config.json",
                     "sftknow_eval/world_data/world.json"):
        assert required in names
    for tracked in _tracked("recipes") + _tracked("tasks"):
        assert f"sftknow_eval/{tracked}" in names, f"{tracked} is not in the wheel"
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert not any("__pycache__" in n for n in names)


def test_shipped_folder_prefers_the_packaged_copy(tmp_path: Path) -> None:
    package = tmp_path / "site" / "sftknow_eval"
    (package / "recipes").mkdir(parents=True)
    assert shipped_folder("recipes", package) == package / "recipes"  # a wheel install
    assert shipped_folder("tasks", package) == tmp_path / "site" / "tasks"  # a checkout


def test_shipped_files_are_found_by_name() -> None:
    kinds = {(f.kind, f.name) for f in shipped_files()}
    assert {("sft", "tiny"), ("study", "tiny"), ("study", "llama3-8b"), ("accelerate", "fsdp"),
            ("tasks", "sftknow_tiny")} <= kinds
    assert find_task_family("sftknow_tiny") == find_task_family("tiny")
    assert (find_task_family("tiny") / "family.json").is_file()
    with pytest.raises(UserError, match="not shipped.*sftknow_tiny"):
        find_task_family("nope")


def test_recipes_path_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "path", "tiny"]) == 0
    assert capsys.readouterr().out.strip().endswith("sft/tiny.yaml")
    assert main(["recipes", "path", "tiny", "--kind", "study"]) == 0
    assert capsys.readouterr().out.strip().endswith("study/tiny.yaml")
    assert main(["recipes", "path", "sftknow_tiny"]) == 0
    assert Path(capsys.readouterr().out.strip(), "family.json").is_file()
    assert main(["recipes", "path", "missing"]) == 2
    assert "nothing shipped is called 'missing'" in capsys.readouterr().err


def test_exported_tiny_recipe_runs_from_any_directory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`trl sft --config` parses the export with nothing left over, from a directory that is not
    the checkout, and its model path is a real model folder."""
    from trl.scripts.sft import make_parser

    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "export", "tiny", "--out", "cfg/tiny.yaml"]) == 0
    exported = yaml.safe_load(Path("cfg/tiny.yaml").read_text())
    model = Path(exported["model_name_or_path"])
    assert model.is_absolute() and (model / "config.json").is_file()
    shipped = yaml.safe_load((REPO / "recipes/sft/tiny.yaml").read_text())
    assert {k: v for k, v in exported.items() if k != "model_name_or_path"} == \
        {k: v for k, v in shipped.items() if k != "model_name_or_path"}
    *_, config_left, cli_left = make_parser().parse_args_and_config(
        ["--config", "cfg/tiny.yaml", "--dataset_name", "data/"],
        return_remaining_strings=True, separate_remaining_strings=True,
    )
    assert config_left == [] and cli_left == []


def test_export_refuses_to_clobber(tmp_path: Path) -> None:
    target = tmp_path / "tiny.yaml"
    target.write_text("mine: true\n")
    with pytest.raises(UserError, match="exists; pass --force"):
        export_recipe("tiny", target)
    assert target.read_text() == "mine: true\n"
    export_recipe("tiny", target, force=True)
    assert "model_name_or_path" in target.read_text()
    with pytest.raises(UserError, match="is a folder"):
        export_recipe("tiny", tmp_path)


def test_accelerate_configs_are_found_by_name_or_checkout_path(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sftknow_eval.recipe_files import find_accelerate_config

    monkeypatch.chdir(tmp_path)  # no recipes/ here, as for a wheel install
    assert find_accelerate_config("fsdp").name == "fsdp.yaml"
    assert find_accelerate_config("recipes/accelerate/fsdp.yaml") == find_accelerate_config("fsdp")
    mine = tmp_path / "recipes" / "accelerate" / "fsdp.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("num_processes: 2\n")
    assert find_accelerate_config("recipes/accelerate/fsdp.yaml") == Path("recipes/accelerate/fsdp.yaml")
    with pytest.raises(UserError, match="accelerate config nope: no such file"):
        find_accelerate_config("nope")
