"""Category rules of both schemes, at their exact edges."""

from __future__ import annotations

import pytest

from sftknow_eval.errors import UserError
from sftknow_eval.probe.categories import (
    category_for_score,
    check_category,
    check_scheme,
    slick_category,
    ye2025_category,
)


@pytest.mark.parametrize(("correct", "total", "expected"), [
    (0, 100, "D0"),    # R = 0
    (1, 100, "D1"),    # just above 0
    (25, 100, "D1"),   # R = 0.25 belongs to D1
    (26, 100, "D2"),
    (50, 100, "D2"),   # R = 0.5
    (51, 100, "D3"),
    (75, 100, "D3"),   # R = 0.75
    (76, 100, "D4"),
    (100, 100, "D4"),  # R = 1
    (1, 210, "D1"), (52, 210, "D1"), (53, 210, "D2"), (105, 210, "D2"), (106, 210, "D3"),
    (157, 210, "D3"), (158, 210, "D4"),
])
def test_ye2025_edges(correct: int, total: int, expected: str) -> None:
    assert ye2025_category(correct, total) == expected


@pytest.mark.parametrize(("score", "expected"), [
    (0.0, "D0"), (1e-9, "D1"), (0.25, "D1"), (0.25 + 1e-9, "D2"), (0.5, "D2"),
    (0.5 + 1e-9, "D3"), (0.75, "D3"), (0.75 + 1e-9, "D4"), (1.0, "D4"),
])
def test_score_edges(score: float, expected: str) -> None:
    assert category_for_score(score) == expected


def test_bad_counts() -> None:
    with pytest.raises(ValueError):
        ye2025_category(3, 2)
    with pytest.raises(ValueError):
        ye2025_category(0, 0)
    with pytest.raises(ValueError):
        category_for_score(1.5)


def test_slick() -> None:
    assert slick_category(10, 10, 0) == "HighlyKnown"
    assert slick_category(3, 10, 0) == "MaybeKnown"
    assert slick_category(0, 10, 1) == "WeaklyKnown"
    assert slick_category(0, 10, 0) == "Unknown"


def test_unknown_scheme_and_category() -> None:
    with pytest.raises(UserError, match="unknown scheme"):
        check_scheme("nope")
    with pytest.raises(UserError, match="unknown category 'D5'"):
        check_category("D5", "ye2025")
    with pytest.raises(UserError, match="HighlyKnown"):
        check_category("D1", "slick")
