"""Versions of the libraries a run depends on, recorded beside every output."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("sftknow-eval", "torch", "transformers", "tokenizers", "lm_eval", "trl", "datasets",
           "huggingface-hub", "accelerate", "safetensors", "peft", "numpy", "numba")


def library_versions() -> dict[str, str]:
    """Python's version and each tracked library's, from package metadata (importing them
    would cost seconds); "absent" when not installed."""
    found = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found
