"""Shared helpers for the probe, select and task tests: hand-made facts, tiny-world facts with
hand-assigned buckets, and a scripted fake LM."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from sftknow_eval.facts import Fact
from sftknow_eval.relations import IN_DOMAIN, RELATIONS


def make_fact(index: int, relation: str = "P17", split: str = "train", known: int = 0,
              category: str | None = None, model_key: str = "base") -> Fact:
    """A fact whose subject encodes ``known``: the fake LM answers right ``known`` of 10 times."""
    subject = f"subj{index}k{known}"
    mastery = {model_key: {"scheme": "ye2025", "category": category}} if category else {}
    return Fact(id=f"{relation}-{index:04d}", relation=relation, subject=subject,
                object=f"obj{index}", aliases=[f"obj{index}"],
                question=RELATIONS[relation].question_for(subject), split=split,
                domain=RELATIONS[relation].domain, mastery=mastery)


def world_facts(per_relation: int = 3) -> list[Fact]:
    """Facts over the in-domain relations with mastery levels 0, 3, 10 of 10."""
    facts = []
    levels = [0, 3, 10]
    for r_index, relation in enumerate(IN_DOMAIN[:4]):
        for j in range(per_relation):
            facts.append(make_fact(r_index * 100 + j, relation, known=levels[j % 3]))
    return facts


class FakeLM:
    """Answers a prompt about ``subj<i>k<known>`` with the object ``known`` times in every 10
    copies sent in one call; records every call (prompts and kwargs)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, dict[str, Any]]]] = []

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self.calls.append([r.args for r in requests])
        seen: Counter[str] = Counter()
        outputs = []
        for request in requests:
            prompt, _ = request.args
            last = prompt.split("\n")[-1]
            index, known = re.search(r"subj(\d+)k(\d+)", last).groups()
            copy = seen[prompt]
            seen[prompt] += 1
            outputs.append(f" obj{index}" if copy % 10 < int(known) else " somewhere else")
        return outputs

    def prompts_sent(self) -> list[str]:
        return [args[0] for call in self.calls for args in call]


class FakeVLLM(FakeLM):
    """Named like lm-eval's vLLM backend, so the sampler adds per-request seeds."""


def bucketed_test_facts(counts: dict[str, int], model_key: str = "tiny",
                        splits: tuple[str, ...] = ("test_in_domain", "test_out_of_domain")) -> list[Fact]:
    """Real tiny-world test facts with hand-assigned buckets: ``counts[bucket]`` facts per
    bucket from each of ``splits``."""
    from sftknow_eval.world.shipped import load_split

    facts: list[Fact] = []
    for split in splits:
        pool, index = load_split(split), 0
        for bucket, count in counts.items():
            for fact in pool[index:index + count]:
                fact.mastery[model_key] = {"scheme": "ye2025", "category": bucket}
                facts.append(fact)
            index += count
    return facts
