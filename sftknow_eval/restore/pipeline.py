"""The restore engine: preflight, then two streaming passes that join reader, selector and writer.

Usable from Python without the CLI: ``restore(RestoreConfig(base=..., tuned=..., out=...))``.
Pass 1 reads every tensor once (NaN/Inf checks, per-tensor summed r, the key histogram and
the exact key counts of heavy bins); pass 2 reads them again and writes every requested variant
at once, deciding each element on the spot except the first few of each k's threshold bin,
which are recorded and patched in place once the exact threshold key is known (see
``selector``). Both passes visit tensors in natural name order (the global element order).
Memory: one chunk of ``chunk_elements`` elements in work buffers, one open shard per model, a
64 MB histogram, a 32 MB bin table and at most ~32 MB of exact key counts, and per k fewer than
``heavy_bin_elements`` plus one chunk of recorded candidates.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sftknow_eval.errors import UserError
from sftknow_eval.restore import selector
from sftknow_eval.restore.card import build_card
from sftknow_eval.restore.reader import Checkpoint, ResolvedModel, read_config, resolve_model
from sftknow_eval.restore.regions import (
    in_layer_group,
    natural_key,
    parse_layer_groups,
    region_pattern,
    select_region,
)
from sftknow_eval.restore.stats import TensorStats, VariantStats, write_stats
from sftknow_eval.restore.writer import (
    ShardedWriter,
    clean_stale_temps,
    commit_folder,
    copy_aux_files,
    new_temp_folder,
    raw_view,
)

log = logging.getLogger(__name__)

DEFAULT_K = (1.0, 3.0, 5.0, 10.0, 20.0)
CONFIG_FILE = "restore_config.json"
_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")


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
    threads: int = 1
    heavy_bin_elements: int | None = None  # None: max(2**18, region elements / 2**14)


@dataclass
class Variant:
    """One output model: a k of a strategy, or a whole layer group."""

    name: str
    k: float | None = None
    group: tuple[int, int] | None = None
    threshold: selector.Threshold | None = None
    stats: VariantStats = field(default_factory=VariantStats)
    folder: Path | None = None
    writer: ShardedWriter | None = None
    candidates: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = (
        field(default_factory=list))
    early_left: int = 0  # threshold-bin elements still to record before the cut is known
    late_counts: np.ndarray | None = None  # exact-key counts of the bin's later elements
    bin_total: int = 0
    cut: int | None = None  # the exact threshold key, once known
    ties_left: int = 0  # elements with key == cut still to take (first ones in global order)
    threshold_r: float | None = None


@dataclass
class RestoreResult:
    """What a run produced: variant name -> folder, plus the ones skipped as already complete."""

    folders: dict[str, Path]
    skipped: list[str]
    pushed: dict[str, str]
    warnings: list[str]


def variant_name(strategy: str, k: float) -> str:
    return f"{strategy}{k:g}"


def _versions() -> dict[str, str]:
    import huggingface_hub
    import safetensors
    import transformers

    from sftknow_eval import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__, "numpy": np.__version__,
            "sftknow_eval": __version__}


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


def preflight(base: Checkpoint, tuned: Checkpoint) -> None:
    """Same architecture, tensor names, shapes and dtypes; the error names the first mismatch."""
    cb, ct = read_config(base.folder), read_config(tuned.folder)
    for key in _ARCH_KEYS:
        if key in cb and key in ct and cb[key] != ct[key]:
            raise UserError(f"architectures differ: config.json {key} is {cb[key]!r} in the base "
                            f"model and {ct[key]!r} in the fine-tuned model")
    names = sorted(set(base.tensors) | set(tuned.tensors), key=natural_key)
    for name in names:
        if name not in base.tensors:
            raise UserError(f"tensor {name} is in the fine-tuned model but missing from the base")
        if name not in tuned.tensors:
            raise UserError(f"tensor {name} is in the base model but missing from the fine-tuned")
        b, t = base.tensors[name], tuned.tensors[name]
        if b.shape != t.shape:
            raise UserError(f"tensor {name}: shape {list(b.shape)} in the base model but "
                            f"{list(t.shape)} in the fine-tuned model")
        if b.dtype != t.dtype:
            raise UserError(f"tensor {name}: dtype {b.dtype} in the base model but {t.dtype} in "
                            "the fine-tuned model")


def _check_disk(out: Path, need: int) -> None:
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"{out}: not enough disk space: the outputs need {need / 2**30:.2f} GiB "
                        f"and {free / 2**30:.2f} GiB are free")


class _Buffers:
    """Reusable work buffers for one chunk (fresh large allocations page-fault on every call)."""

    def __init__(self, size: int):
        self.size = size
        self.r = torch.empty(size, dtype=torch.float32)
        self.scratch = torch.empty(size, dtype=torch.float32)
        self.keys = torch.empty(size, dtype=torch.int32)
        self.bins = torch.empty(size, dtype=torch.int32)
        self.slots = torch.empty(size, dtype=torch.int32)
        self.low = torch.empty(size, dtype=torch.int32)
        self.mask = torch.empty(size, dtype=torch.bool)
        self.cand = torch.empty(size, dtype=torch.bool)
        # float64 counts are exact below 2**53 and index_add_ is fastest on floating types
        self.ones = torch.ones(size, dtype=torch.float64)
        self._out: dict[torch.dtype, torch.Tensor] = {}

    def out(self, dtype: torch.dtype, n: int) -> torch.Tensor:
        if dtype not in self._out:
            self._out[dtype] = torch.empty(self.size, dtype=dtype)
        return self._out[dtype][:n]


def _chunks(numel: int, size: int):
    for start in range(0, numel, size):
        yield start, min(numel, start + size)


def _nonfinite_error(name: str, base: torch.Tensor, tuned: torch.Tensor) -> UserError:
    which = [label for label, t in (("base", base), ("fine-tuned", tuned))
             if not bool(torch.isfinite(t.float()).all())]
    where = " and ".join(which) if which else "neither (the difference overflows float32)"
    return UserError(f"tensor {name}: NaN or Inf values in the {where} model")


def restore(cfg: RestoreConfig) -> RestoreResult:
    """Run a restoration end to end (see the module docstring); returns where the variants went.

    Torch runs with ``cfg.threads`` threads (default 1) for the duration: the per-chunk work is
    memory-bound, and on a busy machine OpenMP's barriers made two threads 15x slower than one.
    """
    _pin_malloc_mmap_threshold()
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _restore(cfg)
    finally:
        torch.set_num_threads(previous)


def _pin_malloc_mmap_threshold() -> None:
    """glibc only, best effort: serve every allocation above 256 KiB by its own mmap.

    By default glibc raises that threshold each time a large block is freed, after which the
    per-chunk temporaries (megabytes each, thousands of chunks) come from the heap, fragment
    it, and the process keeps gigabytes it no longer uses: peak RSS then grew with the model.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 256 << 10)  # M_MMAP_THRESHOLD (also turns off its dynamic raising)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return


