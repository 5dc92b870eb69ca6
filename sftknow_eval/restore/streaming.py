"""The two streaming passes of restore, run on worker threads: scan (pass 1) and write (pass 2).

Pass 1 reads every tensor once: NaN/Inf checks, per-tensor summed r, the key histogram and the
exact key counts of marked bins (:class:`selector.TieCounts`). Pass 2 reads them again and
writes every requested variant at once, deciding each element on the spot except the early
elements of each k's threshold bin, which are recorded and patched in place once the exact
threshold key is known (see ``selector``). Both passes visit tensors in natural name order (the
global element order).

Threads. The element-wise maths runs on ``workers`` Python threads, each running torch
single-threaded: torch and numpy release the GIL inside their kernels, so two cores work on two
chunks at once. (Not torch's own intra-op threads: on a busy machine the barriers of OpenMP made
two-thread ops 15x slower than one.) In pass 1 the workers take chunks in batches of
``workers`` and bins are marked between batches, so the split between the elements pass 2
records and the ones pass 1 counts falls on a point of global order whatever the number of
workers: the outputs do not depend on it (tested). In pass 2 the workers compute r, keys and
the candidates of the next chunks while the main thread makes the sequential decisions; the
chunks are then assembled and written by jobs on the same workers.

Memory: per worker one chunk of ``chunk_elements`` elements in work buffers and, in pass 1, a
table of the 64 MB histogram plus 2 KB per count slot (at most 47 MB for five k's, whatever
the model size: see ``TieCounts``), beside a shared 32 MB bin map; at most ``4 * workers`` output chunks in
flight; one open shard per model (two for a moment when a shard ends); per k the recorded
early elements of its threshold bin (13-14 bytes each).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.restore import kernels, selector
from sftknow_eval.restore.reader import Checkpoint
from sftknow_eval.restore.regions import in_layer_group
from sftknow_eval.restore.stats import VariantStats
from sftknow_eval.restore.writer import ShardedWriter, raw_view


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
        if floats_only and not info.dtype.is_floating_point:
            continue
        first = selection.starts.get(name) if name in selection.region else None
        for a in range(0, info.numel, size):
            out.append(Piece(name, a, min(info.numel, a + size),
                             None if first is None else first + a))
    return out


class _Buffers:
    """One worker's reusable buffers (fresh large allocations page-fault on every call)."""

    def __init__(self, size: int):
        self.base32 = np.empty(size, dtype=np.float32)  # fp16 / fp64 chunks cast to float32
        self.tuned32 = np.empty(size, dtype=np.float32)
        self.sample = np.empty(-(-size // selector.DETECT_STRIDE), dtype=np.int64)
        self.pos = np.empty(size, dtype=np.int64)
        self.keys = np.empty(size, dtype=np.int32)
        self.r = np.empty(size, dtype=np.float32)

    def inputs(self, bc: torch.Tensor, tc: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """A piece's base and tuned values as the kernels take them (see ``kernels``)."""
        bf16 = bc.dtype == torch.bfloat16
        return (kernels.as_kernel_input(raw_view(bc) if bf16 else bc.numpy(), bf16, self.base32),
                kernels.as_kernel_input(raw_view(tc) if bf16 else tc.numpy(), bf16, self.tuned32))


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
            torch.set_num_threads(1)  # per thread (OpenMP's setting is thread-local)
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
    """The main thread's door to both checkpoints: a piece's base and tuned slices.

    Only the main thread opens shards; workers get slices, which keep their shard's mapping
    alive for as long as they are referenced.
    """

    def __init__(self, base: Checkpoint, tuned: Checkpoint):
        self.base, self.tuned = base, tuned
        self._name: str | None = None
        self._flat: tuple[torch.Tensor, torch.Tensor] | None = None

    def whole(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name != self._name:
            self._flat = (self.base.tensor(name).reshape(-1), self.tuned.tensor(name).reshape(-1))
            self._name = name
        return self._flat  # type: ignore[return-value]

    def slices(self, piece: Piece) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = self.whole(piece.name)
        return b[piece.start:piece.stop], t[piece.start:piece.stop]


def _nonfinite_error(name: str, base: torch.Tensor, tuned: torch.Tensor) -> UserError:
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
    hist: torch.Tensor | None
    ties: selector.TieCounts | None


class _ScanState:
    def __init__(self, size: int, ties: selector.TieCounts | None):
        self.buffers = _Buffers(size)
        self.table = ties.new_table() if ties is not None else None
        self.table_np = self.table.numpy() if self.table is not None else None


def scan(tensors: CheckpointPair, parts: list[Piece], selection: Selection, targets: list[int],
         workers: int, size: int, heavy: int | None, progress: bool) -> ScanResult:
    """Pass 1 over ``parts`` (every floating-point tensor), in batches of ``workers`` pieces.

    ``targets``: how many elements each k selects (empty for layer groups only: then no
    histogram is kept).
    """
    ties = selector.TieCounts(selection.total, heavy, targets) if targets else None
    pool = _Workers(workers, lambda: _ScanState(size, ties))
    sum_r = {name: 0.0 for name in selection.region}
    changed_outside = False
    seen = 0  # region elements scanned
    checkpoints = [round(f * selection.total) for f in selector.CHECKPOINTS]
    bar = tqdm(total=len(parts), desc="restore pass 1/2", unit="chunk", disable=not progress)
    try:
        for i in range(0, len(parts), pool.workers):
            batch = parts[i:i + pool.workers]
            futures = [pool.submit(_scan_piece, pool, ties, p, *tensors.slices(p), selection)
                       for p in batch]
            samples = []
            for p, future in zip(batch, futures, strict=True):
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
            if ties is not None and samples:
                tables = [st.table for st in pool.states]
                ties.mark_heavy(tables, torch.cat(samples))
                if checkpoints and seen >= checkpoints[0]:
                    while checkpoints and seen >= checkpoints[0]:
                        checkpoints.pop(0)
                    ties.mark_near(tables, seen)
            bar.update(len(batch))
    finally:
        bar.close()
        pool.close()
    hist = ties.finish([st.table for st in pool.states]) if ties is not None else None
    return ScanResult(sum_r, changed_outside, hist, ties)


def _scan_piece(pool: _Workers, ties: selector.TieCounts | None, piece: Piece, bc: torch.Tensor,
                tc: torch.Tensor, selection: Selection) -> tuple[float, torch.Tensor | None]:
    """One piece of pass 1 on a worker: summed r, and (in the region) its counts."""
    st: _ScanState = pool.state()
    base, tuned = st.buffers.inputs(bc, tc)
    if piece.first is None or ties is None:
        return kernels.sum_relative_change(base, tuned), None
    sample = st.buffers.sample[:-(-base.size // selector.DETECT_STRIDE)]
    s = kernels.count_keys(base, tuned, kernels.STRATEGY_CODES[selection.strategy], piece.first,
                           selector.random_seed_term(selection.seed), ties.target_np,
                           st.table_np, sample)
    return s, torch.from_numpy(sample.copy())


# ------------------------------------------------------------------------------------- pass 2
@dataclass
class _Candidates:
    """The elements of one region chunk that any k may take or record, as numpy arrays.

    ``pos`` holds their positions in the chunk (ascending, i.e. global order), the others their
    keys, r and raw base bits. Every k's selection in this chunk is a subset of these, so each
    k's work is on this fraction of the chunk (at most the largest k plus its threshold bin),
    not on the whole chunk. They are found by one compiled sweep (``kernels.find_candidates``).
    """

    pos: np.ndarray
    keys: np.ndarray
    r: np.ndarray
    base_raw: np.ndarray


@dataclass
class _Prepared:
    """A region piece after a worker's part of pass 2."""

    sum_r: float  # for layer groups
    candidates: _Candidates | None  # for the k's


def _lowest_key(selecting: list[Variant]) -> int:
    """The smallest key any k may still take or record: its cut, or its threshold bin's floor.

    It only grows as cuts become known, so a value read for a chunk prepared ahead is never
    above the current one: the candidates are then a superset, which is safe.
    """
    return min(v.cut if v.cut is not None else v.threshold.bin << selector.BIN_SHIFT
               for v in selecting)


def _prepare_piece(pool: _Workers, piece: Piece, bc: torch.Tensor, tc: torch.Tensor,
                   selection: Selection, low: int | None) -> _Prepared:
    buf: _Buffers = pool.state()
    base, tuned = buf.inputs(bc, tc)
    if low is None:
        return _Prepared(kernels.sum_relative_change(base, tuned), None)
    count, total = kernels.find_candidates(
        base, tuned, kernels.STRATEGY_CODES[selection.strategy], piece.first,
        selector.random_seed_term(selection.seed), low, buf.pos, buf.keys, buf.r)
    pos = buf.pos[:count].copy()  # the buffers serve the next piece while these wait
    return _Prepared(total, _Candidates(pos, buf.keys[:count].copy(), buf.r[:count].copy(),
                                        raw_view(bc)[pos]))


class _WriteQueue:
    """Output writes as jobs on the workers, at most ``limit`` in flight.

    A job assembles one chunk of one variant and writes it; its statistics come back as the
    job's result and are added in submission order, so they do not depend on the threads.
    Output chunks are taken from a free list, so at most ``limit`` exist per element size.
    """

    def __init__(self, pool: _Workers, size: int, limit: int):
        self.pool, self.size, self.limit = pool, size, limit
        self.pending: deque[tuple[Future, Variant | None, str]] = deque()
        self._free: dict[np.dtype, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def submit(self, stats_of: Variant | None, name: str, fn: Callable, *args) -> None:
        while len(self.pending) >= self.limit:
            self._pop()
        self.pending.append((self.pool.submit(fn, self, *args), stats_of, name))

    def drain(self) -> None:
        while self.pending:
            self._pop()

    def _pop(self) -> None:
        future, variant, name = self.pending.popleft()
        result = future.result()
        if variant is not None and result[0]:
            variant.stats.add(name, *result)

    def take(self, dtype: np.dtype) -> np.ndarray:
        with self._lock:
            free = self._free.setdefault(dtype, [])
            return free.pop() if free else np.empty(self.size, dtype=dtype)

    def give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free[buffer.dtype].append(buffer)


def _write_job(queue: _WriteQueue, v: Variant, piece: Piece, raw: np.ndarray) -> None:
    v.writer.write_raw(piece.name, piece.start, raw)


def _restored_write_job(queue: _WriteQueue, v: Variant, piece: Piece, tuned_raw: np.ndarray,
                        cand: _Candidates, chosen: np.ndarray) -> tuple[int, float]:
    """The tuned chunk with the chosen candidates set back to their base values, written out."""
    buffer = queue.take(tuned_raw.dtype)
    try:
        out = buffer[:tuned_raw.size]
        np.copyto(out, tuned_raw)
        if chosen.size:
            out[cand.pos[chosen]] = cand.base_raw[chosen]
        v.writer.write_raw(piece.name, piece.start, out)
    finally:
        queue.give_back(buffer)
    if not chosen.size:
        return 0, 0.0
    return int(chosen.size), float(cand.r[chosen].sum(dtype=np.float64))


def write_variants(tensors: CheckpointPair, parts: list[Piece], selection: Selection,
                   variants: list[Variant], workers: int, size: int, progress: bool) -> None:
    """Pass 2 over ``parts`` (every tensor): each variant's weights, written as they are decided.

    Workers prepare up to ``2 * workers`` pieces ahead (r, keys, candidates); the main thread
    takes them in order and makes every sequential decision (threshold ties, recording,
    resolving); the chunks are then assembled and written by jobs on the same workers.
    """
    selecting = [v for v in variants if v.k is not None]
    groups = [v for v in variants if v.group is not None]
    pool = _Workers(workers, lambda: _Buffers(size))
    writes = _WriteQueue(pool, size, limit=4 * pool.workers)
    ahead: deque[tuple[Piece, torch.Tensor, torch.Tensor, Future | None]] = deque()

    def submit(piece: Piece) -> None:
        bc, tc = tensors.slices(piece)
        future = None
        if piece.first is not None:
            low = _lowest_key(selecting) if selecting else None
            future = pool.submit(_prepare_piece, pool, piece, bc, tc, selection, low)
        ahead.append((piece, bc, tc, future))

    bar = tqdm(total=len(parts), desc="restore pass 2/2", unit="chunk", disable=not progress)
    todo: Iterator[Piece] = iter(parts)
    try:
        for piece in todo:
            submit(piece)
            if len(ahead) >= 2 * pool.workers:
                break
        while ahead:
            piece, bc, tc, future = ahead.popleft()
            tuned_raw = raw_view(tc)
            if future is None:  # outside the region: the tuned values, in every variant
                for v in variants:
                    writes.submit(None, piece.name, _write_job, v, piece, tuned_raw)
            else:
                prepared: _Prepared = future.result()
                for v in groups:
                    if in_layer_group(piece.name, v.group):
                        writes.submit(None, piece.name, _write_job, v, piece, raw_view(bc))
                        v.stats.add(piece.name, piece.stop - piece.start, prepared.sum_r)
                    else:
                        writes.submit(None, piece.name, _write_job, v, piece, tuned_raw)
                if prepared.candidates is not None:
                    for v in selecting:
                        chosen = _select_chunk(v, piece, prepared.candidates,
                                               selection.strategy, writes)
                        writes.submit(v, piece.name, _restored_write_job, v, piece, tuned_raw,
                                      prepared.candidates, chosen)
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
                local = cand.pos[in_bin] + piece.start
                local = local.astype(np.int32) if local[-1] < 2**31 else local
                v.candidates.append((piece.name, local, keys[in_bin], cand.r[in_bin],
                                     cand.base_raw[in_bin]))
            return np.flatnonzero(keys >= th.lo_key_sure)
        writes.drain()
        _resolve(v, keys[in_bin[:v.early_left]], strategy)
    selected = keys > v.cut
    if v.ties_left:
        tied = np.flatnonzero(keys == v.cut)[:v.ties_left]
        selected[tied] = True
        v.ties_left -= tied.size
    return np.flatnonzero(selected)


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
    v.writer.drop_written()
