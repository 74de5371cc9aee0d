"""A scripted vhost-user front-end and virtio-net driver, for the protocol tests.

It plays QEMU and the guest at once: guest memory is a memfd (passed to the
back-end with SET_MEM_TABLE as two adjacent regions, so buffers that cross
from one into the other are exercised), the rings are laid out in it as a
Linux driver would, and the control messages go over a UNIX stream socket.
Everything is written with struct, byte for byte as the specification says,
independently of the back-end's code; hostile tests write whatever they like.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct

from passt.vhost.protocol import (
    ADDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MEM_HEADER,
    REGION,
    STATE,
    U64,
    VERSION,
    F,
    Req,
)

GPA_BASE = 0x100000
UVA_BASE = 0x7F1200000000
REGION_SIZE = 2 << 20             # two adjacent regions of this size
DESC = struct.Struct("<QIHH")
HDR = struct.Struct("<BBHHHHH")   # virtio_net_hdr_mrg_rxbuf
NEXT, WRITE, INDIRECT = 1, 2, 4


class GuestRam:
    """A memfd as guest memory, with a bump allocator (gpa in, bytes out)."""

    def __init__(self, size: int = 2 * REGION_SIZE) -> None:
        self.fd = os.memfd_create("vhost-test-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size
        self.map = mmap.mmap(self.fd, size)
        self.next = GPA_BASE + 0x1000

    def alloc(self, size: int, align: int = 64) -> int:
        self.next = (self.next + align - 1) // align * align
        gpa = self.next
        self.next += size
        assert self.next <= GPA_BASE + self.size, "test guest memory exhausted"
        return gpa

    def off(self, gpa: int) -> int:
        return gpa - GPA_BASE

    def uva(self, gpa: int) -> int:
        return UVA_BASE + gpa - GPA_BASE

    def write(self, gpa: int, data: bytes) -> None:
        o = self.off(gpa)
        self.map[o:o + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        o = self.off(gpa)
        return self.map[o:o + n]

    def pack(self, st: struct.Struct, gpa: int, *values) -> None:
        st.pack_into(self.map, self.off(gpa), *values)

    def unpack(self, st: struct.Struct, gpa: int) -> tuple:
        return st.unpack_from(self.map, self.off(gpa))

    def table(self) -> tuple[bytes, list[int]]:
        """SET_MEM_TABLE's payload and descriptors: two regions, adjacent in both spaces."""
        half = self.size // 2
        payload = MEM_HEADER.pack(2, 0)
        payload += REGION.pack(GPA_BASE, half, UVA_BASE, 0)
        payload += REGION.pack(GPA_BASE + half, half, UVA_BASE + half, half)
        return payload, [os.dup(self.fd), os.dup(self.fd)]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class DriverRing:
    """The driver's side of one split virtqueue."""

    def __init__(self, ram: GuestRam, num: int) -> None:
        self.ram, self.num = ram, num
        self.desc = ram.alloc(16 * num, 16)
        self.avail = ram.alloc(6 + 2 * num, 2)
        self.used = ram.alloc(6 + 8 * num, 4)
        self.free = list(range(num))
        self.avail_idx = 0
        self.kicked_at = 0             # avail_idx when the driver last decided on a kick
        self.used_seen = 0
        self.chains: dict[int, list[int]] = {}

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.ram.pack(DESC, self.desc + 16 * i, addr, length, flags, nxt)

    def add(self, bufs: list[tuple[int, int]], write: bool, publish: bool = True) -> int:
        """Offer a chain of (gpa, length) buffers; its head index."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, ((addr, length), i) in enumerate(zip(bufs, ids, strict=True)):
            last = k == len(ids) - 1
            self.set_desc(i, addr, length, (WRITE if write else 0) | (0 if last else NEXT),
                          0 if last else ids[k + 1])
        self.chains[ids[0]] = ids
        self.offer(ids[0], publish)
        return ids[0]

    def add_indirect(self, bufs: list[tuple[int, int]], write: bool) -> int:
        table = self.ram.alloc(16 * len(bufs), 16)
        for k, (addr, length) in enumerate(bufs):
            last = k == len(bufs) - 1
            self.ram.pack(DESC, table + 16 * k, addr, length,
                          (WRITE if write else 0) | (0 if last else NEXT), 0 if last else k + 1)
        i = self.free.pop(0)
        self.set_desc(i, table, 16 * len(bufs), INDIRECT)
        self.chains[i] = [i]
        self.offer(i)
        return i

    def add_raw(self, addr: int, length: int, flags: int) -> int:
        """Offer one descriptor with whatever address, length and flags (hostile tests)."""
        i = self.free.pop(0)
        self.set_desc(i, addr, length, flags)
        self.offer(i)
        return i

    def offer(self, head: int, publish: bool = True) -> None:
        self.ram.pack(struct.Struct("<H"), self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self, idx: int | None = None) -> None:
        self.ram.pack(struct.Struct("<H"), self.avail + 2,
                      self.avail_idx if idx is None else idx)

    def used_idx(self) -> int:
        return self.ram.unpack(struct.Struct("<H"), self.used + 2)[0]

    def take_used(self) -> list[tuple[int, int]]:
        """(head, length) of the buffers given back since the last call; frees them."""
        out = []
        idx = self.used_idx()
        while self.used_seen != idx:
            head, length = self.ram.unpack(struct.Struct("<II"),
                                           self.used + 4 + 8 * (self.used_seen % self.num))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, [head]))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.ram.pack(struct.Struct("<H"), self.avail + 4 + 2 * self.num, value)

    def set_avail_flags(self, value: int) -> None:
        self.ram.pack(struct.Struct("<H"), self.avail, value)

    def avail_event(self) -> int:
        return self.ram.unpack(struct.Struct("<H"), self.used + 4 + 8 * self.num)[0]

    def used_flags(self) -> int:
        return self.ram.unpack(struct.Struct("<H"), self.used)[0]


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def events(fd: int, timeout: float = 0.0) -> int:
    """How many times fd was signalled (reads and clears the count), waiting up to timeout."""
    if timeout:
        select.select([fd], [], [], timeout)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class FrontEnd:
    """The QEMU side of the control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(5)

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False, flags: int | None = None) -> None:
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(req, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([data], anc)
        for fd in fds or []:
            os.close(fd)

    def recv_reply(self, req: int) -> bytes:
        hdr = self._recv_exact(HEADER.size)
        r, flags, size = HEADER.unpack(hdr)
        assert r == req, f"reply to {r}, expected {req}"
        assert flags & FLAG_REPLY and flags & 3 == VERSION
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            data += chunk
        return data

    def call(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = True) -> bytes:
        self.send(req, payload, fds, need_reply)
        return self.recv_reply(req)

    def u64(self, req: int) -> int:
        return U64.unpack(self.call(req, need_reply=False))[0]

    def ack(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> int:
        """Send with NEED_REPLY; the back-end's status (0: success)."""
        return U64.unpack(self.call(req, payload, fds))[0]

    def closed(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, ConnectionResetError):
            return False
        finally:
            self.sock.settimeout(5)


DEFAULT_FEATURES = (1 << F.VERSION_1 | 1 << F.NET_MRG_RXBUF | 1 << F.RING_EVENT_IDX
                    | 1 << F.PROTOCOL_FEATURES | 1 << F.NET_CSUM | 1 << F.NET_GUEST_CSUM
                    | 1 << F.NET_GUEST_TSO4 | 1 << F.NET_GUEST_TSO6 | 1 << F.NET_HOST_TSO4
                    | 1 << F.NET_HOST_TSO6 | 1 << F.RING_INDIRECT_DESC)


class Guest:
    """Front-end and driver together: `start()` brings the device up as QEMU 7.2 does."""

    def __init__(self, sock: socket.socket, num: int = 64,
                 features: int = DEFAULT_FEATURES) -> None:
        self.fe = FrontEnd(sock)
        self.ram = GuestRam()
        self.num = num
        self.features = features
        self.rings = [DriverRing(self.ram, num), DriverRing(self.ram, num)]
        self.kick = [eventfd(), eventfd()]
        self.call = [eventfd(), eventfd()]
        self.err = [eventfd(), eventfd()]

    @property
    def rx(self) -> DriverRing:
        return self.rings[0]

    @property
    def tx(self) -> DriverRing:
        return self.rings[1]

    def negotiate(self) -> None:
        fe = self.fe
        offered = fe.u64(Req.GET_FEATURES)
        assert offered & self.features == self.features
        if self.features & 1 << F.PROTOCOL_FEATURES:
            fe.u64(Req.GET_PROTOCOL_FEATURES)
            fe.send(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 3))      # REPLY_ACK
        fe.send(Req.SET_OWNER)
        assert fe.ack(Req.SET_FEATURES, U64.pack(self.features)) == 0
        payload, fds = self.ram.table()
        assert fe.ack(Req.SET_MEM_TABLE, payload, fds) == 0

    def start_queue(self, i: int, base: int = 0) -> None:
        fe, ring = self.fe, self.rings[i]
        assert fe.ack(Req.SET_VRING_NUM, STATE.pack(i, self.num)) == 0
        assert fe.ack(Req.SET_VRING_BASE, STATE.pack(i, base)) == 0
        assert fe.ack(Req.SET_VRING_ADDR, ADDR.pack(
            i, 0, self.ram.uva(ring.desc), self.ram.uva(ring.used), self.ram.uva(ring.avail),
            0)) == 0
        assert fe.ack(Req.SET_VRING_KICK, U64.pack(i), [os.dup(self.kick[i])]) == 0
        assert fe.ack(Req.SET_VRING_CALL, U64.pack(i), [os.dup(self.call[i])]) == 0
        assert fe.ack(Req.SET_VRING_ERR, U64.pack(i), [os.dup(self.err[i])]) == 0

    def enable(self, i: int, on: bool = True) -> None:
        assert self.fe.ack(Req.SET_VRING_ENABLE, STATE.pack(i, int(on))) == 0

    def start(self) -> None:
        self.negotiate()
        for i in (0, 1):
            self.start_queue(i)
        if self.features & 1 << F.PROTOCOL_FEATURES:
            for i in (0, 1):
                self.enable(i)

    # ---------------------------------------------------------------- the driver's data path

    def post_rx(self, count: int, size: int = 2048) -> list[int]:
        """Offer `count` receive buffers of `size` bytes (one descriptor each)."""
        return [self.rx.add([(self.ram.alloc(size), size)], write=True) for _ in range(count)]

    def send_frame(self, frame: bytes, split: list[int] | None = None, indirect: bool = False,
                   hdr: bytes | None = None, kick: bool = True) -> int:
        """Put header + frame in TX buffers (split at the given sizes) and kick."""
        data = (hdr if hdr is not None else bytes(12)) + frame
        sizes = split or [len(data)]
        bufs, pos = [], 0
        for k, n in enumerate(sizes):
            n = len(data) - pos if k == len(sizes) - 1 else n
            gpa = self.ram.alloc(n)
            self.ram.write(gpa, data[pos:pos + n])
            bufs.append((gpa, n))
            pos += n
        head = (self.tx.add_indirect(bufs, False) if indirect
                else self.tx.add(bufs, write=False))
        if kick and self.kick_wanted(self.tx):
            os.eventfd_write(self.kick[1], 1)
        return head

    def kick_wanted(self, ring: DriverRing) -> bool:
        """As Linux decides (virtqueue_kick_prepare): does the device want a kick for
        what was added since the last time the driver asked?"""
        old, new = ring.kicked_at, ring.avail_idx
        ring.kicked_at = new
        if self.features & 1 << F.RING_EVENT_IDX:
            event = ring.avail_event()
            return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not ring.used_flags() & 1

    def received(self) -> list[tuple[bytes, bytes]]:
        """(header, frame) of every frame the back-end put in RX buffers since last time."""
        out = []
        used = self.rx.take_used()
        k = 0
        while k < len(used):
            head, length = used[k]
            addr, _cap, _f, _n = self.ram.unpack(DESC, self.rx.desc + 16 * head)
            first = self.ram.read(addr, length)
            hdr = first[:12]
            nbuf = HDR.unpack(hdr)[6]
            data = first[12:]
            for head2, length2 in used[k + 1:k + nbuf]:
                addr2 = self.ram.unpack(DESC, self.rx.desc + 16 * head2)[0]
                data += self.ram.read(addr2, length2)
            out.append((hdr, data))
            k += max(nbuf, 1)
        return out

    def close(self) -> None:
        self.fe.sock.close()
        for fd in (*self.kick, *self.call, *self.err):
            os.close(fd)
        self.ram.close()
