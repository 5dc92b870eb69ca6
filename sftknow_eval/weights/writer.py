"""Sharded writer: streams tensors into safetensors shards laid out like a source checkpoint.

Headers are computed up front and blocks reserved (:func:`preallocate`), then shards are filled
chunk by chunk with ``os.pwrite``: safetensors' ``save_file`` needs a whole shard in memory.
Written data leaves the page cache a little behind the writes (:class:`WriteBehind`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from sftknow_eval.weights.checkpoint import SAFETENSORS_INDEX, TensorInfo
from sftknow_eval.write_behind import WriteBehind, preallocate

#: Files copied from the tuned model beside the weights (config, tokenizer, generation config).
AUX_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab*", "merges.txt", "chat_template*", "preprocessor_config.json",
)


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
            preallocate(fd, 8 + len(blob) + end)
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
        """Close every file, once its background writes are done (they use the descriptor);
        raises the first write error met, after closing them all."""
        error: OSError | None = None
        for fd, behind in self._files.values():  # no fsync: atomicity comes from the folder rename
            try:
                behind.close()
            except OSError as failed:
                error = error or failed
            finally:
                os.close(fd)
        self._files.clear()
        if error is not None:
            raise error

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
