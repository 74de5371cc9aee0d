"""The dirty log: which guest pages we wrote, for QEMU to copy again while it migrates.

During a live migration QEMU copies guest memory while the guest runs, then
copies again every page written since.  Pages written by the guest's CPUs it
tracks itself; pages written by us (receive buffers, the used rings) it
learns from this log: a bitmap in memory it shares with us (SET_LOG_BASE),
one bit per 4 KiB page of guest physical memory, bit `page % 8` of byte
`page // 8`.  Logging runs while the front-end has negotiated LOG_ALL.

QEMU collects the bitmap with an atomic exchange per word while we keep
setting bits.  Python has no atomic OR, but a read-modify-write of one byte
cannot lose a bit of ours: QEMU only clears, so the worst a race does is set
again a bit it already collected (one page copied once more).
"""

from __future__ import annotations

import mmap
import os

PAGE_SHIFT = 12                   # VHOST_LOG_PAGE: 4 KiB


class LogMapError(Exception):
    """The log the front-end passed cannot be mapped."""


class DirtyLog:
    __slots__ = ("_map", "view", "size", "call_fd", "marks")

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
            raise LogMapError(f"log of {size} bytes at offset {offset}")
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except (OSError, ValueError, OverflowError) as exc:
            raise LogMapError(f"cannot map the log ({size} bytes): {exc}") from None
        self.view = memoryview(self._map)
        self.size = size
        self.call_fd: int | None = None   # SET_LOG_FD's eventfd (the device's): told after
                                          # each batch of marks
        self.marks = 0

    def mark(self, addr: int, length: int) -> None:
        """Guest physical [addr, addr + length) was written."""
        if length <= 0:
            return
        view = self.view
        size = self.size
        for page in range(addr >> PAGE_SHIFT, ((addr + length - 1) >> PAGE_SHIFT) + 1):
            i = page >> 3
            if i >= size:
                break                     # beyond what the front-end logs
            view[i] |= 1 << (page & 7)
        self.marks += 1

    def written(self) -> None:
        """A batch of marks is complete: tell the front-end, if it asked to hear."""
        if self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError:
                pass

    def close(self) -> None:
        self.view.release()
        self._map.close()
