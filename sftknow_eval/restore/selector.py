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
lie in higher bins) and, in :class:`TieCounts`, exact per-key counts for every *marked* bin (one
that has reached ``heavy`` elements, or lies near where a threshold is expected), counted from
two rounds after it was marked. bf16 and fp16 inputs make r take few distinct values, so exact
ties are huge; these counts are what lets pass 2 decide them without storing them. In pass 2,
for each k, the first ``early`` elements of the threshold bin (those pass 1 counted before the
bin was marked; every element of an unmarked bin) are recorded as candidates; once the last of
them is seen, their keys plus the bin's exact counts give the exact threshold key ``cut`` and
how many elements equal to it are taken (:func:`fine_cut`): the first ``m`` in global order.
The candidates are patched then, and every later element is decided on the spot:
``key > cut``, or ``key == cut`` while fewer than ``m`` such were taken (a running counter).
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
BIN_SHIFT = 8
NUM_BINS = (1 << 31) >> BIN_SHIFT  # keys are < 2**31 for every strategy
FINE = 1 << BIN_SHIFT  # exact keys per bin
CHECKPOINTS = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # of the region, for mark_near
NEAR_BINS = 128  # bins marked on either side of an expected threshold (about +-0.4% in r)
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

    The definition the compiled loops (``kernels``) reproduce bit for bit; also the tests'
    reference. Reusing buffers matters: fresh allocations page-fault and cost more than the
    maths.
    """
    import torch

    n = base.numel()
    out = torch.empty(n, dtype=torch.float32) if out is None else out[:n]
    scratch = torch.empty(n, dtype=torch.float32) if scratch is None else scratch[:n]
    scratch.copy_(base.reshape(-1))  # base as float32
    out.copy_(tuned.reshape(-1))
    out.sub_(scratch).abs_()
    scratch.abs_().add_(EPS)
    return out.div_(scratch)


def random_seed_term(seed: int) -> int:
    """The seed's 32-bit contribution to every random key."""
    return (seed * 0x9E3779B1 + 0x7F4A7C15) & _MASK32


