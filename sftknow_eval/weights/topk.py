"""Exact top-k selection over a stream of tensors: the rule, its keys, and the cut per k.

The rule, which every streaming pass reproduces exactly:

* Relative change ``r = |tuned - base| / (|base| + 1e-8)`` in float32, whatever the stored dtype.
* Each region element gets an integer *key* (0 <= key < 2**31; larger keys are selected
  first): for ``top`` r's float32 bits (they sort like non-negative floats), for ``bottom``
  ``INF_BITS - bits``, for ``random`` a seeded counter-based hash of the element's global index
  (``kernels._random_key``: the draw depends neither on the sharding nor on the reading order).
* The *global index* numbers the region's elements: tensors in natural name order (digit runs
  compared as numbers, so ``layers.2`` precedes ``layers.10``), elements row-major within each.
* ``n = floor(N * k / 100)`` elements are selected: the first n of a stable sort by
  ``(-key, global index)`` (for ``top``: ``torch.sort(r, descending=True, stable=True)[:n]``).

Each n's cut takes two read-only passes with fixed-size tables: a histogram of
``key >> BIN_SHIFT`` gives the *threshold bin* holding the n-th largest key
(:func:`threshold_bins`); exact per-key counts inside those bins only give the cut key and how
many keys equal to it are taken (:func:`exact_cuts`). A writing pass then selects
``key > cut``, or ``key == cut`` while a running count of such elements is under ``ties``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from sftknow_eval.errors import UserError

if TYPE_CHECKING:
    import torch

EPS = 1e-8
INF_BITS = 0x7F800000  # float32 +inf; every finite non-negative r has smaller bits
BIN_SHIFT = 16  # 32 K bins: a worker's histogram stays in its cache
NUM_BINS = (1 << 31) >> BIN_SHIFT  # keys are < 2**31 for every strategy
FINE = 1 << BIN_SHIFT  # exact keys per bin
STRATEGIES = ("top", "bottom", "random")
MASK32 = 0xFFFFFFFF
MIX = 0x045D9F3B  # < 2**27, so products of 32-bit values stay inside int64


def validate_k(k: float) -> float:
    """k is a percentage strictly between 0 and 100."""
    if not (0 < k < 100):
        raise UserError(f"--k {k:g}: k must lie strictly between 0 and 100 (a percentage)")
    return k


def count_to_select(total: int, k: float) -> int:
    """floor(total * k / 100), computed exactly (k as the decimal the user typed)."""
    return int(Fraction(str(k)) * total / 100)


def relative_change(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """r = |tuned - base| / (|base| + 1e-8) in float32, flat: the definition the compiled
    loops (``kernels``) reproduce bit for bit."""
    b = base.reshape(-1).float()
    return (tuned.reshape(-1).float() - b).abs_().div_(b.abs().add_(EPS))


def random_seed_term(seed: int) -> int:
    """The seed's 32-bit contribution to every random key."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) & MASK32


def key_to_r(keys: np.ndarray | int, strategy: str) -> np.ndarray | float | None:
    """The r value(s) that top/bottom keys stand for (None for random)."""
    if strategy == "random":
        return None
    bits = np.asarray(keys, dtype=np.int64)
    r = (bits if strategy == "top" else INF_BITS - bits).astype(np.uint32).view(np.float32)
    return float(r) if r.ndim == 0 else r


@dataclass(frozen=True)
class Threshold:
    """Where the n-th largest key lies: in bin ``bin``, with ``above`` elements in higher bins."""

    n: int
    bin: int
    above: int


@dataclass(frozen=True)
class Cut:
    """n's exact selection: every key above ``key``, and the first ``ties`` keys equal to it."""

    n: int
    key: int
    ties: int


def _nth_from_top(counts: np.ndarray, n: int) -> tuple[int, int]:
    """Where the n-th largest of ``counts`` (per key or bin, in key order) lies: its index, and
    how many lie above it."""
    from_top = np.cumsum(np.asarray(counts, dtype=np.int64)[::-1])
    if not 0 < n <= from_top[-1]:
        raise ValueError(f"cannot select {n} of {from_top[-1]} elements: the passes disagree")
    pos = int(np.searchsorted(from_top, n, side="left"))
    return len(counts) - 1 - pos, int(from_top[pos - 1]) if pos else 0


def threshold_bins(hist: np.ndarray, counts: list[int]) -> list[Threshold]:
    """For each n (1 <= n <= the histogram's total), the bin holding the n-th largest key."""
    return [Threshold(n, *_nth_from_top(hist, n)) for n in counts]


def slot_map(thresholds: list[Threshold]) -> tuple[np.ndarray, list[int]]:
    """Where each threshold bin's exact counts go: a map bin -> slot (-1: not counted) and
    the bins in slot order. Slot s holds FINE counts, entry ``s * FINE + (key & (FINE - 1))``."""
    bins = sorted({t.bin for t in thresholds})
    slots = np.full(NUM_BINS, -1, dtype=np.int32)
    slots[bins] = np.arange(len(bins), dtype=np.int32)
    return slots, bins


def exact_cuts(thresholds: list[Threshold], fine: np.ndarray, slots: np.ndarray) -> list[Cut]:
    """Each n's exact cut from the threshold bins' per-key counts (``fine``: slots x FINE)."""
    cuts = []
    for t in thresholds:
        low, above = _nth_from_top(fine[slots[t.bin]], t.n - t.above)
        cuts.append(Cut(t.n, (t.bin << BIN_SHIFT) | low, t.n - t.above - above))
    return cuts


def count_fine(keys: np.ndarray, slots: np.ndarray, fine: np.ndarray) -> None:
    """Add the keys that fall in a counted bin to ``fine`` (slots x FINE), with numpy (for
    whole tensors; ``kernels.count_in_bins`` is the compiled form for chunks)."""
    keys = np.asarray(keys, dtype=np.int64)
    slot = slots[keys >> BIN_SHIFT]
    hit = slot >= 0
    flat = slot[hit].astype(np.int64) * FINE + (keys[hit] & (FINE - 1))
    fine += np.bincount(flat, minlength=fine.size).reshape(fine.shape)

