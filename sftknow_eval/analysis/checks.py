"""Input and output checks shared by the analysis lenses: output folders, finite weights, JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from sftknow_eval.errors import UserError


def check_out_folder(out: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``out`` as a Path when it can become an output folder: a file at ``out`` or at one of
    its parents is refused before any model is loaded."""
    path = Path(out)
    for place in (path, *path.parents):
        if place.exists() and not place.is_dir():
            where = "" if place == path else f" (its parent {place} is a file)"
            raise UserError(f"{flag} {path}: not a folder{where}; give a folder path")
    return path


def positive_int(value: int | None, flag: str, *, allow_none: bool = False) -> None:
    """A count option (batch size, templates) must be an integer of at least 1."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{flag} {value!r}: must be an integer of at least 1")


def _finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def require_finite(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a tensor holding NaN or Inf; ``tensors`` maps a model's label (``base``,
    ``fine-tuned``) to its copy of the tensor ``name``. The error names the tensor and every
    model at fault, in the wording ``restore`` uses for the same refusal."""
    which = [label for label, tensor in tensors.items() if not _finite(tensor)]
    if which:
        raise UserError(f"tensor {name}: NaN or Inf values in the {' and '.join(which)} model")


def require_finite_models(base_model: Any, tuned_model: Any) -> None:
    """Every floating-point weight of two loaded models is finite (tensor by tensor, by name)."""
    states = {"base": base_model.state_dict(), "fine-tuned": tuned_model.state_dict()}
    for name in dict.fromkeys(name for state in states.values() for name in state):
        require_finite(name, {label: state[name] for label, state in states.items()
                              if name in state})


def strict_json(data: Any, what: str, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and Infinity (they are not JSON): a UserError naming
    the output instead of a file other tools cannot read."""
    try:
        return json.dumps(data, allow_nan=False, **kwargs)
    except ValueError as error:
        raise UserError(f"{what}: a value is NaN or infinite ({error}); nothing written") \
            from None
