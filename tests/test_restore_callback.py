"""Restoration inside a training run: RestoreCallback with TRL's SFTTrainer, and `train
--restore-k`, whose variants are byte-identical to `sftknow-eval restore` on the same pair."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from hub_fixtures import tiny_rows

from sftknow_eval import hub
from sftknow_eval.cli import main
from sftknow_eval.errors import UserError
from sftknow_eval.train import train
from sftknow_eval.train.restore_callback import RestoreCallback, variants_folder

FAST = ["num_train_epochs=1", "logging_steps=1", "disable_tqdm=true"]


def _data(path: Path, n: int = 16) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in tiny_rows(n)))
    return path


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _trainer(base: Path, output: Path, callback: RestoreCallback, **settings):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftknow_eval.train.sft import prepare_tokenizer

    args = SFTConfig(output_dir=str(output), use_cpu=True, bf16=False, report_to="none",
                     per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1,
                     disable_tqdm=True, completion_only_loss=True, **settings)
    return SFTTrainer(model=AutoModelForCausalLM.from_pretrained(base), args=args,
                      train_dataset=Dataset.from_list(tiny_rows(16)),
                      processing_class=prepare_tokenizer(AutoTokenizer.from_pretrained(base)),
                      callbacks=[callback])


def test_train_restore_k_is_byte_identical_to_restore(tiny_model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sft" / "d2"
    code = main(["train", "--recipe", "tiny", "--data", str(_data(tmp_path / "d.jsonl")),
                 "--out", str(out), "--restore-k", "5,20", f"model_name_or_path={tiny_model_dir}",
                 *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    restored = variants_folder(out)
    assert restored == tmp_path / "sft" / "d2-restored"
    assert f"restored top5: {restored / 'top5'}" in printed
    assert sorted(p.name for p in restored.iterdir()) == ["top20", "top5"]

    assert main(["restore", "--base", str(tiny_model_dir), "--tuned", str(out), "--k", "5,20",
                 "--out", str(tmp_path / "after")]) == 0
    for variant in ("top5", "top20"):
        during, after = restored / variant, tmp_path / "after" / variant
        assert _weights(during) and _weights(during) == _weights(after), variant
        assert _weights(during) != _weights(out)  # something was reset
        stats = json.loads((during / "restore_stats.json").read_text())
        stats_after = json.loads((after / "restore_stats.json").read_text())
        del stats["run"], stats_after["run"]  # how and when each was invoked
        assert stats == stats_after
        assert {"config.json", "tokenizer.json", "README.md"} <= {p.name for p in during.iterdir()}


def test_callback_restores_each_checkpoint_and_the_final_model(tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    """Inside a plain SFTTrainer run: every saved checkpoint and the final model get their
    variants beside them, read from the saved shards."""
    from safetensors.torch import load_file

    output = tmp_path / "run"
    callback = RestoreCallback(base=str(tiny_model_dir), k=[10], at_each_save=True)
    trainer = _trainer(tiny_model_dir, output, callback, max_steps=4, save_strategy="steps",
                       save_steps=2)
    trainer.train()
    for saved in (output / "checkpoint-2", output / "checkpoint-4", output):
        variant = variants_folder(saved) / "top10"
        assert (variant / "model.safetensors").is_file(), variant
        assert callback.results[saved].folders == {"top10": variant}
        stats = json.loads((variant / "restore_stats.json").read_text())
        restored, total = stats["restored_elements"], stats["region_elements"]
        assert restored == total // 10
        # every restored element is back at its base value, the rest are the fine-tune's
        base = load_file(tiny_model_dir / "model.safetensors")
        tuned = load_file(saved / "model.safetensors")
        new = load_file(variant / "model.safetensors")
        reset = sum(int(((new[n] == base[n]) & (tuned[n] != base[n])).sum()) for n in new
                    if ".layers." in n and n.endswith("proj.weight"))
        assert 0 < reset <= restored
    assert not (tmp_path / "run-restored" / "top10" / "checkpoint-2").exists()


def test_other_architecture_stops_before_the_first_step(tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size = 48
    other = tmp_path / "other-base"
    LlamaForCausalLM(config).save_pretrained(other)
    trainer = _trainer(tiny_model_dir, tmp_path / "run", RestoreCallback(base=str(other), k=[5]),
                       max_steps=2, save_strategy="no")
    with pytest.raises(UserError, match="intermediate_size 48 but the model being trained has 64"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert not (tmp_path / "run-restored").exists()


def test_bad_settings_fail_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="k must lie strictly between 0 and 100"):
        RestoreCallback(base=str(tiny_model_dir), k=[100])
    with pytest.raises(UserError, match="--region 'nowhere'"):
        RestoreCallback(base=str(tiny_model_dir), region="nowhere")
    with pytest.raises(UserError, match="at least one k"):
        RestoreCallback(base=str(tiny_model_dir), k=[])
    out = tmp_path / "never"
    with pytest.raises(UserError, match="k must lie strictly between 0 and 100"):
        train("tiny", _data(tmp_path / "d.jsonl"), out, restore_k=[0],
              overrides=[f"model_name_or_path={tiny_model_dir}", *FAST])
    assert not out.exists()
    # pushing from a trainer needs a full org/name id for the variants' repos (checked when
    # training begins; a trainer with push_to_hub would create its own repo first)
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(push_to_hub=True, hub_model_id="no-org")
    with pytest.raises(UserError, match="hub_model_id as org/name"):
        RestoreCallback(base=str(tiny_model_dir)).on_train_begin(args, TrainerState(),
                                                                 TrainerControl())


def test_train_pushes_each_variant_to_its_own_repo(local_hub, tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    out = tmp_path / "sft"
    result = train("tiny", _data(tmp_path / "d.jsonl"), out, push_to="study/tiny-sft",
                   restore_k=[5], overrides=[f"model_name_or_path={tiny_model_dir}", *FAST])
    assert set(result.restored) == {"top5"} and "/study/tiny-sft-top5/commit/" in \
        result.restored_pushed["top5"]
    files = set(HfApi().list_repo_files("study/tiny-sft-top5"))
    assert {"model.safetensors", "README.md", "restore_stats.json"} <= files
    assert not any("restored" in name for name in HfApi().list_repo_files("study/tiny-sft"))
    # the variant's card names the fine-tune's repo as its parent, not a local path
    card = hub.load_model_card("study/tiny-sft-top5")
    assert card.data.base_model == "study/tiny-sft"