def _restore(cfg: RestoreConfig) -> RestoreResult:
    strategy = cfg.strategy
    if strategy not in selector.STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: use one of {', '.join(selector.STRATEGIES)}")
    if cfg.layers and cfg.k:
        raise UserError("--layers restores whole layer groups; do not combine it with --k")
    ks = [] if cfg.layers else [selector.validate_k(float(k)) for k in (cfg.k or DEFAULT_K)]
    groups = parse_layer_groups(cfg.layers) if cfg.layers else []
    region_pattern(cfg.region)
    out = Path(cfg.out)

    base_model = resolve_model(cfg.base, cfg.base_revision)
    tuned_model = resolve_model(cfg.tuned, cfg.tuned_revision)
    base = Checkpoint.open(base_model.path, allow_pickle=cfg.allow_pickle)
    tuned = Checkpoint.open(tuned_model.path, allow_pickle=cfg.allow_pickle)
    preflight(base, tuned)

    floats = {n for n, i in tuned.tensors.items() if i.dtype.is_floating_point}
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
        n = selector.count_to_select(total, k)
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
    strategy = cfg.strategy
    buffers = _Buffers(cfg.chunk_elements)
    selecting = [v for v in variants if v.k is not None]
    tensor_stats = {name: TensorStats(tuned.tensors[name].numel) for name in region}
    # natural name order in both passes: region tensors then come in global element order,
    # which the tie-break (lower global index first) and the early/late split rely on
    order = sorted(tuned.tensors, key=natural_key)

    # ---- pass 1: checks, summed r, key histogram -------------------------------------------
    hist = torch.zeros(selector.NUM_BINS, dtype=torch.float64) if selecting else None
    ties = selector.TieCounts(total, cfg.heavy_bin_elements) if selecting else None
    any_change = False
    for name in tqdm(order, desc="restore pass 1/2", unit="tensor", disable=not cfg.progress):
        info = tuned.tensors[name]
        if not info.dtype.is_floating_point:
            continue
        b_flat, t_flat = base.tensor(name).reshape(-1), tuned.tensor(name).reshape(-1)
        for a, e in _chunks(info.numel, buffers.size):
            bc, tc = b_flat[a:e], t_flat[a:e]
            r = selector.relative_change(bc, tc, buffers.r, buffers.scratch)
            s = float(r.sum())  # float32 with torch's cascade summation; totals in Python floats
            if not np.isfinite(s):
                raise _nonfinite_error(name, b_flat, t_flat)
            if name not in region_set:
                any_change = any_change or s > 0
                continue
            tensor_stats[name].sum_r += s
            if hist is not None:
                keys = selector.score_keys(r, strategy, starts[name] + a, cfg.seed, buffers.keys)
                bins = torch.bitwise_right_shift(keys, selector.BIN_SHIFT, out=buffers.bins[:e - a])
                hist.index_add_(0, bins, buffers.ones[:e - a])
                ties.add(hist, bins, keys, buffers.ones, buffers.slots, buffers.low)
    region_sum = sum(t.sum_r for t in tensor_stats.values())
    if region_sum == 0:
        what = "identical" if not any_change else "identical inside the region"
        message = (f"the fine-tuned and base models are {what} ({cfg.region!r}): nothing to "
                   "restore; no variant written")
        log.warning(message)
        result.warnings.append(message)
        result.folders.clear()
        return
    thresholds = selector.threshold_bins(hist, [selector.count_to_select(total, v.k)
                                                for v in selecting]) if hist is not None else []
    for v, th in zip(selecting, thresholds, strict=True):
        v.threshold = th
        v.bin_total = int(hist[th.bin])
        v.early_left, v.late_counts = ties.of_bin(th.bin, v.bin_total)
    del hist, ties

    # ---- pass 2: write every variant -----------------------------------------------------
    layout = tuned.output_layout()
    for v in variants:
        v.stats = VariantStats({n: TensorStats(s.numel, s.sum_r) for n, s in tensor_stats.items()})
        v.folder = new_temp_folder(out, v.name)
        v.writer = ShardedWriter(v.folder, layout, tuned.tensors, tuned.metadata)
    try:
        for name in tqdm(order, desc="restore pass 2/2", unit="tensor", disable=not cfg.progress):
            info = tuned.tensors[name]
            b_flat, t_flat = base.tensor(name).reshape(-1), tuned.tensor(name).reshape(-1)
            if name not in region_set:
                for a, e in _chunks(info.numel, buffers.size):
                    for v in variants:
                        v.writer.write(name, a, t_flat[a:e])
                continue
            for a, e in _chunks(info.numel, buffers.size):
                m = e - a
                bc, tc = b_flat[a:e], t_flat[a:e]
                r = selector.relative_change(bc, tc, buffers.r, buffers.scratch)
                keys = bins = None
                if selecting:
                    keys = selector.score_keys(r, strategy, starts[name] + a, cfg.seed,
                                               buffers.keys)
                    if any(v.cut is None for v in selecting):
                        bins = torch.bitwise_right_shift(keys, selector.BIN_SHIFT,
                                                         out=buffers.bins[:m])
                for v in variants:
                    if v.group is not None:
                        if in_layer_group(name, v.group):
                            v.writer.write(name, a, bc)
                            v.stats.add(name, m, float(r.sum()))
                        else:
                            v.writer.write(name, a, tc)
                        continue
                    _select_chunk(v, name, a, m, bc, tc, r, keys, bins, strategy, buffers)
        for v in selecting:
            if v.cut is None or v.ties_left:
                raise AssertionError(f"{v.name}: pass 2 did not meet the elements pass 1 counted")
    except BaseException:
        for v in variants:
            if v.writer is not None:
                v.writer.close()
        raise
    finally:
        base.close()
        tuned.close()

    versions = _versions()
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


