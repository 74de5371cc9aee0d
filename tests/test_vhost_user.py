"""passt --vhost-user without QEMU: a scripted front-end and driver against a real session.

The session (`VhostUserSession`, as `passt --vhost-user` runs it) serves on
its own loop thread; the test plays QEMU on the control socket and the
guest's virtio-net driver in a memfd shared with the back-end (see
`tests/vhost_frontend.py`).  Frames go through the rings both ways and are
checked byte for byte; then the same rings are made hostile: each broken
ring stops only its queue, with one log line and the error eventfd, while
the process, the connection and the other queue carry on.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.packet.frames import build_ipv4_frame
from common.packet.ipv4 import IPPROTO_TCP
from common.packet.tcp import ACK, PSH, SYN, TcpOptions, build_tcp4, parse_tcp
from common.tap import GSO_TCP4, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4
from passt.vhost import migration
from passt.vhost.protocol import (
    ADDR,
    DEVICE_STATE,
    MEM_HEADER,
    REGION,
    STATE,
    U64,
    VERSION,
    F,
    Req,
)
from passt.vhost.session import VhostUserSession
from tests.support import GUEST_MAC, GW4, HOST4, OUR_MAC, make_conf, parse_frame, wait_until
from tests.test_passt import (
    arp_request,
    check_arp_reply,
    check_dhcp_reply,
    dhcp,
)
from tests.vhost_frontend import (
    DEFAULT_FEATURES,
    DESC,
    GPA_BASE,
    HDR,
    INDIRECT,
    NEXT,
    REGION_SIZE,
    WRITE,
    Guest,
    events,
)

DHCPDISCOVER, DHCPOFFER = 1, 2
NO_EVENT_IDX = DEFAULT_FEATURES & ~(1 << F.RING_EVENT_IDX)


class Server:
    """A vhost-user passt session on its own loop thread."""

    def __init__(self, path: Path, one_off: bool = False, **opts) -> None:
        opts.setdefault("no_ra", True)        # no unasked frames: counts stay exact
        self.session = VhostUserSession(make_conf(**opts), socket_path=str(path),
                                        one_off=one_off)
        self.session.setup()
        self.session.start()
        self.session.loop.call_every(0.02, lambda: None)   # notices stop() and call()
        self.path = str(path)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.session.run()

    def call(self, fn: Callable[[], object]) -> object:
        """Run fn on the loop thread; its result."""
        done = threading.Event()
        out: dict = {}

        def run() -> None:
            try:
                out["v"] = fn()
            finally:
                done.set()

        self.session.loop.call_later(0, run)
        assert done.wait(5), "the loop did not run the call"
        return out.get("v")

    def connect(self, **kw) -> Guest:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path)
        return Guest(s, **kw)

    def stop(self) -> None:
        self.session.loop.stop(0)
        self.thread.join(5)
        self.session.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "vhost.socket")
    yield s
    s.stop()


def started(server: Server, g: Guest) -> Guest:
    """g's device up, and the loop past the look at each ring that starting it asks for
    (a drain of its own: counts of signals start after it)."""
    g.start()
    wait_until(lambda: server.session.dataplane is not None, what="the data plane")
    server.call(lambda: None)
    server.call(lambda: None)      # the second runs after the loop's next poll
    return g


@pytest.fixture
def guest(server: Server) -> Iterator[Guest]:
    g = started(server, server.connect())
    yield g
    g.close()


def frames_in(g: Guest, count: int = 1) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []
    wait_until(lambda: got.extend(g.received()) or len(got) >= count, what=f"{count} frame(s)")
    return got


def is_arp_reply(frame: bytes) -> bool:
    return frame[12:14] == b"\x08\x06"


# ---------------------------------------------------------------- the protocol


def test_features_offered_and_negotiated(server: Server) -> None:
    g = server.connect()
    try:
        fe = g.fe
        offered = fe.u64(Req.GET_FEATURES)
        for bit in (F.VERSION_1, F.NET_MRG_RXBUF, F.RING_EVENT_IDX, F.RING_INDIRECT_DESC,
                    F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_HOST_TSO4, F.NET_HOST_TSO6,
                    F.NET_GUEST_TSO4, F.NET_GUEST_TSO6, F.PROTOCOL_FEATURES, F.LOG_ALL):
            assert offered >> bit & 1, bit
        for bit in (F.RING_PACKED, F.ACCESS_PLATFORM, F.NET_MTU):
            assert not offered >> bit & 1, bit
        proto = fe.u64(Req.GET_PROTOCOL_FEATURES)
        assert proto & 1 << 3                      # REPLY_ACK
        assert proto & 1 << 1 and proto & 1 << 19  # LOG_SHMFD, DEVICE_STATE (migration)
        assert not proto & 1                       # no multiqueue
        fe.send(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 3))
        # what was not offered is refused, and the message fails alone
        assert fe.ack(Req.SET_FEATURES, U64.pack(1 << F.RING_PACKED)) != 0
        assert fe.ack(Req.SET_FEATURES, U64.pack(DEFAULT_FEATURES)) == 0
        assert fe.ack(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 0)) != 0
    finally:
        g.close()


def test_unsupported_requests_fail_alone_and_their_fds_are_closed(server: Server) -> None:
    before = len(os.listdir("/proc/self/fd"))
    g = server.connect()
    try:
        fe = g.fe
        fe.send(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 3))
        assert fe.ack(99) != 0
        r, w = os.pipe()
        assert fe.ack(Req.SET_LOG_FD, b"", [r, w]) != 0        # two fds: both closed
        assert fe.ack(Req.SET_LOG_BASE, struct.pack("=QQ", 4096, 0)) != 0   # no fd
        r, w = os.pipe()
        assert fe.ack(Req.SET_DEVICE_STATE_FD, struct.pack("=II", 0, 1), [r]) != 0
        os.close(w)                                            # no such phase: r closed
        assert fe.call(Req.GET_CONFIG, struct.pack("=III", 0, 8, 0), need_reply=False) == b""
        assert fe.ack(Req.SET_VRING_NUM, STATE.pack(0, 100)) != 0      # not a power of two
        assert fe.ack(Req.SET_VRING_NUM, STATE.pack(7, 64)) != 0       # no queue 7
        assert fe.ack(Req.SET_VRING_ENDIAN, STATE.pack(0, 1)) != 0     # big-endian
        # a kick without a descriptor (polling) is refused, the connection stays
        assert fe.ack(Req.SET_VRING_KICK, U64.pack(1 | 1 << 8)) != 0
        assert fe.u64(Req.GET_FEATURES)
    finally:
        g.close()
    wait_until(lambda: server.session.conn is None, what="the connection to end")
    assert len(os.listdir("/proc/self/fd")) == before


def test_bad_memory_tables_fail_and_keep_the_old_one(server: Server, guest: Guest) -> None:
    fe = guest.fe
    fd = os.dup(guest.ram.fd)
    too_big = MEM_HEADER.pack(1, 0) + REGION.pack(GPA_BASE, 64 << 20, 0x1000, 0)
    assert fe.ack(Req.SET_MEM_TABLE, too_big, [fd]) != 0          # beyond the file's end
    empty = MEM_HEADER.pack(1, 0) + REGION.pack(GPA_BASE, 0, 0x1000, 0)
    assert fe.ack(Req.SET_MEM_TABLE, empty, [os.dup(guest.ram.fd)]) != 0
    two = MEM_HEADER.pack(2, 0) + REGION.pack(0, 4096, 0, 0) * 2
    assert fe.ack(Req.SET_MEM_TABLE, two, [os.dup(guest.ram.fd)]) != 0   # one fd for two
    # the rings still work on the old table
    guest.post_rx(4)
    guest.send_frame(arp_request(GW4))
    (hdr, frame), = frames_in(guest)
    check_arp_reply(frame, GW4)


@pytest.mark.parametrize("bad", [
    struct.pack("=III", Req.GET_FEATURES, 2, 0),             # protocol version 2
    struct.pack("=III", Req.SET_FEATURES, VERSION, 1 << 20),  # a huge payload
])
def test_malformed_header_ends_the_connection_not_the_process(server: Server,
                                                               bad: bytes) -> None:
    g = server.connect()
    try:
        g.fe.sock.sendall(bad)
        assert g.fe.closed()
    finally:
        g.close()
    g = server.connect()
    try:
        assert g.fe.u64(Req.GET_FEATURES)
    finally:
        g.close()


def test_message_in_pieces_with_its_fds(server: Server) -> None:
    g = server.connect()
    try:
        g.fe.send(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 3))
        payload, fds = g.ram.table()
        data = struct.pack("=III", Req.SET_MEM_TABLE, VERSION | 8, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("2i", *fds))]
        g.fe.sock.sendmsg([data[:5]], anc)
        for fd in fds:
            os.close(fd)
        time.sleep(0.05)
        g.fe.sock.sendall(data[5:40])
        time.sleep(0.05)
        g.fe.sock.sendall(data[40:])
        assert U64.unpack(g.fe.recv_reply(Req.SET_MEM_TABLE))[0] == 0
        assert len(server.session.conn.device.mem) == 2
    finally:
        g.close()


# ---------------------------------------------------------------- frames both ways


def test_arp_and_dhcp_through_the_rings(server: Server, guest: Guest) -> None:
    guest.post_rx(8)
    guest.send_frame(arp_request(GW4))
    (hdr, frame), = frames_in(guest)
    check_arp_reply(frame, GW4)
    flags, gso, _hl, _gs, _cs, _co, nbuf = HDR.unpack(hdr)
    assert (flags, gso, nbuf) == (0, 0, 1)
    assert guest.tx.take_used() and events(guest.call[1], 1.0) >= 1
    assert events(guest.call[0], 1.0) >= 1
    guest.send_frame(dhcp(DHCPDISCOVER))
    (hdr, frame), = frames_in(guest)
    check_dhcp_reply(frame, DHCPOFFER)


def test_tx_buffers_split_across_descriptors_regions_and_indirect(server: Server,
                                                                  guest: Guest) -> None:
    guest.post_rx(8)
    # a chain of three: header alone, then the frame in two pieces
    guest.send_frame(arp_request(GW4), split=[12, 20, 0])
    check_arp_reply(frames_in(guest)[0][1], GW4)
    # one buffer that starts in the first region and ends in the second
    ram = guest.ram
    ram.next = GPA_BASE + REGION_SIZE - 30
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)
    # an indirect table of three
    guest.send_frame(arp_request(GW4), split=[12, 7, 0], indirect=True)
    check_arp_reply(frames_in(guest)[0][1], GW4)


def test_tcp_payload_is_sent_from_guest_memory(server: Server, guest: Guest) -> None:
    """A guest TCP segment's payload past its headers stays in the TX buffers and goes to
    the host socket from there: every byte in order, whatever the buffers' shape."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(5)
    port = lsock.getsockname()[1]
    me, gw = socket.inet_aton(HOST4), socket.inet_aton(GW4)
    guest.post_rx(32)

    def segment(seq: int, ack: int, flags: int, payload: bytes = b"",
                options: TcpOptions | None = None) -> bytes:
        l4 = build_tcp4(me, gw, 40000, port, seq, ack, flags, 65535, payload, options)
        return build_ipv4_frame(OUR_MAC, GUEST_MAC, me, gw, IPPROTO_TCP, l4)

    try:
        guest.send_frame(segment(1000, 0, SYN, options=TcpOptions(mss=1460, wscale=7)))
        (_hdr, synack), = frames_in(guest)
        tcp, _ = parse_tcp(parse_frame(synack)[1])
        assert tcp.flags == SYN | ACK
        peer, _ = lsock.accept()
        peer.settimeout(5)
        seq, ack = 1001, tcp.seq + 1
        sent = b""
        # Ethernet + IPv4 + TCP headers are 54 bytes: a first descriptor that holds them
        # (after the 12-byte virtio-net header) is all that is copied; else the first 146
        # bytes are (the longest headers), the rest is read in place, its first piece cut
        # where the copy ended
        for split, indirect in (([12, 100, 300, 1000, 0], False),
                                ([12, 54, 400, 0], True),
                                ([66, 2000, 0], False),
                                ([100, 1000, 0], True),
                                ([30, 0], True),
                                ([2000, 0], False)):
            data = os.urandom(3000)
            guest.send_frame(segment(seq, ack, ACK | PSH, data), split=split, indirect=indirect)
            seq += len(data)
            sent += data
        # a resend that overlaps what we have: its payload starts inside a piece in place
        data = os.urandom(1000)
        guest.send_frame(segment(seq - 500, ack, ACK | PSH, sent[-500:] + data),
                         split=[66, 700, 800, 0])
        seq += len(data)
        sent += data
        got = b""
        while len(got) < len(sent):
            chunk = peer.recv(65536)
            assert chunk, "the connection ended early"
            got += chunk
        assert got == sent
        assert server.call(lambda: server.session.conn.tap.payload_in_place) == 7
        peer.close()
    finally:
        lsock.close()


