"""Benchmark of ``sftknow-eval restore``: wall time and peak RSS against an in-memory baseline
and the I/O floor, on generated Llama-layout bf16 checkpoints (see README.md here).

    python benchmarks/restore/run.py               # ~2 GB per model, 500 MB shards
    python benchmarks/restore/run.py --size-gb 0.5 # quicker

Each contender runs in its own subprocess; its peak RSS is the child's ``ru_maxrss`` from
``os.wait4``, so peaks do not contaminate each other. Everything lives in a temp folder that is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000
MATS = {"self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.v_proj.weight": (HIDDEN, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)}
PIECE = 2 << 20  # the floor's write size: one of restore's 1 M-element chunks of bf16
REGION_RE = r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"


# ---------------------------------------------------------------- generation
def shapes_for(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        for mat, shape in MATS.items():
            shapes[f"model.layers.{i}.{mat}"] = shape
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def layers_for(size_gb: float) -> int:
    per_layer = sum(a * b for a, b in MATS.values()) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def generate(base_dir: Path, tuned_dir: Path, layers: int, shard_mb: int, seed: int) -> None:
    """Base: N(0, 0.02); tuned: base + dense N(0, 2e-4) + 1% sparse N(0, 2e-2), all in bf16."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
              "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "torch_dtype": "bfloat16"}
    shapes = shapes_for(layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_mb * 1e6:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for folder in (base_dir, tuned_dir):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        base, tuned = {}, {}
        for name in names:
            shape = shapes[name]
            if "norm" in name:
                b = torch.ones(shape)
                t = b + torch.randn(shape, generator=gen) * 1e-3
            else:
                b = torch.randn(shape, generator=gen).mul_(0.02)
                t = b + torch.randn(shape, generator=gen).mul_(2e-4)
                sparse = torch.rand(shape, generator=gen) < 0.01
                t += sparse * torch.randn(shape, generator=gen).mul_(2e-2)
                del sparse
            base[name], tuned[name] = b.bfloat16(), t.bfloat16()
            del b, t
            weight_map[name] = file
        save_file(base, base_dir / file, metadata={"format": "pt"})
        save_file(tuned, tuned_dir / file, metadata={"format": "pt"})
        del base, tuned
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())},
             "weight_map": weight_map}
    for folder in (base_dir, tuned_dir):
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ---------------------------------------------------------------- contenders (in children)
def baseline(base_dir: Path, tuned_dir: Path, out: Path, k: float) -> None:
    """The authors' style: both models whole in memory, one flat r, torch.topk, restore, save."""
    import re

    import torch
    from safetensors.torch import load_file, save_file

    def load(folder: Path) -> dict:
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
        return state

    base, tuned = load(base_dir), load(tuned_dir)
    names = [n for n in tuned if re.search(REGION_RE, n)]
    flat = torch.cat([((tuned[n].float() - base[n].float()).abs()
                       / (base[n].float().abs() + 1e-8)).reshape(-1) for n in names])
    count = int(flat.numel() * k / 100)
    top = torch.topk(flat, count, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[top] = True
    del flat, top
    offset = 0
    for n in names:
        size = tuned[n].numel()
        m = mask[offset:offset + size].reshape(tuned[n].shape)
        tuned[n] = torch.where(m, base[n], tuned[n])
        offset += size
    index = json.loads((tuned_dir / "model.safetensors.index.json").read_text())
    out.mkdir(parents=True)
    by_file: dict[str, dict] = {}
    for n, f in index["weight_map"].items():
        by_file.setdefault(f, {})[n] = tuned[n]
    for f, state in by_file.items():
        save_file(state, out / f, metadata={"format": "pt"})


def io_floor(base_dir: Path, tuned_dir: Path, out: Path, outputs: int = 1,
             lag_mb: int | None = None, reserve: bool = False) -> None:
    """Read both inputs once, write ``outputs`` outputs of the same size: no computation.

    ``lag_mb``: with the write-behind that restore's writer uses (each written range starts
    going to disk at once; ``lag_mb`` MB later the writer waits for it and drops it from the
    page cache), so the floor gets the same help; None: plain buffered writes. Each input block
    is written to every output in ``PIECE``-sized writes, as restore writes a chunk for every k
    (one 64 MB write per output would make each one wait for its own write-back).
    ``reserve``: each output's blocks are reserved first (``os.posix_fallocate``), as restore's
    writer does.
    """
    # standard library only: no torch import
    from sftknow_eval.weights.writer import WriteBehind

    folders = [out / f"o{i}" for i in range(outputs)]
    for folder in folders:
        folder.mkdir(parents=True)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for f in sorted(tuned_dir.glob("*.safetensors")):
        with open(base_dir / f.name, "rb", buffering=0) as b, open(f, "rb", buffering=0) as t:
            files = [open(folder / f.name, "wb", buffering=0) for folder in folders]  # noqa: SIM115
            if reserve:
                for o in files:
                    os.posix_fallocate(o.fileno(), 0, f.stat().st_size)
            behind = [WriteBehind(o.fileno(), lag_mb << 20) if lag_mb else None for o in files]
            try:
                while b.readinto(view):
                    pass
                offset = 0
                while n := t.readinto(view):
                    for start in range(0, n, PIECE):
                        piece = view[start:min(n, start + PIECE)]
                        for o, wb in zip(files, behind, strict=True):
                            o.write(piece)
                            if wb is not None:
                                wb.wrote(offset + start, len(piece))
                    offset += n
            finally:
                for o in files:
                    o.close()


def warm_up(folder: Path) -> None:
    """Restore a tiny bf16 pair once, so numba's cache holds every kernel restore uses (only
    the first run after an install compiles them) and no contender pays for compiling."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in MATS]
    base = {n: torch.randn(256, 256, generator=gen).to(torch.bfloat16) for n in names}
    base["model.embed_tokens.weight"] = torch.randn(64, 256, generator=gen).to(torch.bfloat16)
    tuned = {n: (t.float() + 1e-2 * torch.randn(t.shape, generator=gen)).to(torch.bfloat16)
             for n, t in base.items()}
    for sub, state in (("base", base), ("tuned", tuned)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        save_file(state, folder / sub / "model.safetensors", metadata={"format": "pt"})
    ours(folder / "base", folder / "tuned", folder / "out", "1,3,5,10,20")
    shutil.rmtree(folder, ignore_errors=True)


def ours(base_dir: Path, tuned_dir: Path, out: Path, ks: str) -> None:
    from sftknow_eval.cli import main

    code = main(["restore", "--base", str(base_dir), "--tuned", str(tuned_dir), "--k", ks,
                 "--out", str(out), "--no-progress"])
    if code:
        raise SystemExit(code)


# ---------------------------------------------------------------- driver
def measure(label: str, argv: list[str], out: Path, before=None, repeat: int = 1
            ) -> dict[str, float]:
    """Run one contender ``repeat`` times, each in a child (``before()`` first: the cache
    state); the fastest wall time and the largest peak RSS of the child itself."""
    runs = []
    for _ in range(repeat):
        if before is not None:
            before()
        runs.append(_measure_once(label, argv, out))
    fastest = min(runs, key=lambda r: r["wall_s"])
    result = {"wall_s": fastest["wall_s"], "exit_s": fastest["exit_s"],
              "peak_rss_gib": max(r["peak_rss_gib"] for r in runs)}
    if repeat > 1:
        result["walls_s"] = [round(r["wall_s"], 3) for r in runs]
    print(f"  {label:<34} {result['wall_s']:7.1f} s  {result['peak_rss_gib']:6.2f} GiB"
          + (f"  (runs: {', '.join(f'{w:.1f}' for w in result['walls_s'])})"
             if repeat > 1 else ""), flush=True)
    return result


def _measure_once(label: str, argv: list[str], out: Path) -> dict[str, float]:
    """Wall time until the child's outputs are on disk: the child's run plus an ``os.sync()``
    of whatever it left dirty, so that no contender looks faster by exiting with its output
    still in memory (plain writes leave all of it; write-behind at most its lag per file)."""
    os.sync()  # no write-back left over from the previous contender
    start = time.perf_counter()
    env = dict(os.environ)
    if label.startswith("baseline"):  # torch's own threads (one per core) for the baseline
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    else:  # restore's parallelism is its own worker threads; the floor has no maths
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    exited = time.perf_counter() - start
    os.sync()
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{label} failed with status {status}")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "exit_s": exited,
            "peak_rss_gib": usage.ru_maxrss / 2**20}  # KiB -> GiB


def warm(folder: Path) -> None:
    """Read a model's shards, so a contender finds them in the page cache."""
    for f in folder.glob("*.safetensors"):
        with open(f, "rb", buffering=0) as h:
            while h.read(64 << 20):
                pass


def evict(folder: Path) -> None:
    """Drop a model's shards from the page cache (they are clean), so they come from disk."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of each model")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--ks", default="1,3,5,10,20")
    parser.add_argument("--workdir", default=None, help="parent of the temp folder")
    parser.add_argument("--data", default=None,
                        help="keep the generated checkpoints in this folder and reuse them on "
                             "later runs (default: a temp folder deleted at the end)")
    parser.add_argument("--generate-only", action="store_true",
                        help="with --data: generate the checkpoints and stop")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="start every contender with its inputs out of the page cache (read "
                             "from disk, as for a model larger than memory) instead of cached")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every contender this many times; report the fastest wall "
                             "time and the largest peak RSS")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: run each contender at least once")
    if args.child:
        kind, *rest = args.child
        paths = [Path(p) for p in rest[:3]]
        if kind == "generate":
            generate(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]))
        elif kind == "baseline":
            baseline(*paths, float(rest[3]))
        elif kind == "floor":
            io_floor(*paths, int(rest[3]), int(rest[4]) or None, rest[5] == "reserve")
        elif kind == "warm_up":
            warm_up(Path(rest[0]))
        else:
            ours(*paths, rest[3])
        return

    keep = args.data is not None
    if keep:
        tmp = Path(args.data)
        tmp.mkdir(parents=True, exist_ok=True)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="restore-bench-", dir=args.workdir))
    try:
        layers = layers_for(args.size_gb)
        one_k = args.ks.split(",")[0] if "," in args.ks else args.ks
        one_k = "10" if "10" in args.ks.split(",") else one_k
        print(f"generating {layers}-layer pair (~{args.size_gb:g} GB each, {args.shard_mb} MB "
              f"shards) and a {2 * layers}-layer pair in {tmp}", flush=True)
        t0 = time.perf_counter()
        # generated in children: a parent with a large RSS would pass its peak on to every
        # later child (ru_maxrss survives fork + exec)
        for name, n_layers, seed in (("", layers, 0), ("2", 2 * layers, 1)):
            done = tmp / f"tuned{name}" / "model.safetensors.index.json"
            if keep and done.is_file():
                continue  # generated by an earlier run with --data (the index is written last)
            for stale in (tmp / f"base{name}", tmp / f"tuned{name}"):
                shutil.rmtree(stale, ignore_errors=True)
            subprocess.run([sys.executable, __file__, "--child", "generate", str(tmp / f"base{name}"),
                            str(tmp / f"tuned{name}"), str(n_layers), str(args.shard_mb), str(seed)],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"  generated in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.generate_only:
            return
        b, t, o = str(tmp / "base"), str(tmp / "tuned"), tmp / "out"
        subprocess.run([sys.executable, __file__, "--child", "warm_up", str(tmp / "warm")],
                       check=True, stdout=subprocess.DEVNULL)
        results: dict[str, dict[str, float]] = {}
        n_out = str(len(args.ks.split(",")))
        # I/O floors: plain writes, and write-behind with restore's 8 MB lag and longer ones
        # (128 MB suited one output, 64 MB several, into sparse files), into sparse files or,
        # as restore's writer does, files with their blocks reserved
        floors_1 = {"io_floor": ("0", "sparse"), "io_floor_streamed_16mb": ("16", "sparse"),
                    "io_floor_streamed_128mb": ("128", "sparse"),
                    "io_floor_reserved_8mb": ("8", "reserve"),
                    "io_floor_reserved_16mb": ("16", "reserve"),
                    "io_floor_reserved_128mb": ("128", "reserve")}
        floors_5 = {"io_floor_5_outputs": ("0", "sparse"),
                    "io_floor_5_outputs_streamed_16mb": ("16", "sparse"),
                    "io_floor_5_outputs_streamed_64mb": ("64", "sparse"),
                    "io_floor_5_outputs_reserved_8mb": ("8", "reserve"),
                    "io_floor_5_outputs_reserved_16mb": ("16", "reserve"),
                    "io_floor_5_outputs_reserved_64mb": ("64", "reserve")}
        contenders = [(label, ["--child", "floor", b, t, str(o), "1", *how], ("base", "tuned"))
                      for label, how in floors_1.items()]
        contenders += [
            ("ours_1k", ["--child", "ours", b, t, str(o), one_k], ("base", "tuned")),
            ("ours_5k", ["--child", "ours", b, t, str(o), args.ks], ("base", "tuned")),
        ]
        contenders += [(label, ["--child", "floor", b, t, str(o), n_out, *how], ("base", "tuned"))
                       for label, how in floors_5.items()]
        contenders += [
            ("baseline_1k", ["--child", "baseline", b, t, str(o), one_k], ("base", "tuned")),
            ("ours_1k_2x_model", ["--child", "ours", str(tmp / "base2"), str(tmp / "tuned2"),
                                  str(o), one_k], ("base2", "tuned2")),
        ]
        for label, argv, folders in contenders:
            if label == "baseline_1k" and args.skip_baseline:
                continue

            def before(folders=folders):  # every run starts with its inputs cached, or evicted
                for f in folders:
                    (evict if args.cold else warm)(tmp / f)

            results[label] = measure(label, argv, o, before,
                                     1 if label == "baseline_1k" else args.repeat)
        # the floor is the fastest way we measured to do the I/O (the strictest target)
        floor = min(results[label]["wall_s"] for label in floors_1)
        floor_5 = min(results[label]["wall_s"] for label in floors_5)
        n_k = len(args.ks.split(","))
        extra_k = (results["ours_5k"]["wall_s"] - results["ours_1k"]["wall_s"]) / (n_k - 1)
        rows = [
            ("ours 1 k / I/O floor (target <= 3)", results["ours_1k"]["wall_s"] / floor),
            (f"each extra k / the floor's own cost of one more output (target <= 1.25; {n_k} k)",
             extra_k / max((floor_5 - floor) / (n_k - 1), 1e-9)),
            ("peak RSS 2x model / 1x (target < 1.2)",
             results["ours_1k_2x_model"]["peak_rss_gib"] / results["ours_1k"]["peak_rss_gib"]),
            (f"each extra k / I/O floor (information; {n_k} k)", extra_k / floor),
        ]
        if "baseline_1k" in results:
            rows += [
                ("baseline peak RSS / ours (target >= 4)",
                 results["baseline_1k"]["peak_rss_gib"] / results["ours_1k"]["peak_rss_gib"]),
                ("baseline wall / ours (target >= 1)",
                 results["baseline_1k"]["wall_s"] / results["ours_1k"]["wall_s"]),
            ]
        print()
        print(f"| contender (k={one_k} unless noted) | wall s (to disk) | of which after "
              "exit | peak RSS GiB |")
        print("|---|---|---|---|")
        for label, r in results.items():
            print(f"| {label} | {r['wall_s']:.2f} | {r['wall_s'] - r['exit_s']:.2f} | "
                  f"{r['peak_rss_gib']:.2f} |")
        print()
        print("| ratio | value |")
        print("|---|---|")
        for label, value in rows:
            print(f"| {label} | {value:.2f} |")
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "ratios": dict(rows),
                                                   "layers": layers}, indent=2))
    finally:
        if keep:
            shutil.rmtree(tmp / "out", ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
