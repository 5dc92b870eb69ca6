"""The shared answer matcher on the tricky cases the paper's containment rule meets."""

import pytest

from sftknow_eval.matching import contains_answer, exact_match, expand_aliases, normalize


@pytest.mark.parametrize(
    ("output", "aliases", "expected"),
    [
        ("Tehran", ["Iran"], False),  # alias inside a longer word
        ("He was born in Tehran, Iran.", ["Iran"], True),
        ("Iranian poet", ["Iran"], False),
        ("PARIS", ["paris"], True),  # case
        ("  new   york  city ", ["New York City"], True),  # whitespace
        ("New York-City", ["New York City"], True),  # punctuation between words
        ("St. Louis, Missouri", ["St Louis"], True),  # periods dropped
        ("He lived in São Paulo", ["Sao Paulo"], True),  # accents folded
        ("Zürich", ["Zurich"], True),
        ("Côte d’Ivoire", ["Cote d'Ivoire"], True),  # curly vs straight apostrophe
        ("ＴＯＫＹＯ", ["Tokyo"], True),  # full-width unicode
        ("", ["Paris"], False),  # empty output
        ("   ", ["Paris"], False),
        ("Paris", [], False),  # no aliases
        ("Paris", ["", "  "], False),  # only empty aliases
        ("the USA", ["United States of America"], True),  # synonym table
        ("Britain", ["United Kingdom"], True),
        ("The United Kingdom", ["Britain"], True),
        ("tell us more", ["United States of America"], False),  # "US" left out on purpose
        ("Bombay", ["Mumbai"], True),
        ("Mumbai", ["Bombay"], True),
    ],
)
def test_contains_answer(output, aliases, expected):
    assert contains_answer(output, aliases) is expected


def test_synonyms_can_be_switched_off():
    assert contains_answer("the USA", ["United States of America"])
    assert not contains_answer("the USA", ["United States of America"], use_synonyms=False)


def test_normalize_is_idempotent_and_canonical():
    samples = ["St. Louis!", "São  Paulo", "Côte d'Ivoire", "ÉCOLE-normale"]
    for text in samples:
        assert normalize(normalize(text)) == normalize(text)
    assert normalize("ÉCOLE-normale") == "ecole normale"


def test_expand_aliases_includes_group():
    accepted = expand_aliases(["Peking"])
    assert {"peking", "beijing"} <= accepted


def test_exact_match_uses_first_line_only():
    assert exact_match(" Paris\nand more", ["Paris"])
    assert not exact_match("Paris, France", ["Paris"])
    assert exact_match("USA", ["United States of America"])
    assert not exact_match("", ["Paris"])
