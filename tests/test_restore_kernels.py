"""The compiled pass loops reproduce the torch definitions of weights.topk bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sftknow_eval.weights import kernels
from sftknow_eval.weights import topk as selector


def random_keys(start: int, n: int, seed: int) -> torch.Tensor:
    """The random strategy's keys written with torch: a seeded 31-bit counter-based hash of
    global indices start..start+n-1 (int64), the reference for ``kernels._random_key``."""
    x = torch.arange(start, start + n, dtype=torch.int64)
    high = x >> 32
    x.bitwise_and_(selector.MASK32)
    x.bitwise_xor_((high * selector.MIX) & selector.MASK32)
    x.bitwise_xor_(selector.random_seed_term(seed))
    for _ in range(3):
        x.bitwise_xor_(x >> 16).mul_(selector.MIX).bitwise_and_(selector.MASK32)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(1)


def score_keys(r: torch.Tensor, strategy: str, start: int, seed: int) -> torch.Tensor:
    """Each element's key (int32) written with torch: the reference for the kernels' keys."""
    bits = r.reshape(-1).view(torch.int32)
    if strategy == "top":
        return bits
    if strategy == "random":
        return random_keys(start, r.numel(), seed).to(torch.int32)
    return selector.INF_BITS - bits


def raw_view(t: torch.Tensor) -> np.ndarray:
    """A bf16 tensor's bits as uint16 (numpy has no bfloat16)."""
    return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)


def _pair(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and tuned values with the awkward cases: zeros, ties, denormals, sign flips."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen) * 0.02
    tuned = base + torch.randn(n, generator=gen) * 1e-3
    base[::7] = 0.0
    tuned[::11] = base[::11]  # unchanged
    tuned[::13] = -base[::13]
    base[5::17] = 1e-40  # float32 denormal (0 in bf16/fp16)
    tuned[3::19] = base[3::19] * 4  # repeated ratios: exact ties in r
    return base.to(dtype), tuned.to(dtype)


def _inputs(t: torch.Tensor) -> np.ndarray:
    values = raw_view(t) if t.dtype == torch.bfloat16 else t.numpy()
    return kernels.as_kernel_input(values, np.empty(t.numel(), np.float32))


def _raw(t: torch.Tensor) -> np.ndarray:
    """The stored bits as unsigned ints of the dtype's width (restore's raw form)."""
    if t.dtype == torch.bfloat16:
        return raw_view(t)
    values = t.reshape(-1).numpy()
    return values.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[values.itemsize])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", selector.STRATEGIES)
def test_candidates_match_torch_r_and_keys(dtype, strategy):
    base, tuned = _pair(dtype, 50_000, seed=3)
    r = selector.relative_change(base, tuned)
    first = 123_456_789_012  # beyond 2**32: the random hash's high word takes part
    keys = score_keys(r, strategy, first, 7).numpy().astype(np.int64)
    low = int(np.quantile(keys, 0.9))
    n = base.numel()
    base_raw = _raw(base)
    pos, got_keys, got_r = np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.float32)
    got_raw = np.empty(n, base_raw.dtype)
    count = kernels.find_candidates(
        _inputs(base), _inputs(tuned), base_raw, selector.STRATEGIES.index(strategy), first,
        selector.random_seed_term(7), low, pos, got_keys, got_r, got_raw)
    want = np.flatnonzero(keys >= low)
    assert count == want.size > 0
    np.testing.assert_array_equal(pos[:count], want)
    np.testing.assert_array_equal(got_keys[:count], keys[want])
    np.testing.assert_array_equal(got_r[:count].view(np.int32), r.numpy()[want].view(np.int32))
    np.testing.assert_array_equal(got_raw[:count], base_raw[want])  # the stored bits, exactly
    total = kernels.sum_relative_change(_inputs(base), _inputs(tuned))
    assert total == pytest.approx(float(r.double().sum()), rel=1e-12)


