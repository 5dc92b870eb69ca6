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

Streaming selection (two passes, memory bounded by one chunk): pass 1 builds a histogram of
``key >> BIN_SHIFT``; :func:`threshold_bins` finds, per k, the bin holding the n-th element and
how many elements lie in higher bins (all selected). Pass 2 selects those, and records only the
elements inside the threshold bin as candidates; :func:`resolve_candidates` orders them
exactly. Elements with r == 0 (tuned equals base, restoring them is a no-op) are counted per
tensor instead of recorded, so a huge tie at zero costs no memory.
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


def noop_key(strategy: str) -> int | None:
    """The key that r == 0 maps to (no-op restorations); None where it is not a single value."""
    return {"top": 0, "bottom": INF_BITS}.get(strategy)


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


def resolve_candidates(keys: np.ndarray, gidx: np.ndarray, take: int, noop: int | None,
                       noop_counts: list[tuple[int, int]]) -> tuple[np.ndarray, list[int], int]:
    """Exact choice inside the threshold bin.

    ``keys``/``gidx``: recorded candidates (never the no-op key); ``noop_counts``: per tensor,
    (global start, count of candidates whose key is the no-op key). Returns the positions of the
    chosen recorded candidates, how many no-op elements each tensor contributes, and the key of
    the last element taken (the exact threshold key).
    """
    order = np.lexsort((gidx, -keys))
    keys_sorted = keys[order]
    if noop is None:
        above, below = order, order[:0]
    else:
        split = int(np.searchsorted(-keys_sorted, -noop, side="left"))
        above, below = order[:split], order[split:]
    noop_total = sum(c for _, c in noop_counts)
    if take > len(above) + noop_total + len(below):
        raise AssertionError("threshold bin holds fewer candidates than the histogram said")
    chosen_above = above[:take]
    rest = take - len(chosen_above)
    noop_take = []
    for _, count in sorted(noop_counts):
        t = min(count, rest)
        noop_take.append(t)
        rest -= t
    order_index = {start: i for i, (start, _) in enumerate(sorted(noop_counts))}
    noop_by_input = [noop_take[order_index[start]] for start, _ in noop_counts]
    chosen_below = below[:rest]
    chosen = np.concatenate([chosen_above, chosen_below])
    if len(chosen_below):
        last_key = int(keys[chosen_below[-1]])
    elif take > len(above):
        last_key = int(noop)  # type: ignore[arg-type]  # the no-op block was reached
    else:
        last_key = int(keys[chosen_above[-1]])
    return chosen, noop_by_input, last_key


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
