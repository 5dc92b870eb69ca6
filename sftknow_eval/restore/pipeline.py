"""The restore engine without the CLI: ``restore(RestoreConfig(base=..., tuned=..., out=...))``.
Around the passes (``passes``): checks, resuming, statistics, cards, atomic rename, Hub push.
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

from sftknow_eval.atomic import atomic_folder
from sftknow_eval.errors import UserError
from sftknow_eval.restore import passes
from sftknow_eval.restore.card import build_card
from sftknow_eval.restore.passes import Streams, Variant
from sftknow_eval.restore.stats import TensorStats, VariantStats, write_stats
from sftknow_eval.versions import library_versions
from sftknow_eval.weights import regions, topk
from sftknow_eval.weights.checkpoint import Checkpoint, ResolvedModel, preflight, resolve_model
from sftknow_eval.weights.writer import ShardedWriter, copy_aux_files

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


@dataclass
class _Job:
    """One run's checked inputs: both models, opened and preflighted (in ``streams``), and the
    region's element count."""

    cfg: RestoreConfig
    base_model: ResolvedModel
    tuned_model: ResolvedModel
    streams: Streams
    total: int


def variant_name(strategy: str, k: float) -> str:
    return f"{strategy}{k:g}"


def _group_text(group: tuple[int, int]) -> str:
    return str(group[0]) if group[0] == group[1] else f"{group[0]}-{group[1]}"


def _settings(cfg: RestoreConfig, variant: Variant) -> dict[str, object]:
    return {"region": cfg.region, "strategy": "layers" if variant.group else cfg.strategy,
            "k": variant.k, "seed": cfg.seed if cfg.strategy == "random" else None,
            "layers": _group_text(variant.group) if variant.group else None}


def _fingerprint(job: _Job, variant: Variant) -> dict[str, object]:
    return {"base": {"source": job.base_model.source, "revision": job.base_model.revision},
            "tuned": {"source": job.tuned_model.source, "revision": job.tuned_model.revision},
            **_settings(job.cfg, variant), "chunk_independent": True}


def restore(cfg: RestoreConfig) -> RestoreResult:
    """Run a restoration end to end (see the module docstring); returns where the variants went.
    Restore never imports torch for safetensors checkpoints."""
    variants = _check_config(cfg)
    if cfg.push_to:  # every variant's repo id, token and empty repo, before any work
        from sftknow_eval import hub

        for v in variants:
            hub.check_push_target(f"{cfg.push_to}-{v.name}")
    job = _open(cfg, variants)
    try:
        out = Path(cfg.out)
        pending = _pending(job, variants, out)
        skipped = [v.name for v in variants if v not in pending]
        if skipped:
            log.info("already complete, skipped: %s", ", ".join(skipped))
        if pending:
            size = sum(info.nbytes for info in job.streams.tuned.tensors.values())
            _check_disk(out, len(pending) * (size + (1 << 20)))
            _run(job, pending, out)
        result = RestoreResult({v.name: out / v.name for v in variants}, skipped, {})
    finally:
        job.streams.base.close()
        job.streams.tuned.close()
    if cfg.push_to:
        from sftknow_eval import hub  # lazy: only pushing needs the Hub door

        for v in variants:
            result.pushed[v.name] = hub.push_folder(
                out / v.name, f"{cfg.push_to}-{v.name}", private=cfg.private,
                commit_message=f"sftknow-eval restore: {v.name}")
            log.info("pushed %s -> %s", v.name, result.pushed[v.name])
    return result


def _check_config(cfg: RestoreConfig) -> list[Variant]:
    """The flags checked before any model is read; the variants they ask for."""
    if cfg.strategy not in topk.STRATEGIES:
        raise UserError(f"--strategy {cfg.strategy!r}: use one of {', '.join(topk.STRATEGIES)}")
    if cfg.threads < 0:
        raise UserError(f"--threads {cfg.threads}: use 0 (one per core, at most 2) or a "
                        "positive number of worker threads")
    if not 0 < cfg.chunk_elements < 2**31:  # candidates keep chunk positions in 32 bits
        raise UserError(f"--chunk-elements {cfg.chunk_elements}: use 1 to {2**31 - 1}")
    if cfg.layers and cfg.k:
        raise UserError("--layers restores whole layer groups; do not combine it with --k")
    regions.region_pattern(cfg.region)
    if cfg.layers:
        groups = regions.parse_layer_groups(cfg.layers)
        return [Variant(f"layers{_group_text(g)}", group=g) for g in groups]
    ks = dict.fromkeys(topk.validate_k(float(k)) for k in (cfg.k or DEFAULT_K))
    return [Variant(variant_name(cfg.strategy, k), k=k) for k in ks]


