"""The streaming passes of restore, on worker threads: two read-only passes, then the write.

1. :func:`scan` reads every floating-point tensor: NaN/Inf checks, per-tensor summed r and the
   region's key histogram (``weights.topk``, step 1).
2. :func:`exact_cuts` reads the region again: exact per-key counts inside the threshold bins
   only, which give every k's exact cut and how many keys equal to it it takes (step 2).
3. :func:`write_variants` reads every tensor once more and writes every variant: a region
   element goes back to its base value for each k with ``key > cut``, or ``key == cut`` while
   that k's running count of such elements is under its allowance.

Every pass visits tensors in natural name order (the global element order), in chunks
(:class:`Piece`) that workers read (positional reads) and run the compiled loops on
(``weights.kernels``, GIL released); results are taken in order, so outputs and statistics do
not depend on the workers or their timing. Memory does not grow with the model: per worker one
chunk's buffers and a 256 KB histogram, in the write pass a fixed pool of :class:`_Slot`.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.restore.stats import VariantStats
from sftknow_eval.weights import kernels, topk
from sftknow_eval.weights.checkpoint import UNSIGNED, Checkpoint, RawRange
from sftknow_eval.weights.regions import in_layer_group
from sftknow_eval.weights.writer import ShardedWriter


@dataclass
class Variant:
    """One output model: a k of a strategy (its exact ``cut`` once known), or a layer group."""

    name: str
    k: float | None = None
    group: tuple[int, int] | None = None
    cut: topk.Cut | None = None
    stats: VariantStats = field(default_factory=VariantStats)
    folder: Path | None = None
    writer: ShardedWriter | None = None
    threshold_r: float | None = None


@dataclass(frozen=True)
class Piece:
    """A run of one tensor's flat elements: ``[start, stop)``; ``first`` is its global index."""

    name: str
    start: int
    stop: int
    first: int | None  # None outside the region


@dataclass
class Selection:
    """What the caller asks for: the region, its global start per tensor, strategy and seed."""

    region: set[str]
    starts: dict[str, int]
    total: int
    strategy: str
    seed: int

    @property
    def key_args(self) -> tuple[int, int]:
        """The kernels' strategy code and seed term."""
        return topk.STRATEGIES.index(self.strategy), topk.random_seed_term(self.seed)


def pieces(checkpoint: Checkpoint, order: list[str], selection: Selection, size: int,
           floats_only: bool) -> list[Piece]:
    """Every tensor of ``order`` cut into runs of at most ``size`` elements, in order."""
    out = []
    for name in order:
        info = checkpoint.tensors[name]
        first = selection.starts.get(name) if name in selection.region else None
        if info.is_float or not floats_only:
            out += [Piece(name, a, min(info.numel, a + size), None if first is None else first + a)
                    for a in range(0, info.numel, size)]
    return out


