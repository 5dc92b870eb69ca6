"""The scorecard of the paper's four shapes on hand-made scores: each verdict (shown, partly, not
shown, not measurable) reached by its rule, the fixed restoration k, the rendering and the
report's scorecard.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sftknow_eval.study import spec_from_dict
from sftknow_eval.study.plan import model_name, restored_name
from sftknow_eval.study.report import _Scores, _shapes
from sftknow_eval.study.scorecard import (
    NOT_MEASURABLE,
    NOT_SHOWN,
    PARTLY,
    SHOWN,
    diagonal,
    fixed_k,
    mid_mastery_best,
    peak_then_fall,
    render,
    restoration,
    scorecard,
)
from sftknow_eval.study.spec import StudySpec

TESTS = ("D0", "D1", "D2", "D3", "D4")
NOISE = {0: 0.005, 1: -0.005, 2: 0.0}  # per seed; two seeds give a std of 0.71 points


def make_spec(categories: list[str], sizes: list[Any], seeds: list[int] = [0, 1],  # noqa: B006
              k: list[float] | None = None, restore_sizes: Any = "all") -> StudySpec:
    data: dict[str, Any] = {"name": "card", "grid": {"categories": categories, "sizes": sizes,
                                                     "seeds": seeds}}
    data["restore"] = {"k": k, "sizes": restore_sizes} if k else None
    return spec_from_dict(data, "card.yaml")


Acc = Callable[[str, Any], float]


def lookup(spec: StudySpec, acc: Acc, bucket: Callable[[str, str], float] | None = None,
           gain: Callable[[str, Any, float], float] | None = None,
           drop: set[str] = frozenset()) -> Callable[..., float | None]:  # type: ignore[assignment]
    """Scores of every model the spec trains (and restores), with per-seed noise; ``drop`` names
    evaluations to leave out (a failed cell)."""
    table: dict[tuple[str, str, str | None], float] = {}
    for category in spec.grid.categories:
        for size in spec.grid.sizes:
            for seed in spec.grid.seeds:
                name, noise = model_name(category, size, seed), NOISE[seed]
                table[(name, "id", None)] = acc(category, size) + noise
                table[(name, "ood", None)] = acc(category, size) - 0.2 + noise
                for test in TESTS:
                    table[(name, "id", test)] = (bucket(category, test) if bucket else 0.5) + noise
                for k in (spec.restore.k if spec.restore and gain else []):
                    restored = restored_name(name, spec.restore.strategy, k)
                    table[(restored, "id", None)] = acc(category, size) + gain(category, size, k) + noise
                    table[(restored, "ood", None)] = acc(category, size) - 0.1
    for name in drop:
        for key in [key for key in table if key[0] == name]:
            del table[key]
    return lambda model, domain, bucket=None: table.get((model, domain, bucket))


SIZES = [40, 80, 160, 320, 640]


def peaked(peak: int, fall: float) -> Callable[[Any], float]:
    """In-domain Acc rising to ``peak`` and falling ``fall`` from there to the largest size."""
    def acc(size: Any) -> float:
        rank, top = SIZES.index(size), SIZES.index(peak)
        if rank <= top:
            return 0.3 + 0.02 * rank
        return 0.3 + 0.02 * top - fall * (rank - top) / (len(SIZES) - 1 - top)
    return acc


# -- (a) peak then fall ---------------------------------------------------------------------


def test_peak_then_fall_shown_when_most_categories_fall_beyond_the_spread() -> None:
    spec = make_spec(["D0", "D2", "D4"], SIZES)
    curves = {"D0": peaked(160, 0.089), "D2": peaked(160, 0.03), "D4": peaked(640, 0.0)}
    shape = peak_then_fall(spec, lookup(spec, lambda c, s: curves[c](s)))
    assert shape.verdict == SHOWN, shape.reason
    d0 = shape.numbers["categories"]["D0"]
    assert d0["peak_size"] == 160 and d0["fall"] == pytest.approx(8.9) and d0["falls"]
    assert d0["peak"]["n"] == 2 and d0["peak"]["std"] == pytest.approx(0.71)
    assert not shape.numbers["categories"]["D4"]["falls"] and shape.numbers["falls"] == 2
    assert "fall 8.9" in shape.study and "2 of 3 categories fall" in shape.reason


def test_peak_then_fall_partly_and_not_shown() -> None:
    spec = make_spec(["D0", "D2", "D4"], SIZES)
    one = {"D0": peaked(160, 0.05), "D2": peaked(640, 0), "D4": peaked(640, 0)}
    assert peak_then_fall(spec, lookup(spec, lambda c, s: one[c](s))).verdict == PARTLY
    # falls inside the seed spread (0.71 points) count as peaks below the largest size only
    small = {"D0": peaked(160, 0.004), "D2": peaked(320, 0.004), "D4": peaked(640, 0)}
    shape = peak_then_fall(spec, lookup(spec, lambda c, s: small[c](s)))
    assert shape.verdict == PARTLY and shape.numbers["falls"] == 0 and shape.numbers["peak_below"] == 2
    rising = peak_then_fall(spec, lookup(spec, lambda c, s: peaked(640, 0)(s)))
    assert rising.verdict == NOT_SHOWN and "0 of 3" in rising.reason


def test_peak_then_fall_not_measurable_with_one_size_or_a_missing_cell() -> None:
    spec = make_spec(["D0", "D2"], [160])
    shape = peak_then_fall(spec, lookup(spec, lambda c, s: 0.4))
    assert shape.verdict == NOT_MEASURABLE and "one size" in shape.reason
    spec = make_spec(["D0", "D2"], [40, 160])
    gone = lookup(spec, lambda c, s: 0.4, drop={"D0-160-s0", "D0-160-s1"})
    shape = peak_then_fall(spec, gone)
    assert shape.verdict == NOT_MEASURABLE and "D0-160-s0, D0-160-s1" in shape.reason
    # one seed of two missing: still measured, over the seed that is there, and said so
    half = peak_then_fall(spec, lookup(spec, lambda c, s: 0.5 if s == 40 else 0.4, drop={"D0-160-s1"}))
    assert half.verdict == SHOWN and "1 evaluation(s) missing" in half.reason
    assert half.numbers["categories"]["D0"]["largest"]["n"] == 1


def test_one_seed_says_the_spread_is_unmeasured() -> None:
    spec = make_spec(["D0", "D2"], [40, 160], seeds=[2])
    shape = peak_then_fall(spec, lookup(spec, lambda c, s: 0.5 if s == 40 else 0.49))
    assert shape.verdict == SHOWN and "one seed" in shape.reason


# -- (b) the diagonal -----------------------------------------------------------------------


def test_diagonal_shown_partly_not_shown_and_not_measurable() -> None:
    spec = make_spec(list(TESTS), [160])
    own = lookup(spec, lambda c, s: 0.5, bucket=lambda c, t: 0.6 if c == t else 0.4)
    shape = diagonal(spec, own, 160)
    assert shape.verdict == SHOWN and shape.numbers["hits"] == 5 and shape.numbers["needed"] == 4

    def three(c: str, t: str) -> float:  # D3 and D4 tests best after D2 training, clearly
        return 0.9 if (c == "D2" and t in ("D3", "D4")) else (0.6 if c == t else 0.4)
    shape = diagonal(spec, lookup(spec, lambda c, s: 0.5, bucket=three), 160)
    assert shape.verdict == PARTLY and shape.numbers["hits"] == 3
    assert shape.numbers["tests"]["D3"]["best_training"] == "D2"

    def close(c: str, t: str) -> float:  # D2 beats own by 0.5 points, inside the 0.71 spread
        return 0.605 if (c == "D2" and t in ("D3", "D4")) else (0.6 if c == t else 0.4)
    shape = diagonal(spec, lookup(spec, lambda c, s: 0.5, bucket=close), 160)
    assert shape.verdict == PARTLY and shape.numbers["near"] == 2

    d4_best = lookup(spec, lambda c, s: 0.5, bucket=lambda c, t: 0.7 if c == "D4" else 0.3)
    shape = diagonal(spec, d4_best, 160)
    assert shape.verdict == NOT_SHOWN and "1 of 5" in shape.reason
    single = make_spec(["D0"], [160])
    assert diagonal(single, lookup(single, lambda c, s: 0.5), 160).verdict == NOT_MEASURABLE


# -- (c) mid-mastery best -------------------------------------------------------------------


@pytest.mark.parametrize(("d2", "verdict"), [(0.58, SHOWN), (0.548, PARTLY), (0.52, NOT_SHOWN)])
def test_mid_mastery_best(d2: float, verdict: str) -> None:
    spec = make_spec(["D0", "D2", "D4"], [40, 160])
    accs = {"D0": 0.45, "D2": d2, "D4": 0.55}
    shape = mid_mastery_best(spec, lookup(spec, lambda c, s: accs[c] if s == 160 else 0.9), 160)
    assert shape.verdict == verdict, shape.reason
    assert shape.numbers["acc"]["D2"]["mean"] == pytest.approx(100 * d2)


def test_mid_mastery_not_measurable_without_d2() -> None:
    spec = make_spec(["D0", "D4"], [160])
    shape = mid_mastery_best(spec, lookup(spec, lambda c, s: 0.5), 160)
    assert shape.verdict == NOT_MEASURABLE and "D2" in shape.reason


# -- (d) restoration ------------------------------------------------------------------------


def test_fixed_k_is_the_papers_or_the_nearest() -> None:
    assert fixed_k([1, 5, 20, 40]) == 20
    assert fixed_k([1, 5, 10, 40]) == 10
    assert fixed_k([10, 30]) == 10
    with pytest.raises(ValueError, match="restore.k is empty"):
        fixed_k([])


def paper_gain(c: str, s: Any, k: float) -> float:
    """Largest at the largest size and for low mastery, positive everywhere."""
    return (0.1 if c in ("D0", "D1") else 0.03) * (2 if s == 640 else 1) * min(k, 20) / 20


def test_restoration_shown_at_the_fixed_k() -> None:
    spec = make_spec(["D0", "D2", "D4"], [160, 640], k=[1, 5, 20, 40])
    shape = restoration(spec, lookup(spec, lambda c, s: 0.4, gain=paper_gain))
    assert shape.verdict == SHOWN, shape.reason
    assert shape.numbers["k"] == 20 and all(shape.numbers["checks"].values())
    assert shape.numbers["gain"]["D0-640"]["mean"] == pytest.approx(20.0)
    assert shape.numbers["gain"]["D0-640"]["std"] == pytest.approx(0.0)
    assert shape.numbers["gain"]["D0-640"]["before"] == pytest.approx(40.0)
    assert shape.numbers["gain"]["D0-640"]["after"] == pytest.approx(60.0)
    assert "D0-640 40.0 -> 60.0 (+20.0 ± 0.0 (n=2))" in shape.study
    assert "k = 20%" in shape.study and "best over k (chosen on test, not used)" in shape.study


def test_restoration_does_not_pick_the_best_k_on_test() -> None:
    """A gain only at k = 40 is not the fixed k's: not shown, with k = 40 listed as secondary."""
    spec = make_spec(["D0", "D4"], [160, 640], k=[1, 20, 40])
    shape = restoration(spec, lookup(spec, lambda c, s: 0.4,
                                     gain=lambda c, s, k: 0.1 if k == 40 else -0.02))
    assert shape.verdict == NOT_SHOWN and "does not raise" in shape.reason
    assert shape.numbers["secondary"]["best_over_k_on_test"]["D0-640"]["k"] == 40


