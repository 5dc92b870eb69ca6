"""Writes per-bucket CBQA scores into a model card's eval results (model-index), through
huggingface_hub's ModelCard / EvalResult objects, for a local model folder or a Hub repo.

Before anything is written: the card's YAML metadata must parse (a malformed card is named in
the error, never rewritten), and every results file must be for the card's model (lm-eval's
``config.model_args`` ``pretrained=`` or ``model_name``; a local path counts when it resolves
to the model folder, or to a folder recording that Hub repo) unless ``force``. Each (task,
dataset, metric) appears once in the model-index: the newest results (lm-eval's ``date``)
replace older ones, and results of the families written replace the card's earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sftknow_eval.errors import UserError
from sftknow_eval.lineage import hub_origin
from sftknow_eval.lm_tasks.results import FamilyScores, read_results_file, recorded_model

DOMAIN_NAMES = {"id": "in-domain", "ood": "out-of-domain"}


def eval_results(scores: FamilyScores) -> list[EvalResult]:
    """One EvalResult per bucket and per domain Acc (values in percent, like the paper)."""
    results: list[EvalResult] = []
    for domain, buckets in scores.buckets.items():
        dataset = f"{scores.family}_{domain}"
        common = {"task_type": "question-answering", "task_name": "Closed-book QA",
                  "dataset_type": dataset,
                  "dataset_name": f"{scores.family} {DOMAIN_NAMES[domain]}"}
        for bucket, value in buckets.items():
            if value is not None:
                results.append(EvalResult(metric_type="accuracy", metric_value=round(100 * value, 2),
                                          metric_name=f"Acc {bucket}", **common))
        if scores.acc.get(domain) is not None:
            results.append(EvalResult(metric_type="accuracy",
                                      metric_value=round(100 * scores.acc[domain], 2),
                                      metric_name="Acc (mean over buckets)", **common))
    return results


def result_key(result: EvalResult) -> tuple[Any, ...]:
    """What makes two model-index entries the same entry: task, dataset, metric."""
    return (result.task_type, result.dataset_type, result.dataset_config, result.dataset_split,
            result.metric_type, result.metric_name, result.metric_config)


def _source(path: str) -> dict[str, Any]:
    """The lm-eval results file scores were read from ({} when it cannot be read again)."""
    try:
        return read_results_file(Path(path))
    except (OSError, UserError):
        return {}


def _date(scores: FamilyScores) -> float:
    """When the results were made: lm-eval's ``date``, else the file's modification time."""
    date = _source(scores.source).get("date")
    if isinstance(date, (int, float)):
        return float(date)
    try:
        return Path(scores.source).stat().st_mtime
    except OSError:
        return 0.0


def merge_results(card: ModelCard, scores: list[FamilyScores], model_name: str) -> ModelCard:
    """``card`` with the scores' results replacing earlier results of the same family; among
    ``scores``, the newest results of each (task, dataset, metric) win."""
    data: ModelCardData = card.data
    families = {f"{s.family}_{d}" for s in scores for d in s.buckets}
    merged: dict[tuple[Any, ...], EvalResult] = {}
    for result in data.eval_results or []:
        if result.dataset_type not in families:
            merged[result_key(result)] = result
    for score in sorted(scores, key=_date):  # oldest first: newer ones replace
        for result in eval_results(score):
            merged.pop(result_key(result), None)
            merged[result_key(result)] = result
    data.eval_results = list(merged.values())
    if not data.model_name:
        data.model_name = model_name
    card.data = data
    return card


def _malformed(where: str, problem: str) -> UserError:
    return UserError(f"{where}: malformed YAML metadata in the model card ({problem}); fix the "
                     "card (nothing was written)")


def load_card(load: Callable[[], ModelCard], where: str) -> ModelCard:
    """The card ``load`` returns (loading with metadata errors raised, not ignored); a
    UserError naming ``where`` when its YAML metadata block does not parse, is not a mapping,
    holds an unreadable model-index or is never closed, so a broken card is never rewritten."""
    try:
        card = load()
    except (yaml.YAMLError, ValueError) as error:
        text = str(error).strip()
        raise _malformed(where, text.splitlines()[0] if text else type(error).__name__) from None
    if not card.data.to_dict() and card.text.lstrip().startswith("---"):
        # huggingface_hub reads a block that is never closed as text, not metadata
        raise _malformed(where, "the block opened by '---' is never closed")
    return card


def _is_same_model(target: str, folder: Path | None, recorded: str) -> bool:
    if folder is not None:
        path = Path(recorded).expanduser()
        if path.exists() and path.resolve() == folder.resolve():
            return True
        mine = hub_origin(str(folder))
    else:
        mine = hub_origin(target)
    theirs = hub_origin(recorded)
    return bool(mine and theirs and mine.repo_id.lower() == theirs.repo_id.lower())


def check_model(target: str, folder: Path | None, scores: list[FamilyScores]) -> None:
    """A UserError naming every results file whose model is not ``target`` (its folder, or
    its Hub repo), or that does not record its model."""
    problems = []
    for source in sorted({s.source for s in scores}):
        recorded = recorded_model(_source(source))
        if recorded is None:
            problems.append(f"{source} does not record its model")
        elif not _is_same_model(target, folder, recorded):
            problems.append(f"{source} is for {recorded}")
    if problems:
        raise UserError(f"the results are not for {target}: " + "; ".join(problems)
                        + ". Pass --force (force=True) to write them into its card anyway")


def add_results(target: str, scores: list[FamilyScores], *, force: bool = False) -> str:
    """Write the results into ``target``'s card: a local folder's README.md (returns its path)
    or a Hub repo's (returns the commit URL, through hub.py). Results of another model are
    refused unless ``force``."""
    folder = Path(target)
    if folder.is_dir():
        if not force:
            check_model(target, folder, scores)
        readme = folder / "README.md"
        card = (load_card(lambda: ModelCard.load(readme), str(readme)) if readme.is_file()
                else ModelCard.from_template(ModelCardData()))
        merge_results(card, scores, folder.resolve().name).save(readme)
        return str(readme)
    if folder.exists() or target.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{target} is not a model folder")
    from sftknow_eval import hub

    hub.validate_repo_id(target, require_namespace=True)
    if not force:
        check_model(target, None, scores)
    card = load_card(lambda: hub.load_model_card(target, strict=True),
                     f"the card (README.md) of {target}")
    card = merge_results(card, scores, target.split("/")[-1])
    return hub.push_model_card(target, card, "Add closed-book QA results by mastery bucket")
