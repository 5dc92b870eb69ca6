"""Fused element loops of the streaming top-k passes, compiled with numba.

With torch or numpy every step (cast, subtract, abs, divide, key, bin, count, compare) is a
sweep of its own, about a dozen per element: two thirds of restore's time (benchmarks/restore,
runs 5-6). These loops do it in one sweep, GIL released so that worker threads run side by side.
They reproduce ``topk`` bit for bit (no fast-math; ``tests/test_restore_kernels.py``). Inputs
are flat arrays of stored bits: ``uint16`` bfloat16, ``uint32`` float32; other floats are cast
first (:func:`as_kernel_input`). Compiled code is cached beside this file.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from sftknow_eval.weights.topk import BIN_SHIFT, EPS, FINE, INF_BITS, MASK32, MIX

_EPS32 = np.float32(EPS)
_KEY_LIMIT = 1 << 31
BLOCK = 1024  # elements per vectorised step
LANES = 8  # partial sums of r


@intrinsic
def _float_of_bits(typingctx, bits):
    """Reinterpret uint32 bits as a float32 (numba has no scalar view)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_of_float(typingctx, value):
    """Reinterpret a float32 as its int32 bit pattern."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@njit(inline="always")
def _load(values, i):
    """Element i as float32 from its stored bits: uint16 holds a bfloat16 (the high half of a
    float32, so widening is a shift, as torch's cast does), uint32 a float32."""
    return _float_of_bits(np.uint32(values[i]) << np.uint32(32 - 8 * values.itemsize))


@njit(inline="always")
def _relative_change(base, tuned, i):
    b = _load(base, i)
    t = _load(tuned, i)
    return abs(t - b) / (abs(b) + _EPS32)


@njit(inline="always")
def _random_key(index, seed_term):
    """The random strategy's key of one global index: a seeded counter-based 31-bit hash."""
    x = index & MASK32
    x ^= ((index >> 32) * MIX) & MASK32
    x ^= seed_term
    for _ in range(3):
        x ^= x >> 16
        x = (x * MIX) & MASK32
    x ^= x >> 16
    return x >> 1


@njit(inline="always")
def _r_and_keys(base, tuned, start, size, strategy, first, seed_term, r, keys):
    """r and keys (see ``topk``) of elements ``start .. start + size - 1``. The block is sliced
    first (indexed as ``base[start + j]`` LLVM left the loop scalar, ten times slower) and each
    strategy has a loop of its own, so that each vectorises."""
    b = base[start:start + size]
    t = tuned[start:start + size]
    if strategy == 0:
        for j in range(size):
            v = _relative_change(b, t, j)
            r[j] = v
            keys[j] = _bits_of_float(v)
    elif strategy == 1:
        for j in range(size):
            v = _relative_change(b, t, j)
            r[j] = v
            keys[j] = INF_BITS - np.int64(_bits_of_float(v))
    else:
        for j in range(size):
            v = _relative_change(b, t, j)
            r[j] = v
            keys[j] = _random_key(first + start + j, seed_term)


@njit(inline="always")
def _block(base, tuned, start, size, strategy, first, seed_term, r, keys, lanes):
    """:func:`_r_and_keys`, and the block's r added to ``lanes`` (element j into lane j % LANES:
    partial sums break the chain of additions; their order depends on the chunk alone)."""
    _r_and_keys(base, tuned, start, size, strategy, first, seed_term, r, keys)
    full = size - size % LANES
    for j in range(0, full, LANES):
        for lane in range(LANES):
            lanes[lane] += r[j + lane]
    for j in range(full, size):
        lanes[j - full] += r[j]


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def sum_relative_change(base, tuned):
    """The summed r of a chunk (float64 partial sums); NaN or Inf when an input is."""
    r = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.int64)
    lanes = np.zeros(LANES, np.float64)
    for start in range(0, base.size, BLOCK):
        _block(base, tuned, start, min(BLOCK, base.size - start), 0, 0, 0, r, keys, lanes)
    return lanes.sum()


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def histogram(base, tuned, strategy, first, seed_term, hist):
    """Pass 1 on one region chunk: counts each key's bin in ``hist``; returns the summed r. Keys
    out of range (only a NaN r) are not counted; their NaN sum makes the caller raise."""
    r = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.int64)
    lanes = np.zeros(LANES, np.float64)
    for start in range(0, base.size, BLOCK):
        size = min(BLOCK, base.size - start)
        _block(base, tuned, start, size, strategy, first, seed_term, r, keys, lanes)
        for j in range(size):
            key = keys[j]
            if key >= 0 and key < _KEY_LIMIT:
                hist[key >> BIN_SHIFT] += 1
    return lanes.sum()


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def count_in_bins(base, tuned, strategy, first, seed_term, slots, fine):
    """The read-only pass on one region chunk: counts each key whose bin has a slot in ``fine``
    (``topk.slot_map``), finding them branch-free as :func:`find_candidates` does."""
    r = np.empty(BLOCK, np.float32)
    keys = np.empty(BLOCK, np.int64)
    found = np.empty(BLOCK, np.int32)
    for start in range(0, base.size, BLOCK):
        size = min(BLOCK, base.size - start)
        _r_and_keys(base, tuned, start, size, strategy, first, seed_term, r, keys)
        m = 0
        for j in range(size):  # keys are finite here (pass 1 checked): mask for safety only
            found[m] = j
            m += slots[(keys[j] >> BIN_SHIFT) & (slots.size - 1)] >= 0
        for c in range(m):
            key = keys[found[c]]
            fine[slots[key >> BIN_SHIFT] * FINE + (key & (FINE - 1))] += 1


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def find_candidates(base, tuned, base_raw, strategy, first, seed_term, low, pos, keys, r_out,
                    raw_out):
    """The write pass on one region chunk: positions, keys, r and raw base values of the
    elements with key >= ``low``, to the fronts of the output arrays; returns how many. Offsets
    are found branch-free (a branch mispredicts when k is large), then only their fields stored
    (storing all four for every element cost twice as much)."""
    r = np.empty(BLOCK, np.float32)
    block_keys = np.empty(BLOCK, np.int64)
    found = np.empty(BLOCK, np.int32)
    count = 0
    for start in range(0, base.size, BLOCK):
        size = min(BLOCK, base.size - start)
        _r_and_keys(base, tuned, start, size, strategy, first, seed_term, r, block_keys)
        m = 0
        for j in range(size):
            found[m] = j
            m += block_keys[j] >= low
        raw = base_raw[start:start + size]
        for c in range(m):
            j = found[c]
            pos[count + c] = start + j
            keys[count + c] = block_keys[j]
            r_out[count + c] = r[j]
            raw_out[count + c] = raw[j]
        count += m
    return count


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def put_back(out, pos, base_raw, r, chosen):
    """Set ``out[pos[c]] = base_raw[c]`` for each chosen candidate c; returns their summed r."""
    total = 0.0
    for c in chosen:
        out[pos[c]] = base_raw[c]
        total += r[c]
    return total


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def count_ties(keys, cuts, out):
    """``out[j]`` = how many of ``keys`` equal ``cuts[j]`` (a chunk's ties at each k's cut)."""
    for j in range(cuts.size):  # one sweep per cut, each a vectorised count
        cut = cuts[j]
        count = 0
        for i in range(keys.size):
            count += keys[i] == cut
        out[j] = count


@njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")
def group_by_cut(keys, cuts, takes, order, bounds):
    """Group candidates by the first k that selects them (k number j: keys above ``cuts[j]``,
    smallest k first, and the first ``takes[j]`` equal to it). Group g (``len(cuts)``: no k) is
    ``order[bounds[g]:bounds[g + 1]]``. Returns how many tied candidates a k selects and a larger
    k does not: 0 unless the selections are not nested."""
    groups = cuts.size
    counts = np.zeros(groups + 1, np.int64)
    taken = np.zeros(groups, np.int64)
    group_of = np.empty(keys.size, np.uint16)  # callers pass fewer than 65535 cuts
    broken = 0
    for i in range(keys.size):
        key, g, tie = keys[i], 0, False
        for j in range(groups):  # branch-free: the group is how many cuts the key does not pass
            g += key <= cuts[j]
            tie |= key == cuts[j]
        if tie:  # rare: take ties in order, as far as each k still takes them here
            g, bad = groups, False
            missed = False  # a larger k does not select it
            for j in range(groups - 1, -1, -1):
                equal = key == cuts[j]
                if key > cuts[j] or (equal and taken[j] < takes[j]):
                    taken[j] += equal
                    g = j
                    bad |= missed
                else:
                    missed = True
            broken += bad
        group_of[i] = g
    for i in range(keys.size):
        counts[group_of[i]] += 1
    bounds[0] = 0
    bounds[1:] = np.cumsum(counts)
    fill = bounds[:groups + 1].copy()
    for i in range(keys.size):
        g = group_of[i]
        order[fill[g]] = i
        fill[g] += 1
    return broken


def as_kernel_input(values: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """A flat chunk of stored values as the kernels take it: bfloat16 bits (uint16) as they
    are, float32 as its bits (uint32), other floats cast into ``scratch`` (float32, at least as
    long) the way torch casts them (round to nearest even)."""
    if values.dtype == np.uint16:
        return values
    if values.dtype != np.float32:
        np.copyto(scratch[:values.size], values, casting="same_kind")
        values = scratch[:values.size]
    return values.view(np.uint32)
