"""Versions of the libraries a run depends on, recorded beside every output."""

from __future__ import annotations

from importlib import metadata

TRACKED = ("sftknow-eval", "torch", "transformers", "tokenizers", "lm_eval", "trl", "datasets",
           "huggingface_hub", "accelerate", "safetensors")


def library_versions() -> dict[str, str]:
    """Installed version of each tracked library ("absent" when not installed)."""
    found = {}
    for name in TRACKED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found
