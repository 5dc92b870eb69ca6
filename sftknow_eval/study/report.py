"""The study report: reads the finished cells of a run folder and writes ``report/report.md``
with its PNGs (matplotlib, Agg): accuracy against training size, the training-category x
test-category table beside the paper's, restoration curves, the concentration curve, KL
against size, the scorecard of the shapes docs/METHOD.md §7 asks to look for (scorecard.py),
and what was run (models, grid, versions, per-stage times)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sftknow_eval.atomic import atomic_folder  # noqa: E402
from sftknow_eval.study.choice_report import chosen_section  # noqa: E402
from sftknow_eval.study.plan import BASE, Cell, model_name, restored_name  # noqa: E402
from sftknow_eval.study.scorecard import render as render_scorecard  # noqa: E402
from sftknow_eval.study.scorecard import scorecard  # noqa: E402
from sftknow_eval.study.spec import SHIPPED, StudySpec, largest_size  # noqa: E402

BUCKETS = ("D0", "D1", "D2", "D3", "D4")
# docs/METHOD.md §7 (Ye et al. 2025, Table 2): LLaMA-3-8B, 1,920 training samples, per test
# category D0..D4, then Acc (in-domain) and Acc (out-of-domain).
PAPER_TABLE: dict[str, tuple[float, ...]] = {
    "D0": (1.75, 16.07, 55.03, 71.06, 83.46, 45.47, 46.24),
    "D1": (0.98, 40.12, 63.93, 74.19, 84.22, 52.69, 50.80),
    "D2": (0.78, 36.56, 75.61, 83.98, 90.71, 57.53, 53.71),
    "D3": (0.64, 27.20, 70.33, 85.90, 91.66, 55.15, 51.04),
    "D4": (0.64, 24.26, 68.28, 83.29, 93.19, 53.93, 50.25),
}
PAPER_CONCENTRATION = {"1": 0.71, "10": 0.87, "20": 0.92}  # docs/METHOD.md §6
SHOWN_K = (1.0, 3.0, 5.0, 10.0, 20.0, 40.0, 60.0)  # the concentration table's columns
PAPER_MODULE_SHARES = {"mlp.down": 28.9, "mlp.up": 28.3, "mlp.gate": 23.4, "attn.o": 9.4,
                       "attn.q": 6.4, "attn.v": 2.6, "attn.k": 1.1}


def _records(run_dir: Path, cells: Sequence[Cell]) -> dict[str, dict[str, Any]]:
    """cell id -> cell.json of every cell finished with its current hash."""
    found = {}
    for cell in cells:
        path = run_dir / cell.id / "cell.json"
        if path.is_file():
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("hash") == cell.hash:
                found[cell.id] = record
    return found


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(pair: tuple[float, float] | None, std: bool = True) -> str:
    if pair is None:
        return "–"
    mean, sd = pair
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if std and sd else f"{100 * mean:.1f}"


class _Scores:
    """Accuracy lookups over the finished eval cells."""

    def __init__(self, records: dict[str, dict[str, Any]]):
        self.outputs = {cid.split("/", 1)[1]: r["outputs"] for cid, r in records.items()
                        if cid.startswith("eval/")}

    def value(self, model: str, domain: str, bucket: str | None = None) -> float | None:
        out = self.outputs.get(model)
        if out is None:
            return None
        if bucket is None:
            return out["acc"].get(domain)
        return out["buckets"].get(domain, {}).get(bucket)

    def over_seeds(self, names: Sequence[str], domain: str,
                   bucket: str | None = None) -> tuple[float, float] | None:
        return _mean_std([self.value(n, domain, bucket) for n in names
                          if self.value(n, domain, bucket) is not None])


def _size_key(size: int | str) -> float:
    return float("inf") if size == "all" else float(size)


def write_report(spec: StudySpec, run_dir: Path, cells: Sequence[Cell], *,
                 invocation_seconds: float | None = None) -> Path:
    """Write ``<run_dir>/report/`` (report.md, scorecard.json, PNGs) from whatever cells are
    finished."""
    records = _records(run_dir, cells)
    scores = _Scores(records)
    grid = spec.grid
    sizes = sorted(grid.sizes, key=_size_key)
    largest = largest_size(grid.sizes)
    seeds_of = {(c, s): [model_name(c, s, seed) for seed in grid.seeds]
                for c in grid.categories for s in sizes}
    lines: list[str] = [f"# Study report: {spec.name}", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    missing = [c.id for c in cells if c.stage != "report" and c.id not in records]
    if missing:
        lines += [f"**Incomplete:** {len(missing)} of {len(cells) - 1} cells are not finished "
                  f"({', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}); their "
                  "numbers are missing below.", ""]
    with atomic_folder(run_dir / "report") as folder:
        lines += _main_table(spec, scores, seeds_of, largest)
        lines += _size_section(spec, scores, seeds_of, sizes, folder)
        lines += _restore_section(spec, scores, folder)
        lines += chosen_section(spec, records, scores.value)
        lines += _updates_section(records, folder)
        lines += _kl_section(spec, records, folder)
        lines += _shapes(spec, scores, folder)
        lines += _what_was_run(spec, run_dir, records, cells, invocation_seconds)
        (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run_dir / "report" / "report.md"


def _main_table(spec: StudySpec, scores: _Scores, seeds_of: dict, largest: int | str) -> list[str]:
    seeds = len(spec.grid.seeds)
    header = "| train | " + " | ".join(BUCKETS) + " | Acc | Acc OOD |"
    rule = "|---" * (len(BUCKETS) + 3) + "|"
    lines = [f"## Accuracy per test category after SFT on {largest} samples",
             "",
             f"Ours (`{_model_path(spec)}`, mean ± std over {seeds} seed(s); in-domain test "
             "categories D0..D4, Acc = unweighted mean over them, docs/METHOD.md §4):", "",
             header, rule]
    base = [_pct(scores.over_seeds([BASE], "id", b)) for b in BUCKETS]
    lines.append(f"| base (no SFT) | {' | '.join(base)} | {_pct(scores.over_seeds([BASE], 'id'))} "
                 f"| {_pct(scores.over_seeds([BASE], 'ood'))} |")
    for category in spec.grid.categories:
        names = seeds_of[(category, largest)]
        cells = [_pct(scores.over_seeds(names, "id", b)) for b in BUCKETS]
        lines.append(f"| {category} | {' | '.join(cells)} | {_pct(scores.over_seeds(names, 'id'))} "
                     f"| {_pct(scores.over_seeds(names, 'ood'))} |")
    items = (scores.outputs.get(BASE) or {}).get("items") or {}
    if items:
        lines += ["", "Test items per category: " + "; ".join(
            f"{'in-domain' if d == 'id' else 'out-of-domain'} "
            + ", ".join(f"{b} {n}" for b, n in counts.items()) for d, counts in items.items())
            + (f" (at most {spec.eval.limit} scored per category)" if spec.eval.limit else "")
            + "."]
    lines += ["", "Paper (LLaMA-3-8B, 1,920 samples, Table 2; docs/METHOD.md §7):", "", header, rule]
    for category, values in PAPER_TABLE.items():
        lines.append(f"| {category} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines + [""]


def _finish_acc_figure(figure: Any, axes: Any, scores: _Scores, path: Path) -> None:
    """The common end of the two-panel (in-domain, out-of-domain) accuracy figures: the base
    model's line, grid, labels, legend, and the PNG written to ``path``."""
    for axis, domain in ((axes[0], "id"), (axes[1], "ood")):
        base = scores.value(BASE, domain)
        if base is not None:
            axis.axhline(100 * base, color="grey", linestyle="--", label="base (no SFT)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Acc (%)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _size_section(spec: StudySpec, scores: _Scores, seeds_of: dict, sizes: list,
                  folder: Path) -> list[str]:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, domain, title in ((axes[0], "id", "in-domain"), (axes[1], "ood", "out-of-domain")):
        for category in spec.grid.categories:
            points = [(s, scores.over_seeds(seeds_of[(category, s)], domain)) for s in sizes]
            points = [(s, p) for s, p in points if p is not None]
            if points:
                axis.errorbar([sizes.index(s) for s, _ in points], [100 * p[0] for _, p in points],
                              yerr=[100 * p[1] for _, p in points], marker="o", capsize=3,
                              label=f"trained on {category}")
        axis.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        axis.set_title(f"Acc, {title} test")
        axis.set_xlabel("training samples")
    _finish_acc_figure(figure, axes, scores, folder / "acc_vs_size.png")
    header = "| train | " + " | ".join(f"{s}" for s in sizes) + " |"
    lines = ["## Accuracy against training size", "", "![accuracy vs size](acc_vs_size.png)", "",
             "Acc in-domain / out-of-domain (%, mean over seeds):", "", header,
             "|---" * (len(sizes) + 1) + "|"]
    for category in spec.grid.categories:
        row = [f"{_pct(scores.over_seeds(seeds_of[(category, s)], 'id'), False)} / "
               f"{_pct(scores.over_seeds(seeds_of[(category, s)], 'ood'), False)}" for s in sizes]
        lines.append(f"| {category} | " + " | ".join(row) + " |")
    return lines + [""]


