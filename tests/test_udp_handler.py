"""The UDP handler with a fake tap and real sockets on this machine's loopback.

Guest frames go in through the frame demux of a real `DataPlane`; what the
host side receives is read from real sockets, and what the guest would get
is read back from the fake tap and checked with the packet codecs.  The
gateway address maps to the host's loopback, so nothing leaves the machine.
"""

from __future__ import annotations

import select
import socket
import struct
from ipaddress import IPv6Address

import pytest

from common.dataplane import DataPlane
from common.flow import FlowTable, frame_key4
from common.guest import GuestState
from common.listeners import host_socket
from common.loop import Loop
from common.packet.checksum import checksum, l4_checksum6
from common.packet.frames import udp4_frame, udp6_frame
from common.packet.icmp import parse_icmp
from common.packet.ipv4 import IPPROTO_ICMP
from common.packet.ipv6 import IPPROTO_ICMPV6
from common.udp import UdpHandler, udp_listener
from tests.support import (
    GUEST_MAC,
    GW4,
    GW6,
    HOST4,
    HOST6,
    OUR_MAC,
    FakeTap,
    make_conf,
    parse_frame,
    run_until,
    spin,
    wait_until,
)
from tests.test_udp_frames import check_udp

P_HOST4, P_GW4 = socket.inet_pton(socket.AF_INET, HOST4), socket.inet_pton(socket.AF_INET, GW4)
P_HOST6, P_GW6 = (socket.inet_pton(socket.AF_INET6, HOST6),
                  socket.inet_pton(socket.AF_INET6, GW6))


def free_port(family: int) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return s.getsockname()[1]


class Setup:
    def __init__(self, offload: bool = False, **opts) -> None:
        self.conf = make_conf(**opts)
        self.loop = Loop()
        self.tap = FakeTap(offload)
        self.dp = DataPlane(self.conf, self.loop, self.tap, GuestState(self.conf, GUEST_MAC))
        self.udp: UdpHandler = self.dp.udp

    def guest_sends(self, v6: bool, sport: int, dport: int, payload: bytes,
                    dst: bytes | None = None, src: bytes | None = None) -> None:
        if v6:
            frame = udp6_frame(OUR_MAC, GUEST_MAC, src or P_HOST6, dst or P_GW6, sport, dport,
                               payload)
        else:
            frame = udp4_frame(OUR_MAC, GUEST_MAC, src or P_HOST4, dst or P_GW4, sport, dport,
                               payload)
        self.dp.demux(memoryview(frame))

    def close(self) -> None:
        self.dp.stop()
        self.loop.close()


