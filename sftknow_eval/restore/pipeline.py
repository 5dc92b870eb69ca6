"""The restore engine: resolve and preflight both models, run the passes, finish outputs.

Usable from Python without the CLI: ``restore(RestoreConfig(base=..., tuned=..., out=...))``.
The passes themselves (what they read, decide and keep in memory) live in ``passes``; this
module owns everything around them: argument checks, resuming and skipping finished variants,
the disk check, statistics, cards, the atomic rename into place and the Hub push.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sftknow_eval.errors import UserError
from sftknow_eval.restore.card import build_card
from sftknow_eval.restore.passes import (
    CheckpointPair,
    Selection,
    Variant,
    exact_cuts,
    pieces,
    scan,
    write_variants,
)
from sftknow_eval.restore.stats import TensorStats, VariantStats, write_stats
from sftknow_eval.versions import library_versions
from sftknow_eval.weights import topk
from sftknow_eval.weights.checkpoint import Checkpoint, ResolvedModel, preflight, resolve_model
from sftknow_eval.weights.regions import (
    in_layer_group,
    natural_key,
    parse_layer_groups,
    region_pattern,
    select_region,
)
from sftknow_eval.weights.writer import (
    ShardedWriter,
    clean_stale_temps,
    commit_folder,
    copy_aux_files,
    new_temp_folder,
)

log = logging.getLogger(__name__)

DEFAULT_K = (1.0, 3.0, 5.0, 10.0, 20.0)
CONFIG_FILE = "restore_config.json"


@dataclass
class RestoreConfig:
    """Everything one restore run needs; fields mirror the CLI flags."""

    base: str
    tuned: str
    out: Path
    k: list[float] | None = None
    region: str = "transformer"
    strategy: str = "top"
    seed: int = 0
    layers: str | None = None
    base_revision: str | None = None
    tuned_revision: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    push_to: str | None = None
    private: bool = True
    chunk_elements: int = 1 << 20
    progress: bool = True
    threads: int = 0  # worker threads; 0: one per core, at most 2


@dataclass
class RestoreResult:
    """What a run produced: variant name -> folder, plus the ones skipped as already complete."""

    folders: dict[str, Path]
    skipped: list[str]
    pushed: dict[str, str]
    warnings: list[str]


def variant_name(strategy: str, k: float) -> str:
    return f"{strategy}{k:g}"


def _settings(cfg: RestoreConfig, variant: Variant) -> dict[str, object]:
    return {"region": cfg.region, "strategy": "layers" if variant.group else cfg.strategy,
            "k": variant.k, "seed": cfg.seed if cfg.strategy == "random" else None,
            "layers": _group_text(variant.group) if variant.group else None}


def _group_text(group: tuple[int, int]) -> str:
    return str(group[0]) if group[0] == group[1] else f"{group[0]}-{group[1]}"


def _fingerprint(cfg: RestoreConfig, base: ResolvedModel, tuned: ResolvedModel,
                 variant: Variant) -> dict[str, object]:
    return {"base": {"source": base.source, "revision": base.revision},
            "tuned": {"source": tuned.source, "revision": tuned.revision},
            **_settings(cfg, variant), "chunk_independent": True}


def _check_disk(out: Path, need: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"{out}: not enough disk space: the outputs need {need / 2**30:.2f} GiB "
                        f"and {free / 2**30:.2f} GiB are free")


def restore(cfg: RestoreConfig) -> RestoreResult:
    """Run a restoration end to end (see the module docstring); returns where the variants went.

    The work runs on ``cfg.threads`` worker threads (0: one per core, at most 2; see
    ``passes``). Restore never imports torch for safetensors checkpoints.
    """
    strategy = cfg.strategy
    if strategy not in topk.STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: use one of {', '.join(topk.STRATEGIES)}")
    if cfg.threads < 0:
        raise UserError(f"--threads {cfg.threads}: use 0 (one per core, at most 2) or a "
                        "positive number of worker threads")
    if not 0 < cfg.chunk_elements < 2**31:  # candidates keep chunk positions in 32 bits
        raise UserError(f"--chunk-elements {cfg.chunk_elements}: use 1 to {2**31 - 1}")
    if cfg.layers and cfg.k:
        raise UserError("--layers restores whole layer groups; do not combine it with --k")
    ks = [] if cfg.layers else [topk.validate_k(float(k)) for k in (cfg.k or DEFAULT_K)]
    groups = parse_layer_groups(cfg.layers) if cfg.layers else []
    region_pattern(cfg.region)
    out = Path(cfg.out)
    if cfg.push_to:  # every variant's repo id, token and empty repo, before any work
        from sftknow_eval import hub

        names = [variant_name(strategy, k) for k in dict.fromkeys(ks)]
        names += [f"layers{_group_text(group)}" for group in groups]
        for name in names:
            hub.check_push_target(f"{cfg.push_to}-{name}")

    base_model = resolve_model(cfg.base, cfg.base_revision)
    tuned_model = resolve_model(cfg.tuned, cfg.tuned_revision)
    base = Checkpoint.open(base_model.path, allow_pickle=cfg.allow_pickle)
    tuned = Checkpoint.open(tuned_model.path, allow_pickle=cfg.allow_pickle)
    preflight(base, tuned)

    floats = {n for n, i in tuned.tensors.items() if i.is_float}
    region = select_region(tuned.tensors, cfg.region, floats)
    if not region:
        raise UserError(f"--region {cfg.region!r} matches no floating-point tensor of {cfg.tuned}")
    starts: dict[str, int] = {}
    total = 0
    for name in region:
        starts[name] = total
        total += tuned.tensors[name].numel
    region_set = set(region)

    variants: list[Variant] = []
    for k in dict.fromkeys(ks):
        n = topk.count_to_select(total, k)
        if n == 0:
            raise UserError(f"--k {k:g}: {k:g}% of the region's {total} elements is less than one")
        variants.append(Variant(variant_name(strategy, k), k=k))
    for group in groups:
        if not any(in_layer_group(n, group) for n in region):
            raise UserError(f"--layers {group[0]}-{group[1]}: no tensor of region "
                            f"{cfg.region!r} lies in these layers")
        variants.append(Variant(f"layers{_group_text(group)}", group=group))

    removed = clean_stale_temps(out)
    if removed:
        log.info("removed %d unfinished folder(s) of an interrupted run", len(removed))
    pending, skipped = [], []
    for v in variants:
        final = out / v.name
        if final.exists():
            marker = final / CONFIG_FILE
            done = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
            if done == _fingerprint(cfg, base_model, tuned_model, v) and not cfg.overwrite:
                skipped.append(v.name)
                continue
            if not cfg.overwrite:
                raise UserError(f"{final} exists from a different restore run; pass --overwrite "
                                "or choose another --out")
        pending.append(v)
    if skipped:
        log.info("already complete, skipped: %s", ", ".join(skipped))
    result = RestoreResult({v.name: out / v.name for v in variants}, skipped, {}, [])
    if pending:
        _check_disk(out, len(pending) * tuned.total_bytes + (1 << 20) * len(pending))
        _run(cfg, base, tuned, base_model, tuned_model, region, region_set, starts, total,
             pending, out, result)
    if cfg.push_to and not result.warnings:
        from sftknow_eval import hub  # lazy: only pushing needs the Hub door

        for v in variants:
            repo = f"{cfg.push_to}-{v.name}"
            result.pushed[v.name] = hub.push_folder(
                out / v.name, repo, private=cfg.private,
                commit_message=f"sftknow-eval restore: {v.name}")
            log.info("pushed %s -> %s", v.name, result.pushed[v.name])
    base.close()
    tuned.close()
    return result


def _run(cfg: RestoreConfig, base: Checkpoint, tuned: Checkpoint, base_model: ResolvedModel,
         tuned_model: ResolvedModel, region: list[str], region_set: set[str],
         starts: dict[str, int], total: int, variants: list[Variant], out: Path,
         result: RestoreResult) -> None:
    selecting = [v for v in variants if v.k is not None]
    selection = Selection(region_set, starts, total, cfg.strategy, cfg.seed)
    workers, size = _workers(cfg.threads), cfg.chunk_elements
    # natural name order in every pass: region tensors then come in global element order,
    # which the tie-break (lower global index first) relies on
    order = sorted(tuned.tensors, key=natural_key)
    pair = CheckpointPair(base, tuned)
    floats = pieces(tuned, order, selection, size, True)
    scanned = scan(pair, floats, selection, bool(selecting), workers, size, cfg.progress)
    if sum(scanned.sum_r.values()) == 0:
        what = "identical" if not scanned.changed_outside else "identical inside the region"
        base.close()
        tuned.close()
        raise UserError(f"the fine-tuned model {cfg.tuned} and the base model {cfg.base} are "
                        f"{what} (region {cfg.region!r}): nothing to restore, no variant written")
    if selecting:
        thresholds = topk.threshold_bins(
            scanned.hist, [topk.count_to_select(total, v.k) for v in selecting])
        scanned.hist = None
        cuts = exact_cuts(pair, floats, selection, thresholds, workers, size, cfg.progress)
        for v, cut in zip(selecting, cuts, strict=True):
            v.cut, v.threshold_r = cut, topk.key_to_r(cut.key, cfg.strategy)
    layout = tuned.output_layout()
    for v in variants:
        v.stats = VariantStats({n: TensorStats(tuned.tensors[n].numel, scanned.sum_r[n])
                                for n in region})
        v.folder = new_temp_folder(out, v.name)
        v.writer = ShardedWriter(v.folder, layout, tuned.tensors, tuned.metadata)
    try:
        write_variants(pair, pieces(tuned, order, selection, size, False), selection, variants,
                       workers, size, cfg.progress)
    except BaseException:
        for v in variants:
            if v.writer is not None:
                with contextlib.suppress(OSError):  # the first error is the one to report
                    v.writer.close()
        raise
    finally:
        base.close()
        tuned.close()
    for v in variants:
        for name in region if v.group is not None else ():
            if in_layer_group(name, v.group):
                v.stats.add(name, tuned.tensors[name].numel, scanned.sum_r[name])
    _finish(cfg, base_model, tuned_model, tuned, variants, total, out)


def _workers(threads: int) -> int:
    """0 means one worker per core, at most 2 (the passes are memory-bound beyond that)."""
    if threads > 0:
        return threads
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def _finish(cfg: RestoreConfig, base_model: ResolvedModel, tuned_model: ResolvedModel,
            tuned: Checkpoint, variants: list[Variant], total: int, out: Path) -> None:
    """Index, config and tokenizer files, statistics, card and run record; then the rename."""
    versions = library_versions()
    for v in variants:
        v.writer.close()
        v.writer.write_index(tuned.sharded_index)
        copy_aux_files(tuned.folder, v.folder)
        settings = _settings(cfg, v)
        summary = v.stats.summary(strategy=settings["strategy"], threshold_r=v.threshold_r)
        run_record = {
            "fingerprint": _fingerprint(cfg, base_model, tuned_model, v),
            "config": {k: (str(val) if isinstance(val, Path) else val)
                       for k, val in asdict(cfg).items()},
            "command": sys.argv,
            "versions": versions,
        }
        header = {"variant": v.name, **settings,
                  "base": {"source": base_model.source, "revision": base_model.revision},
                  "tuned": {"source": tuned_model.source, "revision": tuned_model.revision},
                  "run": run_record}
        write_stats(v.folder, header, v.stats, summary)
        build_card(variant=v.name, base=header["base"], tuned=header["tuned"],
                   settings=settings, summary=summary).save(v.folder / "README.md")
        (v.folder / CONFIG_FILE).write_text(json.dumps(run_record, indent=2) + "\n")
        commit_folder(v.folder, out / v.name)
        log.info("%s: restored %d of %d region elements -> %s", v.name, v.stats.restored, total,
                 out / v.name)