def test_guest_header_flags_are_taken_and_bad_sizes_dropped(server: Server,
                                                            guest: Guest) -> None:
    guest.post_rx(8)
    # a guest asking for checksum offload on an ARP frame: the header is skipped
    hdr = HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 14, 16, 0)
    guest.send_frame(arp_request(GW4), hdr=hdr)
    check_arp_reply(frames_in(guest)[0][1], GW4)
    guest.send_frame(b"\x01\x02")                             # shorter than Ethernet
    big = guest.ram.alloc(70000)
    guest.tx.add([(big, 70000)], write=False)                # longer than any frame
    os.eventfd_write(guest.kick[1], 1)
    wait_until(lambda: len(guest.tx.take_used()) >= 0 and guest.tx.used_idx() == 3,
               what="the bad buffers back")
    assert server.call(lambda: server.session.conn.tap.bad_frames) == 2
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)


def inject(server: Server, frames: list[bytes]) -> None:
    server.call(lambda: [server.session.conn.tap.send_frame(f) for f in frames])


@pytest.mark.parametrize("layout", ["adjacent", "apart", "across regions"])
def test_large_frame_spans_mergeable_buffers(server: Server, guest: Guest,
                                             layout: str) -> None:
    if layout == "across regions":
        guest.ram.next = GPA_BASE + REGION_SIZE - 5000
    guest.post_rx(50, size=1536)
    if layout == "apart":                   # every other buffer: none continues the last
        for head in list(guest.rx.chains)[::2]:
            addr, length, flags, nxt = guest.ram.unpack(DESC, guest.rx.desc + 16 * head)
            guest.ram.pack(DESC, guest.rx.desc + 16 * head, addr + 64, length - 64, flags,
                           nxt)
    frame = bytes(range(256)) * 256                          # 64 KiB
    frame = b"\x52\x54\x00\x12\x34\x56" + frame[6:]
    inject(server, [frame])
    (hdr, data), = frames_in(guest)
    assert data == frame
    nbuf = HDR.unpack(hdr)[6]
    assert nbuf == -(-(len(frame) + 12) // (1536 - (32 if layout == "apart" else 0)))
    assert events(guest.call[0], 1.0) == 1


def test_partial_checksum_and_gso_go_into_the_header(server: Server, guest: Guest) -> None:
    guest.post_rx(60, size=1536)
    tap = server.call(lambda: server.session.conn.tap)
    assert tap.csum_offload
    frame = bytearray(16 + 14 + 20 + 20 + 30000)
    frame[16 + 14] = 0x45
    frame[16 + 14 + 20 + 12] = 5 << 4                       # TCP header of 20 bytes
    server.call(lambda: tap.send(frame, 16, len(frame), 34, 16, GSO_TCP4,
                                 1460))
    (hdr, data), = frames_in(guest)
    assert data == frame[16:]
    flags, gso, hdr_len, gso_size, cstart, coff, _n = HDR.unpack(hdr)
    assert (flags, gso, hdr_len, gso_size, cstart, coff) == (
        VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 54, 1460, 34, 16)


def test_no_offload_without_guest_tso(server: Server) -> None:
    g = server.connect(features=DEFAULT_FEATURES & ~(1 << F.NET_GUEST_TSO6))
    try:
        started(server, g)
        assert not server.call(lambda: server.session.conn.tap.csum_offload)
    finally:
        g.close()


def test_single_buffers_without_mrg_rxbuf(server: Server) -> None:
    g = server.connect(features=DEFAULT_FEATURES & ~(1 << F.NET_MRG_RXBUF))
    try:
        started(server, g)
        g.post_rx(1, size=100)              # too small for what comes: dropped, given back
        g.post_rx(1, size=4096)
        small = b"\x52\x54\x00\x12\x34\x56" + bytes(194)
        inject(server, [small, small[:60]])
        used = wait_until(lambda: g.rx.used_idx() == 2 and g.rx.take_used(), what="two buffers")
        assert [n for _h, n in used] == [0, 12 + 60]
    finally:
        g.close()


def test_frames_wait_for_receive_buffers_in_order(server: Server, guest: Guest) -> None:
    frames = [b"\x52\x54\x00\x12\x34\x56" + bytes([i]) * 500 for i in range(6)]
    inject(server, frames)
    time.sleep(0.05)
    assert guest.rx.used_idx() == 0
    # the back-end asked to be kicked at the next buffer (event index)
    assert guest.rx.avail_event() == guest.rx.avail_idx
    guest.post_rx(3)
    os.eventfd_write(guest.kick[0], 1)
    got = frames_in(guest, 3)
    guest.post_rx(3)
    os.eventfd_write(guest.kick[0], 1)
    got += frames_in(guest, 3)
    assert [f for _h, f in got] == frames
    assert server.call(lambda: server.session.conn.tap.queued) == 0


def test_disabled_rings_take_no_frames_and_discard_guest_ones(server: Server,
                                                              guest: Guest) -> None:
    guest.post_rx(4)
    guest.enable(0, False)
    assert not server.call(lambda: server.session.conn.tap.send_frame(
        b"\x52\x54\x00\x12\x34\x56" + bytes(60)))
    guest.enable(0)
    guest.enable(1, False)
    guest.send_frame(arp_request(GW4))
    wait_until(lambda: guest.tx.used_idx() == 1, what="the TX buffer back")
    time.sleep(0.05)
    assert guest.rx.used_idx() == 0              # discarded: no ARP reply
    guest.enable(1)
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)


