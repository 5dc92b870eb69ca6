"""Mastery categories of both schemes: ye2025's D0..D4 from R, and SliCK's four known-levels."""

from __future__ import annotations

from sftknow_eval.errors import UserError

YE2025 = "ye2025"
SLICK = "slick"
SCHEMES: tuple[str, ...] = (YE2025, SLICK)

YE2025_CATEGORIES: tuple[str, ...] = ("D0", "D1", "D2", "D3", "D4")
SLICK_CATEGORIES: tuple[str, ...] = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
CATEGORIES: dict[str, tuple[str, ...]] = {YE2025: YE2025_CATEGORIES, SLICK: SLICK_CATEGORIES}


def check_scheme(scheme: str) -> str:
    """``scheme`` if known, else a UserError naming the known ones."""
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    return scheme


def check_category(category: str, scheme: str) -> str:
    """``category`` if it belongs to ``scheme``, else a UserError listing the scheme's categories."""
    names = CATEGORIES[check_scheme(scheme)]
    if category not in names:
        raise UserError(
            f"unknown category {category!r} for scheme {scheme}; choose from {', '.join(names)}"
        )
    return category


def ye2025_category(correct: int, total: int) -> str:
    """D0 iff R = 0; D_i iff (i-1)/4 < R <= i/4, with R = correct / total (exact integer arithmetic).

    R <= i/4  <=>  4 * correct <= i * total, so i = ceil(4 * correct / total).
    """
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
    if correct == 0:
        return "D0"
    return f"D{-(-4 * correct // total)}"


def category_for_score(score: float) -> str:
    """The ye2025 category of a fraction R in [0, 1] (the quarter edges are exact in binary)."""
    if not 0.0 <= score <= 1.0:
        raise ValueError(f"R must lie in [0, 1], got {score}")
    if score == 0.0:
        return "D0"
    for i in range(1, 5):
        if score <= i / 4:
            return f"D{i}"
    raise AssertionError("unreachable")


def slick_category(greedy_correct: int, greedy_total: int, sampled_correct: int) -> str:
    """SliCK (Gekhman et al. 2024) from few-shot greedy answers and sampled answers.

    HighlyKnown: every greedy answer is right; MaybeKnown: some are; WeaklyKnown: no greedy
    answer is right but some sample is; Unknown: neither.
    """
    if greedy_total <= 0 or not 0 <= greedy_correct <= greedy_total or sampled_correct < 0:
        raise ValueError(f"bad SliCK counts: greedy {greedy_correct}/{greedy_total}, "
                         f"sampled {sampled_correct}")
    if greedy_correct == greedy_total:
        return "HighlyKnown"
    if greedy_correct > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if sampled_correct > 0 else "Unknown"
