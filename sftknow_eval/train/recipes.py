"""SFT recipes: flat TRL YAML configs (the ``trl sft --config`` format), loaded strictly.

A recipe holds only keys of TRL's own ``sft`` dataclasses (ScriptArguments, SFTConfig,
ModelConfig, DatasetMixtureConfig) plus TRL's ``env`` section, so the same file runs with
``trl sft --config``. Loading goes through TRL's ``TrlParser``; unknown keys (in the file or
in ``key=value`` overrides) are named in the error instead of being passed on silently.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sftknow_eval.errors import UserError
from sftknow_eval.recipe_files import RECIPES_ROOT, find_yaml

# Keys TRL's parser reads itself rather than handing to a dataclass.
TRL_SPECIAL_KEYS = frozenset({"env"})
RECIPES_DIR = RECIPES_ROOT / "sft"


def _dataclass_types() -> tuple[type, ...]:
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    # the same tuple, in the same order, as trl/scripts/sft.py's make_parser
    return (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)


def known_keys() -> frozenset[str]:
    """Every key a recipe may hold."""
    names = {f.name for cls in _dataclass_types() for f in dataclasses.fields(cls) if f.init}
    return frozenset(names) | TRL_SPECIAL_KEYS


@dataclass
class Recipe:
    """A parsed recipe: TRL's dataclasses plus the flat mapping they came from."""

    path: Path | None
    values: dict[str, Any]  # the effective flat recipe (file, then overrides)
    script: Any  # trl.ScriptArguments
    sft: Any  # trl.SFTConfig
    model: Any  # trl.ModelConfig
    datasets: Any  # trl.DatasetMixtureConfig

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.values, sort_keys=False)


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file by path, or a shipped recipe by name (``tiny``: recipes/sft/tiny.yaml)."""
    return find_yaml(name_or_path, RECIPES_DIR, "recipe")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["learning_rate=1e-4", "seed=3"]`` -> ``{"learning_rate": 1e-4, "seed": 3}``."""
    result: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise UserError(f"override {pair!r}: expected key=value (e.g. learning_rate=1e-4)")
        parsed = yaml.safe_load(value) if value.strip() else None
        # YAML 1.1 reads yes/no/on/off as booleans; only true/false mean a boolean here, so
        # that e.g. logging_strategy=no stays the string TRL expects.
        if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
            parsed = value.strip()
        result[key] = parsed
    return result


def _check_keys(keys: list[str], where: str) -> None:
    unknown = sorted(set(keys) - known_keys())
    if unknown:
        raise UserError(
            f"{where}: unknown recipe key(s) {', '.join(unknown)} (a recipe holds only TRL SFT "
            "keys: fields of trl.SFTConfig, trl.ModelConfig, trl.ScriptArguments)"
        )


def _bad_value(recipe_path: Path) -> Any:
    def refuse(message: str) -> None:
        raise UserError(f"{recipe_path}: {message.replace('argument --', '')}")

    return refuse


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def load_recipe(
    path: str | os.PathLike[str],
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    adapt_to_machine: bool = True,
) -> Recipe:
    """Parse a recipe with TRL's own parser, then apply ``overrides``.

    With ``adapt_to_machine`` and no GPU, bf16 is switched off and ``use_cpu`` on (TRL's
    default bf16=True refuses to start on a CPU-only machine).
    """
    from trl import TrlParser

    recipe_path = find_recipe(path)
    try:
        values = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"{recipe_path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"{recipe_path}: a recipe is a flat YAML mapping of TRL SFT keys")
    _check_keys(list(values), str(recipe_path))
    extra = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    _check_keys(list(extra), "override")
    values = {**values, **extra}
    if adapt_to_machine and not on_gpu():
        values["bf16"] = False
        values["fp16"] = False
        values["use_cpu"] = True
        if values.get("dtype") in ("bfloat16", "float16"):
            values["dtype"] = "float32"
    values.setdefault("output_dir", "runs/sft")

    # Parse the effective mapping exactly as `trl sft --config` would.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
        effective = handle.name
    env_before = dict(os.environ)
    try:
        parser = TrlParser(_dataclass_types())
        parser.error = _bad_value(recipe_path)  # not argparse's usage of every TRL flag and exit
        script, sft, model, datasets = parser.parse_args_and_config(
            ["--config", effective], fail_with_unknown_args=True
        )
    except (ValueError, TypeError) as error:
        raise UserError(f"{recipe_path}: {error}") from None
    except SystemExit:  # argparse reports a bad value and exits
        raise UserError(f"{recipe_path}: a value does not parse (see the message above)") from None
    finally:
        os.unlink(effective)
        # TRL exports the recipe's `env:` section; keep it, but never clobber what was set
        for key, value in env_before.items():
            os.environ[key] = value
    return Recipe(path=recipe_path, values=values, script=script, sft=sft, model=model,
                  datasets=datasets)
