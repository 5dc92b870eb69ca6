"""pytest fixtures that point huggingface_hub at the local Hub server (tests/hub_server.py).

Register in tests/conftest.py with ``pytest_plugins = ["tests.hub_fixtures"]`` (or
``"hub_fixtures"`` when tests/ is on sys.path). ``local_hub`` starts a fresh server per test
and, for that test only, sets HF_ENDPOINT to it, HF_HUB_DISABLE_XET=1, a fake HF_TOKEN,
HF_HUB_OFFLINE=0 and an empty HF_HOME / cache. huggingface_hub reads these variables once
at import, so the matching ``huggingface_hub.constants`` attributes are patched as well.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import LocalHub  # noqa: E402

FAKE_TOKEN = "hf_local_test_token_not_a_secret"


def point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path,
                 token: str | None = FAKE_TOKEN) -> None:
    """Environment + huggingface_hub constants for a hub at ``url`` and a cache under ``home``."""
    from huggingface_hub import constants

    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_TOKEN_PATH": str(home / "token"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    patches = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A fresh local Hub with huggingface_hub pointed at it and an empty cache."""
    with LocalHub(tmp_path / "hub-server", token=FAKE_TOKEN) as hub:
        point_hub_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub


# ---------------------------------------------------------------------------------------
# a tiny causal LM for push/pull and training tests


TINY_SUBJECTS = ["varo", "quell", "ambrin", "tosk", "merrow", "fennick", "doralt", "ystin"]
TINY_OBJECTS = ["tessia", "corvane", "luthra", "omberg"]


def tiny_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-completion rows in the project's QA format over a toy world."""
    from sftknow_eval.prompts import qa_completion, qa_prompt

    rows = []
    for i in range(n):
        subject = TINY_SUBJECTS[(i + seed) % len(TINY_SUBJECTS)]
        obj = TINY_OBJECTS[(i * 7 + seed) % len(TINY_OBJECTS)]
        rows.append({
            "prompt": qa_prompt(f"Which country is {subject} located in?"),
            "completion": qa_completion(obj),
            "relation": "P17",
        })
    return rows


def build_tiny_model(folder: Path, *, with_pad: bool = False) -> Path:
    """A random 2-layer Llama and a word-level tokenizer (no pad token unless asked)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from sftknow_eval.prompts import ANSWER_MARKER, QUESTION_MARKER

    specials = ["<unk>", "<s>", "</s>", QUESTION_MARKER, ANSWER_MARKER]
    specials += ["<pad>"] if with_pad else []
    words = sorted({w.lower() for row in tiny_rows(64) for text in row.values()
                    for w in text.split()} - {QUESTION_MARKER.lower(), ANSWER_MARKER.lower()})
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>" if with_pad else None,
        additional_special_tokens=[QUESTION_MARKER, ANSWER_MARKER],
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=vocab.get("<pad>"),
    )
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + word-level tokenizer without a pad token (built once per run)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")
