"""Parameter-level lens (docs/METHOD.md §6): streaming statistics of the relative update
r = |tuned - base| / (|base| + 1e-8) over a region, read through the weights layer.

Three passes over the tensors (one tensor in memory at a time), with restore's exact top-k
(``weights.topk``: r descending, ties to the lower global element index):
1. a histogram of r's float32 bit pattern (counts and sums per bin; bit patterns of
   non-negative floats sort like the floats), the mass per layer and module, and a log10 r
   histogram;
2. exact per-key counts inside each k's threshold bin, which give each k's exact cut; the
   concentration (share of summed r held by the top k% elements) and threshold follow;
3. for the share k's, per tensor, the elements above each cut and at it, which give the
   per-layer / per-module shares of the top-k elements exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sftknow_eval.analysis.checks import check_out_folder, require_finite, strict_json
from sftknow_eval.errors import UserError
from sftknow_eval.weights import topk
from sftknow_eval.weights.checkpoint import Checkpoint, preflight, resolve_model
from sftknow_eval.weights.regions import layer_of, module_of, select_region

CONCENTRATION_KS = tuple(range(1, 61))
SHARE_KS = (1, 5, 10, 20)
LOG10_RANGE = (-10.0, 10.0)  # values outside are counted in the edge bins
LOG10_BINS = 80


class _Tensors:
    """The region's tensors of a base / tuned pair, in the global element order."""

    def __init__(self, base: str, tuned: str, region: str):
        self.base_model, self.tuned_model = resolve_model(base), resolve_model(tuned)
        self.base = Checkpoint.open(self.base_model.path)
        self.tuned = Checkpoint.open(self.tuned_model.path)
        preflight(self.base, self.tuned)
        floats = {n for n, info in self.tuned.tensors.items() if info.is_float}
        self.names = select_region(self.tuned.tensors, region, floats)
        if not self.names:
            raise UserError(f"region {region!r} holds no tensors of {tuned}")
        self.total = sum(self.tuned.tensors[name].numel for name in self.names)

    def keys(self, desc: str, progress: bool) -> Iterator[tuple[str, torch.Tensor, np.ndarray]]:
        """Each tensor's name, r and keys (r's bits as int64), in order."""
        for name in tqdm(self.names, desc=desc, unit="tensor", disable=not progress):
            base, tuned = self.base.tensor(name), self.tuned.tensor(name)
            r = topk.relative_change(base, tuned)
            if not torch.isfinite(r).all():
                require_finite(name, {"base": base, "fine-tuned": tuned})
                raise UserError(f"tensor {name}: the relative change overflows float32")
            yield name, r, r.view(torch.int32).numpy().astype(np.int64)


def _histogram(pair: _Tensors, progress: bool) -> dict[str, Any]:
    """Pass 1: counts and sums of r per bin, mass per layer and module, log10 r histogram."""
    counts = np.zeros(topk.NUM_BINS, dtype=np.int64)
    sums = np.zeros(topk.NUM_BINS, dtype=np.float64)
    mass_layer: dict[str, float] = defaultdict(float)
    mass_module: dict[str, float] = defaultdict(float)
    log_hist = torch.zeros(LOG10_BINS, dtype=torch.float64)
    for name, r, keys in pair.keys("updates: histogram", progress):
        bins, r64 = keys >> topk.BIN_SHIFT, r.double()
        counts += np.bincount(bins, minlength=topk.NUM_BINS)
        sums += np.bincount(bins, weights=r64.numpy(), minlength=topk.NUM_BINS)
        mass = float(r64.sum())
        mass_layer[str(layer_of(name))] += mass
        mass_module[module_of(name)] += mass
        log_r = torch.log10(r64).clamp(*LOG10_RANGE)  # log10(0) = -inf -> lowest bin
        log_hist += torch.histc(log_r, bins=LOG10_BINS, min=LOG10_RANGE[0], max=LOG10_RANGE[1])
    return {"counts": counts, "sums": sums, "mass_layer": mass_layer,
            "mass_module": mass_module, "log_hist": log_hist}


def _cuts(pair: _Tensors, counts: np.ndarray, ks: list[float],
          progress: bool) -> tuple[dict[float, topk.Cut], np.ndarray, np.ndarray]:
    """Pass 2: each k's exact cut (k's that select nothing are left out), plus the slot map
    and the threshold bins' per-key counts."""
    wanted = {k: topk.count_to_select(pair.total, k) for k in ks}
    wanted = {k: n for k, n in wanted.items() if n > 0}
    thresholds = topk.threshold_bins(counts, list(wanted.values()))
    slots, bins = topk.slot_map(thresholds)
    fine = np.zeros((len(bins), topk.FINE), dtype=np.int64)
    for _, _, keys in pair.keys("updates: exact counts", progress):
        topk.count_fine(keys, slots, fine)
    cuts = topk.exact_cuts(thresholds, fine, slots)
    return dict(zip(wanted, cuts, strict=True)), slots, fine


def _top_sum(cut: topk.Cut, sums: np.ndarray, slots: np.ndarray, fine: np.ndarray) -> float:
    """Summed r of the top n elements: higher bins, higher keys of the bin, the ties taken."""
    tb, low = cut.key >> topk.BIN_SHIFT, cut.key & (topk.FINE - 1)
    in_bin = fine[slots[tb]]
    keys = (tb << topk.BIN_SHIFT) + np.arange(low + 1, topk.FINE)
    higher = float((in_bin[low + 1:] * topk.key_to_r(keys, "top").astype(np.float64)).sum())
    return float(sums[tb + 1:].sum()) + higher + cut.ties * topk.key_to_r(cut.key, "top")


