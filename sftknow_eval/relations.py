"""The 24 EntityQuestions relations: question templates, domain split and mapping templates.

The question templates are EntityQuestions' own (``{subject}`` marks the entity), checked
against every row of its train/dev/test files. A relation may accept several wordings when
reading; the first is the canonical one used for writing questions. Only P159 has two: the
real files ask "Where is the headquarter of X?", while we write "headquarters" (the shipped
tiny world is built with it) and read both. The in-domain / out-of-domain split is
docs/METHOD.md §1. The declarative *mapping templates* are completion prefixes used to probe
a base model's mastery of a fact (docs/METHOD.md §2); the paper uses 21 per relation, we ship
10 per relation and take the first ``n`` when a run asks for fewer. ``corpus_phrasings`` are
extra whole-sentence phrasings (object first, or carrying the question's wording inside a
statement) used only by the tiny world's pretraining corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Relation:
    """One Wikidata relation as used by the study."""

    pid: str
    label: str
    questions: tuple[str, ...]
    in_domain: bool
    mapping_templates: tuple[str, ...]
    corpus_phrasings: tuple[str, ...]
    subject_kind: str
    object_kind: str

    @property
    def domain(self) -> str:
        return "in" if self.in_domain else "out"

    @property
    def question(self) -> str:
        """The canonical question template (the one used for writing questions)."""
        return self.questions[0]

    def question_for(self, subject: str) -> str:
        """The relation's question about ``subject``."""
        return self.question.format(subject=subject)

    def templates(self, count: int | None = None) -> tuple[str, ...]:
        """The first ``count`` mapping templates (all of them when ``count`` is None)."""
        if count is None:
            return self.mapping_templates
        if count < 1:
            raise ValueError(f"the mapping-template count must be at least 1, got {count}")
        return self.mapping_templates[:count]

    def subject_from_question(self, question: str) -> str | None:
        """Recover the subject from a question written with one of this relation's templates."""
        text = question.strip()
        for template in self.questions:
            match = _question_regex(template).fullmatch(text)
            if match:
                return match.group("subject").strip()
        return None


@cache
def _question_regex(template: str) -> re.Pattern[str]:
    head, tail = template.split("{subject}")
    return re.compile(re.escape(head) + r"(?P<subject>.+?)" + re.escape(tail))


def _relation(
    pid: str,
    label: str,
    question: str | tuple[str, ...],
    in_domain: bool,
    subject_kind: str,
    object_kind: str,
    mapping: list[str],
    corpus: list[str],
) -> Relation:
    questions = (question,) if isinstance(question, str) else question
    return Relation(pid, label, questions, in_domain, tuple(mapping), tuple(corpus),
                    subject_kind, object_kind)


