"""ShardedWriter and its write-behind: data lands intact, old ranges are waited for and dropped,
unsupported files turn it off, real errors are raised, blocks are reserved."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file

from sftknow_eval.weights import writer as writer_module
from sftknow_eval.weights.checkpoint import TensorInfo
from sftknow_eval.weights.writer import ShardedWriter, WriteBehind

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux")


@linux
def test_ranges_from_two_threads_land_and_old_ones_are_waited_for(tmp_path, monkeypatch):
    real, calls = writer_module._SYNC_FILE_RANGE, []

    def recording(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((fd, offset, length, flags))
        return real(fd, offset, length, flags)

    monkeypatch.setattr(writer_module, "_SYNC_FILE_RANGE", recording)
    blocks = {i: [os.urandom(4096 * 5 + 7 * i) for _ in range(30)] for i in range(3)}
    fds = {i: os.open(tmp_path / f"out{i}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC) for i in blocks}
    behind = {i: WriteBehind(fd, lag=4096 * 12) for i, fd in fds.items()}

    def write(i: int, j: int) -> None:
        offset = sum(len(b) for b in blocks[i][:j])
        os.pwrite(fds[i], blocks[i][j], offset)
        behind[i].wrote(offset, len(blocks[i][j]))

    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda ij: write(*ij), [(i, j) for j in range(30) for i in blocks]))
    finally:
        for fd in fds.values():
            os.close(fd)
    for i, chunks in blocks.items():
        assert (tmp_path / f"out{i}.bin").read_bytes() == b"".join(chunks)
        wb = behind[i]
        assert wb.enabled and 0 < wb._pending <= wb.lag
        started = {(o, n) for fd, o, n, f in calls if fd == fds[i] and f == writer_module._START}
        finished = [(o, n) for fd, o, n, f in calls if fd == fds[i] and f == writer_module._FINISH]
        assert len(started) == 30  # every range started at once
        # every range but the last ``lag`` bytes was waited for (and dropped), once
        assert len(finished) == len(set(finished)) == 30 - len(wb._ranges)
        assert set(finished) | set(wb._ranges) == started


@linux
def test_a_pipe_turns_it_off_instead_of_failing():
    read_end, write_end = os.pipe()
    try:
        behind = WriteBehind(write_end, lag=0)
        os.write(write_end, b"abc")
        behind.wrote(0, 3)
        assert not behind.enabled and not behind._ranges
        assert os.read(read_end, 3) == b"abc"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_real_write_back_error_is_raised(tmp_path, monkeypatch):
    def failing(fd: int, offset: int, length: int, flags: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(writer_module, "_SYNC_FILE_RANGE", failing)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        behind = WriteBehind(fd)
        with pytest.raises(OSError) as error:
            behind.wrote(0, 4096)
        assert error.value.errno == errno.EIO and behind.enabled
    finally:
        os.close(fd)


@linux
def test_sharded_writer_reserves_blocks_and_writes_chunks_in_any_order(tmp_path):
    infos = {"a": TensorInfo("a", "F32", (3, 5000), "one.safetensors"),
             "b": TensorInfo("b", "I64", (7,), "one.safetensors"),
             "c": TensorInfo("c", "BF16", (2000,), "two.safetensors")}
    layout = {"one.safetensors": ["a", "b"], "two.safetensors": ["c"]}
    writer = ShardedWriter(tmp_path, layout, infos, {"one.safetensors": {"format": "pt"}})
    for file in layout:
        info = os.stat(tmp_path / file)
        assert info.st_blocks * 512 >= info.st_size > sum(infos[n].nbytes for n in layout[file])
    a = np.random.default_rng(0).standard_normal(15000).astype(np.float32)
    b = np.arange(7, dtype=np.int64)
    c = np.arange(2000, dtype=np.uint16)  # raw bf16 bits
    writer.write_raw("a", 9000, a[9000:].view(np.uint32))
    writer.write_raw("c", 0, c)
    writer.write_raw("b", 0, b.view(np.uint64))
    writer.write_raw("a", 0, a[:9000].view(np.uint32))
    writer.close()
    one = load_file(tmp_path / "one.safetensors")
    assert np.array_equal(one["a"], a.reshape(3, 5000)) and np.array_equal(one["b"], b)
    with open(tmp_path / "two.safetensors", "rb") as f:
        assert f.read()[-4000:] == c.tobytes()
