"""The tiny world's knowledge base: invented entities, per-relation object pools, and facts
with a heavy-tailed corpus exposure count, split into the SFT pool, an in-domain dev split
and the two test sets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sftknow_eval.facts import Fact
from sftknow_eval.relations import RELATIONS, Relation
from sftknow_eval.world.names import NameFactory

# Answer pools made of real words, for relations whose answers are ordinary nouns.
REAL_POOLS: dict[str, tuple[str, ...]] = {
    "occupation": (
        "farmer", "painter", "sculptor", "poet", "lawyer", "physician", "teacher", "engineer",
        "architect", "carpenter", "sailor", "merchant", "banker", "dancer", "singer", "priest",
        "chef", "baker", "potter", "weaver", "astronomer", "chemist", "historian", "composer",
        "journalist", "pilot", "nurse", "blacksmith", "librarian", "gardener",
    ),
    "genre": (
        "jazz", "blues", "reggae", "techno", "soul", "funk", "punk", "gospel", "opera", "disco",
        "swing", "ska", "grunge", "ambient", "salsa", "tango", "polka", "bluegrass", "calypso",
        "trance",
    ),
    "position": (
        "goalkeeper", "midfielder", "winger", "sweeper", "pitcher", "catcher", "shortstop",
        "quarterback", "linebacker", "wicketkeeper", "bowler", "batsman", "setter", "libero",
        "pivot", "playmaker", "fullback", "halfback", "outfielder", "centreman",
    ),
}

# Invented-name pools: size, and the suffixes that give each kind its flavour.
INVENTED_KINDS: dict[str, tuple[int, tuple[str, ...]]] = {
    "country": (40, ("ia", "land", "stan", "ora", "esh")),
    "city": (120, ("", "", "burg", "ville", "grad", "polis")),
    "region": (60, ("shire", "ia", "mark", "vale")),
    "school": (40, ("ford", "ton", "wick")),
    "person": (150, ("", "")),
    "company": (50, ("co", "tex", "corp", "ex")),
    "musician": (60, ("", "s")),
    "label": (30, ("tone", "disc", "wave")),
    "language": (30, ("ish", "ese", "ic")),
    "work": (80, ("", "")),
}
SUBJECT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "place": ("", "a", "o"), "region": ("ia", "ana", "or"), "person": ("", "", "a"),
    "work": ("", ""), "organization": ("", "ix", "on"), "musician": ("", "s"),
    "product": ("", "x", "o"), "site": ("", "um", "ara"),
}
# How some kinds' objects get a second accepted name (the matcher accepts either).
ALIAS_FORMS: dict[str, str] = {
    "country": "Republic of {name}",
    "city": "{name} City",
    "school": "University of {name}",
    "company": "{name} Corporation",
    "label": "{name} Records",
}


@dataclass
class WorldConfig:
    """Everything that determines a tiny world's knowledge base (with the seed)."""

    seed: int = 0
    subjects_in_domain: int = 1300
    subjects_out_of_domain: int = 60
    # Per in-domain relation: the first subjects are test facts, the next dev facts, the rest
    # the SFT pool; out-of-domain relations are test-only.
    test_per_relation: int = 120
    dev_per_relation: int = 20
    absent_fraction: float = 0.25
    max_exposure: int = 60
    object_popularity_exponent: float = 0.5
    alias_fraction: float = 0.5
    pool_scale: float = 1.5
    # 1: every subject is one invented word (one token, its own embedding). 2: a given name and
    # a family name drawn from shared inventories ("Brelmo Tavisko"), so a subject is two tokens
    # that other subjects share, its facts must be stored in the network rather than in a
    # private embedding row, and the vocabulary stops growing with the number of subjects.
    subject_words: int = 2
    given_names: int = 400
    family_names_per_kind: int = 200
    relations: tuple[str, ...] = field(default_factory=lambda: tuple(RELATIONS))

    def __post_init__(self) -> None:
        if self.subject_words not in (1, 2):
            raise ValueError(f"WorldConfig.subject_words: {self.subject_words!r}; use 1 (one "
                             "invented word) or 2 (a given name and a family name)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["relations"] = list(self.relations)
        return data


@dataclass
class ObjectPool:
    """The answers a relation draws from, most popular first, with their aliases."""

    names: list[str]
    aliases: dict[str, list[str]]
    weights: list[float]


def make_pools(config: WorldConfig, names: NameFactory, rng: random.Random) -> dict[str, ObjectPool]:
    """One pool per object kind, with Zipf-like popularity so unknown facts are guessable."""
    pools: dict[str, ObjectPool] = {}
    for kind in sorted(set(REAL_POOLS) | set(INVENTED_KINDS)):
        if kind in REAL_POOLS:
            members = list(REAL_POOLS[kind])
            for word in members:
                names.used.add(word)
        else:
            size, suffixes = INVENTED_KINDS[kind]
            size = max(4, round(size * config.pool_scale))
            members = [names.take(rng.choice(suffixes)) for _ in range(size)]
        rng.shuffle(members)
        aliases: dict[str, list[str]] = {}
        form = ALIAS_FORMS.get(kind)
        if form:
            for name in members:
                if rng.random() < config.alias_fraction:
                    aliases[name] = [form.format(name=name)]
        weights = [1.0 / (rank + 1) ** config.object_popularity_exponent
                   for rank in range(len(members))]
        pools[kind] = ObjectPool(members, aliases, weights)
    return pools


def draw_exposure(rng: random.Random, config: WorldConfig) -> int:
    """How often a fact appears in the corpus: absent, or log-uniform in 1..max_exposure."""
    if rng.random() < config.absent_fraction:
        return 0
    drawn = math.exp(rng.uniform(0, math.log(config.max_exposure + 0.5)))
    return max(1, min(config.max_exposure, round(drawn)))


def subject_namer(config: WorldConfig, names: NameFactory, rng: random.Random) -> Callable[[str], str]:
    """A function giving a new subject name of a kind, unique across the world."""
    if config.subject_words == 1:
        return lambda kind: names.take(rng.choice(SUBJECT_SUFFIXES[kind]))
    given = [names.take() for _ in range(config.given_names)]
    families = {kind: [names.take(rng.choice(suffixes)) for _ in range(config.family_names_per_kind)]
                for kind, suffixes in sorted(SUBJECT_SUFFIXES.items())}
    taken: set[str] = set()

    def take(kind: str) -> str:
        for _ in range(10_000):
            name = f"{rng.choice(given)} {rng.choice(families[kind])}"
            if name not in taken:
                taken.add(name)
                return name
        raise RuntimeError("ran out of two-word subject names; raise given_names")

    return take


def generate_facts(config: WorldConfig) -> list[Fact]:
    """The knowledge base: one fact per (relation, subject), seeded and deterministic."""
    rng = random.Random(config.seed)
    names = NameFactory(rng)
    pools = make_pools(config, names, rng)
    take_subject = subject_namer(config, names, rng)
    facts: list[Fact] = []
    for pid in config.relations:
        relation: Relation = RELATIONS[pid]
        count = config.subjects_in_domain if relation.in_domain else config.subjects_out_of_domain
        pool = pools[relation.object_kind]
        test_count = config.test_per_relation if relation.in_domain else count
        dev_count = config.dev_per_relation if relation.in_domain else 0
        subjects = [take_subject(relation.subject_kind) for _ in range(count)]
        for index, subject in enumerate(subjects):
            obj = rng.choices(pool.names, weights=pool.weights)[0]
            split = ("test" if index < test_count
                     else "dev" if index < test_count + dev_count else "train")
            facts.append(Fact(
                id=f"{pid}-{index:04d}",
                relation=pid,
                subject=subject,
                object=obj,
                aliases=[obj, *pool.aliases.get(obj, [])],
                question=relation.question_for(subject),
                split=split,
                domain=relation.domain,
                meta={"exposure": draw_exposure(rng, config)},
            ))
    return facts


def exposure_band(exposure: int) -> str:
    """The frequency band a fact's exposure count falls in (for reporting)."""
    for upper, label in ((0, "0"), (2, "1-2"), (5, "3-5"), (15, "6-15")):
        if exposure <= upper:
            return label
    return "16+"


EXPOSURE_BANDS = ("0", "1-2", "3-5", "6-15", "16+")