def _restore_section(spec: StudySpec, scores: _Scores, folder: Path) -> list[str]:
    restore = spec.restore
    if restore is None:
        return []
    ks = sorted(restore.k)
    targets = [(c, s) for c in (restore.categories or spec.grid.categories)
               for s in spec.restored_sizes()]
    seeds = restore.seeds or spec.grid.seeds
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    header = "| train | size | k=0 | " + " | ".join(f"k={k:g}%" for k in ks) + " |"
    lines = ["## Restoring the most-changed weights",
             "",
             f"Top-k% elements by relative change (region {restore.region}, strategy "
             f"{restore.strategy}) reset to base values; k=0 is the fine-tuned model. "
             "Acc in-domain / out-of-domain (%, mean over seeds). Paper: LLaMA-3-8B, 1,920 D0 "
             "samples 44.96 -> 54.81 at k=20, 55.44 at k=40; D2 58.80 -> 62.21 at k=20.",
             "", "![restoration](restore_curves.png)", "", header,
             "|---" * (len(ks) + 3) + "|"]
    for category, size in targets:
        names = [model_name(category, size, seed) for seed in seeds]
        row = []
        for axis, domain in ((axes[0], "id"), (axes[1], "ood")):
            xs, ys = [0.0], [scores.over_seeds(names, domain)]
            for k in ks:
                xs.append(k)
                ys.append(scores.over_seeds([restored_name(n, restore.strategy, k) for n in names],
                                            domain))
            kept = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if kept:
                axis.plot([x for x, _ in kept], [100 * y[0] for _, y in kept], marker="o",
                          label=f"{category}, {size}")
            if domain == "id":
                row = [_pct(y, False) for y in ys]
                row_ood = [_pct(scores.over_seeds(names, "ood"), False)]
                row_ood += [_pct(scores.over_seeds([restored_name(n, restore.strategy, k)
                                                    for n in names], "ood"), False) for k in ks]
        lines.append(f"| {category} | {size} | " +
                     " | ".join(f"{a} / {b}" for a, b in zip(row, row_ood, strict=True)) + " |")
    for axis, title in ((axes[0], "in-domain"), (axes[1], "out-of-domain")):
        axis.set_title(f"Acc after restoring the top k%, {title}")
        axis.set_xlabel("k (% of elements restored)")
    _finish_acc_figure(figure, axes, scores, folder / "restore_curves.png")
    return lines + [""]


