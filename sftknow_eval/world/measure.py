"""Fitness checks of a tiny world (docs/TINY_WORLD.md, "What it measures").

* graded knowledge: greedy completion of the mapping templates, success rate per corpus
  frequency band;
* extractable knowledge: a short answer-only SFT on question/answer pairs of frequent
  in-domain facts, then greedy answers to held-out questions, per group of facts.

The SFT here is a deliberately plain loop (the TRL recipes are the study's path); it only
shows that the model's knowledge can be reached through the question format.
"""

from __future__ import annotations

import copy
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftknow_eval.facts import Fact
from sftknow_eval.generation import greedy_complete
from sftknow_eval.matching import contains_answer
from sftknow_eval.prompts import qa_completion, qa_prompt
from sftknow_eval.relations import RELATIONS
from sftknow_eval.world.knowledge import EXPOSURE_BANDS, exposure_band


def template_success(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    templates_per_relation: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Per fact id: the share of its relation's mapping templates completed correctly (greedy)."""
    prompts, owners = [], []
    for fact in facts:
        for template in RELATIONS[fact.relation].templates(templates_per_relation):
            prompts.append(template.format(subject=fact.subject))
            owners.append(fact)
    completions = greedy_complete(model, tokenizer, prompts, progress=progress, desc="cloze")
    hits: dict[str, list[bool]] = defaultdict(list)
    for fact, completion in zip(owners, completions, strict=True):
        hits[fact.id].append(contains_answer(completion, fact.aliases))
    return {fact_id: sum(values) / len(values) for fact_id, values in hits.items()}


def rate_by_band(facts: Sequence[Fact], score: dict[str, float]) -> dict[str, dict[str, float]]:
    """Mean score and fact count per exposure band."""
    groups: dict[str, list[float]] = defaultdict(list)
    for fact in facts:
        if fact.id in score:
            groups[exposure_band(int(fact.meta.get("exposure", 0)))].append(score[fact.id])
    return {
        band: {"facts": len(groups[band]), "rate": sum(groups[band]) / len(groups[band])}
        for band in EXPOSURE_BANDS if groups[band]
    }


@dataclass
class ExtractionSettings:
    """The plain SFT used by the extraction check."""

    train_size: int = 240
    min_exposure: int = 16
    learning_rate: float = 1e-4
    epochs: int = 10
    batch_size: int = 16
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def answer_only_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """Right-padded prompt+completion+EOS ids, with labels masked (-100) outside the answer."""
    rows, labels = [], []
    for prompt, completion in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        rows.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids}


def plain_sft(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Fact],
    settings: ExtractionSettings,
) -> PreTrainedModel:
    """A copy of ``base`` fine-tuned on ``train``'s QA pairs with an answer-only loss."""
    model = copy.deepcopy(base)
    model.train()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    pairs = [(qa_prompt(f.question), qa_completion(f.object)) for f in train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    for _ in range(settings.epochs):
        rng.shuffle(pairs)
        for start in range(0, len(pairs), settings.batch_size):
            batch = answer_only_batch(tokenizer, pairs[start:start + settings.batch_size])
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def qa_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact]
) -> float:
    """Greedy closed-book QA accuracy (SFT prompt, containment of an alias)."""
    if not facts:
        return float("nan")
    answers = greedy_complete(model, tokenizer, [qa_prompt(f.question) for f in facts],
                              max_new_tokens=16, stop_strings=())
    return sum(contains_answer(a, f.aliases) for a, f in zip(answers, facts, strict=True)) / len(facts)


def extraction_groups(facts: Sequence[Fact], min_exposure: int) -> dict[str, list[Fact]]:
    """The fact groups the extraction check reports on (all held out from SFT)."""
    def exposure(f: Fact) -> int:
        return int(f.meta.get("exposure", 0))

    return {
        "frequent_in_domain_test": [f for f in facts if f.domain == "in" and f.split == "test"
                                    and exposure(f) >= min_exposure],
        "frequent_out_of_domain": [f for f in facts if f.domain == "out"
                                   and exposure(f) >= min_exposure],
        "absent_test": [f for f in facts if f.split == "test" and exposure(f) == 0],
    }


def choose_sft_facts(
    facts: Sequence[Fact], settings: ExtractionSettings
) -> tuple[list[Fact], list[Fact]]:
    """Frequent in-domain training-pool facts: ``train_size`` for SFT (balanced across
    relations), the rest kept as a validation set for choosing the settings."""
    rng = random.Random(settings.seed)
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        if fact.split == "train" and fact.domain == "in" and \
                int(fact.meta.get("exposure", 0)) >= settings.min_exposure:
            by_relation[fact.relation].append(fact)
    for group in by_relation.values():
        rng.shuffle(group)
    chosen: list[Fact] = []
    relations = sorted(by_relation)
    while len(chosen) < settings.train_size and any(by_relation.values()):
        for relation in relations:
            if by_relation[relation] and len(chosen) < settings.train_size:
                chosen.append(by_relation[relation].pop())
    validation = [f for group in by_relation.values() for f in group]
    return chosen, validation


def extraction_check(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    settings: ExtractionSettings,
) -> dict[str, float | int | dict]:
    """Fine-tune on frequent in-domain pairs; accuracy on the validation set and each group."""
    train, validation = choose_sft_facts(facts, settings)
    tuned = plain_sft(base, tokenizer, train, settings)
    report: dict[str, float | int | dict] = {
        "settings": settings.to_dict(),
        "sft_pairs": len(train),
        "validation_facts": len(validation),
        "validation_accuracy": qa_accuracy(tuned, tokenizer, validation),
        "before_sft_frequent_in_domain_test": qa_accuracy(
            base, tokenizer, extraction_groups(facts, settings.min_exposure)["frequent_in_domain_test"]
        ),
    }
    for name, group in extraction_groups(facts, settings.min_exposure).items():
        report[f"{name}_facts"] = len(group)
        report[f"{name}_accuracy"] = qa_accuracy(tuned, tokenizer, group)
    return report
