"""Atomic outputs: a folder is built under a temporary name beside its target and renamed
into place only when complete, so an interrupted run never leaves a folder that looks done.

Temporary folders are named ``.<target name>.tmp-<pid>-<host>-<random>``. A run killed
before its rename leaves one behind; the next run for the same target removes those whose
process is gone (same host, pid no longer alive) and logs each. A folder of a live process,
or of another host (a shared filesystem), is never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_MARK = ".tmp-"


def _host() -> str:
    """This machine's name as it appears in temporary folder names (letters, digits, _)."""
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def work_folder(out: str | os.PathLike[str]) -> Path:
    """A fresh hidden folder beside ``out``, named after it, this process and this host."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}{TEMP_MARK}{os.getpid()}-{_host()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except (OverflowError, ValueError):
        return False  # not a pid any process can have
    return True


def stale_work_folders(out: str | os.PathLike[str]) -> list[Path]:
    """The temporary folders of ``out`` left by processes of this host that are gone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{out.name}{TEMP_MARK}")
                         + r"(?P<pid>\d+)-(?P<host>[A-Za-z0-9_]+)-[A-Za-z0-9_]+")
    stale = []
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if (match and path.is_dir() and not path.is_symlink() and match["host"] == _host()
                and not _pid_alive(int(match["pid"]))):
            stale.append(path)
    return sorted(stale)


def clean_stale_work(out: str | os.PathLike[str]) -> list[Path]:
    """Remove (and log) the temporary folders of ``out`` whose process is gone."""
    removed = []
    for path in stale_work_folders(out):
        logger.info("removing %s, left by an interrupted run for %s", path, Path(out).name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _carry_over(source: Path, staging: Path, keep: Callable[[str], bool], relative: str = "") -> None:
    """Put the entries of ``source`` that ``keep`` accepts (by path relative to the top, with
    ``/``) and ``staging`` does not hold into ``staging``: hard links (copies where the
    filesystem has none), symlinks as symlinks, folders recursively."""
    for entry in os.scandir(source):
        rel = f"{relative}{entry.name}"
        target = staging / entry.name
        if not keep(rel):
            continue
        if entry.is_symlink():
            if not target.exists() and not target.is_symlink():
                os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            if target.exists() and not target.is_dir():
                continue  # the new output put a file where the old one had a folder
            target.mkdir(exist_ok=True)
            shutil.copystat(entry.path, target)
            _carry_over(Path(entry.path), target, keep, f"{rel}/")
        elif not target.exists():
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


def _swap(staging: Path, out: Path) -> None:
    """Move ``staging`` into place at ``out``; an existing ``out`` is moved aside first and
    removed after, so ``out`` is at every moment either the old folder or the new one."""
    if not out.exists():
        os.replace(staging, out)
        return
    aside = work_folder(out)
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | os.PathLike[str], *,
                  keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out``, on failure it is removed.

    With ``keep``, the entries of an existing ``out`` that ``keep`` accepts (called with the
    path relative to ``out``, ``/``-separated) and the staging folder does not hold are
    carried into the new folder (as hard links) before the swap: the rest of the old folder
    is replaced, those survive. Stale temporary folders of ``out`` are removed first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the output must be a folder")
    clean_stale_work(out)
    staging = work_folder(out)
    try:
        yield staging
        if keep is not None and out.is_dir():
            _carry_over(out, staging, keep)
        _swap(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