def random_keys(start: int, n: int, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Seeded 31-bit hash keys for global indices start..start+n-1 (int64).

    A counter-based hash (no generator state), so the draw does not depend on how the
    checkpoint is sharded or in which order tensors are read.
    """
    import torch

    x = torch.arange(start, start + n, dtype=torch.int64, out=None if out is None else out[:n])
    high = x >> 32
    x.bitwise_and_(_MASK32)
    x.bitwise_xor_((high * _MIX) & _MASK32)
    x.bitwise_xor_(random_seed_term(seed))
    for _ in range(3):
        x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(1)


def score_keys(r: torch.Tensor, strategy: str, start: int, seed: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The integer key per element (int32, 0 <= key < 2**31): larger key = selected earlier.

    For ``top`` this is a view of r's bits (no copy); ``out`` is an int32 buffer otherwise.
    """
    import torch

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


def threshold_bins(hist: np.ndarray, counts: list[int]) -> list[Threshold]:
    """For each n, the bin holding the n-th largest key and the count in higher bins."""
    from_top = np.cumsum(np.asarray(hist, dtype=np.float64)[::-1])  # exact below 2**53
    out = []
    for n in counts:
        if n <= 0:
            raise ValueError("n must be positive")
        pos = int(np.searchsorted(from_top, float(n), side="left"))
        b = len(hist) - 1 - pos
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
    """The key histogram plus exact per-key counts of chosen bins, gathered in pass 1.

    Pass 1 runs in *rounds* of a few chunks. A bin is *marked* (given a slot of FINE
    exact-key counts) after a round when

    * it has become heavy: the histogram shows ``heavy`` elements in it (checked on every
      DETECT_STRIDE-th element of the round), or
    * it lies near where a requested count's threshold is expected: at each checkpoint (a
      fraction CHECKPOINTS of the region seen), the bins within NEAR_BINS of the bin holding
      the rank ``n * seen / total`` (:meth:`mark_near`).

    A bin marked after round r is counted per exact key from round r + 2 on and in the
    histogram before, so its histogram entry ends up holding exactly its elements of the
    rounds before the split: ``early[bin]``, set by :meth:`finish`, the elements that pass 2
    must record as candidates before the bin's exact key counts are complete. The earlier a
    threshold bin is marked, the sooner pass 2 knows the exact threshold (and the fewer
    elements it records and patches); a threshold bin never marked is recorded whole, which is
    slower but just as exact. At most ``total // heavy`` bins become heavy and CHECKPOINTS x
    targets x (2 NEAR_BINS + 1) are marked near, so the tables have a fixed size.

    Layout, so that counting an element is one lookup and one increment
    (``kernels.count_keys``): each worker owns one float64 table (:meth:`new_table`), the
    histogram in its first NUM_BINS entries and then FINE counts per slot; a target map holds 0
    for a bin not marked (its elements go to histogram entry ``b``) and its slot's first entry
    once marked, where the key's low bits are added (zeros, not the identity, so the map's
    untouched pages are never written). There are two maps, for even and odd rounds: while the workers
    count round r + 1 with one, the marks decided after round r go into the other
    (:meth:`apply`), which round r + 2 then uses, so no worker ever waits for the marking and
    no map is written while read. Heavy bins are looked up while a round runs (what is read
    only steers which bins are marked, never a count); the near bins are chosen at the
    checkpoints, with no round running, so they do not depend on timing.
    """

    def __init__(self, total: int, heavy: int | None = None, targets: list[int] | None = None):
        self.heavy = max(1, heavy if heavy else max(1 << 18, total >> 14))
        self.total = total
        self.targets = list(targets or [])
        # numpy allocates the maps and tables: it asks for transparent huge pages on large
        # arrays, and the counting loop reads and writes them at random, where 4 KiB pages cost
        # a TLB miss per element (pass 1 took 20% longer on torch's memory)
        self.maps = (np.zeros(NUM_BINS, dtype=np.int32), np.zeros(NUM_BINS, dtype=np.int32))
        self.slots = (total // self.heavy + 1
                      + len(CHECKPOINTS) * len(self.targets) * (2 * NEAR_BINS + 1))
        if NUM_BINS + self.slots * FINE >= 2**31:
            raise UserError(f"region of {total} elements: too large for the count tables")
        self.early: dict[int, int] = {}
        self.slot_of: dict[int, int] = {}
        self._marked = np.zeros(NUM_BINS, dtype=bool)
        self._order: list[int] = []  # marked bins, in slot order
        self._applied = [0, 0]  # how many of them each map has
        self.hist: np.ndarray | None = None  # after finish: the whole histogram
        self.counts: np.ndarray | None = None  # after finish: slots x FINE exact counts

    def new_table(self) -> np.ndarray:
        return np.zeros(NUM_BINS + self.slots * FINE, dtype=np.float64)

    def target_for(self, round_index: int) -> np.ndarray:
        """The target map that round ``round_index`` counts with."""
        return self.maps[round_index % 2]

    def apply(self, round_index: int) -> None:
        """Put every mark so far into the map of ``round_index``'s parity; that round must be
        finished and the next round of the same parity not yet started."""
        which = round_index % 2
        first = self._applied[which]
        new = np.asarray(self._order[first:], dtype=np.int64)
        slots = np.arange(first, len(self._order), dtype=np.int64)  # slots follow _order
        self.maps[which][new] = NUM_BINS + slots * FINE
        self._applied[which] = len(self._order)

    def mark_heavy(self, tables: list[np.ndarray], sample: np.ndarray) -> None:
        """Mark the sampled unmarked bins whose count (summed over the workers) is heavy."""
        unmarked = sample[~self._marked[sample]]
        if not unmarked.size:
            return
        seen = tables[0][unmarked]
        for table in tables[1:]:
            seen += table[unmarked]
        hot = unmarked[seen >= self.heavy]
        if hot.size:
            self.mark_bins(np.unique(hot))

    def mark_near(self, tables: list[np.ndarray], seen: int) -> None:
        """Mark the bins near each target's expected threshold, the tables holding exactly the
        first ``seen`` region elements (no round running): target n is expected at rank
        ``n * seen / total``."""
        from sftknow_eval.restore import kernels  # kernels imports this module's constants

        if not self.targets or seen <= 0:
            return
        ranks = np.array(sorted(max(1.0, float(Fraction(n) * seen / self.total))
                                for n in self.targets), dtype=np.float64)
        bins = np.empty(ranks.size, dtype=np.int64)
        kernels.bins_at_ranks(tuple(tables), self.maps[0], self.maps[1], ranks, bins)
        near = [np.arange(max(0, b - NEAR_BINS), min(NUM_BINS, b + NEAR_BINS + 1))
                for b in bins.tolist() if b >= 0]
        if near:
            bins = np.unique(np.concatenate(near))
            self.mark_bins(bins[~self._marked[bins]])

    def mark_bins(self, bins: np.ndarray) -> None:
        """Give each (unmarked) bin a count slot; it takes effect through :meth:`apply`."""
        for b in bins.tolist():
            slot = len(self._order)
            if slot >= self.slots:  # cannot happen (see the class docstring)
                raise AssertionError("more marked bins than count slots")
            self.slot_of[b] = slot
            self._order.append(b)
        self._marked[bins] = True

    def finish(self, tables: list[np.ndarray]) -> np.ndarray:
        """Sum the workers' tables (after pass 1); returns the whole histogram."""
        total = tables[0]
        for table in tables[1:]:
            total += table
        hist, self.counts = total[:NUM_BINS], total[NUM_BINS:].reshape(self.slots, FINE)
        marked = np.asarray(self._order, dtype=np.int64)
        self.early = dict(zip(self._order, hist[marked].astype(np.int64).tolist(), strict=True))
        hist[marked] += self.counts[:marked.size].sum(1)
        self.hist = hist
        return hist

    def of_bin(self, b: int, bin_total: int) -> tuple[int, np.ndarray]:
        """(early count, exact-key counts of the later elements) for bin ``b``."""
        slot = self.slot_of.get(b)
        if slot is None:
            return bin_total, np.zeros(FINE, dtype=np.float64)
        return self.early[b], self.counts[slot].copy()


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
    import torch

    keys = score_keys(r.reshape(-1).float().clone(), strategy, 0, seed).numpy().astype(np.int64)
    idx = np.arange(keys.size)
    order = np.lexsort((idx, -keys))[:n]
    mask = torch.zeros(keys.size, dtype=torch.bool)
    mask[torch.from_numpy(order)] = True
    return mask
