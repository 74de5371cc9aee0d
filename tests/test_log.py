"""The size-capped log file: written, and shrunk, through the descriptor opened at start."""

from __future__ import annotations

import logging

from common.log import CappedFileHandler


def _record(i: int) -> logging.LogRecord:
    return logging.LogRecord("t", logging.INFO, __file__, 1, f"line {i:04d} " + "x" * 40,
                             None, None)


def test_capped_and_shrunk_through_the_descriptor(tmp_path):
    path = tmp_path / "log"
    h = CappedFileHandler(str(path), 1024)
    try:
        moved = tmp_path / "elsewhere"
        path.rename(moved)            # the path is gone (as it is to a user who can't open it)
        for i in range(200):
            h.emit(_record(i))
    finally:
        h.close()
    assert not path.exists()
    lines = moved.read_text().splitlines()
    assert lines[-1].startswith("line 0199 ")
    assert moved.stat().st_size <= 1024
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 200))      # whole lines, the newest, in order