def _open(cfg: RestoreConfig, variants: list[Variant]) -> _Job:
    """Both models resolved, opened and preflighted; the region in global element order; each
    variant checked against it."""
    base_model = resolve_model(cfg.base, cfg.base_revision)
    tuned_model = resolve_model(cfg.tuned, cfg.tuned_revision)
    base = Checkpoint.open(base_model.path, allow_pickle=cfg.allow_pickle)
    tuned = Checkpoint.open(tuned_model.path, allow_pickle=cfg.allow_pickle)
    preflight(base, tuned)
    floats = {n for n, i in tuned.tensors.items() if i.is_float}
    region = regions.select_region(tuned.tensors, cfg.region, floats)
    if not region:
        raise UserError(f"--region {cfg.region!r} matches no floating-point tensor of {cfg.tuned}")
    starts, total = {}, 0
    for name in region:
        starts[name] = total
        total += tuned.tensors[name].numel
    for v in variants:
        if v.k is not None and topk.count_to_select(total, v.k) == 0:
            raise UserError(f"--k {v.k:g}: {v.k:g}% of the region's {total} elements is less "
                            "than one")
        if v.group is not None and not any(regions.in_layer_group(n, v.group) for n in region):
            raise UserError(f"--layers {_group_text(v.group)}: no tensor of region "
                            f"{cfg.region!r} lies in these layers")
    streams = Streams(base, tuned, starts, cfg.strategy, cfg.seed, _workers(cfg.threads),
                      cfg.chunk_elements, cfg.progress)
    return _Job(cfg, base_model, tuned_model, streams, total)


def _pending(job: _Job, variants: list[Variant], out: Path) -> list[Variant]:
    """The variants to make: not finished by an earlier run with the same fingerprint."""
    pending = []
    for v in variants:
        final = out / v.name
        if final.exists() and not job.cfg.overwrite:
            marker = final / CONFIG_FILE
            done = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
            if done == _fingerprint(job, v):
                continue
            raise UserError(f"{final} exists from a different restore run; pass --overwrite or "
                            "choose another --out")
        pending.append(v)
    return pending


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    if need > free:
        raise UserError(f"{out}: not enough disk space: the outputs need {need / 2**30:.2f} GiB "
                        f"and {free / 2**30:.2f} GiB are free")


def _run(job: _Job, variants: list[Variant], out: Path) -> None:
    """The passes (``passes``), then each variant's files and the rename into place."""
    cfg, streams, tuned = job.cfg, job.streams, job.streams.tuned
    selecting = [v for v in variants if v.k is not None]
    floats = streams.pieces(floats_only=True)
    sum_r, hist = passes.scan(streams, floats)
    if sum(sum_r.values()) == 0:
        raise UserError(f"the fine-tuned model {cfg.tuned} and the base model {cfg.base} are "
                        f"identical in region {cfg.region!r}: nothing to restore, no variant written")
    if selecting:
        thresholds = topk.threshold_bins(
            hist, [topk.count_to_select(job.total, v.k) for v in selecting])
        for v, cut in zip(selecting, passes.exact_cuts(streams, floats, thresholds), strict=True):
            v.cut = cut
    with contextlib.ExitStack() as folders:  # each renamed into place once all are done
        for v in variants:
            v.stats = VariantStats({n: TensorStats(tuned.tensors[n].numel, sum_r[n])
                                    for n in streams.starts})
            v.folder = folders.enter_context(atomic_folder(out / v.name))
            v.writer = ShardedWriter(v.folder, tuned.output_layout(), tuned.tensors,
                                     tuned.metadata)
        try:
            passes.write_variants(streams, streams.pieces(floats_only=False), variants)
        except BaseException:
            for v in variants:
                with contextlib.suppress(OSError):  # the first error is the one to report
                    v.writer.close()
            raise
        for v in variants:
            v.writer.close()
        for v in (v for v in variants if v.group is not None):
            for name in (n for n in streams.starts if regions.in_layer_group(n, v.group)):
                v.stats.add(name, tuned.tensors[name].numel, sum_r[name])
        _finish(job, variants, out)


def _workers(threads: int) -> int:
    """0 means one worker per core, at most 2 (the passes are memory-bound beyond that)."""
    if threads > 0:
        return threads
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def _finish(job: _Job, variants: list[Variant], out: Path) -> None:
    """Index, config and tokenizer files, statistics, card and run record."""
    cfg, versions = job.cfg, library_versions()
    config = {k: (str(val) if isinstance(val, Path) else val) for k, val in asdict(cfg).items()}
    for v in variants:
        v.writer.write_index(job.streams.tuned.sharded_index)
        copy_aux_files(job.streams.tuned.folder, v.folder)
        settings = _settings(cfg, v)
        threshold_r = topk.key_to_r(v.cut.key, cfg.strategy) if v.cut else None
        summary = v.stats.summary(strategy=settings["strategy"], threshold_r=threshold_r)
        fingerprint = _fingerprint(job, v)
        run_record = {"fingerprint": fingerprint, "config": config, "command": sys.argv,
                      "versions": versions}
        header = {"variant": v.name, **settings, "base": fingerprint["base"],
                  "tuned": fingerprint["tuned"], "run": run_record}
        write_stats(v.folder, header, v.stats, summary)
        build_card(variant=v.name, base=header["base"], tuned=header["tuned"],
                   settings=settings, summary=summary).save(v.folder / "README.md")
        (v.folder / CONFIG_FILE).write_text(json.dumps(run_record, indent=2) + "\n")
        log.info("%s: restored %d of %d region elements -> %s", v.name, v.stats.restored,
                 job.total, out / v.name)
