"""Sharded writer: streams tensors into safetensors shards laid out like a source checkpoint.

Headers are computed up front and blocks reserved (``os.posix_fallocate``), then shards are
filled chunk by chunk with ``os.pwrite``: safetensors' ``save_file`` needs a whole shard in memory.
Written data leaves the page cache a little behind the writes (:class:`WriteBehind`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import json
import os
import shutil
import struct
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sftknow_eval.weights.checkpoint import SAFETENSORS_INDEX, TensorInfo

#: Files copied from the tuned model beside the weights (config, tokenizer, generation config).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "chat_template*", "preprocessor_config.json",
)


def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range (the standard library binds none), or None where libc has none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_START, _FINISH = 2, 1 | 2 | 4  # WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER
_UNSUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP}


class WriteBehind:
    """Write-behind for one file (as ``dd oflag=nocache``): each written range starts going to
    disk at once, and once ``lag`` newer bytes follow it the writer waits for it and drops it
    from the page cache. Without it, model-sized outputs fill memory with dirty pages and every
    write waits on the kernel's throttling: five k's of a 2 GB model took 29-32 s with plain
    writes against 12-15 s. The small lag keeps the pages a write copies into in the CPU
    caches. A background thread doing the waiting instead was no faster (12-14.5 s)."""

    def __init__(self, fd: int, lag: int = 8 << 20):
        self.fd, self.lag = fd, lag
        self.enabled = _SYNC_FILE_RANGE is not None
        self._lock = threading.Lock()  # two workers may write to one file
        self._ranges: deque[tuple[int, int]] = deque()
        self._pending = 0

    def wrote(self, offset: int, length: int) -> None:
        """``length`` bytes at ``offset`` were just written."""
        if length <= 0 or not self._sync(offset, length, _START):
            return
        done = []
        with self._lock:
            self._ranges.append((offset, length))
            self._pending += length
            while self._pending > self.lag:
                done.append(self._ranges.popleft())
                self._pending -= done[-1][1]
        for old, size in done:
            if self._sync(old, size, _FINISH):
                os.posix_fadvise(self.fd, old, size, os.POSIX_FADV_DONTNEED)

    def _sync(self, offset: int, length: int, flags: int) -> bool:
        """sync_file_range; False (and off from then on) where the file does not take it."""
        if not self.enabled:
            return False
        if _SYNC_FILE_RANGE(self.fd, offset, length, flags) == 0:
            return True
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(code, f"sync_file_range: {os.strerror(code)}")
        self.enabled = False
        return False


class ShardedWriter:
    """One output model's weight files; tensors may be written in any order, in chunks."""

    def __init__(self, folder: Path, layout: dict[str, list[str]], infos: dict[str, TensorInfo],
                 metadata: dict[str, dict[str, str] | None]):
        self.folder, self.infos, self.layout = folder, infos, layout
        self._files: dict[str, tuple[int, WriteBehind]] = {}  # file -> (descriptor, write-behind)
        self._where: dict[str, tuple[int, WriteBehind, int]] = {}  # tensor -> file, byte offset
        for file, names in layout.items():
            header: dict[str, object] = {"__metadata__": metadata[file]} if metadata.get(file) else {}
            offsets, end = {}, 0
            for name in names:
                info = infos[name]
                header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                                "data_offsets": [end, end + info.nbytes]}
                offsets[name], end = end, end + info.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(blob)) + blob)
            # blocks reserved: a full disk fails here, and filling them skips ext4's per-page
            # bookkeeping (five 2 GB files: 2.0 s of system time against 3.2-3.7 s)
            size = 8 + len(blob) + end
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # macOS: a sparse file
                os.ftruncate(fd, size)
            self._files[file] = (fd, WriteBehind(fd))
            for name in names:
                self._where[name] = (*self._files[file], 8 + len(blob) + offsets[name])

    def write_raw(self, name: str, first_element: int, data: np.ndarray) -> None:
        """Write a contiguous run of the tensor's flat elements starting at ``first_element``,
        given as their raw bits (unsigned ints of the tensor's itemsize)."""
        fd, behind, base = self._where[name]
        start = offset = base + first_element * data.itemsize
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        behind.wrote(start, offset - start)

    def close(self) -> None:
        """Close every file (no fsync: atomicity comes from the folder rename)."""
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def write_index(self, source_index: dict | None) -> None:
        """Write model.safetensors.index.json when the tuned model had one (or several shards)."""
        if source_index is None and len(self.layout) == 1:
            return
        weight_map = {name: file for file, names in self.layout.items() for name in names}
        metadata = {**((source_index or {}).get("metadata") or {}),
                    "total_size": sum(self.infos[n].nbytes for n in weight_map)}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_aux_files(source: Path, target: Path) -> None:
    """Copy config, tokenizer and generation config files."""
    for path in sorted(source.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in AUX_PATTERNS):
            shutil.copy2(path, target / path.name)
