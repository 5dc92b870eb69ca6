"""Parameter-level lens (docs/METHOD.md §6): streaming statistics of the relative update
r = |tuned - base| / (|base| + 1e-8) over a region, read through restore's reader.

Two passes over the tensors (one tensor in memory at a time):
1. a fine histogram of r (counts and sums per bin of r's float32 bit pattern, which orders
   non-negative floats) plus the mass per layer and module;
2. for each k, the elements of its threshold bin are gathered and ordered exactly (by r
   descending, then global element index: restore's tie-break), which makes the
   concentration (share of summed r held by the top k% elements) and the per-layer /
   per-module shares of the top-k elements exactly what a full in-memory sort gives.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sftknow_eval.analysis.checks import check_out_folder, require_finite, strict_json
from sftknow_eval.errors import UserError
from sftknow_eval.restore.pipeline import preflight
from sftknow_eval.restore.reader import Checkpoint, resolve_model
from sftknow_eval.restore.regions import layer_of, module_of, select_region
from sftknow_eval.restore.selector import count_to_select, relative_change, validate_k

BIN_SHIFT = 10  # 2^21 bins over the 31 bits of a non-negative float32
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
        self.offsets = []
        total = 0
        for name in self.names:
            self.offsets.append(total)
            total += self.tuned.tensors[name].numel
        self.total = total

    def relative_changes(self, desc: str, progress: bool):
        for index, name in enumerate(tqdm(self.names, desc=desc, unit="tensor",
                                          disable=not progress)):
            base, tuned = self.base.tensor(name), self.tuned.tensor(name)
            r = relative_change(base, tuned)
            if not torch.isfinite(r).all():
                require_finite(name, {"base": base, "fine-tuned": tuned})
                raise UserError(f"tensor {name}: the relative change overflows float32")
            yield index, name, r


def _bins(r: torch.Tensor) -> torch.Tensor:
    return (r.view(torch.int32) >> BIN_SHIFT).long()


def update_statistics(base: str, tuned: str, *, region: str = "transformer",
                      concentration_ks: tuple[float, ...] = CONCENTRATION_KS,
                      share_ks: tuple[float, ...] = SHARE_KS, progress: bool = True) -> dict[str, Any]:
    """Concentration curve, threshold per k, per-layer / per-module shares of the top-k
    elements, the mass of r per layer / module, and a histogram of log10 r."""
    for k in (*concentration_ks, *share_ks):
        validate_k(k)
    pair = _Tensors(base, tuned, region)
    bins_total = 1 << (31 - BIN_SHIFT)
    counts = torch.zeros(bins_total, dtype=torch.int64)
    sums = torch.zeros(bins_total, dtype=torch.float64)
    mass_layer: dict[str, float] = defaultdict(float)
    mass_module: dict[str, float] = defaultdict(float)
    log_hist = torch.zeros(LOG10_BINS, dtype=torch.float64)
    for _, name, r in pair.relative_changes("updates: histogram", progress):
        b, r64 = _bins(r), r.double()
        counts += torch.bincount(b, minlength=bins_total)
        sums += torch.bincount(b, weights=r64, minlength=bins_total)
        mass = float(r64.sum())
        mass_layer[str(layer_of(name))] += mass
        mass_module[module_of(name)] += mass
        log_r = torch.log10(r64).clamp(*LOG10_RANGE)  # log10(0) = -inf -> lowest bin
        log_hist += torch.histc(log_r, bins=LOG10_BINS, min=LOG10_RANGE[0], max=LOG10_RANGE[1])
    total_sum = float(sums.sum())
    if total_sum == 0:
        raise UserError(f"the fine-tuned model {tuned} and the base model {base} are identical "
                        f"in region {region!r}: every relative change is 0, there is no update "
                        "to analyse; nothing written")

    # Per k: the threshold bin and how many of its elements the top-n takes.
    above = counts.flip(0).cumsum(0).flip(0) - counts  # elements in bins strictly higher
    plan: dict[float, tuple[int, int, int]] = {}
    for k in sorted({*concentration_ks, *share_ks}):
        n = count_to_select(pair.total, k)
        if n == 0:
            plan[k] = (bins_total, 0, 0)
            continue
        tb = int(torch.nonzero((above < n) & (above + counts >= n)).max())
        plan[k] = (tb, n - int(above[tb]), n)
    wanted = {tb for tb, take, _ in plan.values() if take}

    # Pass 2: the threshold bins' elements (value, global index, tensor) and sure counts.
    candidates: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    sure: dict[float, list[int]] = {k: [0] * len(pair.names) for k in share_ks}
    for index, _, r in pair.relative_changes("updates: top-k", progress):
        b = _bins(r)
        for k in share_ks:
            sure[k][index] = int((b > plan[k][0]).sum())
        for tb in wanted:
            hit = torch.nonzero(b == tb).flatten()
            if hit.numel():
                candidates[tb].append((r[hit].clone(), hit + pair.offsets[index],
                                       torch.full_like(hit, index)))

    ordered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for tb, parts in candidates.items():
        values = torch.cat([p[0] for p in parts]).double()
        positions = torch.cat([p[1] for p in parts])
        owners = torch.cat([p[2] for p in parts])
        # Stable sort by position, then by value descending: ties keep the lower position first.
        by_position = torch.argsort(positions, stable=True)
        order = by_position[torch.argsort(-values[by_position], stable=True)]
        ordered[tb] = (values[order], owners[order])

    concentration, thresholds = {}, {}
    for k in concentration_ks:
        tb, take, n = plan[k]
        top_sum = float(sums[tb + 1:].sum()) if tb < bins_total else 0.0
        if take:
            values, _ = ordered[tb]
            top_sum += float(values[:take].sum())
            thresholds[str(k)] = float(values[take - 1])
        concentration[str(k)] = top_sum / total_sum if total_sum > 0 else 0.0

    layer_shares, module_shares = {}, {}
    for k in share_ks:
        tb, take, n = plan[k]
        per_tensor = list(sure[k])
        if take:
            for owner in ordered[tb][1][:take].tolist():
                per_tensor[owner] += 1
        by_layer: dict[str, int] = defaultdict(int)
        by_module: dict[str, int] = defaultdict(int)
        for name, count in zip(pair.names, per_tensor, strict=True):
            by_layer[str(layer_of(name))] += count
            by_module[module_of(name)] += count
        layer_shares[str(k)] = {key: v / n if n else 0.0 for key, v in sorted(
            by_layer.items(), key=lambda item: _layer_order(item[0]))}
        module_shares[str(k)] = {key: v / n if n else 0.0 for key, v in sorted(
            by_module.items(), key=lambda item: -item[1])}

    step = (LOG10_RANGE[1] - LOG10_RANGE[0]) / LOG10_BINS
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
                              "counts": [int(c) for c in log_hist.tolist()]},
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
