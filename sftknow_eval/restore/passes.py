"""The streaming passes of restore (the selection rule: ``weights.topk``): :func:`scan` (NaN/Inf
checks, summed r, key histogram), :func:`exact_cuts` (every k's exact cut), :func:`write_variants`.

Workers read chunks (:class:`Piece`) and run the compiled loops (``weights.kernels``, GIL
released); results are taken in order, so outputs and statistics do not depend on the workers
or their timing. Memory does not grow with the model: a fixed number of :class:`_Slot`.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.restore.stats import VariantStats
from sftknow_eval.weights import kernels, topk
from sftknow_eval.weights.checkpoint import UNSIGNED, Checkpoint, RawRange
from sftknow_eval.weights.regions import in_layer_group, natural_key
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


@dataclass(frozen=True)
class Piece:
    """A run of one tensor's flat elements: ``[start, stop)``; ``first`` is its global index."""

    name: str
    start: int
    stop: int
    first: int | None  # None outside the region


@dataclass
class Streams:
    """What every pass reads, and how: both checkpoints (only the main thread opens files), the
    region's global start per tensor, strategy and seed, worker threads and chunk size."""

    base: Checkpoint
    tuned: Checkpoint
    starts: dict[str, int]
    strategy: str
    seed: int
    workers: int
    size: int
    progress: bool

    @property
    def key_args(self) -> tuple[int, int]:
        """The kernels' strategy code and seed term."""
        return topk.STRATEGIES.index(self.strategy), topk.random_seed_term(self.seed)

    def pieces(self, floats_only: bool) -> list[Piece]:
        """Every tensor cut into runs of at most ``size`` elements. Natural name order in every
        pass: region tensors then come in global element order, which the tie-break needs."""
        out, size = [], self.size
        for name in sorted(self.tuned.tensors, key=natural_key):
            info, first = self.tuned.tensors[name], self.starts.get(name)
            if info.is_float or not floats_only:
                out += [Piece(name, a, min(info.numel, a + size), None if first is None else first + a)
                        for a in range(0, info.numel, size)]
        return out

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

    def pool(self) -> _Pool:
        return _Pool(self.workers, self.size, self.progress)


_FLOATS = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64}


class _Slot:
    """A chunk's reused buffers (fresh ones page-fault); in the read passes also a worker's table
    of counts, in the write pass the candidates (keys reaching the lowest cut) and their ties."""

    def __init__(self, size: int):
        self.base_bytes, self.tuned_bytes = np.empty(size * 8, np.uint8), np.empty(size * 8, np.uint8)
        self.base32, self.tuned32 = np.empty(size, np.float32), np.empty(size, np.float32)
        self.pos, self.keys = np.empty(size, np.int32), np.empty(size, np.int32)
        self.r, self.raw_bytes = np.empty(size, np.float32), np.empty(size * 8, np.uint8)
        self.dtype, self.tuned, self.base = "", np.empty(0), None
        self.table: np.ndarray | None = None
        self.candidates: tuple[np.ndarray, ...] = ()
        self.ties: np.ndarray | None = None

    def read(self, base: RawRange | None, tuned: RawRange) -> None:
        """The tuned chunk's raw bits, and the base chunk's unless ``base`` is None."""
        self.dtype = tuned.dtype  # the base's too (preflight)
        self.tuned = tuned.read(self.tuned_bytes).view(UNSIGNED[tuned.itemsize])
        self.base = None if base is None else base.read(self.base_bytes).view(self.tuned.dtype)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Both chunks read, as the kernels take them."""
        return (kernels.as_kernel_input(self.base.view(_FLOATS[self.dtype]), self.base32),
                kernels.as_kernel_input(self.tuned.view(_FLOATS[self.dtype]), self.tuned32))

    def zeroed(self, size: int) -> np.ndarray:
        if self.table is None:
            self.table = np.zeros(size, dtype=np.int64)
        return self.table


class _Pool(ThreadPoolExecutor):
    """Worker threads, each with its own :class:`_Slot` in the read passes."""

    def __init__(self, workers: int, size: int, progress: bool):
        super().__init__(workers, thread_name_prefix="restore")
        self.workers, self.size, self.progress, self.slots = workers, size, progress, []
        self._mine, self._lock = threading.local(), threading.Lock()

    def own(self) -> _Slot:
        if not hasattr(self._mine, "slot"):
            self._mine.slot = _Slot(self.size)
            with self._lock:
                self.slots.append(self._mine.slot)
        return self._mine.slot

    def ordered(self, fn: Callable, items: list, args: Callable, what: str) -> Iterator[tuple]:
        """``(item, fn(*args(item)))`` in order, ``2 * workers`` items ahead, with a progress
        bar; ``args`` runs on the calling thread (it opens files, or waits for a free slot)."""
        todo, pending = iter(items), deque()
        with tqdm(total=len(items), desc=f"restore: {what}", unit="chunk",
                  disable=not self.progress) as bar:
            for item in itertools.islice(todo, 2 * self.workers):
                pending.append((item, self.submit(fn, *args(item))))
            while pending:
                item, future = pending.popleft()
                for nxt in itertools.islice(todo, 1):
                    pending.append((nxt, self.submit(fn, *args(nxt))))
                yield item, future.result()
                bar.update(1)

    def summed_tables(self) -> np.ndarray:
        return np.sum([s.table for s in self.slots if s.table is not None], axis=0)

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True, cancel_futures=True)


def scan(streams: Streams, parts: list[Piece]) -> tuple[dict[str, float], np.ndarray]:
    """Pass 1 over ``parts`` (every floating-point tensor): each region tensor's summed r and
    the region's key histogram."""
    strategy, seed_term = streams.key_args
    sum_r = dict.fromkeys(streams.starts, 0.0)

    def work(piece: Piece, base: RawRange, tuned: RawRange) -> float:
        slot = pool.own()
        slot.read(base, tuned)
        if piece.first is None:
            return kernels.sum_relative_change(*slot.inputs())
        return kernels.histogram(*slot.inputs(), strategy, piece.first, seed_term,
                                 slot.zeroed(topk.NUM_BINS))

    with streams.pool() as pool:
        for piece, total in pool.ordered(work, parts, streams.ranges, "histogram"):
            if not np.isfinite(total):
                raise streams.nonfinite_error(piece.name)
            if piece.first is not None:
                sum_r[piece.name] += total  # in order: independent of the workers
        return sum_r, pool.summed_tables()