def test_restoration_partly_when_a_part_fails_or_cannot_be_measured() -> None:
    spec = make_spec(["D0", "D4"], [160, 640], k=[20])
    flat = lambda c, s, k: 0.05 if c == "D4" else 0.01  # noqa: E731  high mastery gains more
    shape = restoration(spec, lookup(spec, lambda c, s: 0.4, gain=flat))
    assert shape.verdict == PARTLY and "fails: larger at largest size, larger for low mastery" \
        in shape.reason
    one_size = make_spec(["D0", "D4"], [160, 640], k=[20], restore_sizes="largest")
    shape = restoration(one_size, lookup(one_size, lambda c, s: 0.4, gain=paper_gain))
    assert shape.verdict == PARTLY and "not measurable here: larger at largest size" in shape.reason


def test_restoration_not_measurable() -> None:
    spec = make_spec(["D0", "D4"], [160, 640])
    assert restoration(spec, lookup(spec, lambda c, s: 0.4)).verdict == NOT_MEASURABLE
    spec = make_spec(["D0", "D4"], [160, 640], k=[20])
    failed = {restored_name(model_name("D0", 640, seed), "top", 20) for seed in (0, 1)}
    shape = restoration(spec, lookup(spec, lambda c, s: 0.4, gain=paper_gain, drop=failed))
    assert shape.verdict == NOT_MEASURABLE and "D0-640-s0-top20" in shape.reason
    with pytest.raises(ValueError, match="k 10 is not among restore.k"):
        restoration(spec, lookup(spec, lambda c, s: 0.4), k=10)