# ---------------------------------------------------------------- notifications


def test_one_signal_per_batch_and_kicks_requested(server: Server) -> None:
    g = server.connect(features=NO_EVENT_IDX)
    try:
        started(server, g)
        g.post_rx(32)
        for _ in range(10):
            g.send_frame(arp_request(GW4), kick=False)
        os.eventfd_write(g.kick[1], 1)
        got = frames_in(g, 10)
        assert all(is_arp_reply(f) for _h, f in got)
        time.sleep(0.05)
        assert events(g.call[1]) == 1 and events(g.call[0]) == 1
        assert g.tx.used_flags() == 0            # kicks wanted again after the drain
        # the driver says "no interrupts": none come
        g.rx.set_avail_flags(1)
        g.tx.set_avail_flags(1)
        g.send_frame(arp_request(GW4))
        frames_in(g)
        time.sleep(0.05)
        assert events(g.call[1]) == 0 and events(g.call[0]) == 0
    finally:
        g.close()


@pytest.mark.parametrize("features", [DEFAULT_FEATURES, NO_EVENT_IDX],
                         ids=["event index", "flags"])
def test_a_failing_handler_does_not_silence_the_guest(server: Server, features: int) -> None:
    """A bug in a handler must not leave kicks turned off (the driver would wait forever)."""
    g = server.connect(features=features)
    try:
        dp = started(server, g) and server.session.dataplane
        g.post_rx(8)
        demux = dp.demux
        calls = []

        def failing_once(frame) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a handler bug")
            demux(frame)

        server.call(lambda: setattr(dp, "demux", failing_once))
        g.send_frame(arp_request(GW4), kick=False)
        g.send_frame(arp_request(GW4), kick=False)
        os.eventfd_write(g.kick[1], 1)
        wait_until(lambda: g.tx.used_idx() == 2, what="both TX buffers back")
        time.sleep(0.05)
        g.send_frame(arp_request(GW4))           # kicks only if the back-end wants it
        got = frames_in(g, 2)
        assert all(is_arp_reply(f) for _h, f in got)
        assert server.session.loop.handler_errors == 1
    finally:
        g.close()


