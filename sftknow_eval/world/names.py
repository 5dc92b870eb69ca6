"""Invented, pronounceable one-word names for the tiny world's entities."""

from __future__ import annotations

import random

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "st", "sh", "th", "ch", "pl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th", "nd", "rk", "st")


def syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def invent_name(rng: random.Random, syllables: tuple[int, int] = (2, 3), suffix: str = "") -> str:
    """One capitalised invented word such as ``Brelmoria``; ``suffix`` flavours its kind."""
    count = rng.randint(*syllables)
    word = "".join(syllable(rng) for _ in range(count)) + suffix
    return word.capitalize()


class NameFactory:
    """Hands out invented names that are unique across the whole world."""

    def __init__(self, rng: random.Random, reserved: set[str] | None = None):
        self.rng = rng
        self.used: set[str] = {name.lower() for name in (reserved or set())}

    def take(self, suffix: str = "", syllables: tuple[int, int] = (2, 3)) -> str:
        for _ in range(10_000):
            name = invent_name(self.rng, syllables, suffix)
            if name.lower() not in self.used and 4 <= len(name) <= 14:
                self.used.add(name.lower())
                return name
        raise RuntimeError("ran out of invented names; widen the syllable inventory")
