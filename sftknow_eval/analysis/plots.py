"""The analysis pictures (matplotlib, PNG): KL against training size per training category,
the concentration curve, per-layer / per-module shares, and the histogram of log10 r."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_kl_vs_size(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One line per training category: mean first-token KL (D4 facts) against training size;
    rows hold ``category``, ``size`` and ``kl_mean`` (several seeds are averaged)."""
    grouped: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[str(row["category"])][int(row["size"])].append(float(row["kl_mean"]))
    figure, axis = plt.subplots(figsize=(6, 4))
    for category in sorted(grouped):
        sizes = sorted(grouped[category])
        means = [sum(grouped[category][s]) / len(grouped[category][s]) for s in sizes]
        axis.plot(sizes, means, marker="o", label=f"trained on {category}")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("training examples")
    axis.set_ylabel("KL(tuned || base), first answer token")
    axis.set_title("Token-level change on well-known (D4) facts")
    axis.legend()
    return _save(figure, path)


def plot_concentration(curve: Mapping[str, float], path: str | Path) -> Path:
    """Share of the summed relative update held by the top k% most-changed elements."""
    ks = sorted(curve, key=float)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([float(k) for k in ks], [100 * curve[k] for k in ks], marker=".")
    axis.set_xlabel("top k% of elements by relative change")
    axis.set_ylabel("% of summed relative change")
    axis.set_ylim(0, 100)
    axis.set_title("Concentration of the fine-tuning update")
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_shares(shares: Mapping[str, float], path: str | Path, title: str) -> Path:
    """Bars: the share of the selected elements in each layer or module."""
    labels = list(shares)
    figure, axis = plt.subplots(figsize=(max(6, 0.4 * len(labels)), 4))
    axis.bar(range(len(labels)), [100 * shares[k] for k in labels])
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_ylabel("% of selected elements")
    axis.set_title(title)
    return _save(figure, path)


def plot_histogram(histogram: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """The distribution of log10 r over the region."""
    edges, counts = list(histogram["edges"]), list(histogram["counts"])
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge")
    axis.set_yscale("log")
    axis.set_xlabel("log10 relative change r")
    axis.set_ylabel("elements")
    axis.set_title("Relative update of every weight element")
    return _save(figure, path)