def _per_tensor(pair: _Tensors, cuts: list[topk.Cut], progress: bool) -> list[list[int]]:
    """Pass 3: per cut, the top-n elements in each tensor (ties to the first in order)."""
    left = [cut.ties for cut in cuts]
    out: list[list[int]] = [[] for _ in cuts]
    for _, _, keys in pair.keys("updates: shares", progress):
        for j, cut in enumerate(cuts):
            ties = min(left[j], int((keys == cut.key).sum()))
            left[j] -= ties
            out[j].append(int((keys > cut.key).sum()) + ties)
    return out


def _shares(names: list[str], per_tensor: list[int], n: int) -> tuple[dict, dict]:
    by_layer: dict[str, int] = defaultdict(int)
    by_module: dict[str, int] = defaultdict(int)
    for name, count in zip(names, per_tensor, strict=True):
        by_layer[str(layer_of(name))] += count
        by_module[module_of(name)] += count
    layers = {key: v / n for key, v in sorted(by_layer.items(),
                                             key=lambda item: _layer_order(item[0]))}
    modules = {key: v / n for key, v in sorted(by_module.items(), key=lambda item: -item[1])}
    return layers, modules


def update_statistics(base: str, tuned: str, *, region: str = "transformer",
                      concentration_ks: tuple[float, ...] = CONCENTRATION_KS,
                      share_ks: tuple[float, ...] = SHARE_KS, progress: bool = True) -> dict[str, Any]:
    """Concentration curve, threshold per k, per-layer / per-module shares of the top-k
    elements, the mass of r per layer / module, and a histogram of log10 r."""
    for k in (*concentration_ks, *share_ks):
        topk.validate_k(k)
    pair = _Tensors(base, tuned, region)
    hist = _histogram(pair, progress)
    total_sum = float(hist["sums"].sum())
    if total_sum == 0:
        raise UserError(f"the fine-tuned model {tuned} and the base model {base} are identical "
                        f"in region {region!r}: every relative change is 0, there is no update "
                        "to analyse; nothing written")
    cuts, slots, fine = _cuts(pair, hist["counts"], sorted({*concentration_ks, *share_ks}),
                              progress)
    concentration, thresholds = {}, {}
    for k in concentration_ks:
        top = _top_sum(cuts[k], hist["sums"], slots, fine) if k in cuts else 0.0
        concentration[str(k)] = top / total_sum if total_sum > 0 else 0.0
        if k in cuts:
            thresholds[str(k)] = topk.key_to_r(cuts[k].key, "top")
    share_cuts = [k for k in share_ks if k in cuts]
    counted = _per_tensor(pair, [cuts[k] for k in share_cuts], progress)
    layer_shares, module_shares = {}, {}
    for k in share_ks:
        per_tensor = counted[share_cuts.index(k)] if k in cuts else [0] * len(pair.names)
        layer_shares[str(k)], module_shares[str(k)] = _shares(pair.names, per_tensor,
                                                              max(1, cuts[k].n if k in cuts else 1))
    step = (LOG10_RANGE[1] - LOG10_RANGE[0]) / LOG10_BINS
    mass_layer, mass_module = hist["mass_layer"], hist["mass_module"]
    return {
        "base": base, "tuned": tuned, "base_revision": pair.base_model.revision,
        "tuned_revision": pair.tuned_model.revision, "region": region,
        "tensors": len(pair.names), "elements": pair.total, "sum_r": total_sum,
        "mean_r": total_sum / pair.total,
        "concentration": concentration, "threshold_r": thresholds,
        "layer_shares": layer_shares, "module_shares": module_shares,
        "mass_share_by_layer": {k: v / total_sum for k, v in sorted(
            mass_layer.items(), key=lambda item: _layer_order(item[0]))} if total_sum else {},
        "mass_share_by_module": {k: v / total_sum for k, v in mass_module.items()}
        if total_sum else {},
        "log10_r_histogram": {"edges": [LOG10_RANGE[0] + i * step for i in range(LOG10_BINS + 1)],
                              "counts": [int(c) for c in hist["log_hist"].tolist()]},
    }


def _layer_order(key: str) -> float:
    return math.inf if key == "None" else int(key)


def run_updates(base: str, tuned: str, out: str | Path | None = None, *,
                region: str = "transformer", progress: bool = True) -> dict[str, Any]:
    """``update_statistics`` plus, when ``out`` is given, ``updates.json`` and the PNG plots."""
    from sftknow_eval.atomic import atomic_folder
    from sftknow_eval.versions import library_versions

    if out is not None:
        check_out_folder(out)
    stats = update_statistics(base, tuned, region=region, progress=progress)
    stats["versions"] = library_versions()
    if out is not None:
        from sftknow_eval.analysis import plots

        with atomic_folder(out) as staging:
            (staging / "updates.json").write_text(
                strict_json(stats, "updates.json", indent=2) + "\n", "utf-8")
            plots.plot_concentration(stats["concentration"], staging / "concentration.png")
            share_k = "10" if "10" in stats["layer_shares"] else next(iter(stats["layer_shares"]))
            plots.plot_shares(stats["layer_shares"][share_k], staging / "layer_shares.png",
                              f"Share of the top {share_k}% most-changed elements per layer")
            plots.plot_shares(stats["module_shares"][share_k], staging / "module_shares.png",
                              f"Share of the top {share_k}% most-changed elements per module")
            plots.plot_histogram(stats["log10_r_histogram"], staging / "r_histogram.png")
    return stats
