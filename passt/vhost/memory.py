"""Guest memory: the regions the front-end passes with SET_MEM_TABLE, mapped and bounds-checked.

Each region arrives as (guest physical address, size, front-end user
address, offset into the file) with a file descriptor (QEMU's memfd or
hugetlbfs file).  We map size + offset bytes of the file shared, read and
write, and keep a memoryview of the region's bytes; the descriptor is closed
once mapped.

Two address spaces point into the regions: descriptor addresses are guest
physical addresses (`gpa`), ring addresses from SET_VRING_ADDR are the
front-end's user addresses (`uva`).  Translation returns the region's view,
the offset of the address in it and how many of the asked bytes lie in that
region: a buffer that runs over a region's end continues at the next guest
address, which the caller translates again (adjacent regions), and an
address in no region raises `BadAddress`.  Nothing here trusts a number the
guest wrote: every offset is checked before a view is touched, and Python's
views check again.
"""

from __future__ import annotations

import logging
import mmap
import os

log = logging.getLogger("vhost")

ADDR_LIMIT = 1 << 64


class BadAddress(Exception):
    """An address (and length) outside every region."""


class MemoryMapError(Exception):
    """A region that cannot be mapped: the message fails, the old table stays."""


class Region:
    __slots__ = ("gpa", "size", "uva", "offset", "gpa_end", "uva_end", "_map", "view")

    def __init__(self, gpa: int, size: int, uva: int, offset: int, fd: int) -> None:
        if size == 0 or gpa + size > ADDR_LIMIT or uva + size > ADDR_LIMIT:
            raise MemoryMapError(f"region at {gpa:#x}: size {size:#x} is empty or wraps")
        if offset + size > ADDR_LIMIT >> 1:
            raise MemoryMapError(f"region at {gpa:#x}: offset {offset:#x} too large")
        self.gpa, self.size, self.uva, self.offset = gpa, size, uva, offset
        self.gpa_end = gpa + size
        self.uva_end = uva + size
        try:
            self._map = mmap.mmap(fd, offset + size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryMapError(f"region at {gpa:#x} (+{size:#x}): cannot map: {exc}") from None
        self.view = memoryview(self._map)[offset:offset + size]

    def close(self) -> None:
        self.view.release()
        try:
            self._map.close()
        except BufferError:
            # a view of it is still alive somewhere: the mapping goes when that view does
            log.debug("guest memory region %#x: still referenced, unmapped later", self.gpa)

    def __repr__(self) -> str:
        return f"Region(gpa={self.gpa:#x}, size={self.size:#x}, uva={self.uva:#x})"


class GuestMemory:
    """The current memory table.  Empty until the first SET_MEM_TABLE."""

    def __init__(self, regions: list[Region] | None = None) -> None:
        self.regions = regions or []
        self._last = self.regions[0] if self.regions else None
        # (first guest address, end, view) per region, for loops that inline the lookup
        self.spans = tuple((r.gpa, r.gpa_end, r.view) for r in self.regions)

    @classmethod
    def map(cls, table: list[tuple[int, int, int, int]], fds: list[int]) -> GuestMemory:
        """Map every region of `table`, one fd each; the fds are always closed."""
        try:
            if len(fds) != len(table):
                raise MemoryMapError(f"{len(table)} regions but {len(fds)} descriptors")
            regions: list[Region] = []
            try:
                for (gpa, size, uva, offset), fd in zip(table, fds, strict=True):
                    regions.append(Region(gpa, size, uva, offset, fd))
            except MemoryMapError:
                for r in regions:
                    r.close()
                raise
            return cls(regions)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self.spans = ()
        for r in self.regions:
            r.close()
        self.regions = []
        self._last = None

    def gpa(self, addr: int, length: int) -> tuple[memoryview, int, int]:
        """(view, offset, bytes in this region) for guest physical `addr`; `length` > 0."""
        r = self._last
        if r is not None and r.gpa <= addr < r.gpa_end:
            end = r.gpa_end - addr
            return r.view, addr - r.gpa, length if length <= end else end
        for r in self.regions:
            if r.gpa <= addr < r.gpa_end:
                self._last = r
                end = r.gpa_end - addr
                return r.view, addr - r.gpa, length if length <= end else end
        raise BadAddress(f"guest address {addr:#x} is in no memory region")

    def gpa_whole(self, addr: int, length: int) -> tuple[memoryview, int]:
        """Like `gpa`, for something that must lie in one region (a descriptor table)."""
        view, off, n = self.gpa(addr, length)
        if n < length:
            raise BadAddress(f"guest range {addr:#x}+{length:#x} crosses a region's end")
        return view, off

    def uva(self, addr: int, length: int) -> tuple[memoryview, int]:
        """(view, offset) of front-end user address `addr`, the whole `length` in one region."""
        for r in self.regions:
            if r.uva <= addr and addr + length <= r.uva_end:
                return r.view, addr - r.uva
        raise BadAddress(f"ring address {addr:#x}+{length:#x} is in no memory region")

    def guest_address(self, addr: int) -> int | None:
        """The guest physical address of front-end user address `addr`, if mapped."""
        for r in self.regions:
            if r.uva <= addr < r.uva_end:
                return r.gpa + addr - r.uva
        return None

    def __len__(self) -> int:
        return len(self.regions)
