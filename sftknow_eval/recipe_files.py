"""The project's shipped files (recipes/sft, recipes/study, recipes/accelerate, tasks/): where an
install keeps them, finding one by name or path, and exporting a recipe for ``trl sft``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftknow_eval.errors import UserError

PACKAGE_ROOT = Path(__file__).resolve().parent


def shipped_folder(name: str, package_root: Path = PACKAGE_ROOT) -> Path:
    """A wheel carries ``recipes/`` and ``tasks/`` inside the package (pyproject maps them there);
    a checkout (or an editable install of one) keeps them at the top level beside the package."""
    inside = package_root / name
    return inside if inside.is_dir() else package_root.parent / name


RECIPES_ROOT = shipped_folder("recipes")
TASKS_ROOT = shipped_folder("tasks")

# kind -> (folder, what a file of that kind is called in messages)
KINDS: dict[str, tuple[Path, str]] = {
    "sft": (RECIPES_ROOT / "sft", "recipe"),
    "study": (RECIPES_ROOT / "study", "study spec"),
    "accelerate": (RECIPES_ROOT / "accelerate", "accelerate config"),
}


@dataclass(frozen=True)
class ShippedFile:
    """One shipped recipe, study spec, accelerate config or task family."""

    kind: str  # sft | study | accelerate | tasks
    name: str  # what `--recipe NAME`, `study NAME` or `tasks path NAME` accept
    path: Path  # a YAML file, or a task family's folder (an lm-eval include path)


def find_yaml(name_or_path: str | os.PathLike[str], folder: Path, what: str) -> Path:
    """``name_or_path`` if it is a file, else ``folder/<name>.yaml`` or ``folder/<name>``; a
    UserError listing the shipped names otherwise (``what`` names the kind, e.g. "recipe")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (folder / f"{name_or_path}.yaml", folder / str(name_or_path)):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in folder.glob("*.yaml"))
    raise UserError(f"{what} {name_or_path}: no such file (shipped {what}s: {', '.join(shipped)})")


def find_accelerate_config(name_or_path: str | os.PathLike[str]) -> Path:
    """An accelerate config file by path, or a shipped one by name (``fsdp``,
    ``deepspeed-zero3``); ``recipes/accelerate/fsdp.yaml`` also finds the shipped file from an
    installed wheel, where no such relative path exists."""
    path = Path(name_or_path)
    folder, what = KINDS["accelerate"]
    if not path.is_file() and path.parent.as_posix() == "recipes/accelerate":
        return find_yaml(path.name, folder, what)
    return find_yaml(name_or_path, folder, what)


def task_families() -> list[ShippedFile]:
    """The shipped lm-eval task families: each folder of tasks/ that ``tasks write`` made."""
    families = []
    for folder in sorted(TASKS_ROOT.glob("*/family.json")):
        name = json.loads(folder.read_text(encoding="utf-8")).get("family", folder.parent.name)
        families.append(ShippedFile("tasks", name, folder.parent))
    return families


def shipped_files() -> list[ShippedFile]:
    """Every shipped recipe, study spec, accelerate config and task family."""
    files = [
        ShippedFile(kind, path.stem, path)
        for kind, (folder, _) in KINDS.items()
        for path in sorted(folder.glob("*.yaml"))
    ]
    return files + task_families()


def find_task_family(name: str) -> Path:
    """A shipped task family's folder by family name (``sftknow_tiny``) or folder name (``tiny``)."""
    families = task_families()
    for family in families:
        if name in (family.name, family.path.name):
            return family.path
    known = ", ".join(f"{f.name} ({f.path.name})" for f in families)
    raise UserError(f"task family {name}: not shipped (shipped: {known}); write one with "
                    "`sftknow-eval tasks write`")


def resolve_package_path(value: str) -> str:
    """A recipe's ``sftknow_eval/...`` path (the tiny world's model) as an absolute path inside
    this install; anything else (a Hub id, an existing path) is returned unchanged."""
    if Path(value).expanduser().exists() or not value.startswith("sftknow_eval/"):
        return value
    inside = PACKAGE_ROOT / value.removeprefix("sftknow_eval/")
    return str(inside) if inside.exists() else value


def export_recipe(name_or_path: str | os.PathLike[str], out: str | os.PathLike[str],
                  *, force: bool = False) -> Path:
    """Write a copy of a recipe that ``trl sft --config OUT`` runs from any working directory:
    paths into the package (``sftknow_eval/world_data/model``) become absolute paths of this
    install. Comments are not kept (the copy is data for TRL; the shipped file documents it)."""
    source = find_yaml(name_or_path, KINDS["sft"][0], "recipe")
    target = Path(out)
    if target.is_dir():
        raise UserError(f"{target}: is a folder; give the file to write (e.g. {target}/tiny.yaml)")
    if target.exists() and not force:
        raise UserError(f"{target}: exists; pass --force to replace it")
    values = yaml.safe_load(source.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise UserError(f"{source}: a recipe is a flat YAML mapping of TRL SFT keys")
    if isinstance(values.get("model_name_or_path"), str):
        values["model_name_or_path"] = resolve_package_path(values["model_name_or_path"])
    header = f"# {source.name} exported by `sftknow-eval recipes export` for this install\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(header + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    partial.replace(target)
    return target
