"""The train stage: answer-only loss, bad input, the card, and the Hub round trip."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from hub_fixtures import point_hub_at, tiny_rows

from sftknow_eval import hub
from sftknow_eval.errors import UserError
from sftknow_eval.train import load_recipe, read_prompt_completion, train
from sftknow_eval.train.sft import build_trainer

FAST = ["num_train_epochs=1", "logging_steps=1"]


def _write(path: Path, rows: list[dict], meta: dict | None = None) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if meta is not None:
        path.with_name(path.name + ".meta.json").write_text(json.dumps(meta))
    return path


def test_loss_covers_answer_tokens_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in tiny_rows(4)]
    recipe = load_recipe("tiny", [f"model_name_or_path={tiny_model_dir}",
                                  "per_device_train_batch_size=4"])
    trainer = build_trainer(recipe, rows, tiny_model_dir, tmp_path)
    tokenizer = trainer.processing_class
    assert tokenizer.pad_token == tokenizer.eos_token  # the tokenizer had no pad token
    batch = next(iter(trainer.get_train_dataloader()))
    for input_ids, labels, mask in zip(batch["input_ids"], batch["labels"],
                                       batch["attention_mask"], strict=True):
        n = int(mask.sum())
        ids = input_ids[:n].tolist()
        answer_at = ids.index(tokenizer.convert_tokens_to_ids("<|answer|>"))
        assert (labels[: answer_at + 1] == -100).all()  # prompt: no loss
        assert (labels[n:] == -100).all()  # padding: no loss
        answer = labels[answer_at + 1 : n].tolist()
        assert answer == ids[answer_at + 1 :] and answer[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(answer, skip_special_tokens=True).strip()
        assert any(decoded == r["completion"].strip().lower() for r in rows)

    # the trainer's loss equals cross-entropy over the answer tokens (and EOS) only
    model = trainer.model.eval()
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep])
    assert torch.allclose(loss, by_hand, atol=1e-5)


def test_data_must_be_prompt_completion(tmp_path: Path) -> None:
    text = _write(tmp_path / "text.jsonl", [{"text": "q a"}])
    with pytest.raises(UserError, match=r"line 1: not prompt-completion data \(found \['text'\]\)"):
        read_prompt_completion(text)
    chat = _write(tmp_path / "chat.jsonl",
                  [{"prompt": [{"role": "user", "content": "q"}], "completion": " a"}])
    with pytest.raises(UserError, match="must be strings"):
        read_prompt_completion(chat)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "completion": " a"}\n{oops\n')
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_prompt_completion(broken)
    with pytest.raises(UserError, match="no such data file"):
        read_prompt_completion(tmp_path / "missing.jsonl")
    rows = read_prompt_completion(_write(tmp_path / "ok.jsonl", tiny_rows(3)))
    assert set(rows[0]) == {"prompt", "completion"}  # metadata fields are dropped


def test_train_push_pull_round_trip(local_hub, tiny_model_dir: Path, tmp_path: Path,
                                    monkeypatch) -> None:
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_url = hub.push_folder(tiny_model_dir, "study/tiny-base")
    base_sha = base_url.rsplit("/", 1)[-1]
    data = _write(tmp_path / "D2-16-s3.jsonl", tiny_rows(16, seed=3),
                  {"category": "D2", "size": 16, "seed": 3, "dataset_id": "study/tiny-probe",
                   "base_model": "study/tiny-base"})
    out = tmp_path / "runs" / "D2-16-s3"
    result = train("tiny", data, out, overrides=["model_name_or_path=study/tiny-base", *FAST],
                   push_to="study/tiny-sft")

    # a complete model folder, written atomically (no temp folder left beside it)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "training_run.json", "recipe.yaml"} <= names
    assert "training_args.bin" not in names
    assert [p.name for p in out.parent.iterdir()] == ["D2-16-s3"]
    assert result.metrics["train_loss"] > 0

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "study/tiny-base"
    assert card.data.base_model_revision == base_sha
    assert card.data.base_model_relation == "finetune"
    assert card.data.datasets == ["study/tiny-probe"]
    data_meta = card.data.sft_training_data
    assert (data_meta["category"], data_meta["size"], data_meta["seed"]) == ("D2", 16, 3)
    assert data_meta["dataset_id"] == "study/tiny-probe"
    assert card.data.sft_hyperparameters["learning_rate"] == 1e-4
    assert card.data.sft_hyperparameters["completion_only_loss"] is True
    versions = set(card.data.sft_library_versions)
    assert {"trl", "transformers", "torch", "huggingface-hub"} <= versions
    run = json.loads((out / "training_run.json").read_text())
    assert run["base_model"]["revision"] == base_sha and run["data"]["rows"] == 16
    # the local folder records where it was pushed (cards of models derived from it use it)
    assert run["pushed_to"] == {"repo_id": "study/tiny-sft",
                                "revision": result.commit_url.rsplit("/", 1)[-1]}
    assert load_recipe(out / "recipe.yaml").model.model_name_or_path == "study/tiny-base"

    # pushed, then pulled back into an empty cache: byte-identical and loadable
    assert result.commit_url and "/study/tiny-sft/commit/" in result.commit_url
    point_hub_at(monkeypatch, local_hub.url, tmp_path / "empty-hf-home")
    pulled = hub.resolve_model("study/tiny-sft")
    assert str(pulled).startswith(str(tmp_path / "empty-hf-home"))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
        assert (pulled / name).read_bytes() == (out / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(pulled)
    AutoTokenizer.from_pretrained(pulled)
    saved = load_file(out / "model.safetensors")
    for key, tensor in model.state_dict().items():
        if key in saved:
            assert tensor.equal(saved[key]), key

    # a rerun with the same recipe and data finds the output and skips the work
    again = train("tiny", data, out, overrides=["model_name_or_path=study/tiny-base", *FAST])
    assert again.skipped
    with pytest.raises(UserError, match="holds another run"):
        train("tiny", data, out, overrides=["model_name_or_path=study/tiny-base",
                                            "learning_rate=5e-5", *FAST])


def test_cli_train_command(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from sftknow_eval.train import commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    data = _write(tmp_path / "d.jsonl", tiny_rows(8))
    out = tmp_path / "cli-out"
    args = parser.parse_args(["train", "--recipe", "tiny", "--data", str(data), "--out", str(out),
                              f"model_name_or_path={tiny_model_dir}", *FAST])
    assert args.func(args) == 0
    assert "model: " in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "base_model:" not in card  # a local base model is not claimed as a Hub id
    bad = parser.parse_args(["train", "--recipe", "tiny", "--data", str(data), "--out",
                             str(tmp_path / "x"), "not_a_key=1"])
    with pytest.raises(UserError, match="not_a_key"):
        bad.func(bad)


WORLD_MODEL = Path(__file__).resolve().parents[1] / "sftknow_eval" / "world_data" / "model"


@pytest.mark.slow
@pytest.mark.skipif(not (WORLD_MODEL / "config.json").is_file(), reason="tiny world not built")
def test_tiny_world_fine_tune_under_two_minutes(tmp_path: Path) -> None:
    """The issue's budget: the shipped tiny.yaml on 240 rows of the tiny world, on this CPU."""
    from sftknow_eval.train.sft import resolve_base

    assert resolve_base("sftknow_eval/world_data/model") == str(WORLD_MODEL)
    data = _write(tmp_path / "d.jsonl", tiny_rows(240))
    result = train("tiny", data, tmp_path / "out")
    assert result.seconds < 120, result.seconds