def _updates_section(records: dict[str, dict[str, Any]], folder: Path) -> list[str]:
    found = {cid.split("/", 1)[1]: r["outputs"] for cid, r in records.items()
             if cid.startswith("updates/") and r["outputs"].get("concentration")}
    if not found:
        return []
    from sftknow_eval.analysis.plots import plot_concentration, plot_shares

    ks = sorted(next(iter(found.values()))["concentration"], key=float)
    shown = [k for k in ks if float(k) in SHOWN_K] or ks
    mean_curve = {k: statistics.fmean(o["concentration"][k] for o in found.values()
                                      if k in o["concentration"]) for k in ks}
    plot_concentration(mean_curve, folder / "concentration.png")
    lines = ["## Where the updates are", "",
             f"Share of the summed relative change held by the top k% most-changed elements "
             f"(mean over the {len(found)} restored models); paper: top 1% ~71%, 10% ~87%, "
             "20% ~92%.", "", "![concentration](concentration.png)", "",
             "| top k% | " + " | ".join(f"{k}" for k in shown) + " |",
             "|---" * (len(shown) + 1) + "|",
             "| ours | " + " | ".join(f"{100 * mean_curve[k]:.1f}" for k in shown) + " |",
             "| paper | " + " | ".join(f"{100 * PAPER_CONCENTRATION[k]:.0f}"
                                     if k in PAPER_CONCENTRATION else "" for k in shown) + " |", ""]
    shares = [o.get("module_shares") or {} for o in found.values()]
    share_k = "10" if all("10" in s for s in shares) else None
    if share_k:
        modules = sorted({m for s in shares for m in s[share_k]})
        mean_shares = {m: statistics.fmean(s[share_k].get(m, 0.0) for s in shares) for m in modules}
        plot_shares(mean_shares, folder / "module_shares.png",
                    f"Share of the top {share_k}% most-changed elements per module")
        lines += [f"Per module, share of the top {share_k}% (ours) against the paper's restored "
                  "elements (LLaMA-3-8B):", "", "![module shares](module_shares.png)", "",
                  "| module | ours % | paper % |", "|---|---|---|"]
        lines += [f"| {m} | {100 * v:.1f} | {PAPER_MODULE_SHARES.get(m, '')} |"
                  for m, v in sorted(mean_shares.items(), key=lambda kv: -kv[1])]
        lines.append("")
    return lines