def test_event_index_both_ways(server: Server, guest: Guest) -> None:
    guest.post_rx(32)
    # the first buffers after a start are always signalled
    guest.send_frame(arp_request(GW4))
    frames_in(guest)
    assert events(guest.call[0], 1.0) == 1 and events(guest.call[1], 1.0) == 1
    # used_event far ahead: no signal for these
    guest.rx.set_used_event(1000)
    guest.tx.set_used_event(1000)
    guest.send_frame(arp_request(GW4), kick=False)
    guest.send_frame(arp_request(GW4))
    frames_in(guest, 2)
    time.sleep(0.05)
    assert events(guest.call[0]) == 0 and events(guest.call[1]) == 0
    # after its drain the back-end wants a kick for the next TX buffer
    assert guest.tx.avail_event() == guest.tx.avail_idx
    # used_event at the next used entry: exactly one signal each way
    guest.rx.set_used_event(guest.rx.used_idx())
    guest.tx.set_used_event(guest.tx.used_idx())
    guest.send_frame(arp_request(GW4))
    frames_in(guest)
    time.sleep(0.05)
    assert events(guest.call[0]) == 1 and events(guest.call[1]) == 1


def test_long_drain_yields_and_comes_back(server: Server) -> None:
    g = server.connect(num=512)
    try:
        started(server, g)
        g.post_rx(400, size=256)
        for _ in range(300):                     # more than one drain's batch (256)
            g.send_frame(arp_request(GW4), kick=False)
        os.eventfd_write(g.kick[1], 1)
        got = frames_in(g, 300)
        assert len(got) == 300
        wait_until(lambda: g.tx.used_idx() == 300, what="every TX buffer back")
    finally:
        g.close()


