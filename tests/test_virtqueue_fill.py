"""`Virtqueue.fill`, the receive path's fast path, bytes in and bytes out.

A driver ring (`tests/vhost_frontend.py`, written with struct independently
of the back-end) offers receive buffers in a memfd mapped as two adjacent
regions; `fill` copies a frame into them.  Checked: every byte lands in the
buffer the used ring names, with the length it says; the ring index wraps
(the slot and the 16-bit counter); any buffer that is not a single
device-writable descriptor inside one region makes `fill` decline (-1) and
take nothing; too few buffers take nothing (0); a broken ring raises.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest

from passt.vhost.memory import GuestMemory
from passt.vhost.virtqueue import RingError, Virtqueue
from tests.vhost_frontend import GPA_BASE, REGION_SIZE, UVA_BASE, WRITE, DriverRing, GuestRam

NUM = 8
U16 = struct.Struct("<H")


class Rig:
    def __init__(self, start: int = 0) -> None:
        self.ram = GuestRam()
        self.ring = DriverRing(self.ram, NUM)
        half = self.ram.size // 2
        table = [(GPA_BASE, half, UVA_BASE, 0), (GPA_BASE + half, half, UVA_BASE + half, half)]
        self.mem = GuestMemory.map(table, [os.dup(self.ram.fd), os.dup(self.ram.fd)])
        # both sides start at `start`: the driver's indices and ours, as after a migration
        self.ring.avail_idx = self.ring.used_seen = start
        self.ram.pack(U16, self.ring.used + 2, start)
        self.ring.publish()
        q = self.q = Virtqueue(0)
        q.set_num(NUM)
        q.set_addr(self.ram.uva(self.ring.desc), self.ram.uva(self.ring.used),
                   self.ram.uva(self.ring.avail))
        q.map(self.mem, True, True)
        q.last_avail = start

    def post(self, bufs: list[tuple[int, int]]) -> list[int]:
        return [self.ring.add([buf], write=True) for buf in bufs]

    def received(self) -> bytes:
        """What the used ring gives back, concatenated in order (after `publish`)."""
        self.q.publish()
        out = b""
        for head, length in self.ring.take_used():
            addr = self.ram.unpack(struct.Struct("<QIHH"), self.ring.desc + 16 * head)[0]
            out += self.ram.read(addr, length)
        return out

    def close(self) -> None:
        self.q.unmap()
        self.mem.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def frame(n: int, seed: int = 1) -> bytearray:
    """A header with num_buffers 1 (as the tap writes it) and random bytes."""
    data = bytearray(random.Random(seed).randbytes(n))
    U16.pack_into(data, 10, 1)
    return data


def expect(data: bytearray, buffers: int) -> bytes:
    out = bytearray(data)
    U16.pack_into(out, 10, buffers)
    return bytes(out)


@pytest.mark.parametrize("layout", ["contiguous", "apart", "mixed"])
def test_every_byte_lands_where_the_used_ring_says(rig: Rig, layout: str) -> None:
    size = 300
    block = rig.ram.alloc(8 * size)
    if layout == "contiguous":           # one run, copied at once
        bufs = [(block + i * size, size) for i in range(7)]
    elif layout == "apart":              # no buffer continues the last
        bufs = [(block + i * size, size - 10) for i in range(7)]
    else:                                # runs broken by a gap and by a backwards step
        bufs = [(block, size), (block + size, size), (block + 3 * size, size),
                (block + 4 * size, size), (block + 2 * size, size), (block + 5 * size, size),
                (block + 6 * size, size)]
    rig.post(bufs)
    data = frame(5 * size + 7)
    need = -(-len(data) // bufs[0][1])
    assert rig.q.fill(memoryview(data), True) == need
    assert rig.q.last_avail == rig.q.used_idx == need
    assert rig.received() == expect(data, need)
    used = [length for _head, length in rig.ring.take_used()]
    assert used == []                    # all taken above, nothing twice


def test_the_ring_index_wraps_in_the_middle_of_a_frame() -> None:
    r = Rig(start=0xFFFE)                # slot 6 of 8 and two steps from the 16-bit wrap
    try:
        block = r.ram.alloc(4096)
        r.post([(block + 200 * i, 200) for i in range(6)])
        data = frame(900, seed=2)
        assert r.q.fill(memoryview(data), True) == 5
        assert r.q.last_avail == r.q.used_idx == 3
        assert r.received() == expect(data, 5)
        small = frame(100, seed=3)       # the next frame takes the one buffer left
        assert r.q.fill(memoryview(small), True) == 1
        assert r.received() == bytes(small)
    finally:
        r.close()


def test_too_few_buffers_take_nothing(rig: Rig) -> None:
    block = rig.ram.alloc(1024)
    rig.post([(block, 256), (block + 256, 256)])
    assert rig.q.fill(memoryview(frame(600)), True) == 0
    assert rig.q.last_avail == rig.q.used_idx == 0
    assert rig.q.fill(memoryview(frame(500)), True) == 2


def test_without_mergeable_buffers_one_buffer_per_frame(rig: Rig) -> None:
    block = rig.ram.alloc(1024)
    rig.post([(block, 256)])
    assert rig.q.fill(memoryview(frame(300)), False) == 0      # may wait for a bigger one
    rig.post([(block + 256, 512)])
    assert rig.q.fill(memoryview(frame(300)), False) == -1     # the first is too small
    assert rig.q.last_avail == 0


def other_shape(rig: Rig, how: str) -> None:
    ram, ring = rig.ram, rig.ring
    if how == "chained":
        a = ram.alloc(512)
        ring.add([(a, 256), (a + 256, 256)], write=True)
    elif how == "indirect":
        a = ram.alloc(512)
        ring.add_indirect([(a, 512)], write=True)
    elif how == "across regions":
        ring.add([(GPA_BASE + REGION_SIZE - 100, 512)], write=True)
    elif how == "shorter than the header":
        ring.add([(ram.alloc(64), 8)], write=True)
    elif how == "not device-writable":
        ring.add([(ram.alloc(512), 512)], write=False)
    elif how == "in no region":
        ring.add_raw(0xDEAD0000000, 512, WRITE)
    elif how == "past the memory's end":
        ring.add_raw(GPA_BASE + 2 * REGION_SIZE - 64, 512, WRITE)
    elif how == "wrapping the address space":
        ring.add_raw((1 << 64) - 64, 512, WRITE)
    else:
        raise AssertionError(how)


SHAPES = ["chained", "indirect", "across regions", "shorter than the header",
          "not device-writable", "in no region", "past the memory's end",
          "wrapping the address space"]


@pytest.mark.parametrize("second", [False, True], ids=["first", "second"])
@pytest.mark.parametrize("how", SHAPES)
def test_other_buffers_are_left_to_the_general_walk(rig: Rig, how: str, second: bool) -> None:
    block = rig.ram.alloc(1024)
    if second:
        rig.post([(block, 256)])
    other_shape(rig, how)
    if how == "shorter than the header" and second:
        # after the first buffer a short one is fine: the frame ends in it
        assert rig.q.fill(memoryview(frame(260)), True) == 2
        return
    before = bytes(rig.ram.read(block, 256))
    assert rig.q.fill(memoryview(frame(600)), True) == -1
    assert rig.q.last_avail == rig.q.used_idx == 0
    assert rig.ram.read(rig.ring.used + 2, 2) == b"\0\0"
    assert bytes(rig.ram.read(block, 256)) == before or second


def test_a_head_beyond_the_queue_mid_frame_breaks_the_ring(rig: Rig) -> None:
    block = rig.ram.alloc(1024)
    rig.post([(block, 256)])
    rig.ring.offer(NUM + 3)
    with pytest.raises(RingError, match="head index 11 beyond"):
        rig.q.fill(memoryview(frame(400)), True)
    assert rig.q.last_avail == rig.q.used_idx == 0


def test_an_available_index_that_jumps_breaks_the_ring(rig: Rig) -> None:
    rig.ring.publish(NUM + 1)
    with pytest.raises(RingError, match="more than the queue size"):
        rig.q.fill(memoryview(frame(100)), True)


def test_a_frame_may_take_the_whole_ring(rig: Rig) -> None:
    block = rig.ram.alloc(NUM * 100)
    rig.post([(block + 100 * i, 100) for i in range(NUM)])
    data = frame(NUM * 100 - 50)
    assert rig.q.fill(memoryview(data), True) == NUM
    assert rig.q.last_avail == rig.q.used_idx == NUM
    assert rig.received() == expect(data, NUM)


def test_a_ring_s_guest_address_from_the_front_end_s(rig: Rig) -> None:
    """What passt -d logs of where a ring lies (the migration test reads it)."""
    half = rig.ram.size // 2
    assert rig.mem.guest_address(UVA_BASE) == GPA_BASE
    assert rig.mem.guest_address(UVA_BASE + half + 5) == GPA_BASE + half + 5
    assert rig.mem.guest_address(rig.ram.uva(rig.ring.used)) == rig.ring.used
    assert rig.mem.guest_address(UVA_BASE - 1) is None
    assert rig.mem.guest_address(UVA_BASE + rig.ram.size) is None
