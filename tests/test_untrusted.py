"""No frame stalls or wedges the data plane (issue 9, section 3).

Each test is one way a guest could stall or wedge us, found by trying it:
a DHCPv6 message whose reply would not fit (or not even be buildable), a
frame whose handler raises (counted, logged at a bounded rate, the next
frame served, nothing handed on twice), an MSS of 1, one flow with much to
send next to another, a listener out of descriptors, and flow tables larger
than the descriptors we may open.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest

from common.budget import RESERVE_FIXED, FdBudget
from common.dataplane import DataPlane
from common.guest import GuestState
from common.listeners import TcpListener
from common.loop import IN, Loop
from common.packet.frames import udp4_frame, udp6_frame
from common.packet.tcp import ACK, RST, SYN, TcpOptions
from common.tap import StreamTap
from common.tcp.handler import PUSH_BATCH
from tests.support import (
    GUEST_LL,
    GUEST_MAC,
    GW4,
    HOST4,
    OUR_MAC,
    FakeTap,
    make_conf,
    spin,
    wait_until,
)
from tests.test_tcp_handler import ISN, Guest, establish

ALL_DHCP = socket.inet_pton(socket.AF_INET6, "ff02::1:2")


def solicit(n_ta: int = 0, n_na: int = 0, held: int = 0) -> bytes:
    """A DHCPv6 SOLICIT with `n_ta` IA_TA and `n_na` IA_NA options (each IA_NA
    holding `held` addresses), as a frame from the guest."""
    duid = struct.pack("!HH", 3, 1) + GUEST_MAC
    msg = bytes((1, 0x12, 0x34, 0x56)) + struct.pack("!HH", 1, len(duid)) + duid
    for i in range(n_ta):
        msg += struct.pack("!HHI", 4, 4, i)
    for i in range(n_na):
        addrs = b"".join(struct.pack("!HH16sII", 5, 24, bytes(15) + bytes((j + 2,)), 0, 0)
                         for j in range(held))
        msg += struct.pack("!HHIII", 3, 12 + len(addrs), i, 0, 0) + addrs
    return udp6_frame(OUR_MAC, GUEST_MAC, GUEST_LL.packed, ALL_DHCP, 546, 547, msg)


def request(n_na: int, held: int) -> bytes:
    """A DHCPv6 REQUEST (our server ID) whose IA_NAs hold stale addresses."""
    from common.dhcpv6 import server_duid
    conf = make_conf("passt", mtu="1500")
    duid = struct.pack("!HH", 3, 1) + GUEST_MAC
    sid = server_duid(conf)
    msg = bytes((3, 0x12, 0x34, 0x56)) + struct.pack("!HH", 1, len(duid)) + duid
    msg += struct.pack("!HH", 2, len(sid)) + sid
    for i in range(n_na):
        addrs = b"".join(struct.pack("!HH16sII", 5, 24, b"\x20\x01\x0d\xb8" + bytes(10)
                                     + struct.pack("!H", j + 1), 0, 0) for j in range(held))
        msg += struct.pack("!HHIII", 3, 12 + len(addrs), i, 0, 0) + addrs
    return udp6_frame(OUR_MAC, GUEST_MAC, GUEST_LL.packed, ALL_DHCP, 546, 547, msg)


# ---------------------------------------------------------------- responders


@pytest.mark.parametrize("frame", [solicit(n_ta=3000), solicit(n_ta=100), solicit(n_na=60),
                                   request(40, 20)],
                         ids=["3000-IA_TA", "100-IA_TA", "60-IA_NA", "stale-addresses"])
def test_dhcpv6_reply_fits_the_mtu(frame):
    conf = make_conf("passt", mtu="1500")
    loop = Loop()
    tap = FakeTap()
    dp = DataPlane(conf, loop, tap, GuestState(conf, GUEST_MAC))
    try:
        dp.demux(memoryview(frame))
        assert not dp.demux.errors.counts
        assert tap.frames, "the client gets an answer"
        assert all(len(f) <= 14 + conf.mtu for f in tap.frames), [len(f) for f in tap.frames]
    finally:
        dp.stop()
        loop.close()


# ---------------------------------------------------------------- handler errors


def _boom(frame, l3, l4, end, key) -> None:
    raise RuntimeError("a handler's bug")


def test_handler_errors_counted_logged_bounded_and_next_frame_served(caplog):
    conf = make_conf("passt")
    loop = Loop()
    tap = FakeTap()
    dp = DataPlane(conf, loop, tap, GuestState(conf, GUEST_MAC))
    dp.demux.udp4 = _boom
    frame = udp4_frame(OUR_MAC, GUEST_MAC, socket.inet_aton(HOST4), socket.inet_aton(GW4),
                       40000, 9, b"x")
    caplog.set_level(logging.DEBUG)
    try:
        for _ in range(2000):
            dp.demux(memoryview(frame))
        (name, n), = dp.demux.errors.counts.items()
        assert name.endswith("test_untrusted._boom") and n == 2000
        records = [r for r in caplog.records if r.name == "demux"]
        assert 1 <= len(records) <= 2, [r.getMessage() for r in records]
        assert records[0].exc_info is not None               # the first, with its traceback
        arp = bytes.fromhex("ffffffffffff") + GUEST_MAC + b"\x08\x06" + struct.pack(
            "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GUEST_MAC, socket.inet_aton(HOST4),
            bytes(6), socket.inet_aton(GW4))
        dp.demux(memoryview(arp))
        assert tap.frames and tap.frames[-1][12:14] == b"\x08\x06"   # served as ever
    finally:
        dp.stop()
        loop.close()


def test_loop_counts_handler_errors_and_logs_at_a_bounded_rate(caplog):
    loop = Loop()
    r, w = os.pipe()
    os.write(w, b"x")                    # level-triggered and never read: fires every turn
    calls = 0

    def handler(_events: int) -> None:
        nonlocal calls
        calls += 1
        raise OSError("a handler's bug")

    caplog.set_level(logging.DEBUG)
    try:
        loop.add(r, IN, handler)
        spin(loop, 0.3)
        records = [rec for rec in caplog.records if rec.name == "loop"]
        assert calls > 100 and loop.handler_errors == calls
        assert 1 <= len(records) <= 2, len(records)
        assert records[0].exc_info is not None
    finally:
        loop.remove(r)
        loop.close()
        os.close(r)
        os.close(w)


def test_passt_link_not_wedged_by_a_frame_that_raised():
    """One write from the guest: a datagram, a DHCPv6 message that made the demux raise,
    another datagram.  Each datagram reaches the host exactly once, and at once."""
    conf = make_conf("passt")
    loop = Loop()
    ours, qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tap = StreamTap(ours, loop)
    dp = DataPlane(conf, loop, tap, GuestState(conf, GUEST_MAC))
    dp.start()
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    host.settimeout(0.5)
    port = host.getsockname()[1]

    def datagram(data: bytes) -> bytes:
        f = udp4_frame(OUR_MAC, GUEST_MAC, socket.inet_aton(HOST4), socket.inet_aton(GW4),
                       40000, port, data)
        return struct.pack("!I", len(f)) + f

    big = solicit(n_ta=3000)
    try:
        qemu.sendall(datagram(b"one") + struct.pack("!I", len(big)) + big + datagram(b"two"))
        spin(loop, 0.1)
        qemu.sendall(datagram(b"three"))
        spin(loop, 0.1)
        got = []
        try:
            while True:
                got.append(host.recv(100))
        except TimeoutError:
            pass
        assert got == [b"one", b"two", b"three"]
    finally:
        dp.stop()
        tap.close()
        qemu.close()
        host.close()
        loop.close()


# ---------------------------------------------------------------- TCP: MSS and batches


@pytest.fixture
def server():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


def test_mss_is_clamped(server):
    g = Guest(False)
    try:
        port = server.getsockname()[1]
        g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1, wscale=7))
        g.run()
        (synack, _), = g.frames()
        g.send(port, ISN + 1, synack.seq + 1, ACK)
        peer, _ = server.accept()
        peer.sendall(os.urandom(20_000))
        g.run(0.1)
        sizes = [len(p) for _, p in g.frames() if p]
        assert sizes and min(sizes[:-1] or sizes) >= 536 and sum(sizes) == 20_000, sizes
        peer.close()
    finally:
        g.close()


def test_a_flow_with_much_to_send_leaves_room_for_another(server):
    """A's socket holds far more than one batch of frames (MSS 536); B's few bytes go
    out after A's first batch, not after all of A's, and within milliseconds."""

    def body():
        with open("/proc/sys/net/ipv4/tcp_rmem", "w") as f:
            f.write("4096 8388608 8388608")       # this namespace only: A's data waits
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        g = Guest(False)
        try:
            isns = {}
            for sport in (41000, 41001):
                g.send(port, ISN, 0, SYN, options=TcpOptions(mss=536, wscale=14), sport=sport)
                g.run(0.02)
                (synack, _), = g.frames()
                isns[sport] = synack.seq
                g.send(port, ISN + 1, synack.seq + 1, ACK, sport=sport)
            a, _ = srv.accept()
            b, _ = srv.accept()
            a.sendall(os.urandom(1 << 20))
            # A's megabyte is in our socket's queue: nothing left unsent or unacknowledged
            wait_until(lambda: not struct.unpack("i", fcntl.ioctl(a, termios.TIOCOUTQ,
                                                                  bytes(4)))[0],
                       what="A's data to reach our socket")
            b.sendall(b"B's few bytes")
            t0 = time.monotonic()
            first_b = None
            sent = 0
            while first_b is None and time.monotonic() - t0 < 5:
                g.run(0.002)
                for tcp, payload in g.frames():
                    if payload and tcp.dport == 41001:
                        first_b = (sent, time.monotonic() - t0)
                        break
                    sent += bool(payload)
            return first_b
        finally:
            g.close()
            srv.close()

    from tests.support import in_fresh_netns
    first_b = in_fresh_netns(body)
    assert first_b is not None
    frames_before, seconds = first_b
    assert frames_before <= PUSH_BATCH, frames_before
    assert seconds < 0.1, seconds


# ---------------------------------------------------------------- descriptors


def test_descriptor_budget():
    for nofile in (256, 1024, 3200, 65536, 1 << 20):
        b = FdBudget(nofile)
        assert RESERVE_FIXED < nofile - b.limit <= RESERVE_FIXED + nofile // 16, (nofile, b)
        assert 0 < b.host_reserve < b.limit // 8
    b = FdBudget(1024)
    # the guest's flows stop short of the host's reserve; forwarded ports still get theirs
    assert b.take(b.guest_limit - 6, by_guest=True) and b.take(6, by_guest=True)
    assert not b.take(by_guest=True) and b.used == b.guest_limit
    assert b.take(b.host_reserve, by_guest=False) and not b.take(by_guest=False)
    b.give(6)
    assert not b.take(7, by_guest=False) and b.take(6, by_guest=False)


def test_flows_take_descriptors_from_the_budget_and_give_them_back(server):
    """A full budget refuses new flows of every kind (counted); closing gives it back."""
    g = Guest(False)
    fds = g.tcp.table.fds
    try:
        port = server.getsockname()[1]
        before = fds.used
        establish(g, port)
        assert fds.used == before + 1
        saved = fds.limit, fds.host_reserve
        fds.limit, fds.host_reserve = fds.used, 0        # nothing left
        try:
            g.send(port, ISN, 0, SYN, sport=40001)
            rst = [t for t, _ in g.frames() if t.dport == 40001]
            assert rst and rst[0].flags & RST and g.tcp.counters["limit"] == 1
            udp = udp4_frame(OUR_MAC, GUEST_MAC, socket.inet_aton(HOST4),
                             socket.inet_aton(GW4), 40002, port, b"x")
            g.dp.demux(memoryview(udp))
            assert g.dp.udp.counters["limit"] == 1 and not g.dp.udp.flows
        finally:
            fds.limit, fds.host_reserve = saved
        g.dp.stop()
        assert fds.used == before
    finally:
        g.loop.close()


HOLD = """
import socket, sys, time
conns = [socket.create_connection(('127.0.0.1', int(sys.argv[1]))) for _ in range(20)]
print('connected', flush=True)
sys.stdin.read()
"""


def test_listener_out_of_descriptors_backs_off_and_recovers(caplog):
    loop = Loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    ls.setblocking(False)
    kept: list[socket.socket] = []
    calls = 0
    listener = TcpListener(loop, ls, 1, lambda conn, *a: kept.append(conn))
    readable = listener._readable

    def counting(events: int) -> None:
        nonlocal calls
        calls += 1
        readable(events)

    loop.remove(ls.fileno())
    loop.add(ls.fileno(), IN, counting)
    listener._readable = counting                        # what the back-off re-registers
    client = subprocess.Popen([sys.executable, "-c", HOLD, str(ls.getsockname()[1])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fill: list[int] = []
    caplog.set_level(logging.DEBUG)
    try:
        assert client.stdout.readline().strip() == "connected"
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        while (fd := os.open("/dev/null", os.O_RDONLY)) < top:     # no gaps below the top
            fill.append(fd)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top + 4, hard))   # room for 3
        spin(loop, 0.5)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        accepted = len(kept)
        assert 1 <= accepted < 20
        assert calls < 20, calls                      # not a busy loop on the listener
        warnings = [r for r in caplog.records if r.name == "fwd"]
        assert 1 <= len(warnings) <= 1, [r.getMessage() for r in warnings]
        assert "Too many open files" in warnings[0].getMessage()
        spin(loop, 0.3)                               # descriptors again: it recovers
        assert len(kept) == 20
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.stdin.close()
        client.wait(5)
        client.stdout.close()
        for c in kept:
            c.close()
        for fd in fill:
            os.close(fd)
        listener.close()
        loop.close()

