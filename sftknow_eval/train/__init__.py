"""The train stage: SFT recipes (flat TRL YAML) and TRL's SFTTrainer on select's output."""

from sftknow_eval.train.recipes import Recipe, find_recipe, known_keys, load_recipe
from sftknow_eval.train.sft import TrainResult, read_prompt_completion, read_sidecar, train

__all__ = [
    "Recipe",
    "TrainResult",
    "find_recipe",
    "known_keys",
    "load_recipe",
    "read_prompt_completion",
    "read_sidecar",
    "train",
]