def _kl_section(spec: StudySpec, records: dict[str, dict[str, Any]], folder: Path) -> list[str]:
    rows = []
    for cid, record in records.items():
        if cid.startswith("kl/") and record["outputs"].get("mean") is not None:
            name = cid.split("/", 1)[1]
            category, size, _ = name.rsplit("-", 2)
            rows.append({"category": category, "size": size, "kl_mean": record["outputs"]["mean"]})
    if not rows:
        return []
    from sftknow_eval.analysis.plots import plot_kl_vs_size

    numeric = [r for r in rows if r["size"] != "all"]
    plot_kl_vs_size(numeric, folder / "kl_vs_size.png")
    sizes = sorted({r["size"] for r in rows}, key=_size_key)
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        by[(row["category"], row["size"])].append(row["kl_mean"])
    lines = ["## First-answer-token KL against training size", "",
             f"KL(fine-tuned || base) over the fine-tuned model's top-10 first answer tokens, on "
             f"the {spec.kl.category} test facts (docs/METHOD.md §5; mean over seeds). Paper: high at "
             "60 samples, lowest near 240, rising with more data, most for D0/D1 training data.",
             "", "![KL vs size](kl_vs_size.png)", "",
             "| train | " + " | ".join(sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for category in spec.grid.categories:
        cells = [f"{statistics.fmean(by[(category, s)]):.3f}" if by.get((category, s)) else "–"
                 for s in sizes]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines + [""]


def _shapes(spec: StudySpec, scores: _Scores, folder: Path) -> list[str]:
    """The scorecard of the paper's four shapes (study/scorecard.py), also as scorecard.json."""
    card = scorecard(spec, scores.value)
    (folder / "scorecard.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return render_scorecard(card)


def _what_was_run(spec: StudySpec, run_dir: Path, records: dict[str, dict[str, Any]],
                  cells: Sequence[Cell], invocation_seconds: float | None) -> list[str]:
    probe = records.get("probe/annotations", {}).get("outputs", {})
    per_stage: dict[str, list[float]] = defaultdict(list)
    for cid, record in records.items():
        per_stage[cid.split("/")[0]].append(float(record.get("seconds") or 0.0))
    versions: dict[str, str] = {}
    for record in records.values():
        versions = record.get("versions") or versions
    train_rows = [r["outputs"] for cid, r in records.items() if cid.startswith("train/")]
    restore = spec.restore
    probed = "probed by this study" if probe.get("probed") else "read, not re-probed"
    restored = (f"k = {', '.join(f'{k:g}' for k in restore.k)}% at sizes "
                f"{', '.join(map(str, spec.restored_sizes()))}" if restore else "off")
    lines = ["## What was run", "",
             f"- Spec: `{spec.source}`; run folder `{run_dir}`.",
             f"- Base model: `{_model_path(spec)}` (mastery key `{spec.model.key}`"
             f"{', revision ' + spec.model.revision if spec.model.revision else ''}).",
             f"- Annotations: `{probe.get('annotated', '?')}` ({probe.get('facts', '?')} facts, "
             f"scheme {probe.get('scheme', '?')}, {probed}).",
             f"- Grid: training categories {', '.join(spec.grid.categories)} x sizes "
             f"{', '.join(map(str, spec.grid.sizes))} x seeds {', '.join(map(str, spec.grid.seeds))} "
             f"= {len(spec.grid.categories) * len(spec.grid.sizes) * len(spec.grid.seeds)} "
             f"fine-tuned models ({len(train_rows)} finished).",
             f"- SFT: recipe `{spec.train.recipe}` (overrides {spec.train.overrides or 'none'}), "
             f"launcher {spec.train.launcher}.",
             f"- Evaluation: lm-eval `{spec.eval.backend}` backend, family `{spec.eval.family}` "
             f"(splits {', '.join(spec.eval.splits)}"
             f"{', limit ' + str(spec.eval.limit) + ' per bucket' if spec.eval.limit else ''}).",
             f"- KL: {'on ' + spec.kl.category + ' test facts' if spec.kl.enabled else 'off'}.",
             f"- Restoration: {restored}.",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
             "Compute time per stage (sum over cells, seconds, as measured when each cell ran):",
             "", "| stage | cells | seconds |", "|---|---|---|"]
    for stage in ("probe", "tasks", "select", "train", "eval", "kl", "updates", "restore",
                  "choose"):
        if per_stage.get(stage):
            lines.append(f"| {stage} | {len(per_stage[stage])} | {sum(per_stage[stage]):.1f} |")
    total = sum(sum(v) for v in per_stage.values())
    lines.append(f"| all | {sum(len(v) for v in per_stage.values())} | {total:.1f} |")
    if invocation_seconds is not None:
        lines += ["", f"This invocation: {invocation_seconds:.1f} s wall time up to the report "
                  f"(cells already finished are not rerun; `runs.jsonl` logs every invocation)."]
    return lines + [""]


def _model_path(spec: StudySpec) -> str:
    if spec.model.path == SHIPPED:
        return "sftknow_eval/world_data/model"  # the tiny world's base model
    return spec.model.path
