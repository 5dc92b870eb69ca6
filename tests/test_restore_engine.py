"""Restore: exact streaming selection vs a brute-force sort, regions, strategies, layer groups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_restore_kernels import score_keys

from sftknow_eval.restore import RestoreConfig, restore
from sftknow_eval.weights import topk as selector
from sftknow_eval.weights.regions import natural_key, select_region

LAYER_MATS = {
    "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
    "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8),
    "mlp.gate_proj.weight": (12, 8), "mlp.up_proj.weight": (12, 8),
    "mlp.down_proj.weight": (8, 12),
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(var, "1")


def make_pair(rng: np.random.Generator, *, layers: int = 3, dtype=torch.float32,
              ties: bool = False, zeros: bool = False, unchanged: float = 0.0):
    """Raw Llama-layout state dicts (base, tuned) with optional ties, zeros and unchanged parts."""
    base, tuned = {}, {}
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
              "lm_head.weight": (16, 8)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (8,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (8,)
        for mat, shape in LAYER_MATS.items():
            shapes[f"model.layers.{i}.{mat}"] = shape
    for name, shape in shapes.items():
        b = rng.normal(0, 0.05, size=shape)
        if zeros:
            b[rng.random(shape) < 0.2] = 0.0
        if ties:
            b = np.round(b * 20) / 20  # few distinct values
            delta = rng.choice([-0.05, 0.0, 0.05, 0.1], size=shape)
        else:
            delta = rng.normal(0, 0.01, size=shape) * (rng.random(shape) < 0.5)
            delta += rng.normal(0, 0.2, size=shape) * (rng.random(shape) < 0.05)
        if unchanged:
            delta[rng.random(shape) < unchanged] = 0.0
        base[name] = torch.tensor(b, dtype=torch.float32).to(dtype)
        tuned[name] = torch.tensor(b + delta, dtype=torch.float32).to(dtype)
    return base, tuned


def save_model(folder: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state, key=natural_key)
    if shards == 1:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        parts = np.array_split(np.arange(len(names)), shards)
        for i, part in enumerate(parts):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({names[j]: state[names[j]] for j in part}, folder / file,
                      metadata={"format": "pt"})
            weight_map.update({names[j]: file for j in part})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).clone()
    return out


def expected(base, tuned, region_names, k, strategy, seed=0):
    """Brute force: one flat r over the region, a full stable sort, restore the first n."""
    flat_r = torch.cat([
        ((tuned[n].float() - base[n].float()).abs() / (base[n].float().abs() + 1e-8)).reshape(-1)
        for n in region_names])
    n = selector.count_to_select(flat_r.numel(), k)
    if strategy == "top":
        order = torch.sort(flat_r, descending=True, stable=True).indices[:n]
    elif strategy == "bottom":
        order = torch.sort(flat_r, stable=True).indices[:n]
    else:
        keys = score_keys(flat_r, "random", 0, seed).numpy().astype(np.int64)
        order = torch.from_numpy(np.lexsort((np.arange(keys.size), -keys))[:n])
    mask = torch.zeros(flat_r.numel(), dtype=torch.bool)
    mask[order] = True
    result = {name: t.clone() for name, t in tuned.items()}
    offset = 0
    for name in region_names:
        size = tuned[name].numel()
        m = mask[offset:offset + size].reshape(tuned[name].shape)
        result[name] = torch.where(m, base[name], tuned[name])
        offset += size
    return result, int(mask.sum())


def run(tmp_path, base, tuned, *, shards=1, chunk=1 << 22, **kw):
    b = save_model(tmp_path / "base", base, shards)
    t = save_model(tmp_path / "tuned", tuned, shards)
    cfg = RestoreConfig(base=str(b), tuned=str(t), out=tmp_path / "out", progress=False,
                        chunk_elements=chunk, **kw)
    return restore(cfg)


@pytest.mark.parametrize("case", range(24))
def test_exact_against_full_sort(tmp_path, case):
    rng = np.random.default_rng(case)
    dtype = [torch.float32, torch.bfloat16, torch.float16][case % 3]
    strategy = ["top", "bottom", "random"][(case // 3) % 3]
    base, tuned = make_pair(rng, layers=2, dtype=dtype, ties=case % 4 == 0,
                            zeros=case % 5 == 0, unchanged=0.6 if case % 6 == 0 else 0.0)
    ks = [0.5, 1, 20, 99.9] if case % 2 else [3, 50]
    region = ["transformer", "attention", "mlp", "all"][case % 4]
    result = run(tmp_path, base, tuned, k=ks, strategy=strategy, region=region, seed=case,
                 shards=1 + case % 3, chunk=[1 << 22, 37, 64][case % 3])
    floats = set(tuned)
    names = select_region(tuned, region, floats)
    for k in ks:
        folder = result.folders[f"{strategy}{k:g}"]
        got = load_dir(folder)
        want, count = expected(base, tuned, names, k, strategy, seed=case)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == tuned[name].dtype
            assert torch.equal(got[name], want[name]), (k, name)
        stats = json.loads((folder / "restore_stats.json").read_text())
        assert stats["restored_elements"] == count


@pytest.mark.parametrize("case", range(18))
def test_exact_with_many_ks_chunks_and_workers(tmp_path, case):
    """Many k's at once, over chunk sizes and worker counts (ties decided in the write pass)."""
    rng = np.random.default_rng(100 + case)
    dtype = [torch.bfloat16, torch.float16, torch.float32][case % 3]
    strategy = ["top", "bottom", "random"][(case // 3) % 3]
    base, tuned = make_pair(rng, layers=3, dtype=dtype, ties=case % 2 == 0,
                            zeros=case % 4 == 1, unchanged=0.5 if case % 5 == 0 else 0.0)
    ks = [0.5, 1, 5, 20, 50, 99.9]
    region = ["transformer", "all", "mlp"][case % 3]
    result = run(tmp_path, base, tuned, k=ks, strategy=strategy, region=region, seed=case,
                 shards=1 + case % 3, chunk=[1 << 22, 37, 64, 5][case % 4],
                 threads=[1, 2, 3, 2][case % 4])
    names = select_region(tuned, region, set(tuned))
    for k in ks:
        folder = result.folders[f"{strategy}{k:g}"]
        got = load_dir(folder)
        want, count = expected(base, tuned, names, k, strategy, seed=case)
        for name in want:
            assert torch.equal(got[name], want[name]), (k, name)
        stats = json.loads((folder / "restore_stats.json").read_text())
        assert stats["restored_elements"] == count


def _weights_and_stats(folder: Path) -> tuple[dict[str, bytes], dict]:
    weights = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    stats = json.loads((folder / "restore_stats.json").read_text())
    stats.pop("run")  # holds the config, which names the thread count
    return weights, stats


@pytest.mark.parametrize("case", range(6))
def test_outputs_do_not_depend_on_worker_threads(tmp_path, case):
    """Byte-identical weights and identical statistics (sums included) for 1, 2 and 3 workers."""
    rng = np.random.default_rng(300 + case)
    dtype = [torch.bfloat16, torch.float16, torch.float32][case % 3]
    strategy = ["top", "bottom", "random"][case % 3]
    base, tuned = make_pair(rng, layers=3, dtype=dtype, ties=case % 2 == 0)
    b = save_model(tmp_path / "base", base, shards=2)
    t = save_model(tmp_path / "tuned", tuned, shards=2)
    ks = [1, 5, 20]
    results = []
    for threads in (1, 2, 3):
        cfg = RestoreConfig(base=str(b), tuned=str(t), out=tmp_path / f"out{threads}", k=ks,
                            strategy=strategy, seed=case, progress=False, threads=threads,
                            chunk_elements=[7, 64, 1000][case % 3])
        result = restore(cfg)
        results.append({name: _weights_and_stats(folder)
                        for name, folder in result.folders.items()})
    assert results[0] == results[1] == results[2]
    names = select_region(tuned, "transformer", set(tuned))
    for k in ks:
        got = load_dir(tmp_path / "out2" / f"{strategy}{k:g}")
        want, _ = expected(base, tuned, names, k, strategy, seed=case)
        for name in want:
            assert torch.equal(got[name], want[name]), (k, name)


def test_exact_cuts_from_bin_counts_match_a_full_sort():
    """Histogram, then exact counts in the threshold bins only: every n's cut key and tie
    allowance are those of a stable full sort, also where many keys tie at the cut."""
    rng = np.random.default_rng(5)
    keys = np.concatenate([rng.integers(0, 2**31, 5_000), rng.integers(2**30, 2**30 + 40, 20_000),
                           np.full(3_000, 2**20)]).astype(np.int64)
    rng.shuffle(keys)
    counts = [1, 17, 4_000, 12_000, 24_999, 27_000, keys.size]
    thresholds = selector.threshold_bins(
        np.bincount(keys >> selector.BIN_SHIFT, minlength=selector.NUM_BINS), counts)
    slots, bins = selector.slot_map(thresholds)
    fine = np.zeros((len(bins), selector.FINE), dtype=np.int64)
    for part in np.array_split(keys, 7):  # streamed in pieces
        selector.count_fine(part, slots, fine)
    order = np.lexsort((np.arange(keys.size), -keys))
    for n, cut in zip(counts, selector.exact_cuts(thresholds, fine, slots), strict=True):
        chosen = order[:n]
        assert cut.key == keys[chosen[-1]]
        assert cut.ties == int((keys[chosen] == cut.key).sum())
        assert cut.n == n