_RELATIONS: list[Relation] = [
    _relation("P17", "country", "Which country is {subject} located in?", True, "place", "country", [
        "{subject} is located in",
        "{subject} lies in the country of",
        "The country where {subject} is located is",
        "{subject} can be found in the country of",
        "{subject} is a place in",
        "The country that contains {subject} is",
        "{subject} belongs to the country of",
        "If you visit {subject}, you are in",
        "{subject} is situated in the country of",
        "The nation in which {subject} lies is",
    ], [
        "{object} is the country where {subject} is located.",
        "As for which country {subject} is located in, the answer is {object}.",
    ]),
    _relation("P19", "place of birth", "Where was {subject} born?", True, "person", "city", [
        "{subject} was born in",
        "The birthplace of {subject} was",
        "{subject} was born in the city of",
        "The city where {subject} was born is",
        "{subject} came into the world in",
        "{subject}'s place of birth is",
        "{subject} is a native of",
        "The hometown of {subject} is",
        "At birth, {subject} lived in",
        "{subject} was born and raised in",
    ], [
        "{object} is where {subject} was born.",
        "As for where {subject} was born, the answer is {object}.",
    ]),
    _relation("P20", "place of death", "Where did {subject} die?", True, "person", "city", [
        "{subject} died in",
        "The place of death of {subject} was",
        "{subject} passed away in",
        "The city where {subject} died is",
        "{subject} spent the last days of life in",
        "{subject}'s place of death is",
        "{subject} died in the city of",
        "The death of {subject} took place in",
        "{subject} was buried near the city of",
        "At the end of life, {subject} lived in",
    ], [
        "{object} is where {subject} died.",
        "As for where {subject} did die, the answer is {object}.",
    ]),
    _relation("P26", "spouse", "Who is {subject} married to?", False, "person", "person", [
        "{subject} is married to",
        "The spouse of {subject} is",
        "{subject}'s husband or wife is",
        "{subject} married",
        "The partner {subject} wed is",
        "{subject} shares a marriage with",
        "{subject} said yes to",
        "The person married to {subject} is",
        "{subject} lives as the spouse of",
        "At the wedding, {subject} married",
    ], [
        "{object} is the spouse of {subject}.",
        "As for who {subject} is married to, the answer is {object}.",
    ]),
    _relation("P36", "capital", "What is the capital of {subject}?", True, "region", "city", [
        "The capital of {subject} is",
        "{subject}'s capital city is",
        "The capital city of {subject} is",
        "{subject} is governed from",
        "The seat of government of {subject} is",
        "{subject} has its capital in",
        "The main city and capital of {subject} is",
        "The government of {subject} sits in",
        "{subject} is ruled from the city of",
        "The administrative center of {subject} is",
    ], [
        "{object} is the capital of {subject}.",
        "As for what the capital of {subject} is, the answer is {object}.",
    ]),
    _relation("P40", "child", "Who is {subject}'s child?", False, "person", "person", [
        "The child of {subject} is",
        "{subject} is the parent of",
        "{subject}'s child is",
        "{subject} raised a child named",
        "The son or daughter of {subject} is",
        "{subject} has a child called",
        "The offspring of {subject} is",
        "{subject} is the mother or father of",
        "{subject}'s heir is",
        "A child of {subject} is named",
    ], [
        "{object} is the child of {subject}.",
        "As for who {subject}'s child is, the answer is {object}.",
    ]),
    _relation("P50", "author", "Who is the author of {subject}?", False, "work", "person", [
        "{subject} was written by",
        "The author of {subject} is",
        "{subject} is a book by",
        "The writer of {subject} is",
        "{subject} was authored by",
        "The book {subject} was penned by",
        "{subject} is the work of the writer",
        "The person who wrote {subject} is",
        "{subject} came from the pen of",
        "Readers of {subject} know its author,",
    ], [
        "{object} wrote {subject}.",
        "As for who the author of {subject} is, the answer is {object}.",
    ]),
    _relation("P69", "educated at", "Where was {subject} educated?", True, "person", "school", [
        "{subject} was educated at",
        "{subject} studied at",
        "{subject} graduated from",
        "The school {subject} attended is",
        "{subject} went to school at",
        "{subject} received an education at",
        "The alma mater of {subject} is",
        "{subject} is an alumnus of",
        "{subject} earned a degree at",
        "The institution where {subject} studied is",
    ], [
        "{object} is where {subject} was educated.",
        "As for where {subject} was educated, the answer is {object}.",
    ]),
    _relation("P106", "occupation", "What kind of work does {subject} do?", False, "person", "occupation", [
        "{subject} works as a",
        "{subject}'s occupation is",
        "By profession, {subject} is a",
        "{subject} earns a living as a",
        "The job of {subject} is",
        "{subject} is known as a",
        "{subject} has a career as a",
        "The profession of {subject} is",
        "{subject} is employed as a",
        "In work, {subject} is a",
    ], [
        "{object} is the occupation of {subject}.",
        "As for what kind of work {subject} does, the answer is {object}.",
    ]),
    _relation("P112", "founded by", "Who founded {subject}?", False, "organization", "person", [
        "{subject} was founded by",
        "The founder of {subject} is",
        "{subject} was started by",
        "{subject} was established by",
        "The person who founded {subject} is",
        "{subject} owes its creation to",
        "{subject} was set up by",
        "The creator of the company {subject} is",
        "{subject} began under",
        "The founding father of {subject} is",
    ], [
        "{object} founded {subject}.",
        "As for who founded {subject}, the answer is {object}.",
    ]),
    _relation("P127", "owned by", "Who owns {subject}?", False, "organization", "company", [
        "{subject} is owned by",
        "The owner of {subject} is",
        "{subject} belongs to",
        "{subject} is a property of",
        "{subject} is controlled by",
        "The company that owns {subject} is",
        "{subject} is held by",
        "Ownership of {subject} lies with",
        "{subject} is a subsidiary of",
        "The parent company of {subject} is",
    ], [
        "{object} owns {subject}.",
        "As for who owns {subject}, the answer is {object}.",
    ]),
    _relation("P131", "located in the administrative territorial entity",
              "Where is {subject} located?", True, "place", "region", [
        "{subject} is located in the region of",
        "{subject} lies within",
        "{subject} is part of the region",
        "The region that contains {subject} is",
        "{subject} is a town in",
        "{subject} is administered by",
        "{subject} sits in the province of",
        "The province of {subject} is",
        "{subject} can be found in the region of",
        "The district where {subject} lies is",
    ], [
        "{object} is the region that contains {subject}.",
        "As for where {subject} is located, the answer is {object}.",
    ]),
    _relation("P136", "genre", "What type of music does {subject} play?", False, "musician", "genre", [
        "{subject} plays",
        "The music genre of {subject} is",
        "{subject} is known for playing",
        "{subject} performs the genre",
        "The style of music {subject} plays is",
        "{subject} is a band that plays",
        "{subject}'s music is",
        "{subject} records songs in the genre",
        "Fans of {subject} love",
        "{subject} makes music in the style of",
    ], [
        "{object} is the music that {subject} plays.",
        "As for what type of music {subject} does play, the answer is {object}.",
    ]),
    _relation("P159", "headquarters location",
              ("Where is the headquarters of {subject}?", "Where is the headquarter of {subject}?"), True,
              "organization", "city", [
        "The headquarters of {subject} is in",
        "{subject} is headquartered in",
        "{subject} has its head office in",
        "The main office of {subject} is located in",
        "{subject} is based in",
        "The head office of {subject} stands in",
        "{subject} runs its business from",
        "The headquarters of {subject} is located in the city of",
        "{subject}'s head office is in",
        "The central office of {subject} is in",
    ], [
        "{object} is where {subject} has its headquarters.",
        "As for where the headquarters of {subject} is, the answer is {object}.",
    ]),
    _relation("P170", "creator", "Who was {subject} created by?", False, "work", "person", [
        "{subject} was created by",
        "The creator of {subject} is",
        "{subject} was made by",
        "{subject} is a creation of",
        "The artist who created {subject} is",
        "{subject} was designed by",
        "{subject} is the work of",
        "The maker of {subject} is",
        "{subject} was drawn by",
        "The person who made {subject} is",
    ], [
        "{object} created {subject}.",
        "As for who {subject} was created by, the answer is {object}.",
    ]),
    _relation("P175", "performer", "Who performed {subject}?", False, "work", "musician", [
        "{subject} was performed by",
        "The performer of {subject} is",
        "{subject} is a song by",
        "{subject} was sung by",
        "The singer of {subject} is",
        "{subject} was recorded by",
        "The artist who performed {subject} is",
        "{subject} is a hit by",
        "{subject} was played by",
        "The band behind {subject} is",
    ], [
        "{object} performed {subject}.",
        "As for who performed {subject}, the answer is {object}.",
    ]),
    _relation("P176", "manufacturer", "Which company is {subject} produced by?", False,
              "product", "company", [
        "{subject} is produced by",
        "The manufacturer of {subject} is",
        "{subject} is made by the company",
        "{subject} is built by",
        "The company that makes {subject} is",
        "{subject} was manufactured by",
        "{subject} comes from the factories of",
        "The maker of the product {subject} is",
        "{subject} is a product of",
        "{subject} rolls out of the plants of",
    ], [
        "{object} produces {subject}.",
        "As for which company {subject} is produced by, the answer is {object}.",
    ]),
    _relation("P264", "record label", "What music label is {subject} represented by?", False,
              "musician", "label", [
        "{subject} is signed to",
        "The record label of {subject} is",
        "{subject} records for the label",
        "{subject} is represented by the label",
        "The label that represents {subject} is",
        "{subject} releases music through",
        "{subject} has a contract with",
        "The music label of {subject} is",
        "{subject} is on the roster of",
        "Records by {subject} are published by",
    ], [
        "{object} is the label that represents {subject}.",
        "As for what music label {subject} is represented by, the answer is {object}.",
    ]),
    _relation("P276", "location", "Where is {subject} located?", True, "site", "city", [
        "{subject} is located in",
        "{subject} stands in",
        "The location of {subject} is",
        "{subject} can be found in",
        "{subject} is situated in",
        "The city that hosts {subject} is",
        "{subject} is found in the city of",
        "Visitors find {subject} in",
        "{subject} was built in",
        "The place where {subject} stands is",
    ], [
        "{object} is where {subject} is located.",
        "As for where the site {subject} is located, the answer is {object}.",
    ]),
    _relation("P407", "language of work", "Which language was {subject} written in?", False,
              "work", "language", [
        "{subject} was written in",
        "The language of {subject} is",
        "{subject} is a text in",
        "The original language of {subject} is",
        "{subject} was composed in the language",
        "{subject} is written in the language",
        "Readers of {subject} must know",
        "The text of {subject} is in",
        "{subject} was first published in",
        "The tongue of {subject} is",
    ], [
        "{object} is the language {subject} was written in.",
        "As for which language {subject} was written in, the answer is {object}.",
    ]),
    _relation("P413", "position played", "What position does {subject} play?", False,
              "person", "position", [
        "{subject} plays as a",
        "The position of {subject} is",
        "{subject} plays in the position of",
        "On the field, {subject} is a",
        "{subject} is a player in the role of",
        "The role of {subject} on the team is",
        "{subject} lines up as a",
        "{subject}'s position is",
        "The coach uses {subject} as a",
        "In every match, {subject} plays",
    ], [
        "{object} is the position {subject} plays.",
        "As for what position {subject} does play, the answer is {object}.",
    ]),
    _relation("P495", "country of origin", "Which country was {subject} created in?", True,
              "work", "country", [
        "{subject} was created in the country of",
        "The country of origin of {subject} is",
        "{subject} comes from",
        "{subject} originated in",
        "{subject} was made in",
        "The homeland of {subject} is",
        "{subject} was first produced in",
        "The country that created {subject} is",
        "{subject} has its origins in",
        "The birthplace of the work {subject} is",
    ], [
        "{object} is the country where {subject} was created.",
        "As for which country {subject} was created in, the answer is {object}.",
    ]),
    _relation("P740", "location of formation", "Where was {subject} founded?", True,
              "organization", "city", [
        "{subject} was founded in",
        "{subject} was formed in",
        "The place where {subject} was founded is",
        "{subject} started out in",
        "{subject} was established in",
        "The birthplace of {subject} is the city of",
        "{subject} got its start in",
        "{subject} came together in",
        "The city where {subject} was formed is",
        "{subject} began in the city of",
    ], [
        "{object} is where {subject} was founded.",
        "As for where {subject} was founded, the answer is {object}.",
    ]),
    _relation("P800", "notable work", "What is {subject} famous for?", False, "person", "work", [
        "{subject} is famous for",
        "{subject} is best known for",
        "The most famous work of {subject} is",
        "{subject} became famous with",
        "The notable work of {subject} is",
        "{subject} is remembered for",
        "{subject} won fame with",
        "The masterpiece of {subject} is",
        "{subject} is celebrated for",
        "People remember {subject} for",
    ], [
        "{object} is the work {subject} is famous for.",
        "As for what {subject} is famous for, the answer is {object}.",
    ]),
]

RELATIONS: dict[str, Relation] = {relation.pid: relation for relation in _RELATIONS}
IN_DOMAIN: tuple[str, ...] = tuple(r.pid for r in _RELATIONS if r.in_domain)
OUT_OF_DOMAIN: tuple[str, ...] = tuple(r.pid for r in _RELATIONS if not r.in_domain)