@pytest.mark.parametrize("strategy", selector.STRATEGIES)
def test_histogram_and_exact_counts_in_chosen_bins(strategy):
    base, tuned = _pair(torch.bfloat16, 30_000, seed=5)
    r = selector.relative_change(base, tuned)
    keys = score_keys(r, strategy, 0, 1).numpy().astype(np.int64)
    bins = keys >> selector.BIN_SHIFT
    code, seed_term = selector.STRATEGIES.index(strategy), selector.random_seed_term(1)
    hist = np.zeros(selector.NUM_BINS, np.int64)
    total = kernels.histogram(_inputs(base), _inputs(tuned), code, 0, seed_term, hist)
    assert total == pytest.approx(float(r.double().sum()), rel=1e-12)
    np.testing.assert_array_equal(hist, np.bincount(bins, minlength=selector.NUM_BINS))
    counted = np.unique(bins[::101])[:5]
    slots = np.full(selector.NUM_BINS, -1, np.int32)
    slots[counted] = np.arange(counted.size)
    fine = np.zeros(counted.size * selector.FINE, np.int64)
    kernels.count_in_bins(_inputs(base), _inputs(tuned), code, 0, seed_term, slots, fine)
    for slot, b in enumerate(counted.tolist()):
        low = keys[bins == b] & (selector.FINE - 1)
        np.testing.assert_array_equal(fine.reshape(-1, selector.FINE)[slot],
                                      np.bincount(low, minlength=selector.FINE))
    assert fine.sum() == np.isin(bins, counted).sum() > 0


@pytest.mark.parametrize("strategy", ["top", "bottom"])
def test_nan_inputs_make_the_sum_nan_and_stay_inside_the_table(strategy):
    """-inf in the base gives inf / inf: x86's default NaN has the sign bit set, so its key is
    negative (top) or past 2**31 (bottom); such keys must not be counted (no bounds checks)."""
    base, tuned = _pair(torch.bfloat16, 1_000, seed=9)
    tuned[10] = float("nan")
    base[20] = float("-inf")
    hist = np.zeros(selector.NUM_BINS, np.int64)
    total = kernels.histogram(_inputs(base), _inputs(tuned), selector.STRATEGIES.index(strategy),
                              0, 0, hist)
    assert np.isnan(total)
    assert 1_000 - 2 <= hist.sum() <= 1_000 - 1  # the -inf element's NaN is never counted


def _groups_reference(keys, cuts, takes):
    """Group of each key: the first k selecting it (keys above its cut, then its first
    ``takes`` ties in order), written the slow way."""
    taken = [0] * len(cuts)
    groups = []
    for key in keys:
        chosen = []
        for j, cut in enumerate(cuts):
            tie = key == cut
            chosen.append(key > cut or (tie and taken[j] < takes[j]))
            taken[j] += tie and chosen[-1]
        groups.append(chosen.index(True) if any(chosen) else len(cuts))
    return np.array(groups)


def test_count_ties_and_group_by_cut_take_ties_in_order():
    rng = np.random.default_rng(11)
    keys = rng.integers(0, 40, 5_000).astype(np.int32)  # few distinct keys: many ties
    cuts = np.array([30, 30, 22, 10, 3], dtype=np.int64)  # two k's share a cut
    ties = np.empty(cuts.size, dtype=np.int64)
    kernels.count_ties(keys, cuts, ties)
    np.testing.assert_array_equal(ties, [(keys == c).sum() for c in cuts])
    takes = np.array([17, 60, 0, 5, ties[4]], dtype=np.int64)  # nested: 17 <= 60 at cut 30
    order = np.empty(keys.size, dtype=np.int64)
    bounds = np.empty(cuts.size + 2, dtype=np.int64)
    assert kernels.group_by_cut(keys, cuts, takes, order, bounds) == 0
    want = _groups_reference(keys.tolist(), cuts.tolist(), takes.tolist())
    for g in range(cuts.size + 1):
        np.testing.assert_array_equal(order[bounds[g]:bounds[g + 1]], np.flatnonzero(want == g))


def test_group_by_cut_reports_selections_that_are_not_nested():
    keys = np.array([5, 5, 5, 9], dtype=np.int32)
    cuts = np.array([5, 5], dtype=np.int64)
    takes = np.array([2, 1], dtype=np.int64)  # the smaller k takes more ties than the larger
    order = np.empty(keys.size, dtype=np.int64)
    bounds = np.empty(4, dtype=np.int64)
    assert kernels.group_by_cut(keys, cuts, takes, order, bounds) == 1
