"""Token-level lens (docs/METHOD.md §5): KL between the fine-tuned and the base model's
distributions of the FIRST answer token, on facts the base model knows well (D4).

For each fact the base model sees its relation's best mapping template (a completion prefix)
and the tuned model the SFT question prompt. The tuned model's top-10 next-token ids are taken;
both models' logits over those ids are renormalised with a softmax; the score is
KL(tuned || base). ``full_vocab=True`` scores the full-vocabulary KL instead.

Rules the paper leaves open, fixed here:
* "best mapping template" of a relation: the template whose greedy completion by the base model
  contains an accepted answer for the most of the analysed facts of that relation (ties: the
  earlier template);
* the first answer token is the next token after the prompt (prompts end without a trailing
  space); the answer's own first token, reported beside the KL, is the first token of
  ``" " + object`` (the SFT completion's form), the canonical object deciding when aliases
  start differently.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact
from sftknow_eval.matching import contains_answer
from sftknow_eval.prompts import qa_prompt
from sftknow_eval.relations import RELATIONS

logger = logging.getLogger(__name__)
TOP_K = 10


def kl_over_top_ids(tuned_logits: torch.Tensor, base_logits: torch.Tensor,
                    top_k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(tuned || base) after renormalising both over the tuned model's top-k ids.

    Returns (kl, top_ids). Computed in float64 for a stable, hand-checkable result.
    """
    tuned = tuned_logits.double()
    base = base_logits.double()
    top_ids = tuned.topk(top_k, dim=-1).indices
    log_p = torch.log_softmax(tuned.gather(-1, top_ids), dim=-1)
    log_q = torch.log_softmax(base.gather(-1, top_ids), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1), top_ids


def kl_full_vocab(tuned_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL(tuned || base) over the whole vocabulary."""
    log_p = torch.log_softmax(tuned_logits.double(), dim=-1)
    log_q = torch.log_softmax(base_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def next_token_logits(model: Any, tokenizer: Any, prompts: Sequence[str],
                      batch_size: int = 64, desc: str = "logits") -> torch.Tensor:
    """The logits of the token that follows each prompt (left-padded batches)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    rows = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc,
                          disable=len(prompts) <= batch_size):
            encoded = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt",
                                padding=True, add_special_tokens=False)
            rows.append(model(**encoded).logits[:, -1, :].float())
    finally:
        tokenizer.padding_side = side
    return torch.cat(rows)


def check_same_tokenizer(base_tokenizer: Any, tuned_tokenizer: Any) -> None:
    """Both models must share one vocabulary: the KL compares distributions over token ids."""
    if base_tokenizer.get_vocab() != tuned_tokenizer.get_vocab():
        raise UserError("the base and tuned tokenizers differ; the first-token KL compares "
                        "distributions over the same token ids, so both must use one tokenizer")


def best_templates(model: Any, tokenizer: Any, facts: Sequence[Fact],
                   templates: int | None = None) -> dict[str, tuple[int, str, float]]:
    """Per relation: (index, template, greedy success) of the base model's best template."""
    from sftknow_eval.generation import greedy_complete

    prompts, owners = [], []
    for fact in facts:
        for index, template in enumerate(RELATIONS[fact.relation].templates(templates)):
            prompts.append(template.format(subject=fact.subject))
            owners.append((fact, index))
    completions = greedy_complete(model, tokenizer, prompts, max_new_tokens=16,
                                  progress=len(prompts) > 512, desc="choosing templates")
    hits: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for (fact, index), text in zip(owners, completions, strict=True):
        hits[fact.relation][index].append(int(contains_answer(text, fact.aliases)))
    chosen = {}
    for relation, by_template in hits.items():
        index = max(sorted(by_template), key=lambda i: sum(by_template[i]) / len(by_template[i]))
        rate = sum(by_template[index]) / len(by_template[index])
        chosen[relation] = (index, RELATIONS[relation].mapping_templates[index], rate)
    return chosen


@dataclass
class FactKL:
    """One fact's first-token comparison."""

    id: str
    relation: str
    category: str | None
    kl: float
    base_prompt: str
    tuned_prompt: str
    answer_first_token: str
    tuned_top1: str
    base_top1: str
    tuned_top1_is_answer: bool
    base_top1_is_answer: bool


