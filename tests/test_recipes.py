"""Shipped SFT recipes parse with TRL's own parser and carry the paper's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sftknow_eval.errors import UserError
from sftknow_eval.train.recipes import RECIPES_DIR, known_keys, load_recipe

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
PAPER = [p for p in RECIPES if p.stem != "tiny"]


def test_every_model_of_the_paper_has_a_recipe() -> None:
    models = {yaml.safe_load(p.read_text())["model_name_or_path"] for p in PAPER}
    assert {
        "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
        "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B",
    } <= models
    assert any(yaml.safe_load(p.read_text()).get("use_peft") for p in PAPER)  # a LoRA variant
    assert (RECIPES_DIR / "tiny.yaml").is_file()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_trl(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= known_keys()
    recipe = load_recipe(path)
    sft = recipe.sft
    assert sft.completion_only_loss is True
    assert sft.num_train_epochs == (10 if path.stem == "tiny" else 1)
    assert sft.per_device_train_batch_size * sft.gradient_accumulation_steps == 8
    assert getattr(sft.lr_scheduler_type, "value", sft.lr_scheduler_type) == "cosine"
    assert getattr(sft.optim, "value", sft.optim) == "adamw_torch"
    if path.stem != "tiny":
        assert raw["bf16"] is True
        assert sft.learning_rate == (1e-4 if raw.get("use_peft") else 1e-5)


def test_tiny_recipe_parses_like_trl_sft_cli() -> None:
    """`trl sft --config` parses it with nothing left over (it would go to accelerate)."""
    from trl.scripts.sft import make_parser

    *_, config_left, cli_left = make_parser().parse_args_and_config(
        ["--config", str(RECIPES_DIR / "tiny.yaml"), "--dataset_name", "data/"],
        return_remaining_strings=True, separate_remaining_strings=True,
    )
    assert config_left == [] and cli_left == []


def test_unknown_key_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rat: 1.0e-5\nepochs: 2\n")
    with pytest.raises(UserError, match="unknown recipe key.*epochs, learning_rat"):
        load_recipe(bad)
    with pytest.raises(UserError, match="unknown recipe key.*batch_size"):
        load_recipe(RECIPES_DIR / "tiny.yaml", ["batch_size=4"])


def test_overrides_and_bad_values(tmp_path: Path) -> None:
    recipe = load_recipe("tiny", ["learning_rate=3e-4", "seed=7"])
    assert recipe.sft.learning_rate == 3e-4 and recipe.sft.seed == 7
    assert recipe.sft.bf16 is False and recipe.sft.use_cpu is True  # no GPU here
    # YAML 1.1 would read "no" as False; an override keeps it the string TRL expects
    quiet = load_recipe("tiny", ["logging_strategy=no", "disable_tqdm=true"])
    assert quiet.sft.logging_strategy == "no" and quiet.sft.disable_tqdm is True
    with pytest.raises(UserError, match="key=value"):
        load_recipe("tiny", ["learning_rate"])
    with pytest.raises(UserError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(listy)


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed-zero3.yaml"])
def test_accelerate_configs(name: str) -> None:
    config = yaml.safe_load((RECIPES_DIR.parent / "accelerate" / name).read_text())
    assert config["distributed_type"] in {"FSDP", "DEEPSPEED"}
    assert config["mixed_precision"] == "bf16" and config["num_processes"] == 8
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] == 3
        assert config["deepspeed_config"]["zero3_save_16bit_model"] is True


def test_a_bad_value_is_one_line_not_trls_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=r"tiny\.yaml: num_train_epochs.*invalid float value: 'many'"):
        load_recipe("tiny", ["num_train_epochs=many"])
    assert "usage:" not in capsys.readouterr().err
