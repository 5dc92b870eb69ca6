"""The train stage: TRL SFTTrainer on select's prompt-completion jsonl, to a complete model.

The output folder holds safetensors weights, config, generation config, tokenizer, a model
card (README.md, built with huggingface_hub's ModelCard) and ``training_run.json`` (the
effective recipe, data digest and metadata, metrics, library versions) plus ``recipe.yaml``
(the effective flat recipe, reusable with ``trl sft --config``). It is written to a temporary
folder beside ``out`` and renamed into place when complete (a later run removes the ones
killed runs left, see ``sftknow_eval.atomic``); a rerun with the same config and data finds it
and skips the work. After ``push_to``, ``training_run.json`` records the repo and commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftknow_eval import hub
from sftknow_eval.atomic import clean_stale_work, work_folder
from sftknow_eval.errors import UserError
from sftknow_eval.lineage import HubOrigin, commit_sha, folder_origin, is_hub_id
from sftknow_eval.recipe_files import resolve_package_path
from sftknow_eval.train.recipes import Recipe, load_recipe
from sftknow_eval.versions import library_versions

logger = logging.getLogger(__name__)

RUN_FILE = "training_run.json"
CARD_HYPERPARAMETERS = (
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
    "max_length", "completion_only_loss", "bf16", "seed",
)


@dataclass
class TrainResult:
    output: Path
    metrics: dict[str, Any]
    seconds: float
    skipped: bool = False
    commit_url: str | None = None
    restored: dict[str, Path] = field(default_factory=dict)  # variant -> folder (restore_k)
    restored_pushed: dict[str, str] = field(default_factory=dict)  # variant -> commit URL


# ---------------------------------------------------------------------------------------
# data


def read_sidecar(data: Path) -> dict[str, Any]:
    """The select stage's ``<file>.meta.json`` (category, size, seed, dataset id...), if any."""
    sidecar = data.with_name(data.name + ".meta.json")
    if not sidecar.is_file():
        return {}
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{sidecar}: not valid JSON: {error}") from None
    return meta if isinstance(meta, dict) else {}


def read_prompt_completion(data: Path) -> list[dict[str, str]]:
    """Rows of a prompt-completion jsonl (extra fields dropped); UserError naming the line."""
    if not data.is_file():
        raise UserError(f"{data}: no such data file")
    rows: list[dict[str, str]] = []
    with data.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{data}, line {number}: not valid JSON: {error.msg}") from None
            if not isinstance(row, dict) or not {"prompt", "completion"} <= set(row):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(
                    f"{data}, line {number}: not prompt-completion data (found {found}); "
                    "train expects select's jsonl rows with string 'prompt' and 'completion'"
                )
            if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
                raise UserError(
                    f"{data}, line {number}: 'prompt' and 'completion' must be strings"
                )
            if not row["completion"].strip():
                raise UserError(f"{data}, line {number}: empty completion")
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise UserError(f"{data}: no rows")
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# model


def resolve_base(name: str) -> str:
    """A recipe's model: a Hub id, a local folder, or a path inside the installed package."""
    return resolve_package_path(name)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token one: its EOS (padding is masked out of the loss)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError("the tokenizer has neither a pad token nor an EOS token to pad with")
        logger.info("tokenizer has no pad token: padding with EOS %r (masked out of the loss)",
                    tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_trainer(recipe: Recipe, rows: list[dict[str, str]], model_path: Path, work: Path) -> Any:
    """TRL's SFTTrainer for ``rows`` with the recipe's settings (output under ``work``)."""
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer, get_peft_config

    args = copy.deepcopy(recipe.sft)
    args.output_dir = str(work / "trainer")
    if args.completion_only_loss is False:
        logger.warning("recipe sets completion_only_loss: false: the prompt is trained on too")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_path))
    dtype = recipe.model.dtype or "auto"
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=getattr(torch, dtype) if dtype != "auto" else "auto",
        attn_implementation=recipe.model.attn_implementation,
        trust_remote_code=args.trust_remote_code,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=get_peft_config(recipe.model),
    )


# ---------------------------------------------------------------------------------------
# card


def _dataset_origin(meta: dict[str, Any]) -> HubOrigin | None:
    """The Hub dataset an SFT set was drawn from, as its select sidecar records it."""
    for key in ("dataset_id", "dataset"):
        value = meta.get(key)
        if isinstance(value, str) and "/" in value and is_hub_id(value):
            revision = meta.get("dataset_revision")
            return HubOrigin(value, revision if isinstance(revision, str) else None, "dataset")
    return None