# ---------------------------------------------------------------- hostile rings


def break_tx(g: Guest, how: str) -> None:
    """Offer one TX buffer that breaks the ring's rules in the way `how` says."""
    ring, ram = g.tx, g.ram
    buf = ram.alloc(64)
    ram.write(buf, bytes(12) + arp_request(GW4))
    if how == "head beyond the queue":
        ring.offer(g.num + 3)
    elif how == "descriptor loop":
        ring.set_desc(0, buf, 8, NEXT, 1)
        ring.set_desc(1, buf + 8, 8, NEXT, 0)
        ring.offer(0)
    elif how == "next beyond the queue":
        ring.set_desc(0, buf, 8, NEXT, 9999)
        ring.offer(0)
    elif how == "address in no region":
        ring.set_desc(0, 0xDEAD0000000, 64)
        ring.offer(0)
    elif how == "length past the memory's end":
        ring.set_desc(0, GPA_BASE + 2 * REGION_SIZE - 16, 0xFFFFFFFF)
        ring.offer(0)
    elif how == "address that wraps":
        ring.set_desc(0, 0xFFFFFFFFFFFFFFF0, 0x100)
        ring.offer(0)
    elif how == "receive buffer in the TX queue":
        ring.set_desc(0, buf, 64, WRITE)
        ring.offer(0)
    elif how == "nested indirect":
        table = ram.alloc(32, 16)
        ram.pack(DESC, table, table, 16, INDIRECT, 0)
        ring.set_desc(0, table, 16, INDIRECT)
        ring.offer(0)
    elif how == "indirect of 17 bytes":
        ring.set_desc(0, buf, 17, INDIRECT)
        ring.offer(0)
    elif how == "indirect loop":
        table = ram.alloc(32, 16)
        ram.pack(DESC, table, buf, 8, NEXT, 1)
        ram.pack(DESC, table + 16, buf, 8, NEXT, 0)
        ring.set_desc(0, table, 32, INDIRECT)
        ring.offer(0)
    elif how == "available index jumps":
        ring.publish((ring.avail_idx + g.num + 5) & 0xFFFF)
    else:
        raise AssertionError(how)
    os.eventfd_write(g.kick[1], 1)