class CheckpointPair:
    """Both checkpoints; only the main thread opens files (:meth:`ranges`)."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint):
        self.base, self.tuned = base, tuned

    def ranges(self, piece: Piece) -> tuple[Piece, RawRange, RawRange]:
        return (piece, self.base.raw_range(piece.name, piece.start, piece.stop),
                self.tuned.raw_range(piece.name, piece.start, piece.stop))

    def nonfinite_error(self, name: str) -> UserError:
        import torch  # the error path only

        which = [label for label, t in (("base", self.base.tensor(name)),
                                        ("fine-tuned", self.tuned.tensor(name)))
                 if not bool(torch.isfinite(t.float()).all())]
        where = " and ".join(which) if which else "neither (the difference overflows float32)"
        return UserError(f"tensor {name}: NaN or Inf values in the {where} model")


_FLOATS = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


class _Buffers:
    """One worker's reusable buffers (fresh ones page-fault) and its table of counts."""

    def __init__(self, size: int):
        self.base, self.tuned = np.empty(size * 8, np.uint8), np.empty(size * 8, np.uint8)
        self.base32, self.tuned32 = np.empty(size, np.float32), np.empty(size, np.float32)
        self.table: np.ndarray | None = None

    def inputs(self, base: RawRange, tuned: RawRange, base_bytes: np.ndarray | None = None,
               tuned_bytes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Both chunks (read here unless given) as the kernels take them."""
        chunks = []
        for source, data, own, scratch in ((base, base_bytes, self.base, self.base32),
                                           (tuned, tuned_bytes, self.tuned, self.tuned32)):
            data = source.read(own) if data is None else data
            chunks.append(kernels.as_kernel_input(data.view(_FLOATS[source.dtype]), scratch))
        return chunks[0], chunks[1]

    def zeroed(self, size: int) -> np.ndarray:
        if self.table is None:
            self.table = np.zeros(size, dtype=np.int64)
        return self.table


class _Pool(ThreadPoolExecutor):
    """Worker threads, each with its own :class:`_Buffers`."""

    def __init__(self, workers: int, size: int):
        super().__init__(max(1, workers), thread_name_prefix="restore")
        self.workers, self.size, self.buffers = max(1, workers), size, []
        self._mine, self._buffers_lock = threading.local(), threading.Lock()

    def own(self) -> _Buffers:
        if not hasattr(self._mine, "buffers"):
            self._mine.buffers = _Buffers(self.size)
            with self._buffers_lock:
                self.buffers.append(self._mine.buffers)
        return self._mine.buffers

    def ordered(self, fn: Callable, items: Iterable, args: Callable) -> Iterator[tuple]:
        """``(item, fn(*args(item)))`` in order, ``2 * workers`` items ahead; ``args`` runs on
        the calling thread (it opens files, or waits for a free slot)."""
        todo, pending = iter(items), deque()
        for item in todo:
            pending.append((item, self.submit(fn, *args(item))))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, self.submit(fn, *args(nxt))))
            yield item, future.result()

    def summed_tables(self) -> np.ndarray:
        return np.sum([b.table for b in self.buffers if b.table is not None], axis=0)

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True, cancel_futures=True)


def _bar(total: int, what: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=f"restore: {what}", unit="chunk", disable=not progress)


@dataclass
class ScanResult:
    """Per-tensor summed r, whether anything outside the region changed, the key histogram."""

    sum_r: dict[str, float]
    changed_outside: bool = False
    hist: np.ndarray | None = None


def scan(pair: CheckpointPair, parts: list[Piece], selection: Selection, workers: int,
         size: int, progress: bool) -> ScanResult:
    """Pass 1 over ``parts`` (every floating-point tensor)."""
    strategy, seed_term = selection.key_args
    result = ScanResult({name: 0.0 for name in selection.region})

    def work(piece: Piece, base: RawRange, tuned: RawRange) -> float:
        buffers = pool.own()
        b, t = buffers.inputs(base, tuned)
        if piece.first is None:
            return kernels.sum_relative_change(b, t)
        return kernels.histogram(b, t, strategy, piece.first, seed_term,
                                 buffers.zeroed(topk.NUM_BINS))

    with _Pool(workers, size) as pool, _bar(len(parts), "histogram", progress) as bar:
        for piece, total in pool.ordered(work, parts, pair.ranges):
            if not np.isfinite(total):
                raise pair.nonfinite_error(piece.name)
            if piece.first is None:
                result.changed_outside = result.changed_outside or total > 0
            else:
                result.sum_r[piece.name] += total  # in order: independent of the workers
            bar.update(1)
        result.hist = pool.summed_tables()
    return result


def exact_cuts(pair: CheckpointPair, parts: list[Piece], selection: Selection,
               thresholds: list[topk.Threshold], workers: int, size: int,
               progress: bool) -> list[topk.Cut]:
    """The read-only pass: each threshold's exact cut, from per-key counts of its bin."""
    strategy, seed_term = selection.key_args
    slots, bins = topk.slot_map(thresholds)
    region = [p for p in parts if p.first is not None]

    def work(piece: Piece, base: RawRange, tuned: RawRange) -> None:
        buffers = pool.own()
        kernels.count_in_bins(*buffers.inputs(base, tuned), strategy, piece.first, seed_term,
                              slots, buffers.zeroed(len(bins) * topk.FINE))

    with _Pool(workers, size) as pool, _bar(len(region), "exact counts", progress) as bar:
        for _ in pool.ordered(work, region, pair.ranges):
            bar.update(1)
        fine = pool.summed_tables().reshape(len(bins), topk.FINE)
    return topk.exact_cuts(thresholds, fine, slots)


class _Slot:
    """A chunk from reading to writing: raw tuned values (patched in place), raw base values,
    candidates (keys reaching the lowest cut: positions, keys, r, raw base values), ties."""

    def __init__(self, size: int):
        self.tuned_bytes, self.base_bytes = np.empty(size * 8, np.uint8), np.empty(size * 8, np.uint8)
        self.pos, self.keys = np.empty(size, np.int32), np.empty(size, np.int32)
        self.r, self.raw_bytes = np.empty(size, np.float32), np.empty(size * 8, np.uint8)
        self.tuned: np.ndarray | None = None
        self.base: np.ndarray | None = None
        self.candidates: tuple[np.ndarray, ...] = ()
        self.ties: np.ndarray | None = None


def write_variants(pair: CheckpointPair, parts: list[Piece], selection: Selection,
                   variants: list[Variant], workers: int, size: int, progress: bool) -> None:
    """The write pass over ``parts`` (every tensor). Workers prepare chunks ahead; the main
    thread takes them in order and decides how many of each cut's ties a chunk takes (the
    one sequential step); then one job per chunk patches it and writes it to every variant.
    """
    selecting = sorted((v for v in variants if v.cut is not None), key=lambda v: v.cut.n)
    groups = [v.group for v in variants if v.group is not None]
    cuts = np.array([v.cut.key for v in selecting], dtype=np.int64)
    ties_left = np.array([v.cut.ties for v in selecting], dtype=np.int64)
    strategy, seed_term = selection.key_args
    free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(3 * max(1, workers) + 1):  # more than ``ordered`` holds ahead
        free.put(_Slot(size))

    def prepare(piece: Piece, base: RawRange, tuned: RawRange, slot: _Slot) -> _Slot:
        tuned_bytes = tuned.read(slot.tuned_bytes)
        slot.tuned, slot.base, slot.candidates = tuned_bytes.view(UNSIGNED[tuned.itemsize]), None, ()
        if piece.first is None or not (selecting or any(in_layer_group(piece.name, g)
                                                        for g in groups)):
            return slot
        base_bytes = base.read(slot.base_bytes)
        slot.base = base_bytes.view(UNSIGNED[base.itemsize])
        if selecting:
            b, t = pool.own().inputs(base, tuned, base_bytes, tuned_bytes)
            raw = slot.raw_bytes.view(slot.base.dtype)
            n = kernels.find_candidates(b, t, slot.base, strategy, piece.first, seed_term,
                                        cuts.min(), slot.pos, slot.keys, slot.r, raw)
            slot.candidates = (slot.pos[:n], slot.keys[:n], slot.r[:n], raw[:n])
            slot.ties = np.empty(cuts.size, dtype=np.int64)
            kernels.count_ties(slot.candidates[1], cuts, slot.ties)
        return slot

    def write(piece: Piece, slot: _Slot, takes: np.ndarray) -> list[tuple[int, float]]:
        try:
            if slot.candidates:
                return _write_selected(piece, slot, selecting, cuts, takes)
            for v in variants:
                inside = slot.base is not None and in_layer_group(piece.name, v.group)
                v.writer.write_raw(piece.name, piece.start, slot.base if inside else slot.tuned)
            return []
        finally:
            free.put(slot)

    written: deque[tuple[Piece, Future]] = deque()
    with _Pool(workers, size) as pool, _bar(len(parts), "write", progress) as bar:
        for piece, slot in pool.ordered(prepare, parts, lambda p: (*pair.ranges(p), free.get())):
            takes = np.minimum(ties_left, slot.ties) if slot.candidates else ties_left * 0
            ties_left -= takes
            written.append((piece, pool.submit(write, piece, slot, takes)))
            while written and (written[0][1].done() or len(written) > 4 * pool.workers):
                _add_stats(*written.popleft(), selecting)
            bar.update(1)
        while written:
            _add_stats(*written.popleft(), selecting)
    if ties_left.any():
        raise AssertionError("the write pass met fewer ties at a cut than the counting pass")


def _add_stats(piece: Piece, future: Future, selecting: list[Variant]) -> None:
    """A written chunk's statistics, added in order (so they do not depend on the threads)."""
    for v, (restored, sum_r) in zip(selecting, future.result(), strict=False):
        if restored:
            v.stats.add(piece.name, restored, sum_r)


def _write_selected(piece: Piece, slot: _Slot, selecting: list[Variant], cuts: np.ndarray,
                    takes: np.ndarray) -> list[tuple[int, float]]:
    """The chunk patched and written for each k, smallest first: the selections are nested,
    so each k patches only what the previous one did not (``kernels.group_by_cut``)."""
    pos, keys, r, raw = slot.candidates
    order = np.empty(keys.size, dtype=np.int64)
    bounds = np.empty(len(selecting) + 2, dtype=np.int64)
    if kernels.group_by_cut(keys, cuts, takes, order, bounds):
        raise AssertionError(f"{piece.name}: the k's selections are not nested")
    results, restored, sum_r = [], 0, 0.0
    for g, v in enumerate(selecting):
        chosen = order[bounds[g]:bounds[g + 1]]
        sum_r += kernels.put_back(slot.tuned, pos, raw, r, chosen)
        restored += chosen.size
        v.writer.write_raw(piece.name, piece.start, slot.tuned)
        results.append((restored, sum_r))
    return results