def build_card(*, base_id: str, base_revision: str | None, base_is_hub: bool,
               data: Path, data_sha256: str, n_rows: int, meta: dict[str, Any],
               recipe: Recipe, versions: dict[str, str], metrics: dict[str, Any],
               name: str) -> Any:
    """The output's model card: lineage, training data, hyperparameters, versions.

    ``base_model`` (with ``base_model_revision``) names a Hub id only: the base's, or for a
    local base the Hub repo the folder records it is a copy of (``lineage.folder_origin``);
    a purely local base is named in the text, never in the metadata. ``datasets`` names the
    Hub dataset the SFT set was drawn from, when its sidecar records one.
    """
    from huggingface_hub import ModelCard, ModelCardData

    origin = HubOrigin(base_id, base_revision) if base_is_hub else folder_origin(base_id)
    dataset = _dataset_origin(meta)
    hyper = {key: recipe.values.get(key, getattr(recipe.sft, key, None))
             for key in CARD_HYPERPARAMETERS}
    hyper["use_peft"] = bool(recipe.model.use_peft)
    training_data = {
        "file": data.name,
        "sha256": data_sha256,
        "size": meta.get("size", n_rows),
        "rows": n_rows,
        "category": meta.get("category"),
        "seed": meta.get("seed"),
        "dataset_id": dataset.repo_id if dataset else None,
        "dataset_revision": dataset.revision if dataset else None,
    }
    card_data = ModelCardData(
        base_model=origin.repo_id if origin else None,
        base_model_relation="finetune" if origin else None,
        base_model_revision=origin.revision if origin else None,
        datasets=[dataset.repo_id] if dataset else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=name,
        tags=["sftknow-eval", "trl", "sft"]
        + ([f"mastery-{training_data['category']}"] if training_data["category"] else []),
        sft_training_data=training_data,
        sft_hyperparameters=hyper,
        sft_library_versions=versions,
    )
    if origin is None:
        base_line = f"the local model `{base_id}` (not from the Hub)"
    elif base_is_hub:
        base_line = origin.markdown()
    else:
        base_line = f"{origin.markdown()} (read from the local copy `{base_id}`)"
    source = meta.get("source")
    if dataset is not None:
        data_line = f"drawn from the Hub dataset {dataset.markdown()}"
    elif source:
        data_line = f"drawn by `sftknow-eval select` from the local probe output `{source}`"
    else:
        data_line = "a local file (no select sidecar beside it)"
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    data_rows = "\n".join(f"| {k} | {v} |" for k, v in training_data.items())
    versions_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    loss = metrics.get("train_loss")
    body = f"""
# {name}

Supervised fine-tune of {base_line} on closed-book QA pairs
(`<|question|> ... <|answer|>` prompt, answer-only loss), made with `sftknow-eval train`
(TRL `SFTTrainer`) to study what SFT does to a model's factual knowledge
(Ye et al., EMNLP 2025).

## Training data

`{data.name}`: {n_rows} QA pairs, {data_line}.

| field | value |
|---|---|
{data_rows}

## Hyperparameters

| key | value |
|---|---|
{rows}

Final training loss: {loss if loss is None else f"{loss:.4f}"}.

## Libraries

{versions_line}
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


# ---------------------------------------------------------------------------------------
# the stage


def _config_key(recipe: Recipe, data_sha256: str) -> str:
    blob = json.dumps({"recipe": recipe.values, "data": data_sha256}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def train(
    recipe: str | os.PathLike[str] | Recipe,
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    overrides: dict[str, Any] | list[str] | None = None,
    push_to: str | None = None,
    *,
    overwrite_remote: bool = False,
    restore_k: list[float] | None = None,
    restore_region: str = "transformer",
) -> TrainResult:
    """Fine-tune the recipe's model on ``data``; write a complete model folder at ``out``.

    ``push_to`` (``org/name``) uploads the folder with :func:`sftknow_eval.hub.push_folder`.
    ``restore_k`` (percentages) also writes the restored variants of the fine-tuned model
    (its most-changed ``restore_region`` weights reset to the recipe's base model) to
    ``<out>-restored/top<k>/`` through :class:`.restore_callback.RestoreCallback`,
    byte-identical to ``sftknow-eval restore`` on the same pair; with ``push_to`` each goes to
    ``<push_to>-top<k>``.
    """
    started = time.perf_counter()
    if push_to:  # a bad repo id, a missing token or a repo with content fail before any work
        hub.check_push_target(push_to, overwrite=overwrite_remote)
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    restorer = _restorer(loaded, restore_k, restore_region)  # a bad k or region fails now
    for name in restorer.variant_names() if restorer and push_to else []:
        hub.check_push_target(f"{push_to}-{name}", overwrite=overwrite_remote)
    data_path, out_path = Path(data), Path(out)
    rows = read_prompt_completion(data_path)
    meta = read_sidecar(data_path)
    data_sha256 = _sha256(data_path)
    key = _config_key(loaded, data_sha256)

    run_file = out_path / RUN_FILE
    if run_file.is_file() and json.loads(run_file.read_text()).get("config_key") == key:
        logger.info("%s already holds this run (same recipe and data): skipping", out_path)
        result = TrainResult(out_path, json.loads(run_file.read_text()).get("metrics", {}),
                             time.perf_counter() - started, skipped=True)
    else:
        if out_path.exists():
            raise UserError(f"{out_path} exists and holds another run: remove it or pick --out")
        result = _train_to(loaded, rows, meta, data_path, data_sha256, key, out_path, started)
    if push_to:
        result.commit_url = hub.push_folder(out_path, push_to, overwrite=overwrite_remote,
                                            commit_message=f"sftknow-eval train: {out_path.name}")
        _record_push(out_path, push_to, result.commit_url)
    if restorer:  # after the push, so the variants' cards name the fine-tune's Hub repo
        restored = restorer.restore_folder(out_path, push_to=push_to)
        result.restored, result.restored_pushed = dict(restored.folders), dict(restored.pushed)
    return result


def _restorer(loaded: Recipe, restore_k: list[float] | None, region: str) -> Any:
    """The RestoreCallback for ``restore_k`` (None without), its base the recipe's model."""
    if not restore_k:
        return None
    from sftknow_eval.train.restore_callback import RestoreCallback

    base = loaded.model.model_name_or_path
    if not base:
        raise UserError(f"{loaded.path}: the recipe names no model_name_or_path")
    base = resolve_base(base)
    revision = loaded.model.model_revision if hub._local_folder(base) is None else None
    return RestoreCallback(base=base, k=restore_k, region=region, base_revision=revision,
                           at_train_end=False)


def _record_push(out: Path, repo_id: str, commit_url: str | None) -> None:
    """Note in the local ``training_run.json`` which Hub repo (and commit) holds this model,
    so cards of models derived from the local folder can name its Hub id."""
    run_file = out / RUN_FILE
    run = json.loads(run_file.read_text(encoding="utf-8"))
    run["pushed_to"] = {"repo_id": repo_id, "revision": commit_sha(commit_url)}
    temp = run_file.with_name(f".{RUN_FILE}.{os.getpid()}")
    temp.write_text(json.dumps(run, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, run_file)


def _train_to(recipe: Recipe, rows: list[dict[str, str]], meta: dict[str, Any], data: Path,
              data_sha256: str, key: str, out: Path, started: float) -> TrainResult:
    from transformers import GenerationConfig

    base_name = recipe.model.model_name_or_path
    if not base_name:
        raise UserError(f"{recipe.path}: the recipe names no model_name_or_path")
    base_id = resolve_base(base_name)
    base_is_hub = hub._local_folder(base_id) is None
    revision = recipe.model.model_revision if base_is_hub else None
    hub.check_model(base_id, revision)  # config + safetensors headers first: fails in seconds
    model_path = hub.resolve_model(base_id, revision)
    base_revision = model_path.name if base_is_hub else None  # snapshots/<commit sha>

    # A killed run leaves its work folder (.<out>.tmp-<pid>-<host>-*) beside ``out``; those
    # whose process is gone are removed here (atomic.clean_stale_work), the rest left alone.
    clean_stale_work(out)
    work = work_folder(out)
    try:
        trainer = build_trainer(recipe, rows, model_path, work)
        sft = trainer.args
        world = sft.world_size
        global_batch = sft.per_device_train_batch_size * sft.gradient_accumulation_steps * world
        logger.info("training %s on %d rows: global batch %d (%d x %d x %d processes)",
                    base_name, len(rows), global_batch, sft.per_device_train_batch_size,
                    sft.gradient_accumulation_steps, world)
        output = trainer.train()
        metrics = dict(output.metrics)
        final = work / "model"
        model = trainer.model
        if recipe.model.use_peft:
            model = model.merge_and_unload()  # a complete model, not an adapter
            if trainer.is_world_process_zero():
                model.save_pretrained(final)
                trainer.processing_class.save_pretrained(final)
        else:
            # Trainer.save_model gathers sharded weights under FSDP / ZeRO-3 (all ranks call it)
            trainer.save_model(str(final))
        if trainer.is_world_process_zero():
            (final / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run is in JSON
            if not (final / "generation_config.json").is_file():
                GenerationConfig.from_model_config(model.config).save_pretrained(final)
            versions = library_versions()
            card = build_card(base_id=base_name if base_is_hub else base_id,
                              base_revision=base_revision, base_is_hub=base_is_hub, data=data,
                              data_sha256=data_sha256, n_rows=len(rows), meta=meta,
                              recipe=recipe, versions=versions, metrics=metrics, name=out.name)
            card.save(final / "README.md")
            (final / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            run = {
                "config_key": key,
                "recipe_file": str(recipe.path) if recipe.path else None,
                "recipe": recipe.values,
                "base_model": {"id": base_name, "path": str(model_path),
                               "revision": base_revision},
                "data": {"file": str(data), "sha256": data_sha256, "rows": len(rows),
                         "metadata": meta},
                "global_batch_size": global_batch,
                "metrics": metrics,
                "seconds": round(time.perf_counter() - started, 2),
                "versions": versions,
            }
            (final / RUN_FILE).write_text(json.dumps(run, indent=2, default=str) + "\n")
            os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    logger.info("wrote %s in %.1f s (train loss %s)", out, seconds, metrics.get("train_loss"))
    return TrainResult(out, metrics, seconds)
