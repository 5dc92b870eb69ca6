"""Statistics of one restored variant: per tensor, per layer, per module; written as JSON and TSV.

Files (in each variant folder):

* ``restore_stats.json``: the variant's settings, element counts, ``threshold_r`` (r of the
  last element selected; null for random and layer groups), ``selected_r_share``,
  ``concentration`` (the same share, for strategy top only), shares of restored elements
  ``per_layer`` and ``per_module``, ``per_tensor`` (the TSV's rows) and ``run``;
* ``restore_stats.tsv``: one row per region tensor (:data:`TSV_COLUMNS`).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sftknow_eval.weights.regions import layer_of, module_of

TSV_COLUMNS = ("tensor", "layer", "module", "numel", "restored", "restored_fraction",
               "mean_r_restored", "sum_r_restored", "sum_r")


@dataclass
class TensorStats:
    numel: int
    sum_r: float = 0.0
    restored: int = 0
    sum_r_restored: float = 0.0


@dataclass
class VariantStats:
    """Accumulates counts while the engine streams; :meth:`summary` makes the JSON."""

    tensors: dict[str, TensorStats] = field(default_factory=dict)

    def add(self, name: str, restored: int, sum_r_restored: float) -> None:
        stats = self.tensors[name]
        stats.restored += int(restored)
        stats.sum_r_restored += float(sum_r_restored)

    @property
    def restored(self) -> int:
        return sum(t.restored for t in self.tensors.values())

    def rows(self) -> list[dict[str, object]]:
        return [{"tensor": name, "layer": layer_of(name), "module": module_of(name),
                 "numel": t.numel, "restored": t.restored,
                 "restored_fraction": t.restored / t.numel if t.numel else 0.0,
                 "mean_r_restored": t.sum_r_restored / t.restored if t.restored else 0.0,
                 "sum_r_restored": t.sum_r_restored, "sum_r": t.sum_r}
                for name, t in self.tensors.items()]

    def summary(self, *, strategy: str, threshold_r: float | None) -> dict[str, object]:
        total, restored = sum(t.numel for t in self.tensors.values()), self.restored
        sum_r = sum(t.sum_r for t in self.tensors.values())
        share = sum(t.sum_r_restored for t in self.tensors.values()) / sum_r if sum_r > 0 else 0.0
        per_layer: Counter[str] = Counter()
        per_module: Counter[str] = Counter()
        for name, t in self.tensors.items():
            layer = layer_of(name)
            per_layer["none" if layer is None else str(layer)] += t.restored
            per_module[module_of(name)] += t.restored
        scale = max(restored, 1)
        return {
            "region_elements": total, "restored_elements": restored,
            "restored_fraction": restored / total if total else 0.0,
            "threshold_r": threshold_r, "selected_r_share": share,
            "concentration": share if strategy == "top" else None, "region_sum_r": sum_r,
            "per_layer": {k: v / scale for k, v in per_layer.items()},
            "per_module": {k: v / scale for k, v in sorted(per_module.items(),
                                                          key=lambda kv: -kv[1])},
        }


def write_stats(folder: Path, header: dict[str, object], stats: VariantStats,
                summary: dict[str, object]) -> None:
    """Write restore_stats.json and restore_stats.tsv into ``folder``."""
    rows = stats.rows()
    payload = {**header, **summary, "per_tensor": rows}
    (folder / "restore_stats.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(folder / "restore_stats.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in TSV_COLUMNS} for row in rows)
