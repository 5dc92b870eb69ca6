"""Probe settings and the prompts a fact is probed with (mapping templates, or SliCK few-shot)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sftknow_eval import relations
from sftknow_eval.errors import UserError
from sftknow_eval.facts import Fact
from sftknow_eval.probe.categories import SLICK, YE2025, check_scheme
from sftknow_eval.prompts import QUESTION_MARKER, qa_completion, qa_prompt

PAPER_TEMPLATES = 21  # docs/METHOD.md §2: N_map = 21; we use all available up to this many
# Scheme defaults where the user leaves a setting out (docs/METHOD.md §2; Gekhman et al. 2024 §3).
SCHEME_DEFAULTS: dict[str, dict[str, Any]] = {
    YE2025: {"samples": 10, "temperature": 0.7},
    SLICK: {"samples": 16, "temperature": 0.5},
}
DEFAULT_UNTIL: tuple[str, ...] = ("\n", ".")


@dataclass
class ProbeSettings:
    """How facts are probed; ``None`` fields take the scheme's default (see ``resolved``).

    scheme          "ye2025" (mapping templates, R and D0..D4) or "slick" (few-shot QA,
                    HighlyKnown..Unknown).
    templates       ye2025: how many mapping templates per relation (all available up to this).
    samples         sampled completions per prompt (ye2025 10; slick 16).
    temperature     sampling temperature (ye2025 0.7; slick 0.5).
    max_new_tokens  generation budget per completion (32).
    until           stop strings; the completion is cut at the first one (newline and period:
                    a mapping template is completed by one clause).
    seed            drives sampling and SliCK's exemplar draws; same seed, same categories.
    shots           slick: exemplars per few-shot prompt (4).
    fewshot_sets    slick: different exemplar sets per fact, each probed greedily and sampled (10).
    gen_kwargs      extra generation kwargs passed to the backend unchanged (e.g. top_k=0).
    """

    scheme: str = YE2025
    templates: int = PAPER_TEMPLATES
    samples: int | None = None
    temperature: float | None = None
    max_new_tokens: int = 32
    until: tuple[str, ...] = DEFAULT_UNTIL
    seed: int = 0
    shots: int = 4
    fewshot_sets: int = 10
    gen_kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> ProbeSettings:
        """A copy with the scheme defaults filled in, validated (UserError on bad values)."""
        check_scheme(self.scheme)
        defaults = SCHEME_DEFAULTS[self.scheme]
        settings = ProbeSettings(**{**asdict(self), "until": tuple(self.until)})
        if settings.samples is None:
            settings.samples = defaults["samples"]
        if settings.temperature is None:
            settings.temperature = defaults["temperature"]
        for name in ("templates", "samples", "max_new_tokens", "fewshot_sets"):
            if getattr(settings, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(settings, name)}")
        if settings.shots < 0:
            raise UserError(f"shots must be at least 0, got {settings.shots}")
        if settings.temperature <= 0:
            raise UserError(f"the sampling temperature must be > 0, got {settings.temperature}")
        reserved = {"until", "do_sample", "temperature", "max_gen_toks", "max_new_tokens", "seed"}
        clash = sorted(reserved & set(settings.gen_kwargs))
        if clash:
            raise UserError(f"set {', '.join(clash)} with their own options, not gen_kwargs")
        return settings

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["until"] = list(self.until)
        return data

    def stops(self) -> list[str]:
        """The stop strings sent to the backend (slick adds the next exemplar's marker)."""
        if self.scheme == SLICK:
            return list(dict.fromkeys([*self.until, QUESTION_MARKER]))
        return list(self.until)

    def sample_kwargs(self) -> dict[str, Any]:
        """lm-eval generation kwargs for the sampled completions."""
        return {"until": self.stops(), "do_sample": True, "temperature": self.temperature,
                "max_gen_toks": self.max_new_tokens, **self.gen_kwargs}

    def greedy_kwargs(self) -> dict[str, Any]:
        """lm-eval generation kwargs for SliCK's greedy completions."""
        return {"until": self.stops(), "do_sample": False, "temperature": 0.0,
                "max_gen_toks": self.max_new_tokens, **self.gen_kwargs}


def mapping_templates(relation_id: str, count: int) -> tuple[str, ...]:
    """The first ``count`` mapping templates of a relation; UserError when it has none."""
    relation = relations.RELATIONS.get(relation_id)
    if relation is None:
        raise UserError(f"unknown relation {relation_id!r}")
    templates = relation.templates(count) if relation.mapping_templates else ()
    if not templates:
        raise UserError(f"relation {relation_id} has no mapping templates to probe with")
    return templates


def mapping_prompts(fact: Fact, count: int) -> list[str]:
    """One prompt per mapping template of the fact's relation (docs/METHOD.md §2)."""
    return [template.format(subject=fact.subject) for template in mapping_templates(fact.relation, count)]


def check_templates(facts: Sequence[Fact], count: int) -> dict[str, int]:
    """Templates used per relation; a UserError naming the first fact whose relation has none."""
    used: dict[str, int] = {}
    for fact in facts:
        if fact.relation not in used:
            try:
                used[fact.relation] = len(mapping_templates(fact.relation, count))
            except UserError as error:
                raise UserError(f"fact {fact.id}: {error}") from None
    return used


class FewShotPrompts:
    """SliCK's few-shot QA prompts: exemplars drawn from other facts of the same relation.

    Prompts use the project's QA format (``prompts.qa_prompt``), one exemplar per line:
    ``<|question|> q1 <|answer|> a1\\n...\\n<|question|> q <|answer|>``. Each fact gets
    ``sets`` prompts with independently drawn exemplars (seeded by the fact id and set index,
    so a draw does not depend on which other facts are probed in the same run).
    """

    def __init__(self, facts: Sequence[Fact], shots: int, sets: int, seed: int):
        self.shots, self.sets, self.seed = shots, sets, seed
        self.by_relation: dict[str, list[Fact]] = defaultdict(list)
        for fact in sorted(facts, key=lambda f: f.id):
            self.by_relation[fact.relation].append(fact)

    def prompts(self, fact: Fact) -> list[str]:
        others = [f for f in self.by_relation[fact.relation] if f.id != fact.id]
        prompts = []
        for index in range(self.sets):
            rng = random.Random(f"slick:{self.seed}:{fact.id}:{index}")
            exemplars = rng.sample(others, min(self.shots, len(others)))
            lines = [qa_prompt(e.question) + qa_completion(e.object) for e in exemplars]
            prompts.append("\n".join([*lines, qa_prompt(fact.question)]))
        return prompts