HOSTILE = ["head beyond the queue", "descriptor loop", "next beyond the queue",
           "address in no region", "length past the memory's end", "address that wraps",
           "receive buffer in the TX queue", "nested indirect", "indirect of 17 bytes",
           "indirect loop", "available index jumps"]


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_tx_ring_stops_that_queue_only(server: Server, guest: Guest, how: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    guest.post_rx(4)
    with caplog.at_level(logging.ERROR, logger="vhost"):
        break_tx(guest, how)
        assert events(guest.err[1], 2.0) == 1, "the error eventfd was not signalled"
        time.sleep(0.05)
    lines = [r for r in caplog.records if r.name == "vhost" and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "TX queue stopped" in lines[0].getMessage(), lines
    # the process, the connection and the receive queue carry on
    assert server.thread.is_alive()
    assert guest.fe.u64(Req.GET_FEATURES)
    inject(server, [b"\x52\x54\x00\x12\x34\x56" + bytes(60)])
    assert frames_in(guest)
    # another kick changes nothing: the queue stays stopped, silently
    os.eventfd_write(guest.kick[1], 1)
    time.sleep(0.05)
    assert events(guest.err[1]) == 0
    assert len([r for r in caplog.records if r.name == "vhost"
                and r.levelno >= logging.ERROR]) == 1


def test_stopped_queue_restarts_when_configured_again(server: Server, guest: Guest) -> None:
    guest.post_rx(4)
    break_tx(guest, "head beyond the queue")
    assert events(guest.err[1], 2.0) == 1
    # QEMU's way: stop the ring, then start it from a sane state
    base = STATE.unpack(guest.fe.call(Req.GET_VRING_BASE, STATE.pack(1, 0),
                                      need_reply=False))[1]
    assert base == 0                            # the bad entry was not taken
    guest.start_queue(1, base=guest.tx.avail_idx)   # the driver starts over past it
    guest.enable(1)
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)


def break_rx(g: Guest, how: str) -> None:
    """Offer receive buffers that break the ring's rules in the way `how` says."""
    ring, ram = g.rx, g.ram
    if how == "buffer not device-writable":
        ring.add([(ram.alloc(2048), 2048)], write=False)
    elif how == "head beyond the queue":
        g.post_rx(1)
        ring.offer(g.num + 1)
    elif how == "available index jumps":
        g.post_rx(1)
        ring.publish((ring.avail_idx + g.num + 1) & 0xFFFF)
    elif how == "address in no region":
        g.post_rx(1)                        # a good one first: the frame needs both
        ring.add_raw(0xDEAD0000000, 4096, WRITE)
    elif how == "length past the memory's end":
        ring.add_raw(GPA_BASE + 2 * REGION_SIZE - 64, 0x100000, WRITE)
    elif how == "descriptor loop":
        i, j = ring.free.pop(0), ring.free.pop(0)
        buf = ram.alloc(64)
        ring.set_desc(i, buf, 32, WRITE | NEXT, j)
        ring.set_desc(j, buf + 32, 32, WRITE | NEXT, i)
        ring.offer(i)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["buffer not device-writable", "head beyond the queue",
                                 "available index jumps", "address in no region",
                                 "length past the memory's end", "descriptor loop"])
def test_hostile_rx_ring_stops_rx_only(server: Server, guest: Guest, how: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="vhost"):
        break_rx(guest, how)
        inject(server, [b"\x52\x54\x00\x12\x34\x56" + bytes(3000)])
        assert events(guest.err[0], 2.0) == 1
    lines = [r for r in caplog.records if r.name == "vhost" and r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "RX queue stopped" in lines[0].getMessage(), lines
    # TX still drains (its frames' replies are dropped: RX is stopped)
    guest.send_frame(arp_request(GW4))
    wait_until(lambda: guest.tx.used_idx() == 1, what="the TX buffer back")


def test_front_end_resizing_a_running_ring_breaks_nothing(server: Server,
                                                          guest: Guest) -> None:
    assert guest.fe.ack(Req.SET_VRING_NUM, STATE.pack(1, 8)) == 0
    assert guest.fe.ack(Req.SET_VRING_NUM, STATE.pack(0, 1024)) == 0
    guest.rx.offer(100)                       # a head only a 1024-entry table has
    for _ in range(12):                       # heads beyond 8
        guest.send_frame(arp_request(GW4), kick=False)
    os.eventfd_write(guest.kick[1], 1)
    inject(server, [b"\x52\x54\x00\x12\x34\x56" + bytes(60)])
    time.sleep(0.1)
    assert server.session.loop.handler_errors == 0
    assert guest.fe.u64(Req.GET_FEATURES)


def test_ring_outside_memory_stops_at_start(server: Server,
                                            caplog: pytest.LogCaptureFixture) -> None:
    g = server.connect()
    try:
        g.negotiate()
        g.start_queue(0)
        fe = g.fe
        with caplog.at_level(logging.ERROR, logger="vhost"):
            assert fe.ack(Req.SET_VRING_NUM, STATE.pack(1, g.num)) == 0
            assert fe.ack(Req.SET_VRING_ADDR, ADDR.pack(1, 0, 0x10, 0x20, 0x40, 0)) == 0
            assert fe.ack(Req.SET_VRING_KICK, U64.pack(1), [os.dup(g.kick[1])]) == 0
        assert any("TX queue stopped" in r.getMessage() for r in caplog.records)
        assert fe.u64(Req.GET_FEATURES)
    finally:
        g.close()


# ---------------------------------------------------------------- life cycle


def test_rings_stop_and_start_and_memory_changes_keep_the_flows(server: Server,
                                                                guest: Guest) -> None:
    guest.post_rx(8)
    dp = server.session.dataplane
    for i in (0, 1):
        idx = STATE.unpack(guest.fe.call(Req.GET_VRING_BASE, STATE.pack(i, 0),
                                         need_reply=False))[1]
        assert idx == guest.rings[i].used_idx()     # everything taken was given back
    assert not server.call(lambda: server.session.conn.tap.send_frame(bytes(60)))
    # a new memory table (the same memory), then the rings again
    payload, fds = guest.ram.table()
    assert guest.fe.ack(Req.SET_MEM_TABLE, payload, fds) == 0
    for i in (0, 1):
        guest.start_queue(i, base=guest.rings[i].used_idx())
        guest.enable(i)
    assert server.session.dataplane is dp
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)


