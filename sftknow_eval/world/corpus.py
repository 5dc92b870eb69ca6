"""The tiny world's pretraining corpus: each fact written ``exposure`` times in varied
declarative phrasings, shuffled into short documents. Never in the SFT question format.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from sftknow_eval.facts import Fact
from sftknow_eval.prompts import ANSWER_MARKER, QUESTION_MARKER
from sftknow_eval.relations import RELATIONS

# A quiz-style statement that carries the relation's question wording (never the SFT markers):
# without it, knowledge learnt from declarative text barely transfers to question prompts of
# relations that SFT never showed (docs/TINY_WORLD.md).
QUIZ_PHRASING = 'Quiz: the answer to "{question}" is {object}.'


def fact_sentence(fact: Fact, rng: random.Random, alias_rate: float = 0.1) -> str:
    """One sentence stating ``fact``: a mapping template completed, or an extra phrasing."""
    relation = RELATIONS[fact.relation]
    quiz = QUIZ_PHRASING.replace("{question}", relation.question)
    phrasings = relation.mapping_templates + relation.corpus_phrasings + (quiz,)
    choice = rng.randrange(len(phrasings))
    answer = fact.object
    others = [a for a in fact.aliases if a != fact.object]
    if others and rng.random() < alias_rate:
        answer = rng.choice(others)
    if choice < len(relation.mapping_templates):
        sentence = phrasings[choice].format(subject=fact.subject) + f" {answer}."
    else:
        sentence = phrasings[choice].format(subject=fact.subject, object=answer)
    return sentence[0].upper() + sentence[1:]


def build_corpus(facts: Sequence[Fact], seed: int, sentences_per_document: int = 8) -> list[str]:
    """Documents (one string each) holding every fact ``meta['exposure']`` times, shuffled."""
    rng = random.Random(seed + 1)
    sentences = [
        fact_sentence(fact, rng)
        for fact in facts
        for _ in range(int(fact.meta.get("exposure", 0)))
    ]
    rng.shuffle(sentences)
    documents = [
        " ".join(sentences[start:start + sentences_per_document])
        for start in range(0, len(sentences), sentences_per_document)
    ]
    for document in documents:
        # The corpus must never teach the SFT format; SFT is the only place it appears.
        assert QUESTION_MARKER not in document and ANSWER_MARKER not in document
    return documents
