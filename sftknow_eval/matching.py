"""The one answer matcher: does a model's output contain an accepted answer? (docs/METHOD.md §2, §4)

The paper counts an output correct when the object or one of its synonyms is *contained* in
it. We normalise both sides the same way (Unicode NFKD with accents dropped, case-folded,
apostrophes and periods deleted, other punctuation turned into spaces, whitespace
collapsed) and then require the alias to occur at word boundaries, so "Iran" is found in
"Tehran, Iran" but not inside "Tehran" or "Iranian". Aliases are widened with the synonym
groups of ``data/synonyms.json`` (e.g. "United States of America" also accepts "USA").
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources

_DELETED = re.compile(r"['’`´.]")
_SEPARATORS = re.compile(r"[\W_]+", re.UNICODE)


@lru_cache(maxsize=65536)
def normalize(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form of ``text``."""
    decomposed = unicodedata.normalize("NFKD", text)
    without_marks = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    folded = _DELETED.sub("", without_marks.casefold())
    return _SEPARATORS.sub(" ", folded).strip()


@lru_cache(maxsize=1)
def synonym_table() -> dict[str, frozenset[str]]:
    """Normalised name -> every normalised name of its synonym group."""
    raw = json.loads(resources.files("sftknow_eval.data").joinpath("synonyms.json").read_text("utf-8"))
    table: dict[str, frozenset[str]] = {}
    for group in raw["groups"]:
        names = frozenset(normalize(name) for name in group if normalize(name))
        for name in names:
            table[name] = table.get(name, frozenset()) | names
    return table


def expand_aliases(aliases: Iterable[str], *, use_synonyms: bool = True) -> frozenset[str]:
    """The normalised accepted answers: the aliases plus their synonym groups."""
    accepted: set[str] = set()
    table = synonym_table() if use_synonyms else {}
    for alias in aliases:
        key = normalize(alias)
        if not key:
            continue
        accepted.add(key)
        accepted.update(table.get(key, ()))
    return frozenset(accepted)


def contains_answer(output: str, aliases: Iterable[str], *, use_synonyms: bool = True) -> bool:
    """True when ``output`` contains any accepted answer at word boundaries."""
    text = normalize(output or "")
    if not text:
        return False
    padded = f" {text} "
    return any(f" {alias} " in padded for alias in expand_aliases(aliases, use_synonyms=use_synonyms))


def exact_match(output: str, aliases: Iterable[str], *, use_synonyms: bool = True) -> bool:
    """True when the output's first line, normalised, equals an accepted answer."""
    first_line = (output or "").strip().split("\n", 1)[0]
    text = normalize(first_line)
    return bool(text) and text in expand_aliases(aliases, use_synonyms=use_synonyms)