def _select_chunk(v: Variant, name: str, a: int, m: int, bc: torch.Tensor, tc: torch.Tensor,
                  r: torch.Tensor, keys: torch.Tensor, bins: torch.Tensor | None, strategy: str,
                  buffers: _Buffers) -> None:
    """Write one chunk of one k's variant; until the cut is known, record threshold-bin elements."""
    th = v.threshold
    if v.cut is None:
        pos = torch.nonzero(torch.eq(bins, th.bin, out=buffers.cand[:m])).reshape(-1)
        if pos.numel() < v.early_left:  # every threshold-bin element here is an early one
            sure = torch.ge(keys, th.lo_key_sure, out=buffers.mask[:m])
            _write_selected(v, name, a, m, bc, tc, r, sure, buffers)
            v.early_left -= pos.numel()
            if pos.numel():
                # compact records: local position, int32 key, float32 r, raw base value
                local = (pos + a).numpy()
                local = local.astype(np.int32) if local[-1] < 2**31 else local
                v.candidates.append((name, local, keys[pos].numpy().copy(),
                                     r[pos].numpy().copy(), raw_view(bc[pos]).copy()))
            return
        _resolve(v, keys[pos[:v.early_left]].numpy(), strategy)
    sel = torch.gt(keys, v.cut, out=buffers.mask[:m])
    if v.ties_left:
        tied = torch.nonzero(torch.eq(keys, v.cut, out=buffers.cand[:m])).reshape(-1)
        tied = tied[:v.ties_left]
        sel[tied] = True
        v.ties_left -= tied.numel()
    _write_selected(v, name, a, m, bc, tc, r, sel, buffers)


