"""WriteBehind: written data stays intact; unsupported files turn it off."""

from __future__ import annotations

import os
import sys

import pytest

from sftknow_eval.write_behind import WriteBehind, preallocate

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux")


@linux
def test_data_is_intact_after_ranges_are_dropped(tmp_path):
    path = tmp_path / "out.bin"
    blocks = [os.urandom(4096 * 3) for _ in range(20)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        behind = WriteBehind(fd, lag=4096 * 6)
        offset = 0
        for block in blocks:
            os.pwrite(fd, block, offset)
            behind.wrote(offset, len(block))
            offset += len(block)
        assert behind.enabled
        assert behind._pending <= behind.lag  # older ranges went to the background flusher
        behind.close()
        assert behind._handed == 0  # close waited for all of them
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)


@linux
def test_several_files_interleaved_all_land(tmp_path):
    """Ranges of three files, written by two threads in any order, all reach their files."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = {i: [os.urandom(4096 * 5 + 7 * i) for _ in range(30)] for i in range(3)}
    fds = {i: os.open(tmp_path / f"out{i}.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
           for i in blocks}
    behind = {i: WriteBehind(fd, lag=4096 * 4) for i, fd in fds.items()}

    def write(i: int, j: int) -> None:
        offset = sum(len(b) for b in blocks[i][:j])
        os.pwrite(fds[i], blocks[i][j], offset)
        behind[i].wrote(offset, len(blocks[i][j]))

    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda ij: write(*ij), [(i, j) for j in range(30) for i in blocks]))
        for b in behind.values():
            b.close()
    finally:
        for fd in fds.values():
            os.close(fd)
    for i, chunks in blocks.items():
        assert (tmp_path / f"out{i}.bin").read_bytes() == b"".join(chunks)


@linux
def test_a_pipe_turns_it_off_instead_of_failing():
    read_end, write_end = os.pipe()
    try:
        behind = WriteBehind(write_end, lag=1)
        assert not behind.enabled  # found out at once, not later on the flusher
        os.write(write_end, b"abc")
        behind.wrote(0, 3)
        behind.close()
        assert os.read(read_end, 3) == b"abc"
    finally:
        os.close(read_end)
        os.close(write_end)


@linux
def test_preallocate_reserves_the_blocks_and_writes_fill_them(tmp_path):
    path = tmp_path / "out.bin"
    size = (4 << 20) + 123
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        os.write(fd, b"head")
        preallocate(fd, size)
        info = os.fstat(fd)
        assert info.st_size == size
        assert info.st_blocks * 512 >= size  # reserved on disk, not a sparse file
        data = os.urandom(size - 4)
        os.pwrite(fd, data, 4)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + data


@linux
def test_an_error_on_the_background_thread_reaches_the_writer(tmp_path):
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    behind = WriteBehind(fd, lag=0)
    os.close(fd)  # the flusher's sync_file_range now fails (EBADF)
    behind.wrote(0, 4096)
    with pytest.raises(OSError):
        behind.close()
    assert behind._handed == 0


@linux
def test_a_stopped_flusher_thread_is_started_again(tmp_path):
    """After a fork the thread is gone from the child; the next handed range restarts it."""
    import threading

    from sftknow_eval import write_behind

    gone = threading.Thread(target=lambda: None)
    gone.start()
    gone.join()
    write_behind._FLUSHER._thread = gone
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        behind = WriteBehind(fd, lag=0)
        os.pwrite(fd, b"x" * 8192, 0)
        behind.wrote(0, 8192)
        behind.close()
        assert write_behind._FLUSHER._thread is not gone
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 8192