def test_next_front_end_after_a_disconnect(server: Server) -> None:
    before = len(os.listdir("/proc/self/fd"))
    first = server.connect()
    first.start()
    wait_until(lambda: server.session.dataplane is not None, what="the data plane")
    second = server.connect()
    assert second.fe.closed(), "a second front-end must be turned away"
    second.close()
    first.close()
    wait_until(lambda: server.session.conn is None and server.session.dataplane is None,
               what="the first guest to be gone")
    assert len(os.listdir("/proc/self/fd")) == before
    third = server.connect()
    try:
        third.start()
        third.post_rx(4)
        third.send_frame(arp_request(GW4))
        check_arp_reply(frames_in(third)[0][1], GW4)
        assert server.session.guests == 2
    finally:
        third.close()


def test_one_off_ends_with_the_front_end(tmp_path: Path) -> None:
    s = Server(tmp_path / "one.socket", one_off=True)
    try:
        g = s.connect()
        g.start()
        g.close()
        s.thread.join(5)
        assert not s.thread.is_alive() and s.code == 0
    finally:
        s.stop()
    assert not (tmp_path / "one.socket").exists()


def test_reset_device_starts_over(server: Server, guest: Guest) -> None:
    fe = guest.fe
    fe.send(Req.SET_PROTOCOL_FEATURES, U64.pack(1 << 3 | 1 << 13))
    assert fe.ack(Req.RESET_DEVICE) == 0
    assert server.call(lambda: server.session.conn.device.features) == 0
    guest.rx.avail_idx = guest.tx.avail_idx = 0
    guest.rx.used_seen = guest.tx.used_seen = 0
    guest.rx.free = list(range(guest.num))
    guest.tx.free = list(range(guest.num))
    guest.ram.write(guest.rx.used, bytes(4))
    guest.ram.write(guest.tx.used, bytes(4))
    guest.start()
    guest.post_rx(4)
    guest.send_frame(arp_request(GW4))
    check_arp_reply(frames_in(guest)[0][1], GW4)


def test_a_driver_resetting_in_a_loop_does_not_flood_the_log(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    """What the guest's driver does as often as it likes (features again, device resets,
    requests we refuse) is said at most about once a second each."""
    g = server.connect()
    try:
        g.negotiate()
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="vhost"):
            for _ in range(200):
                assert g.fe.ack(Req.SET_FEATURES, U64.pack(g.features)) == 0
                assert g.fe.ack(Req.RESET_DEVICE) == 0
                assert g.fe.ack(Req.SET_FEATURES, U64.pack(1 << 63)) != 0
        elapsed = time.monotonic() - start
        lines = [r for r in caplog.records if r.name == "vhost"]
        assert len(lines) <= 3 * (2 + elapsed), [r.getMessage() for r in lines[:10]]
        assert g.fe.u64(Req.GET_FEATURES)
    finally:
        g.close()


# ---------------------------------------------------------------- live migration

LOG_PAGE = 4096


