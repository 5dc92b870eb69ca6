"""WriteBehind: written data stays intact; unsupported files turn it off."""

from __future__ import annotations

import os
import sys

import pytest

from sftknow_eval.write_behind import WriteBehind

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
        assert behind._pending <= behind.lag  # older ranges were waited for and dropped
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(blocks)


@linux
def test_a_pipe_turns_it_off_instead_of_failing():
    read_end, write_end = os.pipe()
    try:
        behind = WriteBehind(write_end, lag=1)
        os.write(write_end, b"abc")
        behind.wrote(0, 3)
        assert not behind.enabled
        assert os.read(read_end, 3) == b"abc"
    finally:
        os.close(read_end)
        os.close(write_end)
