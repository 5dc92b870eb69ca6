"""Writes per-bucket CBQA scores into a model card's eval results (model-index), through
huggingface_hub's ModelCard / EvalResult objects, for a local model folder or a Hub repo."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sftknow_eval.lm_tasks.results import FamilyScores

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


def merge_results(card: ModelCard, scores: list[FamilyScores], model_name: str) -> ModelCard:
    """``card`` with the scores' results replacing earlier results of the same family."""
    data: ModelCardData = card.data
    families = {f"{s.family}_{d}" for s in scores for d in s.buckets}
    kept = [r for r in (data.eval_results or []) if r.dataset_type not in families]
    data.eval_results = kept + [r for s in scores for r in eval_results(s)]
    if not data.model_name:
        data.model_name = model_name
    card.data = data
    return card


def add_results(target: str, scores: list[FamilyScores]) -> str:
    """Write the results into ``target``'s card: a local folder's README.md (returns its path)
    or a Hub repo's (returns the commit URL, through hub.py)."""
    folder = Path(target)
    if folder.is_dir():
        readme = folder / "README.md"
        card = ModelCard.load(readme) if readme.is_file() else ModelCard.from_template(
            ModelCardData())
        merge_results(card, scores, folder.name).save(readme)
        return str(readme)
    if folder.exists() or target.startswith((".", "/")):
        raise FileNotFoundError(f"{target} is not a model folder")
    from sftknow_eval import hub

    card = merge_results(hub.load_model_card(target), scores, target.split("/")[-1])
    return hub.push_model_card(target, card, "Add closed-book QA results by mastery bucket")