def pages(addr: int, length: int) -> set[int]:
    return set(range(addr // LOG_PAGE, (addr + length - 1) // LOG_PAGE + 1)) if length else set()


def logged(log_map) -> set[int]:
    return {8 * i + bit for i, byte in enumerate(bytes(log_map)) if byte
            for bit in range(8) if byte >> bit & 1}


def start_logging(g: Guest, log_fd: int, size: int, on: bool = True) -> None:
    """What QEMU does when a migration starts (or, `on` False, ends): the log, LOG_ALL,
    and the rings' addresses again with their used rings' guest addresses to log."""
    fe = g.fe
    fe.send(Req.SET_LOG_BASE, struct.pack("=QQ", size, 0), [os.dup(log_fd)])
    assert U64.unpack(fe.recv_reply(Req.SET_LOG_BASE)) == (0,)
    feats = g.features | (1 << F.LOG_ALL if on else 0)
    assert fe.ack(Req.SET_FEATURES, U64.pack(feats)) == 0
    for i, ring in enumerate(g.rings):
        assert fe.ack(Req.SET_VRING_ADDR, ADDR.pack(
            i, 1 if on else 0, g.ram.uva(ring.desc), g.ram.uva(ring.used),
            g.ram.uva(ring.avail), ring.used)) == 0


def test_dirty_log_has_every_page_we_wrote_and_no_other(server: Server, guest: Guest) -> None:
    size = (GPA_BASE + guest.ram.size) // LOG_PAGE // 8 + 1
    log_fd = os.memfd_create("vhost-test-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(log_fd, size)
        log_map = mmap.mmap(log_fd, size)
        start_logging(guest, log_fd, size)
        # receive buffers: single ones (the fast path) and a chain of three pieces
        guest.ram.alloc(0, LOG_PAGE)                         # a page of its own
        pieces = [(guest.ram.alloc(640), 640) for _ in range(3)]    # contiguous
        guest.ram.alloc(0, LOG_PAGE)
        chained = guest.rx.add(pieces, write=True)          # the first frame goes here
        singles = guest.post_rx(8, size=1536)
        buffers = {h: [(guest.ram.unpack(DESC, guest.rx.desc + 16 * h)[0], 1536)]
                   for h in singles}
        buffers[chained] = pieces
        frames = [b"\x52\x54\x00\x12\x34\x56" + bytes(range(6, 256)) * 4]   # 1 KiB
        frames.append(frames[0][:60])
        inject(server, frames)
        guest.send_frame(arp_request(GW4))                   # TX used ring, and a reply
        got = frames_in(guest, 3)
        received = [d for _h, d in got]
        assert all(f in received for f in frames)
        expected: set[int] = set()
        # what we gave back, read from the used ring (the driver above consumed it)
        used = [guest.ram.unpack(struct.Struct("<II"), guest.rx.used + 4 + 8 * i)
                for i in range(guest.rx.used_idx())]
        assert len(used) == 3
        for head, length in used:
            for addr, n in buffers[head]:
                expected |= pages(addr, min(n, length))
                length -= n
                if length <= 0:
                    break
        for ring in guest.rings:
            expected |= pages(ring.used, 6 + 8 * guest.num)
        wait_until(lambda: logged(log_map) == expected, what="the log to hold every page written")
        assert logged(log_map) == expected
        # the front-end ends the migration: nothing more is logged
        start_logging(guest, log_fd, size, on=False)
        log_map[:] = bytes(size)
        guest.post_rx(4, size=1536)
        inject(server, frames)
        frames_in(guest, 2)
        assert logged(log_map) == set()
        log_map.close()
    finally:
        os.close(log_fd)


def test_device_state_moves_what_we_know_of_the_guest(server: Server) -> None:
    guest = started(server, server.connect())
    guest.post_rx(4, size=1536)
    guest.send_frame(arp_request(GW4))                       # we learn the guest's MAC
    frames_in(guest, 1)
    source = server.call(lambda: server.session.conn.guest)
    assert source.mac == bytes.fromhex("525400123456")
    r, w = os.pipe()
    reply = guest.fe.call(Req.SET_DEVICE_STATE_FD, DEVICE_STATE.pack(0, 0), [w],
                          need_reply=False)
    assert U64.unpack(reply) == (1 << 8,)                    # it writes into our pipe
    state = b""
    while chunk := os.read(r, 4096):                         # and closes it when done
        state += chunk
    os.close(r)
    assert guest.fe.u64(Req.CHECK_DEVICE_STATE) == 0
    assert len(state) == migration.STATE_SIZE
    guest.close()
    wait_until(lambda: server.session.conn is None, what="the first front-end to go")

    def load(data: bytes) -> tuple[int, object]:
        g = server.connect()
        try:
            g.negotiate()
            r, w = os.pipe()
            assert U64.unpack(g.fe.call(Req.SET_DEVICE_STATE_FD, DEVICE_STATE.pack(1, 0), [r],
                                        need_reply=False)) == (1 << 8,)
            os.write(w, data)
            os.close(w)
            status = g.fe.u64(Req.CHECK_DEVICE_STATE)
            return status, server.call(lambda: server.session.conn.guest)
        finally:
            g.close()
            wait_until(lambda: server.session.conn is None, what="the front-end to go")

    status, dest = load(state)
    assert status == 0
    assert (dest.mac, dest.mac_seen, dest.addr4, dest.addr6) == (
        source.mac, True, source.addr4, source.addr6)
    # a state that is not ours fails the check and changes nothing
    bad = bytearray(state)
    bad[16] |= 1                                             # a multicast MAC
    for data in (b"", state[:-1], state + b"x", b"x" + state[1:], bytes(bad)):
        status, dest = load(data)
        assert status != 0, data
        assert not dest.mac_seen