def _write_selected(v: Variant, name: str, a: int, m: int, bc: torch.Tensor, tc: torch.Tensor,
                    r: torch.Tensor, sel: torch.Tensor, buffers: _Buffers) -> None:
    out = torch.where(sel, bc, tc, out=buffers.out(tc.dtype, m))
    v.writer.write(name, a, out)
    # no temporaries here (sum of a bool, or float times bool, would allocate one per chunk)
    count = int(torch.count_nonzero(sel))
    if count:
        as_float = buffers.scratch[:m].copy_(sel)
        v.stats.add(name, count, float(torch.dot(r, as_float)))


def _resolve(v: Variant, early_here: np.ndarray, strategy: str) -> None:
    """All early elements seen: fix the exact threshold key, patch the recorded candidates."""
    th = v.threshold
    stored = (np.concatenate([c[2] for c in v.candidates]) if v.candidates
              else np.zeros(0, dtype=np.int32))
    counts = v.late_counts.copy()
    counts += np.bincount(stored & (selector.FINE - 1), minlength=selector.FINE)
    counts += np.bincount(early_here & (selector.FINE - 1), minlength=selector.FINE)
    if int(counts.sum()) != v.bin_total:
        raise AssertionError(f"{v.name}: threshold bin holds {counts.sum():.0f} elements in pass "
                             f"2 but {v.bin_total} in pass 1")
    low, above_in_bin = selector.fine_cut(counts, th.take)
    v.cut = (th.bin << selector.BIN_SHIFT) | low
    v.threshold_r = selector.key_to_r(v.cut, strategy)
    m = th.take - above_in_bin
    tied = stored == v.cut
    chosen = (stored > v.cut) | (tied & (np.cumsum(tied) <= m))  # stored in global order
    v.ties_left = m - min(m, int(tied.sum()))
    offset = 0
    for name, local, _, r, raw in v.candidates:
        picks = np.flatnonzero(chosen[offset:offset + len(local)])
        offset += len(local)
        if len(picks):
            v.writer.patch(name, local[picks], raw[picks])
            v.stats.add(name, len(picks), float(r[picks].astype(np.float64).sum()))
    v.candidates.clear()
    v.late_counts = None
