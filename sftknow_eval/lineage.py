"""Where a model or dataset came from, for model cards: its Hub id and revision when it came
from the Hub, or from a local folder that records the Hub repo it is a copy of; otherwise
nothing, so a purely local path never goes into card metadata.

A local folder records its Hub repo in one of two ways: it is a snapshot in the Hugging Face
cache (``.../models--org--name/snapshots/<commit>``), or it is a ``train`` output that was
pushed (``training_run.json`` -> ``pushed_to``: ``{"repo_id", "revision"}``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sftknow_eval.errors import UserError

RUN_FILE = "training_run.json"
_SNAPSHOT = re.compile(r"/(?P<kind>models|datasets)--(?P<repo>[^/]+)/snapshots/"
                       r"(?P<sha>[0-9a-f]{40})(?:/|$)")
_KINDS = {"model": "models", "dataset": "datasets"}


@dataclass(frozen=True)
class HubOrigin:
    """A Hub repo (and the revision, when known) that a model or dataset came from."""

    repo_id: str
    revision: str | None = None
    repo_type: str = "model"

    @property
    def url(self) -> str:
        prefix = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{prefix}{self.repo_id}"

    def markdown(self) -> str:
        """``[org/name](url)``, with ``at revision `sha` `` when the revision is known."""
        at = f" at revision `{self.revision}`" if self.revision else ""
        return f"[{self.repo_id}]({self.url}){at}"


def is_hub_id(text: str) -> bool:
    """True for a valid Hub repo id that is not written like a local path."""
    from sftknow_eval.hub import validate_repo_id

    if not text or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        validate_repo_id(text)
    except UserError:
        return False
    return True


def folder_origin(folder: str | os.PathLike[str], revision: str | None = None, *,
                  repo_type: str = "model") -> HubOrigin | None:
    """The Hub repo a local folder is a copy of, when the folder records it; else None."""
    path = Path(folder).expanduser().resolve()
    match = _SNAPSHOT.search(path.as_posix())
    if match and match["kind"] == _KINDS[repo_type]:
        return HubOrigin(match["repo"].replace("--", "/"), revision or match["sha"], repo_type)
    run_file = path / RUN_FILE
    if repo_type == "model" and run_file.is_file():
        try:
            pushed = json.loads(run_file.read_text(encoding="utf-8")).get("pushed_to")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if isinstance(pushed, dict) and is_hub_id(str(pushed.get("repo_id") or "")):
            return HubOrigin(str(pushed["repo_id"]), pushed.get("revision"), repo_type)
    return None


def hub_origin(source: str | os.PathLike[str], revision: str | None = None, *,
               repo_type: str = "model") -> HubOrigin | None:
    """``source`` as a user gave it (Hub id or local path): its Hub origin, or None for a
    purely local model or dataset."""
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return folder_origin(text, revision, repo_type=repo_type)
    if is_hub_id(text):
        return HubOrigin(text, revision, repo_type)
    return None


def commit_sha(commit_url: str | None) -> str | None:
    """The commit sha at the end of a Hub commit URL (``.../commit/<sha>``), if any."""
    match = re.search(r"/commit/([0-9a-f]{7,40})/?$", commit_url or "")
    return match.group(1) if match else None