@pytest.fixture
def setup():
    made: list[Setup] = []

    def make(**kw) -> Setup:
        s = Setup(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def server(v6: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::1" if v6 else "127.0.0.1", 0))
    s.settimeout(2)
    return s


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("v6", [False, True])
def test_flow_to_the_gateway_reaches_host_loopback_and_back(setup, v6, offload):
    s = setup(offload=offload)
    srv = server(v6)
    port = srv.getsockname()[1]
    gport = free_port(socket.AF_INET6 if v6 else socket.AF_INET)
    s.guest_sends(v6, gport, port, b"question")
    data, peer = srv.recvfrom(100)
    assert data == b"question" and peer[1] == gport      # the guest's port, kept
    srv.sendto(b"answer" * 1000, peer)
    spin(s.loop)
    src, dst = (P_GW6, P_HOST6) if v6 else (P_GW4, P_HOST4)
    assert check_udp(s.tap.frames[-1], src, dst, port, gport) == b"answer" * 1000
    # the same flow again: one socket, both ways seen
    s.guest_sends(v6, gport, port, b"again")
    assert srv.recvfrom(100)[0] == b"again"
    assert len(s.udp.flows) == 1
    assert next(iter(s.udp.flows.values())).replied


@pytest.mark.parametrize("v6", [False, True])
def test_closed_port_becomes_icmp_port_unreachable(setup, v6):
    s = setup()
    port = free_port(socket.AF_INET6 if v6 else socket.AF_INET)
    s.guest_sends(v6, 40001, port, b"anyone?")
    spin(s.loop, 0.1)
    assert s.udp.counters["icmp_error"] == 1
    ip, l4 = parse_frame(s.tap.frames[-1])
    if v6:
        assert (ip.src, ip.dst, ip.next_header) == (P_GW6, P_HOST6, IPPROTO_ICMPV6)
        assert l4_checksum6(P_GW6, P_HOST6, IPPROTO_ICMPV6, l4) == 0
        icmp, quote = parse_icmp(l4)
        assert (icmp.type, icmp.code) == (1, 4)
        assert bytes(quote[8:24]) == P_HOST6 and bytes(quote[24:40]) == P_GW6
        udp_at = 40
    else:
        assert (ip.src, ip.dst, ip.proto) == (P_GW4, P_HOST4, IPPROTO_ICMP)
        assert checksum(l4) == 0
        icmp, quote = parse_icmp(l4)
        assert (icmp.type, icmp.code) == (3, 3)
        assert bytes(quote[12:16]) == P_HOST4 and bytes(quote[16:20]) == P_GW4
        udp_at = 20
    assert struct.unpack_from("!HH", quote, udp_at) == (40001, port)
    assert bytes(quote[udp_at + 8:]) == b"anyone?"
    # the pending error does not swallow the next datagram: it goes out and fails again
    s.guest_sends(v6, 40001, port, b"still?")
    spin(s.loop, 0.1)
    assert s.udp.counters["icmp_error"] == 2


def test_oversize_reply_is_dropped_and_counted(setup):
    s = setup(mtu="1500")
    srv = server(False)
    s.guest_sends(False, 40002, srv.getsockname()[1], b"q")
    _, peer = srv.recvfrom(10)
    srv.sendto(b"x" * 1473, peer)
    srv.sendto(b"y" * 1472, peer)
    spin(s.loop)
    assert s.udp.counters["oversize"] == 1
    assert len(s.tap.frames) == 1 and check_udp(s.tap.frames[0], P_GW4, P_HOST4,
                                                srv.getsockname()[1], 40002) == b"y" * 1472


def test_guest_checksum_is_not_verified(setup):
    s = setup()
    srv = server(False)
    frame = bytearray(udp4_frame(OUR_MAC, GUEST_MAC, P_HOST4, P_GW4, 40003,
                                 srv.getsockname()[1], b"partial"))
    frame[14 + 20 + 6:14 + 20 + 8] = b"\x12\x34"       # as a partial checksum would be
    s.dp.demux(memoryview(frame))
    assert srv.recvfrom(10)[0] == b"partial"


def test_multicast_broadcast_and_malformed_are_dropped(setup):
    s = setup()
    s.guest_sends(False, 5353, 5353, b"mdns", dst=socket.inet_aton("224.0.0.251"))
    s.guest_sends(False, 1, 2, b"bcast", dst=socket.inet_aton("192.0.2.255"))
    s.guest_sends(True, 5353, 5353, b"mdns", dst=socket.inet_pton(socket.AF_INET6, "ff02::fb"))
    bad = bytearray(udp4_frame(OUR_MAC, GUEST_MAC, P_HOST4, P_GW4, 1, 2, b"abc"))
    struct.pack_into("!H", bad, 14 + 20 + 4, 200)        # UDP length beyond the packet
    s.dp.demux(memoryview(bad))
    assert s.udp.counters["multicast"] == 2 and s.udp.counters["bad_dst"] == 1
    assert s.udp.counters["malformed"] == 1 and not s.udp.flows


def test_flow_limit_and_idle_expiry():
    conf = make_conf()
    loop = Loop()
    tap = FakeTap()
    udp = UdpHandler(conf, loop, tap, GuestState(conf, GUEST_MAC),
                     flows=FlowTable(loop, limit=2), idle=0.15, idle_replied=0.4)
    udp.expiry.grid = 0.01
    srv = server(False)
    port = srv.getsockname()[1]
    try:
        for gport in (40011, 40012, 40013):
            f = udp4_frame(OUR_MAC, GUEST_MAC, P_HOST4, P_GW4, gport, port, b"x")
            udp.on_frame4(memoryview(f), 14, 34, len(f), frame_key4(memoryview(f), 14, 34))
        assert len(udp.flows) == 2 and udp.stats()["evicted"] == 1
        socks = [f.sock for f in udp.flows.values()]
        # one of them gets an answer: it lives longer
        _, peer = srv.recvfrom(10)
        srv.recvfrom(10)
        srv.recvfrom(10)
        srv.sendto(b"r", ("127.0.0.1", 40013) if peer[1] != 40013 else peer)
        run_until(loop, lambda: len(udp.flows) == 1, 2.0, what="the one-way flows' expiry")
        assert next(iter(udp.flows.values())).replied
        run_until(loop, lambda: not udp.flows, 2.0, what="the answered flow's expiry")
        assert all(s.fileno() == -1 for s in socks)
        assert udp.stats()["expired"] == 2
    finally:
        udp.close_all()
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_forwarded_port_to_guest_and_reply(setup, v6):
    s = setup()
    family = socket.AF_INET6 if v6 else socket.AF_INET
    lo = "::1" if v6 else "127.0.0.1"
    listener = udp_listener(s.loop, host_socket, lambda: s.udp)(family, lo, 0, None, 5555)
    lport = listener.sock.getsockname()[1]
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.bind((lo, 0))
    client.settimeout(2)
    cport = client.getsockname()[1]
    client.sendto(b"to the guest", (lo, lport))
    spin(s.loop)
    src, dst = (P_GW6, P_HOST6) if v6 else (P_GW4, P_HOST4)   # host loopback -> gateway
    assert check_udp(s.tap.frames[-1], src, dst, cport, 5555) == b"to the guest"
    # the guest answers from 5555 to the gateway: out through the listener
    s.guest_sends(v6, 5555, cport, b"from the guest")
    data, peer = client.recvfrom(100)
    assert data == b"from the guest" and peer[1] == lport
    listener.close()
    assert not s.udp.flows


def test_forwarded_reply_from_another_guest_address(setup):
    """A guest with a second address (SLAAC next to the configured one) may answer a
    forwarded datagram from it: still the same conversation, out through the listener."""
    s = setup()
    listener = udp_listener(s.loop, host_socket, lambda: s.udp)(socket.AF_INET6, "::1", 0,
                                                                None, 5556)
    lport = listener.sock.getsockname()[1]
    client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    client.bind(("::1", 0))
    client.settimeout(2)
    cport = client.getsockname()[1]
    client.sendto(b"question", ("::1", lport))
    spin(s.loop)
    other = IPv6Address("2001:db8:1::5054:ff:fe12:3456").packed
    s.guest_sends(True, 5556, cport, b"answer", src=other)
    data, peer = client.recvfrom(100)
    assert data == b"answer" and peer[1] == lport
    assert s.udp.counters["reply_from_other_addr"] == 1
    listener.close()
    client.close()


def test_forwarded_port_local_hook_and_no_handler(setup):
    s = setup()
    seen = []
    current = [s.udp]
    opener = udp_listener(s.loop, host_socket, lambda: current[0],
                          lambda lst, data, peer: seen.append((bytes(data), peer[0])))
    listener = opener(socket.AF_INET, "127.0.0.1", 0, None, 5556)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"local", listener.sock.getsockname())
    spin(s.loop)
    assert seen == [(b"local", "127.0.0.1")] and not s.tap.frames
    current[0] = None                     # passt between guests: read, offered, dropped
    client.sendto(b"nobody", listener.sock.getsockname())
    spin(s.loop)
    assert seen[-1] == (b"nobody", "127.0.0.1")
    listener.close()


def test_stop_closes_every_socket(setup):
    s = setup()
    srv = server(False)
    for gport in (40021, 40022):
        s.guest_sends(False, gport, srv.getsockname()[1], b"x")
    socks = [f.sock for f in s.udp.flows.values()]
    assert len(socks) == 2
    s.dp.stop()
    assert all(x.fileno() == -1 for x in socks) and not s.udp.flows


def test_an_answer_is_read_alone_a_burst_is_drained(setup):
    """One datagram per event (no read that only finds the queue empty) unless the
    socket was read on the previous turn too: of three queued datagrams one is read,
    the rest wait (epoll reports them on the next turn), and that turn drains them,
    in order."""
    s = setup()
    srv = server(False)
    port = srv.getsockname()[1]
    gport = free_port(socket.AF_INET)
    s.guest_sends(False, gport, port, b"q")
    _, peer = srv.recvfrom(100)
    (flow,) = s.udp.flows.values()
    for i in range(3):
        srv.sendto(b"a%d" % i, peer)
    wait_until(lambda: _readable(flow.sock), what="the answers queued")
    before = len(s.tap.frames)
    s.loop.turn = 10
    s.udp._drain(flow)                          # not read on turn 9: one datagram
    assert len(s.tap.frames) == before + 1 and _readable(flow.sock)
    s.loop.turn = 11
    s.udp._drain(flow)                          # read on turn 10: a burst, drained
    assert not _readable(flow.sock)
    got = [check_udp(f, P_GW4, P_HOST4, port, gport) for f in s.tap.frames[before:]]
    assert got == [b"a0", b"a1", b"a2"]


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