def compare_first_tokens(base: Any, tuned: Any, tokenizer: Any, facts: Sequence[Fact],
                         model_key: str, *, full_vocab: bool = False, templates: int | None = None,
                         batch_size: int = 64) -> tuple[list[FactKL], dict[str, Any]]:
    """Per-fact KL records and the chosen template per relation."""
    chosen = best_templates(base, tokenizer, facts, templates)
    base_prompts = [chosen[f.relation][1].format(subject=f.subject) for f in facts]
    tuned_prompts = [qa_prompt(f.question) for f in facts]
    base_logits = next_token_logits(base, tokenizer, base_prompts, batch_size, "base logits")
    tuned_logits = next_token_logits(tuned, tokenizer, tuned_prompts, batch_size, "tuned logits")
    if full_vocab:
        values = kl_full_vocab(tuned_logits, base_logits)
    else:
        values, _ = kl_over_top_ids(tuned_logits, base_logits)
    records = []
    for i, fact in enumerate(facts):
        answer_ids = tokenizer(" " + fact.object, add_special_tokens=False)["input_ids"]
        first = answer_ids[0] if answer_ids else -1
        tuned_top = int(tuned_logits[i].argmax())
        base_top = int(base_logits[i].argmax())
        records.append(FactKL(
            id=fact.id, relation=fact.relation, category=fact.category(model_key),
            kl=float(values[i]), base_prompt=base_prompts[i], tuned_prompt=tuned_prompts[i],
            answer_first_token=tokenizer.convert_ids_to_tokens(first) if first >= 0 else "",
            tuned_top1=tokenizer.convert_ids_to_tokens(tuned_top),
            base_top1=tokenizer.convert_ids_to_tokens(base_top),
            tuned_top1_is_answer=tuned_top == first, base_top1_is_answer=base_top == first,
        ))
    templates_used = {rel: {"index": i, "template": t, "base_greedy_success": rate}
                      for rel, (i, t, rate) in sorted(chosen.items())}
    return records, templates_used


def summarize(records: Sequence[FactKL]) -> dict[str, Any]:
    """Mean, median and count overall, per relation and per category."""
    def stats(values: list[float]) -> dict[str, float | int]:
        return {"facts": len(values), "mean": statistics.fmean(values),
                "median": statistics.median(values)}

    by_relation: dict[str, list[float]] = defaultdict(list)
    by_category: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_relation[record.relation].append(record.kl)
        by_category[str(record.category)].append(record.kl)
    values = [r.kl for r in records]
    return {**stats(values),
            "tuned_top1_is_answer": sum(r.tuned_top1_is_answer for r in records) / len(records),
            "per_relation": {k: stats(v) for k, v in sorted(by_relation.items())},
            "per_category": {k: stats(v) for k, v in sorted(by_category.items())}}


def training_metadata(tuned_folder: Path) -> dict[str, Any]:
    """Category / size / seed of a tuned model, from train's ``training_run.json`` if present."""
    path = tuned_folder / "training_run.json"
    if not path.is_file():
        return {}
    run = json.loads(path.read_text(encoding="utf-8"))
    meta = (run.get("data") or {}).get("metadata") or {}
    return {key: meta[key] for key in ("category", "size", "seed") if meta.get(key) is not None}


def run_kl(base: str, tuned: str, annotated: str | Path, *, category: str | None = "D4",
           split: str = "test", out: str | Path | None = None, full_vocab: bool = False,
           templates: int | None = None, batch_size: int = 64) -> dict[str, Any]:
    """docs/METHOD.md §5 for one base / tuned pair on an annotated fact set; writes ``kl.jsonl`` and
    ``kl_summary.json`` into ``out`` when given, and returns the summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftknow_eval import hub
    from sftknow_eval.analysis.checks import (
        check_out_folder,
        positive_int,
        require_finite_models,
        strict_json,
    )
    from sftknow_eval.atomic import atomic_folder
    from sftknow_eval.probe.annotated import load_annotated
    from sftknow_eval.versions import library_versions

    positive_int(batch_size, "--batch-size")
    positive_int(templates, "--templates", allow_none=True)
    if out is not None:
        check_out_folder(out)
    facts, model_key, scheme = load_annotated(annotated)
    chosen = [f for f in facts if f.split == split
              and (category is None or f.category(model_key) == category)]
    if not chosen:
        raise UserError(f"no {split} facts in category {category} for {model_key} in {annotated}: "
                        "nothing to compare")
    base_path, tuned_path = hub.resolve_model(base), hub.resolve_model(tuned)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tuned_path))
    base_model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    tuned_model = AutoModelForCausalLM.from_pretrained(tuned_path, dtype=torch.float32).eval()
    require_finite_models(base_model, tuned_model)  # NaN / Inf weights: refused, as in restore
    records, templates_used = compare_first_tokens(
        base_model, tuned_model, tokenizer, chosen, model_key, full_vocab=full_vocab,
        templates=templates, batch_size=batch_size)
    broken = [r.id for r in records if not math.isfinite(r.kl)]
    if broken:
        raise UserError(f"the KL of {len(broken)} fact(s) is not finite (first: {broken[0]}): "
                        f"the logits of {base} or {tuned} overflow; nothing written")
    summary = {
        "base": base, "tuned": tuned, "annotated": str(annotated), "mastery_model": model_key,
        "scheme": scheme, "category": category, "split": split,
        "measure": "full-vocabulary KL" if full_vocab else f"KL over the tuned top-{TOP_K} ids",
        "training": training_metadata(Path(tuned_path)),
        **summarize(records), "templates": templates_used, "versions": library_versions(),
    }
    if out is not None:
        lines = "".join(strict_json(asdict(r), "kl.jsonl") + "\n" for r in records)
        text = strict_json(summary, "kl_summary.json", indent=2) + "\n"
        with atomic_folder(out) as staging:
            (staging / "kl.jsonl").write_text(lines, encoding="utf-8")
            (staging / "kl_summary.json").write_text(text, encoding="utf-8")
    return summary
