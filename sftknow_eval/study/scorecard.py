"""The study's scorecard of the paper's four shapes (docs/METHOD.md §7): one verdict per shape,
decided by a fixed rule stated beside it, with the numbers and seed spread behind it, rendered
as a markdown table for the report and as a dict for ``scorecard.json``.

The rules were written before any result was looked at, and do not change with the results:

(a) peak then fall: for each training category, the size with the highest mean in-domain Acc
    (the peak; on a tie the smaller size) and the fall from it to the largest size. A category
    *falls* when its peak is not the largest size and the fall exceeds the larger of the two
    seed stds. Shown: more than half of the categories fall. Partly: at least one falls, or more
    than half peak below the largest size with falls inside the seed spread. Else not shown.
(b) the diagonal: at the largest size, for each test category that is also a training
    category, the training category with the highest mean accuracy on it. Shown: at least 80%
    of those test categories (4 of 5) are best after their own training category. Partly: that
    holds when the own category within one seed std (the larger of the two) of the best also
    counts, or more than half are strict hits. Else not shown.
(c) mid-mastery best: at the largest size, D2 has the highest mean in-domain Acc of all
    training categories (shown), is within one seed std (the larger of the two) of the best
    (partly), or neither (not shown).
(d) restoration: at one fixed k (the paper's 20% when the spec restores at 20, else the
    spec's k nearest to 20, the smaller on a tie; never the best k on the test set), the gain
    is restored minus fine-tuned in-domain Acc, paired per seed. Three parts: (1) the mean gain
    over all restored models is positive; (2) the mean gain at the largest restored size
    exceeds that at the smallest; (3) the mean gain for D0/D1 training data exceeds that for
    D3/D4. Shown: all three hold. Partly: (1) holds but (2) or (3) fails or cannot be measured
    (one restored size; no low- or no high-mastery category restored). Not shown: (1) fails.
    The best gain over all k is listed as a secondary number only: k is then chosen on the
    test set.

A verdict is "not measurable" when the spec cannot measure the shape (one size, one category,
no D2, no restoration) or an evaluation it needs is missing (a failed or skipped cell); the
reason says which. Seeds with a missing evaluation are left out of a mean and ``n`` says how
many remain. Accuracies in the dict are percentage points; ``std`` is the sample standard
deviation over seeds (0 with one seed, where the spread is unmeasured and the reason says so).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftknow_eval.probe.categories import YE2025_CATEGORIES
from sftknow_eval.study.plan import model_name, restored_name
from sftknow_eval.study.spec import StudySpec

SHOWN, PARTLY, NOT_SHOWN, NOT_MEASURABLE = "shown", "partly", "not shown", "not measurable"
VERDICTS = (SHOWN, PARTLY, NOT_SHOWN, NOT_MEASURABLE)
PAPER_K = 20.0
DIAGONAL_SHARE = 0.8
LOW_MASTERY, HIGH_MASTERY = ("D0", "D1"), ("D3", "D4")

# (model name, domain "id"/"ood", test category or None for Acc) -> accuracy in [0, 1] or None
Lookup = Callable[[str, str, str | None], float | None]

RULES = {
    "a": "per training category: peak = size with the best mean in-domain Acc; it *falls* when "
         "the peak is not the largest size and the fall to the largest size exceeds the larger "
         "seed std. Shown: > half the categories fall; partly: >= 1 falls, or > half peak below "
         "the largest size within the seed spread",
    "b": "at the largest size, per test category: the best training category. Shown: >= 80% "
         "(4 of 5) are their own; partly: >= 80% counting own-within-one-std, or > half strict",
    "c": "at the largest size, D2 has the best mean in-domain Acc (shown), is within one seed "
         "std of the best (partly), or neither (not shown)",
    "d": "at fixed k = {k}% (chosen before the run, not on test): (1) mean in-domain gain over "
         "restored models > 0, (2) gain at the largest restored size > at the smallest, (3) gain "
         "for D0/D1 > for D3/D4. Shown: all three; partly: (1) but (2) or (3) fails or cannot be "
         "measured; not shown: not (1)",
}
PAPER = {
    "a": "peaks near 240 samples, then falls: D0 -8.9 points in-domain from 240 to 1,920",
    "b": "5 of 5 test categories best after their own training category (1,920 samples)",
    "c": "D2 best: 57.53 in-domain Acc, next D3 55.15 (1,920 samples)",
    "d": "k = 20: D0 at 1,920 44.96 -> 54.81 (+9.85), D2 58.80 -> 62.21 (+3.41); gains largest "
         "at the largest sizes and for the least-mastered data",
}
NAMES = {"a": "peak at a small or medium size, then a fall",
         "b": "each category helps its own test category most",
         "c": "mid-mastery (D2) data best overall",
         "d": "restoration raises accuracy, most at large sizes and low mastery"}


@dataclass(frozen=True)
class Stat:
    """A mean over seeds (fractions in [0, 1] or differences of them) with its spread."""

    mean: float
    std: float
    n: int

    def text(self, signed: bool = False) -> str:
        mean = f"{100 * self.mean:+.1f}" if signed else f"{100 * self.mean:.1f}"
        return f"{mean} ± {100 * self.std:.1f} (n={self.n})"

    def to_dict(self) -> dict[str, Any]:
        return {"mean": round(100 * self.mean, 2), "std": round(100 * self.std, 2), "n": self.n}


def _stat(values: Sequence[float]) -> Stat | None:
    if not values:
        return None
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                len(values))


@dataclass
class Shape:
    """One row of the scorecard."""

    key: str
    verdict: str
    reason: str
    study: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.key, "name": NAMES[self.key], "paper": PAPER[self.key],
                "verdict": self.verdict, "reason": self.reason, "this_study": self.study,
                "rule": self.rule, "numbers": self.numbers}


class _Evals:
    """Per-seed accuracy lookups that remember which evaluations were missing."""

    def __init__(self, value: Lookup):
        self.value = value
        self.missing: list[str] = []
        self.wanted = 0

    def one(self, name: str, domain: str, bucket: str | None) -> float | None:
        self.wanted += 1
        found = self.value(name, domain, bucket)
        if found is None:
            self.missing.append(name)
        return found

    def acc(self, names: Sequence[str], domain: str = "id", bucket: str | None = None) -> Stat | None:
        values = [self.one(n, domain, bucket) for n in names]
        return _stat([v for v in values if v is not None])

    def gain(self, names: Sequence[str], strategy: str, k: float, domain: str = "id") -> Stat | None:
        """Restored minus fine-tuned accuracy, paired per seed."""
        diffs = []
        for name in names:
            before = self.one(name, domain, None)
            after = self.one(restored_name(name, strategy, k), domain, None)
            if before is not None and after is not None:
                diffs.append(after - before)
        return _stat(diffs)

    def check(self, key: str, rule: str, stats: Sequence[Stat | None]) -> Shape | None:
        """A not-measurable row when any needed number has no seed at all."""
        if any(s is None for s in stats):
            names = sorted(set(self.missing))
            return Shape(key, NOT_MEASURABLE, f"missing evaluations ({len(names)}): "
                         + ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""),
                         rule=rule, numbers={"missing": names})
        return None

    def note(self, stats: Sequence[Stat]) -> str:
        """The caveats a reason carries: missing seeds, and no spread with one seed."""
        notes = []
        if self.missing:
            notes.append(f"{len(set(self.missing))} evaluation(s) missing, means over the seeds present")
        if any(s.n < 2 for s in stats):
            notes.append("one seed: the seed spread is not measured")
        return f" ({'; '.join(notes)})" if notes else ""


def size_order(size: int | str) -> float:
    return float("inf") if size == "all" else float(size)


def fixed_k(ks: Sequence[float], paper_k: float = PAPER_K) -> float:
    """The k the restoration verdict uses: the paper's k if restored, else the nearest (smaller
    on a tie). Fixed by the spec alone, never by the results."""
    if not ks:
        raise ValueError("restore.k is empty: list at least one k (e.g. k: [20])")
    return min(sorted(ks), key=lambda k: abs(k - paper_k))


def _seeds(spec: StudySpec, category: str, size: int | str, seeds: Sequence[int] | None = None) -> list[str]:
    return [model_name(category, size, seed) for seed in (seeds or spec.grid.seeds)]


def _not(key: str, rule: str, reason: str) -> Shape:
    return Shape(key, NOT_MEASURABLE, reason, rule=rule)


def _grade(shown: bool, partly: bool) -> str:
    """The verdict of a measurable shape: shown, else partly, else not shown."""
    return SHOWN if shown else PARTLY if partly else NOT_SHOWN


def peak_then_fall(spec: StudySpec, value: Lookup) -> Shape:
    """Shape (a); see the module docstring for the rule."""
    rule, sizes = RULES["a"], sorted(spec.grid.sizes, key=size_order)
    if len(sizes) < 2:
        return _not("a", rule, f"this spec trains one size ({sizes[0]}): no size axis")
    evals = _Evals(value)
    curves = {c: {s: evals.acc(_seeds(spec, c, s)) for s in sizes} for c in spec.grid.categories}
    stats = [st for curve in curves.values() for st in curve.values()]
    failed = evals.check("a", rule, stats)
    if failed:
        return failed
    largest, rows, parts, falls, below = sizes[-1], {}, [], 0, 0
    for category, curve in curves.items():
        peak = max(sizes, key=lambda s: curve[s].mean)  # first maximum: the smaller size on a tie
        drop = curve[peak].mean - curve[largest].mean
        spread = max(curve[peak].std, curve[largest].std)
        fell = peak != largest and drop > spread
        falls += fell
        below += drop > 0
        rows[category] = {"peak_size": peak, "peak": curve[peak].to_dict(),
                          "largest": curve[largest].to_dict(), "fall": round(100 * drop, 2),
                          "spread": round(100 * spread, 2), "falls": fell,
                          "curve": {str(s): curve[s].to_dict() for s in sizes}}
        if drop <= 0:
            parts.append(f"{category}: best at the largest size {largest}, {curve[largest].text()}")
        else:
            parts.append(f"{category}: peak {curve[peak].text()} at {peak}, {curve[largest].text()} at "
                         f"{largest}, fall {100 * drop:.1f} (spread {100 * spread:.1f})")
    total = len(curves)
    verdict = _grade(2 * falls > total, bool(falls) or 2 * below > total)
    reason = (f"{falls} of {total} categories fall beyond the seed spread from their peak to "
              f"{largest}; {below} of {total} peak below the largest size")
    return Shape("a", verdict, reason + evals.note(stats), "; ".join(parts),
                 {"largest_size": largest, "categories": rows, "falls": falls, "peak_below": below},
                 rule)


def diagonal(spec: StudySpec, value: Lookup, largest: int | str) -> Shape:
    """Shape (b); see the module docstring for the rule."""
    rule = RULES["b"]
    trained = list(spec.grid.categories)
    tests = [c for c in trained if c in YE2025_CATEGORIES]
    if len(tests) < 2:
        return _not("b", rule, "this spec trains fewer than two of the test categories D0..D4: "
                    "no diagonal to compare")
    evals = _Evals(value)
    table = {t: {c: evals.acc(_seeds(spec, c, largest), "id", t) for c in trained} for t in tests}
    stats = [st for row in table.values() for st in row.values()]
    failed = evals.check("b", rule, stats)
    if failed:
        return failed
    hits, near, rows, parts = 0, 0, {}, []
    for test, row in table.items():
        best = max(trained, key=lambda c: row[c].mean)
        hit = best == test
        close = not hit and row[best].mean - row[test].mean <= max(row[best].std, row[test].std)
        hits += hit
        near += close
        rows[test] = {"best_training": best, "best": row[best].to_dict(), "own": row[test].to_dict(),
                      "hit": hit, "own_within_std": close}
        parts.append(f"{test} test: best after {best} {row[best].text()}"
                     + ("" if hit else f", own {row[test].text()}"))
    need = math.ceil(DIAGONAL_SHARE * len(tests))
    verdict = _grade(hits >= need, hits + near >= need or 2 * hits > len(tests))
    reason = (f"{hits} of {len(tests)} test categories best after their own training category "
              f"({near} more within one std); shown needs {need}")
    return Shape("b", verdict, reason + evals.note(stats), f"at {largest}: " + "; ".join(parts),
                 {"size": largest, "tests": rows, "hits": hits, "near": near, "needed": need}, rule)


def mid_mastery_best(spec: StudySpec, value: Lookup, largest: int | str) -> Shape:
    """Shape (c); see the module docstring for the rule."""
    rule, trained = RULES["c"], list(spec.grid.categories)
    if "D2" not in trained or len(trained) < 2:
        return _not("c", rule, "this spec does not train D2 beside another category")
    evals = _Evals(value)
    accs = {c: evals.acc(_seeds(spec, c, largest)) for c in trained}
    failed = evals.check("c", rule, list(accs.values()))
    if failed:
        return failed
    ranked = sorted(trained, key=lambda c: -accs[c].mean)
    best = next(c for c in ranked if c != "D2")  # the best of the others
    gap = accs[best].mean - accs["D2"].mean
    spread = max(accs[best].std, accs["D2"].std)
    if gap < 0:
        verdict, reason = SHOWN, f"D2 has the highest mean in-domain Acc, {100 * -gap:.1f} above {best}"
    elif gap == 0:
        verdict, reason = PARTLY, f"D2 ties with {best} for the highest mean in-domain Acc"
    elif gap <= spread:
        verdict = PARTLY
        reason = f"{best} is best, D2 {100 * gap:.1f} points lower, within the seed spread {100 * spread:.1f}"
    else:
        verdict = NOT_SHOWN
        reason = f"{best} is best, D2 {100 * gap:.1f} points lower, beyond the seed spread {100 * spread:.1f}"
    study = f"at {largest}: " + "; ".join(f"{c} {accs[c].text()}" for c in ranked)
    return Shape("c", verdict, reason + evals.note(list(accs.values())), study,
                 {"size": largest, "acc": {c: accs[c].to_dict() for c in ranked}, "best": best,
                  "gap_to_d2": round(100 * gap, 2), "spread": round(100 * spread, 2)}, rule)


def _mean(stats: Sequence[Stat]) -> float:
    return statistics.fmean(s.mean for s in stats)


def restoration(spec: StudySpec, value: Lookup, k: float | None = None) -> Shape:
    """Shape (d) at a fixed ``k`` (default: :func:`fixed_k` of the spec's list)."""
    restore = spec.restore
    if restore is None or not restore.k:
        return _not("d", RULES["d"].format(k=f"{PAPER_K:g}"), "this spec does not restore")
    k = fixed_k(restore.k) if k is None else k
    rule = RULES["d"].format(k=f"{k:g}")
    if k not in restore.k:
        raise ValueError(f"restoration k {k:g} is not among restore.k "
                         f"({', '.join(f'{x:g}' for x in restore.k)}); pick one of them")
    categories = list(restore.categories or spec.grid.categories)
    sizes = sorted(spec.restored_sizes(), key=size_order)
    seeds = restore.seeds or spec.grid.seeds
    evals = _Evals(value)
    targets = [(c, s) for c in categories for s in sizes]
    gains = {t: evals.gain(_seeds(spec, *t, seeds), restore.strategy, k) for t in targets}
    failed = evals.check("d", rule, list(gains.values()))
    if failed:
        return failed
    present: dict[tuple[str, int | str], Stat] = {t: g for t, g in gains.items() if g is not None}
    overall = _mean(list(present.values()))
    parts = [f"mean gain {100 * overall:+.1f} over {len(present)} restored model(s)"]
    checks: dict[str, bool | None] = {"raises": overall > 0, "larger_at_largest_size": None,
                                      "larger_for_low_mastery": None}
    numbers: dict[str, Any] = {"k": k, "mean_gain": round(100 * overall, 2)}
    if len(sizes) >= 2:
        small = _mean([present[(c, sizes[0])] for c in categories])
        large = _mean([present[(c, sizes[-1])] for c in categories])
        checks["larger_at_largest_size"] = large > small
        numbers["gain_by_size"] = {str(sizes[0]): round(100 * small, 2),
                                   str(sizes[-1]): round(100 * large, 2)}
        parts.append(f"at {sizes[-1]} {100 * large:+.1f} vs at {sizes[0]} {100 * small:+.1f}")
    low = [c for c in categories if c in LOW_MASTERY]
    high = [c for c in categories if c in HIGH_MASTERY]
    if low and high:
        low_gain = _mean([present[(c, s)] for c in low for s in sizes])
        high_gain = _mean([present[(c, s)] for c in high for s in sizes])
        checks["larger_for_low_mastery"] = low_gain > high_gain
        numbers["gain_by_mastery"] = {"/".join(low): round(100 * low_gain, 2),
                                      "/".join(high): round(100 * high_gain, 2)}
        parts.append(f"{'/'.join(low)} {100 * low_gain:+.1f} vs {'/'.join(high)} {100 * high_gain:+.1f}")
    numbers["gain"] = {f"{c}-{s}": g.to_dict() for (c, s), g in present.items()}
    # secondary numbers, not used by the verdict: Acc before and after, OOD at the same k, and
    # the best k on test
    extra = _Evals(value)  # its missing evaluations do not touch the verdict's
    rows = []
    for (c, s), g in present.items():
        names = _seeds(spec, c, s, seeds)
        before = extra.acc(names)
        after = extra.acc([restored_name(n, restore.strategy, k) for n in names])
        span = f"{100 * before.mean:.1f} -> {100 * after.mean:.1f} " if before and after else ""
        rows.append(f"{c}-{s} {span}({g.text(signed=True)})")
        numbers["gain"][f"{c}-{s}"].update(
            before=round(100 * before.mean, 2) if before else None,
            after=round(100 * after.mean, 2) if after else None)
    per_model = "; ".join(rows)
    ood = {t: extra.gain(_seeds(spec, *t, seeds), restore.strategy, k, "ood") for t in targets}
    best_k = {}
    for target in targets:
        over_k = [(x, extra.gain(_seeds(spec, *target, seeds), restore.strategy, x)) for x in restore.k]
        over_k = [(x, g) for x, g in over_k if g is not None]
        if over_k:
            x, g = max(over_k, key=lambda xg: xg[1].mean)
            best_k[f"{target[0]}-{target[1]}"] = {"k": x, **g.to_dict()}
    numbers["secondary"] = {"ood_gain": {f"{c}-{s}": g.to_dict() for (c, s), g in ood.items() if g},
                            "best_over_k_on_test": best_k}
    numbers["checks"] = checks
    secondary = "; ".join(f"{t} {v['mean']:+.1f} at k={v['k']:g}" for t, v in best_k.items())
    study = (f"k = {k:g}%: " + ", ".join(parts) + f". Per model: {per_model}."
             + (f" Secondary, best over k (chosen on test, not used): {secondary}." if secondary else ""))
    failed_parts = [name for name, ok in checks.items() if ok is False and name != "raises"]
    unmeasured = [name for name, ok in checks.items() if ok is None]
    verdict = _grade(checks["raises"] and not failed_parts and not unmeasured,
                     bool(checks["raises"]))
    reason = ("restoration raises in-domain Acc on average" if checks["raises"]
              else "restoration does not raise in-domain Acc on average")
    if failed_parts:
        reason += "; fails: " + ", ".join(p.replace("_", " ") for p in failed_parts)
    if unmeasured:
        reason += "; not measurable here: " + ", ".join(p.replace("_", " ") for p in unmeasured)
    return Shape("d", verdict, reason + evals.note(list(present.values())),
                 study, numbers, rule)


def scorecard(spec: StudySpec, value: Lookup, k: float | None = None) -> dict[str, Any]:
    """The four verdicts as a dict (what ``scorecard.json`` holds). ``value`` looks up one
    evaluated accuracy (``None`` when missing); ``k`` overrides the fixed restoration k."""
    if not spec.grid.sizes or not spec.grid.categories or not spec.grid.seeds:
        raise ValueError("the study grid needs at least one category, size and seed")
    largest = sorted(spec.grid.sizes, key=size_order)[-1]
    shapes = [peak_then_fall(spec, value), diagonal(spec, value, largest),
              mid_mastery_best(spec, value, largest), restoration(spec, value, k)]
    counts = {v: sum(s.verdict == v for s in shapes) for v in VERDICTS}
    return {"study": spec.name, "largest_size": largest, "seeds": list(spec.grid.seeds),
            "counts": counts, "shapes": [s.to_dict() for s in shapes]}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(card: dict[str, Any]) -> list[str]:
    """The report's markdown section for a :func:`scorecard` dict."""
    counts = card["counts"]
    lines = ["## The paper's shapes, checked", "",
             f"Scorecard of the four shapes of docs/METHOD.md §7: {counts[SHOWN]} shown, "
             f"{counts[PARTLY]} partly, {counts[NOT_SHOWN]} not shown, {counts[NOT_MEASURABLE]} "
             "not measurable. In-domain Acc in % as mean ± seed std (n seeds); each verdict "
             "follows the fixed rule beside it (also in `scorecard.json`).", "",
             "| shape | paper | this study | verdict | rule |", "|---|---|---|---|---|"]
    for shape in card["shapes"]:
        study = shape["this_study"] or "–"
        lines.append(f"| ({shape['shape']}) {_cell(shape['name'])} | {_cell(shape['paper'])} | "
                     f"{_cell(study)} | **{shape['verdict']}**: {_cell(shape['reason'])} | "
                     f"{_cell(shape['rule'])} |")
    return lines + [""]