def exact_cuts(streams: Streams, parts: list[Piece], thresholds: list[topk.Threshold]
               ) -> list[topk.Cut]:
    """The read-only pass: each threshold's exact cut, from per-key counts of its bin."""
    strategy, seed_term = streams.key_args
    slots, bins = topk.slot_map(thresholds)
    region = [p for p in parts if p.first is not None]

    def work(piece: Piece, base: RawRange, tuned: RawRange) -> None:
        slot = pool.own()
        slot.read(base, tuned)
        kernels.count_in_bins(*slot.inputs(), strategy, piece.first, seed_term, slots,
                              slot.zeroed(len(bins) * topk.FINE))

    with streams.pool() as pool:
        for _ in pool.ordered(work, region, streams.ranges, "exact counts"):
            pass
        fine = pool.summed_tables().reshape(len(bins), topk.FINE)
    return topk.exact_cuts(thresholds, fine, slots)


def write_variants(streams: Streams, parts: list[Piece], variants: list[Variant]) -> None:
    """The write pass over ``parts`` (every tensor). Workers prepare chunks ahead; the main
    thread decides, in order, how many of each cut's ties a chunk takes (the one sequential
    step); then one job per chunk patches it and writes it to every variant."""
    selecting = sorted((v for v in variants if v.cut is not None), key=lambda v: v.cut.n)
    groups = [v.group for v in variants if v.group is not None]
    cuts = np.array([v.cut.key for v in selecting], dtype=np.int64)
    ties_left = np.array([v.cut.ties for v in selecting], dtype=np.int64)
    strategy, seed_term = streams.key_args
    free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(3 * streams.workers + 1):  # more than ``ordered`` holds ahead
        free.put(_Slot(streams.size))

    def prepare(piece: Piece, base: RawRange, tuned: RawRange, slot: _Slot) -> _Slot:
        inside = piece.first is not None and bool(
            selecting or any(in_layer_group(piece.name, g) for g in groups))
        slot.read(base if inside else None, tuned)
        slot.candidates = ()
        if inside and selecting:
            raw = slot.raw_bytes.view(slot.base.dtype)
            n = kernels.find_candidates(*slot.inputs(), slot.base, strategy, piece.first, seed_term,
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
    with streams.pool() as pool:
        for piece, slot in pool.ordered(prepare, parts, lambda p: (*streams.ranges(p), free.get()),
                                        "write"):
            takes = np.minimum(ties_left, slot.ties) if slot.candidates else ties_left * 0
            ties_left -= takes
            written.append((piece, pool.submit(write, piece, slot, takes)))
            while written and (written[0][1].done() or len(written) > 4 * pool.workers):
                _add_stats(*written.popleft(), selecting)
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
