"""Finding the project's shipped YAML files (recipes/sft, recipes/study) by path or by name."""

from __future__ import annotations

import os
from pathlib import Path

from sftknow_eval.errors import UserError

RECIPES_ROOT = Path(__file__).resolve().parent.parent / "recipes"


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
