"""The two streaming passes of restore, run on worker threads: scan (pass 1) and write (pass 2).

Pass 1 reads every tensor once: NaN/Inf checks, per-tensor summed r, the key histogram and the
exact key counts of marked bins (:class:`selector.TieCounts`). Pass 2 reads them again and
writes every requested variant at once, deciding each element on the spot except the early
elements of each k's threshold bin, which are recorded and patched in place once the exact
threshold key is known (see ``selector``). Both passes visit tensors in natural name order (the
global element order).

Threads. The element loops are compiled (``kernels``) and release the GIL, so ``workers``
Python threads run them on as many cores; each worker reads its chunk itself with positional
reads (``reader.RawRange``). In pass 1 the chunks go in rounds of ROUND_PIECES, two rounds in
flight, and bins are marked between rounds; the split between the elements pass 2 records and
the ones pass 1 counts exactly falls on a round edge, so it is a point of global order
whatever the number of workers or their timing: the outputs do not depend on either (tested).
In pass 2 the workers read and prepare the next chunks (r, keys, candidates) while the main
thread makes the sequential decisions; each chunk is then patched and written to every
variant by one job on the same workers.

Memory, whatever the model size: per worker the work buffers of one chunk of
``chunk_elements`` elements (up to 8 bytes each, times two inputs, plus candidates) and, in
pass 1, a table of the 64 MB histogram plus 2 KB per count slot (at most 47 MB for five k's,
see ``TieCounts``), beside two shared 32 MB bin maps; in pass 2 at most ``6 * workers``
chunks read ahead or waiting to be written, each with its candidates (20 bytes per candidate,
in buffers reused from a pool); per k the recorded early elements of its threshold bin (13-14
bytes each). Nothing is memory-mapped, so no shard's pages count.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.restore import kernels, selector
from sftknow_eval.restore.reader import Checkpoint, RawRange
from sftknow_eval.restore.regions import in_layer_group
from sftknow_eval.restore.stats import VariantStats
from sftknow_eval.restore.writer import ShardedWriter

if TYPE_CHECKING:
    import torch


@dataclass
class Variant:
    """One output model (a k of a strategy, or a whole layer group) and its pass-2 state."""

    name: str
    k: float | None = None
    group: tuple[int, int] | None = None
    threshold: selector.Threshold | None = None
    stats: VariantStats = field(default_factory=VariantStats)
    folder: Path | None = None
    writer: ShardedWriter | None = None
    candidates: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = (
        field(default_factory=list))
    early_left: int = 0  # threshold-bin elements still to record before the cut is known
    late_counts: np.ndarray | None = None  # exact-key counts of the bin's later elements
    bin_total: int = 0
    cut: int | None = None  # the exact threshold key, once known
    ties_left: int = 0  # elements with key == cut still to take (first ones in global order)
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


def pieces(checkpoint: Checkpoint, order: list[str], selection: Selection, size: int,
           floats_only: bool) -> list[Piece]:
    """Every tensor of ``order`` cut into runs of at most ``size`` elements, in order."""
    out = []
    for name in order:
        info = checkpoint.tensors[name]
        if floats_only and not info.is_float:
            continue
        first = selection.starts.get(name) if name in selection.region else None
        for a in range(0, info.numel, size):
            out.append(Piece(name, a, min(info.numel, a + size),
                             None if first is None else first + a))
    return out


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_FLOATS = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def raw_values(data: np.ndarray, source: RawRange) -> np.ndarray:
    """Bytes read from ``source`` as unsigned ints of its itemsize (the writer's raw form)."""
    return data.view(_UNSIGNED[source.itemsize])


class _Buffers:
    """One worker's reusable buffers (fresh large allocations page-fault on every call)."""

    def __init__(self, size: int):
        self.base_bytes = np.empty(size * 8, dtype=np.uint8)  # room for float64 chunks
        self.tuned_bytes = np.empty(size * 8, dtype=np.uint8)
        self.base32 = np.empty(size, dtype=np.float32)  # fp16 / fp64 chunks cast to float32
        self.tuned32 = np.empty(size, dtype=np.float32)
        self.sample = np.empty(-(-size // selector.DETECT_STRIDE), dtype=np.int64)

    def values(self, data: np.ndarray, source: RawRange, scratch: np.ndarray) -> np.ndarray:
        """Read bytes as the kernels take them (see ``kernels``)."""
        bf16 = source.dtype == "BF16"
        typed = data.view(np.uint16 if bf16 else _FLOATS[source.dtype])
        return kernels.as_kernel_input(typed, bf16, scratch)


class _Workers:
    """A pool of threads, each with its own lazily made state; ``workers == 1`` runs inline."""

    def __init__(self, workers: int, make_state: Callable[[], object]):
        self.workers = max(1, workers)
        self._make_state = make_state
        self._local = threading.local()
        self._lock = threading.Lock()
        self.states: list[object] = []
        self._pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="restore")
                      if self.workers > 1 else None)

    def state(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = self._make_state()
            with self._lock:
                self.states.append(state)
        return state

    def submit(self, fn: Callable, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # same behaviour as a pool: raised on .result()
            future.set_exception(error)
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class CheckpointPair:
    """The main thread's door to both checkpoints: a piece's base and tuned byte ranges.

    Only the main thread opens files; workers read the ranges (positional reads, see
    ``reader.RawRange``) into buffers they own.
    """

    def __init__(self, base: Checkpoint, tuned: Checkpoint):
        self.base, self.tuned = base, tuned

    def whole(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Both whole tensors, memory-mapped (for error messages)."""
        return self.base.tensor(name).reshape(-1), self.tuned.tensor(name).reshape(-1)

    def ranges(self, piece: Piece) -> tuple[RawRange, RawRange]:
        return (self.base.raw_range(piece.name, piece.start, piece.stop),
                self.tuned.raw_range(piece.name, piece.start, piece.stop))


def _nonfinite_error(name: str, base: torch.Tensor, tuned: torch.Tensor) -> UserError:
    import torch  # the error path only

    which = [label for label, t in (("base", base), ("fine-tuned", tuned))
             if not bool(torch.isfinite(t.float()).all())]
    where = " and ".join(which) if which else "neither (the difference overflows float32)"
    return UserError(f"tensor {name}: NaN or Inf values in the {where} model")


# ------------------------------------------------------------------------------------- pass 1
@dataclass
class ScanResult:
    """Pass 1's findings: per-tensor summed r, and whether anything outside the region changed.

    ``hist`` and ``ties`` are None when no k is requested (layer groups only).
    """

    sum_r: dict[str, float]
    changed_outside: bool
    hist: np.ndarray | None
    ties: selector.TieCounts | None


class _ScanState:
    def __init__(self, size: int, ties: selector.TieCounts | None):
        self.buffers = _Buffers(size)
        self.table = ties.new_table() if ties is not None else None


ROUND_PIECES = 4  # pieces per round of pass 1 (marks are decided between rounds)


def scan(tensors: CheckpointPair, parts: list[Piece], selection: Selection, targets: list[int],
         workers: int, size: int, heavy: int | None, progress: bool) -> ScanResult:
    """Pass 1 over ``parts`` (every floating-point tensor), in rounds of ROUND_PIECES pieces.

    Two rounds are in flight: while the workers count round r + 1, the main thread takes
    round r's results, marks heavy bins for round r + 2 (see ``selector.TieCounts``) and
    submits it. At a checkpoint it lets round r + 1 finish too, so that the bins near the
    expected thresholds are chosen from an exact histogram (at a round edge: the same marks
    however the rounds were timed); the workers wait only at those six points.
    ``targets``: how many elements each k selects (empty for layer groups only: then no
    histogram is kept).
    """
    ties = selector.TieCounts(selection.total, heavy, targets) if targets else None
    pool = _Workers(workers, lambda: _ScanState(size, ties))
    sum_r = {name: 0.0 for name in selection.region}
    changed_outside = False
    seen = 0  # region elements scanned
    checkpoints = [round(f * selection.total) for f in selector.CHECKPOINTS]
    rounds = [parts[i:i + ROUND_PIECES] for i in range(0, len(parts), ROUND_PIECES)]
    in_flight: deque[list[tuple[Piece, Future]]] = deque()
    bar = tqdm(total=len(parts), desc="restore pass 1/2", unit="chunk", disable=not progress)

    def submit(index: int) -> None:
        target = ties.target_for(index) if ties is not None else None
        in_flight.append([(p, pool.submit(_scan_piece, pool, ties, target, p,
                                          *tensors.ranges(p), selection))
                          for p in rounds[index]])

    def take() -> None:
        """The next round's results; heavy bins among its samples are marked."""
        nonlocal changed_outside, seen
        samples = []
        for p, future in in_flight.popleft():
            s, sample = future.result()
            if not np.isfinite(s):
                raise _nonfinite_error(p.name, *tensors.whole(p.name))
            if p.first is None:
                changed_outside = changed_outside or s > 0
            else:
                sum_r[p.name] += s  # pieces in order: sums do not depend on the workers
                seen += p.stop - p.start
            if sample is not None:
                samples.append(sample)
            bar.update(1)
        if ties is not None and samples:
            ties.mark_heavy([st.table for st in list(pool.states)], np.concatenate(samples))

    try:
        submitted = 0
        index = 0
        while index < len(rounds):
            while submitted < min(index + 2, len(rounds)):
                submit(submitted)
                submitted += 1
            take()
            if ties is not None:
                if checkpoints and seen >= checkpoints[0]:
                    if in_flight:  # let the next round finish: an exact histogram, no race
                        ties.apply(index)
                        index += 1
                        take()
                    while checkpoints and seen >= checkpoints[0]:
                        checkpoints.pop(0)
                    ties.mark_near([st.table for st in pool.states], seen)
                    ties.apply(index + 1)  # nothing in flight: both maps
                ties.apply(index)  # round index is done; index + 2 counts with this map
            index += 1
    finally:
        bar.close()
        pool.close()
    hist = ties.finish([st.table for st in pool.states]) if ties is not None else None
    return ScanResult(sum_r, changed_outside, hist, ties)


def _scan_piece(pool: _Workers, ties: selector.TieCounts | None, target: np.ndarray | None,
                piece: Piece, base: RawRange, tuned: RawRange,
                selection: Selection) -> tuple[float, np.ndarray | None]:
    """One piece of pass 1 on a worker: summed r, and (in the region) its counts."""
    st: _ScanState = pool.state()
    buf = st.buffers
    b = buf.values(base.read(buf.base_bytes), base, buf.base32)
    t = buf.values(tuned.read(buf.tuned_bytes), tuned, buf.tuned32)
    if piece.first is None or ties is None:
        return kernels.sum_relative_change(b, t), None
    sample = buf.sample[:-(-b.size // selector.DETECT_STRIDE)]
    s = kernels.count_keys(b, t, kernels.STRATEGY_CODES[selection.strategy], piece.first,
                           selector.random_seed_term(selection.seed), target, st.table,
                           sample)
    return s, sample.copy()


# ------------------------------------------------------------------------------------- pass 2
@dataclass
class _Candidates:
    """The elements of one region chunk that any k may take or record, as numpy arrays.

    ``pos`` holds their positions in the chunk (ascending, i.e. global order), the others their
    keys, r and raw base bits. Every k's selection in this chunk is a subset of these, so each
    k's work is on this fraction of the chunk (at most the largest k plus its threshold bin),
    not on the whole chunk. They are found by one compiled sweep (``kernels.find_candidates``),
    straight into a buffer of the pool (:class:`_Spares`) that goes back once the chunk is
    written: whatever outlives the write job is copied out (``_select_chunk``'s records).
    """

    pos: np.ndarray
    keys: np.ndarray
    r: np.ndarray
    base_raw: np.ndarray


@dataclass
class _Prepared:
    """A piece after a worker's part of pass 2: the tuned chunk's raw values (in a buffer of
    its own, which the write job patches in place) and, in the region, what the variants
    need. ``buffers`` go back to the spares once the piece is written."""

    tuned_raw: np.ndarray
    buffers: list[np.ndarray]
    sum_r: float = 0.0  # for layer groups
    candidates: _Candidates | None = None  # for the k's
    ties: np.ndarray | None = None  # per k, candidates equal to its cut (every cut known)
    base_raw: np.ndarray | None = None  # for layer groups: the whole base chunk


class _Spares:
    """Byte buffers handed from read to write and back, so pass 2 reads and finds candidates
    into memory already mapped (fresh buffers cost page faults and zeroing on every chunk).

    Two kinds, kept apart so that each buffer's touched pages stay few: chunks (room for one
    chunk of any dtype) and candidate buffers (:func:`_candidate_views`).
    """

    def __init__(self, size: int):
        self.chunk_bytes = size * 8  # float64
        self.candidate_bytes = 3 * _field_bytes(size) + size * 8  # see _candidate_views
        self._free: dict[int, list[np.ndarray]] = {self.chunk_bytes: [],
                                                   self.candidate_bytes: []}
        self._lock = threading.Lock()

    def chunk(self) -> np.ndarray:
        return self._take(self.chunk_bytes)

    def candidates(self) -> np.ndarray:
        return self._take(self.candidate_bytes)

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            if self._free[nbytes]:
                return self._free[nbytes].pop()
        return np.empty(nbytes, dtype=np.uint8)

    def give_back(self, buffers: list[np.ndarray]) -> None:
        with self._lock:
            for buffer in buffers:
                self._free[buffer.size].append(buffer)


def _field_bytes(size: int) -> int:
    """Bytes of one 4-byte field of ``size`` candidates, rounded up to 8 (alignment)."""
    return -(-size * 4 // 8) * 8


def _candidate_views(buffer: np.ndarray, size: int, raw_dtype: np.dtype
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Room for up to ``size`` candidates in one candidate buffer (20 bytes each, padded):
    positions and keys (int32), r (float32), raw base values (each field 8-byte aligned)."""
    step = _field_bytes(size)
    return (buffer[:size * 4].view(np.int32), buffer[step:step + size * 4].view(np.int32),
            buffer[2 * step:2 * step + size * 4].view(np.float32),
            buffer[3 * step:3 * step + size * raw_dtype.itemsize].view(raw_dtype))


def _lowest_key(selecting: list[Variant]) -> int:
    """The smallest key any k may still take or record: its cut, or its threshold bin's floor.

    It only grows as cuts become known, so a value read for a chunk prepared ahead is never
    above the current one: the candidates are then a superset, which is safe.
    """
    return min(v.cut if v.cut is not None else v.threshold.bin << selector.BIN_SHIFT
               for v in selecting)


def _known_cuts(selecting: list[Variant]) -> np.ndarray | None:
    """Every k's exact threshold key (smallest k first), or None while one is not known."""
    if not selecting or any(v.cut is None for v in selecting):
        return None
    return np.array([v.cut for v in selecting], dtype=np.int64)


def _prepare_piece(pool: _Workers, spares: _Spares, piece: Piece, base: RawRange,
                   tuned: RawRange, selection: Selection, low: int | None,
                   cuts: np.ndarray | None, groups: bool) -> _Prepared:
    buf: _Buffers = pool.state()
    own = [spares.chunk()]
    tuned_bytes = tuned.read(own[0])
    prepared = _Prepared(raw_values(tuned_bytes, tuned), own)
    if piece.first is None:
        return prepared
    if groups:
        own.append(spares.chunk())
    base_bytes = base.read(own[1] if groups else buf.base_bytes)
    b = buf.values(base_bytes, base, buf.base32)
    t = buf.values(tuned_bytes, tuned, buf.tuned32)
    if groups:
        prepared.base_raw = raw_values(base_bytes, base)
    if low is None:
        prepared.sum_r = kernels.sum_relative_change(b, t)
        return prepared
    base_raw = raw_values(base_bytes, base)
    own.append(spares.candidates())  # the candidates wait with the piece, in a spare of their own
    views = _candidate_views(own[-1], b.size, base_raw.dtype)
    count = kernels.find_candidates(
        b, t, base_raw, kernels.STRATEGY_CODES[selection.strategy], piece.first,
        selector.random_seed_term(selection.seed), low, *views)
    prepared.candidates = _Candidates(*(view[:count] for view in views))
    if cuts is not None:  # cuts never change once known: count the ties they meet here
        prepared.ties = np.empty(cuts.size, dtype=np.int64)
        kernels.count_ties(prepared.candidates.keys, cuts, prepared.ties)
    return prepared


class _WriteQueue:
    """Output writes as jobs on the workers, at most ``limit`` in flight.

    A job writes one chunk to one or more variants; the statistics of restored chunks come
    back as the job's result and are added in submission order, so they do not depend on the
    threads.
    """

    def __init__(self, pool: _Workers, limit: int, spares: _Spares):
        self.pool, self.limit, self.spares = pool, limit, spares
        self.pending: deque[tuple[Future, list[Variant], str]] = deque()

    def submit(self, stats_of: list[Variant], name: str, release: list[np.ndarray],
               fn: Callable, *args) -> None:
        """Queue ``fn(*args)``; ``release`` goes back to the spares once it has run (the last
        job to use those buffers)."""
        while len(self.pending) >= self.limit:
            self._pop()
        self.pending.append((self.pool.submit(self._run, release, fn, *args), stats_of, name))

    def _run(self, release: list[np.ndarray], fn: Callable, *args):
        try:
            return fn(*args)
        finally:
            self.spares.give_back(release)

    def drain(self) -> None:
        while self.pending:
            self._pop()

    def _pop(self) -> None:
        future, variants, name = self.pending.popleft()
        result = future.result()
        for v, (restored, sum_r) in zip(variants, result or (), strict=False):
            if restored:
                v.stats.add(name, restored, sum_r)


def _write_job(piece: Piece, writes: list[tuple[Variant, np.ndarray]]) -> None:
    for v, raw in writes:
        v.writer.write_raw(piece.name, piece.start, raw)


def _restored_write_job(piece: Piece, tuned_raw: np.ndarray, cand: _Candidates,
                        picks: list[tuple[Variant, np.ndarray]]) -> list[tuple[int, float]]:
    """The tuned chunk with each k's chosen candidates set back to base values, written out.

    ``picks`` come in ascending order of selected count, and the selections are nested (each
    k's selected elements are the first n of one fixed order), so the chunk is patched in
    place, cumulatively, and written after each k's patches: no copy per k. Elements a k
    defers (its threshold bin, before the cut is known) are never chosen by a smaller k unless
    the larger one selects them too, and the later patch writes the same base value.
    """
    results = []
    for v, chosen in picks:
        sum_r = kernels.put_back(tuned_raw, cand.pos, cand.base_raw, cand.r, chosen)
        v.writer.write_raw(piece.name, piece.start, tuned_raw)
        results.append((int(chosen.size), float(sum_r)))
    return results


def _settled_write_job(piece: Piece, tuned_raw: np.ndarray, cand: _Candidates,
                       variants: list[Variant], cuts: np.ndarray,
                       takes: np.ndarray) -> list[tuple[int, float]]:
    """:func:`_restored_write_job` once every k's cut is known: the selections are then "key
    above the cut, and the first ``takes`` keys equal to it" (the main thread has counted the
    ties each k takes here), decided on a worker in one sweep (``kernels.group_by_cut``);
    each k patches only the elements the previous one did not.
    """
    if len(variants) >= 65535:  # the kernel numbers groups in 16 bits
        raise AssertionError("more k's in one run than restore can group")
    order = np.empty(cand.keys.size, dtype=np.int64)
    bounds = np.empty(len(variants) + 2, dtype=np.int64)
    if kernels.group_by_cut(cand.keys, cuts, takes, order, bounds):
        raise AssertionError(f"{piece.name}: the k's selections are not nested")
    results = []
    restored, sum_r = 0, 0.0
    for g, v in enumerate(variants):
        chosen = order[bounds[g]:bounds[g + 1]]
        sum_r += kernels.put_back(tuned_raw, cand.pos, cand.base_raw, cand.r, chosen)
        restored += chosen.size
        v.writer.write_raw(piece.name, piece.start, tuned_raw)
        results.append((restored, sum_r))
    return results


def write_variants(tensors: CheckpointPair, parts: list[Piece], selection: Selection,
                   variants: list[Variant], workers: int, size: int, progress: bool) -> None:
    """Pass 2 over ``parts`` (every tensor): each variant's weights, written as they are decided.

    Workers read and prepare up to ``2 * workers`` pieces ahead (raw chunks; in the region r,
    keys and candidates); the main thread takes them in order and makes every sequential
    decision (threshold ties, recording, resolving); each chunk is then patched and written
    to every variant by one job on the same workers.
    """
    selecting = sorted((v for v in variants if v.k is not None), key=lambda v: v.threshold.n)
    groups = [v for v in variants if v.group is not None]
    if selecting and groups:  # one write job per piece: it alone gives the buffers back
        raise AssertionError("k's and layer groups are never restored in one run")
    pool = _Workers(workers, lambda: _Buffers(size))
    spares = _Spares(size)
    writes = _WriteQueue(pool, 4 * pool.workers, spares)
    ahead: deque[tuple[Piece, Future]] = deque()

    def submit(piece: Piece) -> None:
        low = _lowest_key(selecting) if selecting and piece.first is not None else None
        cuts = _known_cuts(selecting) if low is not None else None
        ahead.append((piece, pool.submit(_prepare_piece, pool, spares, piece,
                                         *tensors.ranges(piece), selection, low, cuts,
                                         bool(groups))))

    bar = tqdm(total=len(parts), desc="restore pass 2/2", unit="chunk", disable=not progress)
    todo: Iterator[Piece] = iter(parts)
    try:
        for piece in todo:
            submit(piece)
            if len(ahead) >= 2 * pool.workers:
                break
        while ahead:
            piece, future = ahead.popleft()
            prepared: _Prepared = future.result()
            if piece.first is None:  # outside the region: the tuned values, in every variant
                writes.submit([], piece.name, prepared.buffers, _write_job, piece,
                              [(v, prepared.tuned_raw) for v in variants])
            else:
                if groups:
                    plan = []
                    for v in groups:
                        inside = in_layer_group(piece.name, v.group)
                        plan.append((v, prepared.base_raw if inside else prepared.tuned_raw))
                        if inside:
                            v.stats.add(piece.name, piece.stop - piece.start, prepared.sum_r)
                    writes.submit([], piece.name, prepared.buffers, _write_job, piece, plan)
                if selecting and prepared.ties is not None:  # every cut known: count ties only
                    takes = np.empty(len(selecting), dtype=np.int64)
                    for j, v in enumerate(selecting):
                        takes[j] = min(v.ties_left, int(prepared.ties[j]))
                        v.ties_left -= int(takes[j])
                    writes.submit(selecting, piece.name, prepared.buffers, _settled_write_job,
                                  piece, prepared.tuned_raw, prepared.candidates, selecting,
                                  _known_cuts(selecting), takes)
                elif selecting:
                    picks = [(v, _select_chunk(v, piece, prepared.candidates,
                                               selection.strategy, writes)) for v in selecting]
                    writes.submit(selecting, piece.name, prepared.buffers, _restored_write_job,
                                  piece, prepared.tuned_raw, prepared.candidates, picks)
            bar.update(1)
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
        writes.drain()
    finally:
        bar.close()
        pool.close()
    for v in selecting:
        if v.cut is None or v.ties_left:
            raise AssertionError(f"{v.name}: pass 2 did not meet the elements pass 1 counted")


def _select_chunk(v: Variant, piece: Piece, cand: _Candidates, strategy: str,
                  writes: _WriteQueue) -> np.ndarray:
    """One k's chosen candidates in this chunk (indices into ``cand``), in global order.

    Until the cut is known, the threshold bin's elements are recorded instead; the chunk where
    the last early one passes fixes the cut and patches the recorded ones (after every write
    queued so far has landed, so no later write of an old chunk undoes a patch).
    """
    th = v.threshold
    keys = cand.keys
    if v.cut is None:
        in_bin = np.flatnonzero((keys >> selector.BIN_SHIFT) == th.bin)
        if in_bin.size < v.early_left:  # every threshold-bin element here is an early one
            v.early_left -= in_bin.size
            if in_bin.size:
                # compact records: position in the tensor, int32 key, float32 r, raw base value
                local = cand.pos[in_bin].astype(np.int64) + piece.start
                local = local.astype(np.int32) if local[-1] < 2**31 else local
                v.candidates.append((piece.name, local, keys[in_bin], cand.r[in_bin],
                                     cand.base_raw[in_bin]))
            return _choose(keys, th.lo_key_sure - 1, 0)[0]
        writes.drain()
        _resolve(v, keys[in_bin[:v.early_left]], strategy)
    chosen, taken = _choose(keys, v.cut, v.ties_left)
    v.ties_left -= taken
    return chosen


def _choose(keys: np.ndarray, cut: int, ties: int) -> tuple[np.ndarray, int]:
    """Indices of keys above ``cut`` plus the first ``ties`` equal to it; ties taken."""
    out = np.empty(keys.size, dtype=np.int64)
    count, taken = kernels.choose(keys, cut, ties, out)
    return out[:count], int(taken)


def _resolve(v: Variant, early_here: np.ndarray, strategy: str) -> None:
    """All early elements seen: fix the exact threshold key, patch the recorded candidates."""
    th = v.threshold
    stored = (np.concatenate([c[2] for c in v.candidates]) if v.candidates
              else np.zeros(0, dtype=np.int32))
    counts = v.late_counts.copy()
    counts += np.bincount(stored & (selector.FINE - 1), minlength=selector.FINE)
    counts += np.bincount(early_here & (selector.FINE - 1), minlength=selector.FINE)
    if int(counts.sum()) != v.bin_total:
        raise AssertionError(f"{v.name}: threshold bin holds {counts.sum():.0f} elements in pass "
                             f"2 but {v.bin_total} in pass 1")
    low, above_in_bin = selector.fine_cut(counts, th.take)
    v.cut = (th.bin << selector.BIN_SHIFT) | low
    v.threshold_r = selector.key_to_r(v.cut, strategy)
    m = th.take - above_in_bin
    tied = stored == v.cut
    chosen = (stored > v.cut) | (tied & (np.cumsum(tied) <= m))  # stored in global order
    v.ties_left = m - min(m, int(tied.sum()))
    offset = 0
    for name, local, _, r, raw in v.candidates:
        picks = np.flatnonzero(chosen[offset:offset + len(local)])
        offset += len(local)
        if len(picks):
            v.writer.patch(name, local[picks], raw[picks])
            v.stats.add(name, len(picks), float(r[picks].astype(np.float64).sum()))
    v.candidates.clear()
    v.late_counts = None
