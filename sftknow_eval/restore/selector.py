"""Selecting room of restore: pure functions that decide which elements go back to base values.

No file I/O here. The selection rule, which the streaming engine reproduces exactly:

* Relative change ``r = |tuned - base| / (|base| + 1e-8)`` in float32, whatever the stored dtype.
* Each region element gets an integer *key*: for ``top`` the float32 bit pattern of r (bit
  patterns of non-negative floats sort like the floats), for ``bottom`` ``INF_BITS - bits`` (so
  larger key = smaller r), for ``random`` a seeded 31-bit hash of the element's global index.
* The *global index* numbers the region's elements: tensors in natural name order (digit runs
  compared as numbers, so ``layers.2`` precedes ``layers.10``), elements row-major within each.
* ``n = floor(N * k / 100)`` elements are selected: the first n of a stable sort by
  ``(-key, global index)``. Ties are therefore broken by position, lower global index first.
  This is what ``torch.sort(r, descending=True, stable=True)[:n]`` gives for ``top``.

Streaming selection (two passes, memory bounded by one chunk plus fixed-size tables). Both
passes visit tensors in global order. Pass 1 builds a histogram of ``key >> BIN_SHIFT``
(:func:`threshold_bins` then finds, per k, the bin holding the n-th element and how many elements
lie in higher bins) and, in :class:`TieCounts`, exact per-key counts for every *heavy* bin (one
that has reached ``heavy`` elements), counted from the chunk after it became heavy. bf16 and
fp16 inputs make r take few distinct values, so exact ties are huge; these counts are what lets
pass 2 decide them without storing them. In pass 2, for each k, the first ``early`` elements of
the threshold bin (those pass 1 saw before the bin became heavy: fewer than ``heavy`` plus one
chunk; every element of a light bin) are recorded as candidates; once the last of them is seen,
their keys plus the heavy bin's counts give the exact threshold key ``cut`` and how many elements
equal to it are taken (:func:`fine_cut`): the first ``m`` in global order. The candidates are
patched then, and every later element is decided on the spot: ``key > cut``, or ``key == cut``
while fewer than ``m`` such were taken (a running counter).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from sftknow_eval.errors import UserError

EPS = 1e-8
INF_BITS = 0x7F800000  # float32 +inf; every finite non-negative r has smaller bits
BIN_SHIFT = 8
NUM_BINS = (1 << 31) >> BIN_SHIFT  # keys are < 2**31 for every strategy
FINE = 1 << BIN_SHIFT  # exact keys per bin
DETECT_STRIDE = 64  # heavy bins are spotted on every 64th element of a chunk (cheap; exactness
# does not depend on it, only how early a bin starts being counted exactly)
STRATEGIES = ("top", "bottom", "random")
_MASK32 = 0xFFFFFFFF
_MIX = 0x045D9F3B  # < 2**27, so products of 32-bit values stay inside int64


def validate_k(k: float) -> float:
    """k is a percentage strictly between 0 and 100."""
    if not (0 < k < 100):
        raise UserError(f"--k {k:g}: k must lie strictly between 0 and 100 (a percentage)")
    return k


def count_to_select(total: int, k: float) -> int:
    """floor(total * k / 100), computed exactly (k as the decimal the user typed)."""
    return int(Fraction(str(k)) * total / 100)


def relative_change(base: torch.Tensor, tuned: torch.Tensor, out: torch.Tensor | None = None,
                    scratch: torch.Tensor | None = None) -> torch.Tensor:
    """r = |tuned - base| / (|base| + 1e-8) in float32; ``out``/``scratch`` are reusable buffers.

    Reusing buffers matters: fresh large allocations page-fault and cost more than the maths.
    """
    n = base.numel()
    out = torch.empty(n, dtype=torch.float32) if out is None else out[:n]
    scratch = torch.empty(n, dtype=torch.float32) if scratch is None else scratch[:n]
    scratch.copy_(base.reshape(-1))  # base as float32
    out.copy_(tuned.reshape(-1))
    out.sub_(scratch).abs_()
    scratch.abs_().add_(EPS)
    return out.div_(scratch)


def random_keys(start: int, n: int, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded 31-bit hash keys for global indices start..start+n-1 (int64).

    A counter-based hash (no generator state), so the draw does not depend on how the
    checkpoint is sharded or in which order tensors are read.
    """
    x = torch.arange(start, start + n, dtype=torch.int64, out=None if out is None else out[:n])
    high = x >> 32
    x.bitwise_and_(_MASK32)
    x.bitwise_xor_((high * _MIX) & _MASK32)
    x.bitwise_xor_((seed * 0x9E3779B1 + 0x7F4A7C15) & _MASK32)
    for _ in range(3):
        x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(1)


