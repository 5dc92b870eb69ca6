"""Fused element loops of restore's two passes, compiled with numba.

Each pass visits every element of the model once; done with torch or numpy, every step (cast,
subtract, abs, divide, key, bin, gather, scatter-add, compare) is a separate sweep over the
chunk, about a dozen per element, and that was two thirds of restore's time (benchmarks/restore,
runs 5-6). No library offers "relative change, key and histogram in one sweep", so these loops
are written here and compiled: one sweep per pass, with the GIL released so that restore's
worker threads run them side by side.

They reproduce ``selector`` exactly: r is computed in float32 with the same operations in the
same order as :func:`selector.relative_change` (IEEE single precision; no fast-math, so the
bits match torch's), keys as in :func:`selector.score_keys`. ``tests/test_restore_kernels.py``
checks both against the torch definitions bit for bit.

Inputs are flat arrays of the stored values: ``uint16`` holds bfloat16 bit patterns (widened
here by a shift, exactly as a bf16 -> float32 cast does), ``float32`` is used as is; callers
cast other float dtypes to float32 first (:func:`as_kernel_input`).

The compiled code is cached beside this file (``cache=True``), so only the first run on a
machine pays the compilation (a few seconds).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from sftknow_eval.restore.selector import (
    BIN_SHIFT,
    DETECT_STRIDE,
    EPS,
    FINE,
    INF_BITS,
    NUM_BINS,
    STRATEGIES,
)

STRATEGY_CODES = {name: code for code, name in enumerate(STRATEGIES)}  # top 0, bottom 1, random 2
_EPS32 = np.float32(EPS)
_KEY_LIMIT = 1 << 31
_MASK32 = 0xFFFFFFFF
_MIX = 0x045D9F3B  # must match selector._MIX


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


def _load(values, i):  # pragma: no cover - replaced by the overload below inside compiled code
    raise NotImplementedError


@overload(_load, inline="always")
def _load_overload(values, i):
    """Element i as float32: bf16 bits (uint16) are widened, float32 is read as is."""
    if values.dtype == types.uint16:
        return lambda values, i: _float_of_bits(np.uint32(values[i]) << np.uint32(16))
    if values.dtype == types.float32:
        return lambda values, i: values[i]
    raise TypeError("restore kernels take uint16 (bfloat16 bits) or float32 arrays")


@njit(inline="always")
def _relative_change(base, tuned, i):
    b = _load(base, i)
    t = _load(tuned, i)
    return abs(t - b) / (abs(b) + _EPS32)


@njit(inline="always")
def _random_key(index, seed_term):
    """selector.random_keys for one global index (int64 arithmetic, same steps)."""
    x = index & _MASK32
    x ^= ((index >> 32) * _MIX) & _MASK32
    x ^= seed_term
    for _ in range(3):
        x ^= x >> 16
        x = (x * _MIX) & _MASK32
    x ^= x >> 16
    return x >> 1


@njit(inline="always")
def _key(r, strategy, index, seed_term):
    if strategy == 0:
        return np.int64(_bits_of_float(r))
    if strategy == 1:
        return INF_BITS - np.int64(_bits_of_float(r))
    return _random_key(index, seed_term)


@njit(nogil=True, cache=True, boundscheck=False)
def sum_relative_change(base, tuned):
    """The summed r of a chunk (float64 accumulation); NaN or Inf when an input is."""
    total = 0.0
    for i in range(base.size):
        total += _relative_change(base, tuned, i)
    return total


@njit(nogil=True, cache=True, boundscheck=False)
def count_keys(base, tuned, strategy, first, seed_term, target, table, sample):
    """Pass 1 on one region chunk: returns summed r; counts every key into ``table``.

    Per element: r, its key, ``entry = target[key >> BIN_SHIFT]`` and ``table[entry] += 1``,
    plus the key's low bits when the entry is a count slot (>= NUM_BINS); see
    ``selector.TieCounts``. ``sample[j]`` gets the bin of element ``j * DETECT_STRIDE``.
    Elements whose key is out of range (only a NaN r) are not counted; their NaN sum makes the
    caller raise.
    """
    n = base.size
    total = 0.0
    for block in range(0, n, DETECT_STRIDE):
        stop = min(n, block + DETECT_STRIDE)
        for i in range(block, stop):
            r = _relative_change(base, tuned, i)
            total += r
            key = _key(r, strategy, first + i, seed_term)
            if key < 0 or key >= _KEY_LIMIT:
                continue
            bin_ = key >> BIN_SHIFT
            if i == block:
                sample[block // DETECT_STRIDE] = bin_
            entry = np.int64(target[bin_])
            if entry >= NUM_BINS:
                entry += key & (FINE - 1)
            table[entry] += 1.0
    return total


@njit(nogil=True, cache=True, boundscheck=False)
def find_candidates(base, tuned, strategy, first, seed_term, low, pos, keys, r_out):
    """Pass 2 on one region chunk: the elements whose key is at least ``low``.

    Writes their positions (ascending), keys and r into the front of ``pos``, ``keys`` and
    ``r_out``; returns (how many, summed r of the whole chunk).
    """
    count = 0
    total = 0.0
    for i in range(base.size):
        r = _relative_change(base, tuned, i)
        total += r
        key = _key(r, strategy, first + i, seed_term)
        if key >= low:
            pos[count] = i
            keys[count] = key
            r_out[count] = r
            count += 1
    return count, total


def as_kernel_input(values: np.ndarray, is_bfloat16: bool, scratch: np.ndarray) -> np.ndarray:
    """A flat chunk the kernels take: bf16 bits as uint16, float32 as is, others cast into
    ``scratch`` (float32, at least as long) the way torch casts them (round to nearest even)."""
    if is_bfloat16:
        return values.view(np.uint16)
    if values.dtype == np.float32:
        return values
    out = scratch[:values.size]
    np.copyto(out, values, casting="same_kind")
    return out
