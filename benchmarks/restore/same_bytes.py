"""Byte-identity check of two restore engines: run ``sftknow-eval restore`` from this checkout and
from another one (an earlier commit, e.g. ``git worktree add /tmp/old <commit>``) on the same
models, and compare the sha256 of every safetensors file they write.

    python benchmarks/restore/same_bytes.py --other /tmp/old --base sftknow_eval/world_data/model \
        --tuned runs/sft/D0-160-s0 --k 1,5,20 [--strategy top] [--chunk-elements 5000]

Exits 1, naming the files, when any output differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]


def restore(checkout: Path, args: argparse.Namespace, out: Path) -> dict[str, str]:
    """The sha256 of every safetensors file the checkout's engine writes to ``out``."""
    argv = [sys.executable, "-m", "sftknow_eval.cli", "restore", "--base", str(Path(args.base).resolve()),
            "--tuned", str(Path(args.tuned).resolve()), "--k", args.k, "--strategy", args.strategy,
            "--out", str(out), "--no-progress", "--chunk-elements", str(args.chunk_elements)]
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    # Run from the checkout: ``-m`` puts the working directory first on sys.path, ahead of both
    # PYTHONPATH and an editable install's finder, so the checkout's own package is the one imported.
    subprocess.run(argv, check=True, env=env, cwd=checkout, stdout=subprocess.DEVNULL)
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(out.glob("*/*.safetensors"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--other", required=True, type=Path, help="the other checkout")
    parser.add_argument("--base", required=True)
    parser.add_argument("--tuned", required=True)
    parser.add_argument("--k", default="1,5,20")
    parser.add_argument("--strategy", default="top")
    parser.add_argument("--chunk-elements", type=int, default=1 << 20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = restore(HERE, args, Path(tmp) / "this")
        theirs = restore(args.other.resolve(), args, Path(tmp) / "other")
    for name, digest in ours.items():
        print(f"{digest}  {name}  {'same' if theirs.get(name) == digest else 'DIFFERENT'}")
    if ours != theirs or not ours:
        print(f"differ: {sorted(set(ours.items()) ^ set(theirs.items()))}", file=sys.stderr)
        return 1
    print(f"identical: {len(ours)} safetensors files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