# -- the whole card, rendered and written ---------------------------------------------------


def test_scorecard_renders_one_row_per_shape() -> None:
    spec = make_spec(["D0", "D2", "D4"], [160, 640], k=[5, 20])
    card = scorecard(spec, lookup(spec, lambda c, s: 0.6 if c == "D2" else 0.4,
                                  bucket=lambda c, t: 0.6 if c == t else 0.4, gain=paper_gain))
    assert [s["shape"] for s in card["shapes"]] == ["a", "b", "c", "d"]
    assert card["counts"] == {SHOWN: 3, PARTLY: 0, NOT_SHOWN: 1, NOT_MEASURABLE: 0}
    json.dumps(card)
    lines = render(card)
    table = [line for line in lines if line.startswith("| (")]
    assert lines[0] == "## The paper's shapes, checked" and len(table) == 4
    assert "| shape | paper | this study | verdict | rule |" in lines
    assert table[2].startswith("| (c) mid-mastery (D2) data best overall | D2 best: 57.53")
    assert "**shown**" in table[2] and "**not shown**" in table[0]
    assert all(line.count(" | ") == 4 for line in table)  # no stray pipes inside a cell


def test_report_writes_scorecard_json(tmp_path: Path) -> None:
    spec = make_spec(["D0", "D2"], [40, 160])
    records = {f"eval/{model_name(c, s, seed)}": {"outputs": {
        "acc": {"id": 0.5 if s == 40 else 0.3, "ood": 0.2},
        "buckets": {"id": {t: 0.6 if t == c else 0.3 for t in TESTS}}}}
        for c in ("D0", "D2") for s in (40, 160) for seed in (0, 1)}
    lines = _shapes(spec, _Scores(records), tmp_path)
    card = json.loads((tmp_path / "scorecard.json").read_text())
    verdicts = {s["shape"]: s["verdict"] for s in card["shapes"]}
    assert verdicts == {"a": SHOWN, "b": SHOWN, "c": PARTLY, "d": NOT_MEASURABLE}
    assert any("**not measurable**: this spec does not restore" in line for line in lines)
