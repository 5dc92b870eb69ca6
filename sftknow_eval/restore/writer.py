"""Writing room of restore: streams tensors into safetensors shards laid out like the tuned model.

Each output shard gets the tuned shard's file name, tensor names, dtypes, shapes and
``__metadata__``. The file is preallocated (its blocks reserved on disk, see
:func:`preallocate`) from a header computed up front, then filled chunk
by chunk with ``os.pwrite`` and patched in place through ``numpy.memmap``. Written by hand
because safetensors' own ``save_file`` needs every tensor of a shard in memory at once, which
would put one shard per requested k in RAM. Outputs live in a temp folder beside the final
one and are renamed into place only when complete.

Written data streams to disk a little behind the writes and leaves the page cache
(:class:`WriteBehind`): several model-sized outputs would otherwise fill memory with dirty
pages, push the inputs out of the cache and stall every write on the kernel's dirty-page
throttling (measured in benchmarks/restore).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np

from sftknow_eval.restore.reader import SAFETENSORS_INDEX, TensorInfo
from sftknow_eval.write_behind import WriteBehind, preallocate

TEMP_PREFIX = ".tmp-restore-"
#: Files copied from the tuned model beside the weights (config, tokenizer, generation config).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "chat_template*", "preprocessor_config.json",
)
_RAW_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class ShardedWriter:
    """One output model's weight files; tensors may be written in any order, in chunks."""

    def __init__(self, folder: Path, layout: dict[str, list[str]], infos: dict[str, TensorInfo],
                 metadata: dict[str, dict[str, str] | None]):
        self.folder = folder
        self.infos = infos
        self.layout = layout
        self._fds: dict[str, int] = {}
        self._behind: dict[str, WriteBehind] = {}
        self._where: dict[str, tuple[str, int]] = {}  # tensor -> (file, absolute byte offset)
        for file, names in layout.items():
            header: dict[str, object] = {}
            meta = metadata.get(file)
            if meta:
                header["__metadata__"] = meta
            offset = 0
            for name in names:
                info = infos[name]
                header[name] = {"dtype": info.dtype,
                                "shape": list(info.shape),
                                "data_offsets": [offset, offset + info.nbytes]}
                offset += info.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
            start = 8 + len(blob)
            path = folder / file
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, struct.pack("<Q", len(blob)) + blob)
            preallocate(fd, start + offset)
            self._fds[file] = fd
            self._behind[file] = WriteBehind(fd)
            for name in names:
                self._where[name] = (file, start + header[name]["data_offsets"][0])  # type: ignore[index]

    def write_raw(self, name: str, first_element: int, data: np.ndarray) -> None:
        """Write a contiguous run of the tensor's flat elements starting at ``first_element``,
        given as their raw bits (unsigned ints of the tensor's itemsize)."""
        file, base = self._where[name]
        start = offset = base + first_element * data.itemsize
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fds[file], view, offset)
            view, offset = view[written:], offset + written
        self._behind[file].wrote(start, offset - start)

    def patch(self, name: str, positions: np.ndarray, raw_values: np.ndarray) -> None:
        """Overwrite single elements (flat positions) with raw values of the tensor's itemsize.

        Through a shared mapping, not flushed: msync on every patch cost more than the patch,
        and the pages reach the file like any other write (no fsync anywhere, see close).
        Pages that already left the page cache (:class:`WriteBehind`) are read back first;
        patches come early in pass 2 and in position order, so these reads are few and
        sequential.
        """
        if len(positions) == 0:
            return
        file, base = self._where[name]
        info = self.infos[name]
        itemsize = info.nbytes // max(info.numel, 1)
        mapped = np.memmap(self.folder / file, dtype=_RAW_DTYPES[itemsize], mode="r+",
                           offset=base, shape=(info.numel,))
        mapped[positions] = raw_values
        del mapped

    def close(self) -> None:
        """Close every file, once its background writes are done (they use the descriptor);
        raises the first write error met, after closing them all."""
        error: OSError | None = None
        for file, fd in self._fds.items():  # no fsync: atomicity comes from the folder rename
            try:
                self._behind[file].close()
            except OSError as failed:
                error = error or failed
            finally:
                os.close(fd)
        self._fds.clear()
        self._behind.clear()
        if error is not None:
            raise error

    def write_index(self, source_index: dict | None) -> None:
        """Write model.safetensors.index.json when the tuned model had one (or several shards)."""
        if source_index is None and len(self.layout) == 1:
            return
        weight_map = {name: file for file, names in self.layout.items() for name in names}
        total = sum(self.infos[n].nbytes for n in weight_map)
        metadata = dict((source_index or {}).get("metadata") or {})
        metadata["total_size"] = total
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def standard_shard_names(files: list[str]) -> dict[str, str]:
    """Each shard's name in a folder transformers loads: ``model.safetensors`` for one shard,
    ``model-0000i-of-0000n.safetensors`` for several (in the given order)."""
    if len(files) == 1:
        return {files[0]: "model.safetensors"}
    return {file: f"model-{i:05d}-of-{len(files):05d}.safetensors"
            for i, file in enumerate(files, start=1)}


def copy_aux_files(source: Path, target: Path) -> list[str]:
    """Copy config, tokenizer and generation config files; returns the names copied."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in AUX_PATTERNS):
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


def new_temp_folder(out: Path, variant: str) -> Path:
    """A fresh hidden folder beside the final one; renamed into place by :func:`commit_folder`."""
    out.mkdir(parents=True, exist_ok=True)
    folder = out / f"{TEMP_PREFIX}{variant}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def commit_folder(temp: Path, final: Path) -> None:
    """Atomically move a finished temp folder into place (replacing an older output)."""
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(final)


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp folders left by an interrupted run (they never look like outputs)."""
    removed = []
    if out.is_dir():
        for path in out.iterdir():
            if path.is_dir() and path.name.startswith(TEMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