def score_keys(r: torch.Tensor, strategy: str, start: int, seed: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The integer key per element (int32, 0 <= key < 2**31): larger key = selected earlier.

    For ``top`` this is a view of r's bits (no copy); ``out`` is an int32 buffer otherwise.
    """
    n = r.numel()
    bits = r.reshape(-1).view(torch.int32)
    if strategy == "top":
        return bits
    keys = torch.empty(n, dtype=torch.int32) if out is None else out[:n]
    if strategy == "random":
        return keys.copy_(random_keys(start, n, seed))
    if strategy != "bottom":
        raise UserError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    return torch.sub(INF_BITS, bits, out=keys)


@dataclass(frozen=True)
class Threshold:
    """Where the n-th selected element lies: every key >= ``lo_key_sure`` is selected, and
    ``take`` more come from the candidates in bin ``bin`` (keys ``bin << BIN_SHIFT`` ...)."""

    n: int
    bin: int
    above: int

    @property
    def take(self) -> int:
        return self.n - self.above

    @property
    def lo_key_sure(self) -> int:
        return (self.bin + 1) << BIN_SHIFT


def threshold_bins(hist: torch.Tensor, counts: list[int]) -> list[Threshold]:
    """For each n, the bin holding the n-th largest key and the count in higher bins."""
    from_top = torch.flip(hist, (0,)).to(torch.float64).cumsum(0)  # exact below 2**53
    out = []
    for n in counts:
        if n <= 0:
            raise ValueError("n must be positive")
        pos = int(torch.searchsorted(from_top, torch.tensor([float(n)], dtype=torch.float64)))
        b = hist.numel() - 1 - pos
        above = int(from_top[pos - 1]) if pos > 0 else 0
        out.append(Threshold(n=n, bin=b, above=above))
    return out


def fine_cut(counts: np.ndarray, take: int) -> tuple[int, int]:
    """Inside one bin: the low bits of the key holding the ``take``-th largest element, and how
    many elements of the bin have larger keys. ``counts`` holds the bin's FINE exact-key counts."""
    from_top = np.cumsum(np.asarray(counts, dtype=np.float64)[::-1])
    if take <= 0 or take > from_top[-1]:
        raise AssertionError(f"cannot take {take} of the {from_top[-1]:.0f} elements in the bin")
    pos = int(np.searchsorted(from_top, float(take), side="left"))
    return len(counts) - 1 - pos, int(from_top[pos - 1]) if pos > 0 else 0


class TieCounts:
    """Exact per-key counts of the heavy bins, gathered in pass 1 alongside the histogram.

    A bin becomes heavy once the histogram shows ``heavy`` elements in it (checked after each
    chunk on every DETECT_STRIDE-th element); from the next chunk on, its elements are counted
    per exact key. ``early[bin]`` is the histogram count when it was marked: the elements that
    pass 2 must record as candidates before the bin's exact key counts are complete. At most
    ``total // heavy`` bins can become heavy, so the table is at most that many x FINE counts.
    """

    def __init__(self, total: int, heavy: int | None = None):
        self.heavy = max(1, heavy if heavy else max(1 << 18, total >> 14))
        self.slot_of_bin = torch.zeros(NUM_BINS, dtype=torch.int32)  # slot 0: not heavy (trash)
        self.counts = torch.zeros((total // self.heavy + 2) * FINE, dtype=torch.float64)
        self.early: dict[int, int] = {}
        self._next = 1

    def add(self, hist: torch.Tensor, bins: torch.Tensor, keys: torch.Tensor, ones: torch.Tensor,
            scratch: torch.Tensor, low: torch.Tensor) -> None:
        """Count one chunk (``hist`` already includes it); ``scratch``/``low``: int32 buffers."""
        n = bins.numel()
        if self._next > 1:
            slots = torch.index_select(self.slot_of_bin, 0, bins, out=scratch[:n])
            slots.mul_(FINE).add_(torch.bitwise_and(keys, FINE - 1, out=low[:n]))
            self.counts.index_add_(0, slots, ones[:n])
        sample = bins[::DETECT_STRIDE]
        hot = (hist[sample] >= self.heavy) & (self.slot_of_bin[sample] == 0)
        if bool(hot.any()):
            for b in torch.unique(sample[hot]).tolist():
                self.slot_of_bin[b] = self._next
                self.early[b] = int(hist[b])
                self._next += 1

    def of_bin(self, b: int, bin_total: int) -> tuple[int, np.ndarray]:
        """(early count, exact-key counts of the later elements) for bin ``b``."""
        slot = int(self.slot_of_bin[b])
        if slot == 0:
            return bin_total, np.zeros(FINE, dtype=np.float64)
        return self.early[b], self.counts[slot * FINE:(slot + 1) * FINE].numpy().copy()


def key_to_r(key: int, strategy: str) -> float | None:
    """The r value that a top/bottom key stands for (None for random)."""
    if strategy == "top":
        bits = key
    elif strategy == "bottom":
        bits = INF_BITS - key
    else:
        return None
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def keys_to_r(keys: np.ndarray, strategy: str) -> np.ndarray:
    """The r values that int32 top/bottom keys stand for (vectorised :func:`key_to_r`)."""
    bits = keys.astype(np.int64) if strategy == "top" else INF_BITS - keys.astype(np.int64)
    return bits.astype(np.uint32).view(np.float32)


def reference_selection(r: torch.Tensor, n: int, strategy: str, seed: int = 0) -> torch.Tensor:
    """Brute-force reference on a whole flat r (global order): a bool mask of the n selected."""
    keys = score_keys(r.reshape(-1).float().clone(), strategy, 0, seed).numpy().astype(np.int64)
    idx = np.arange(keys.size)
    order = np.lexsort((idx, -keys))[:n]
    mask = torch.zeros(keys.size, dtype=torch.bool)
    mask[torch.from_numpy(order)] = True
    return mask
