"""ICMP echo through ping sockets, with a fake tap, in a throw-away network namespace.

Ping sockets depend on net.ipv4.ping_group_range, which is per network
namespace: each test runs in a thread that unshared its own (loopback up),
so it can allow or forbid them without touching this machine's setting.
"""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from common.flow import echo_key4, echo_key6
from common.guest import GuestState
from common.icmp import IcmpHandler
from common.loop import Loop
from common.packet.checksum import checksum, l4_checksum6
from common.packet.frames import build_ipv4_frame, build_ipv6_frame
from common.packet.icmp import build_icmp4, build_icmp6
from common.packet.ipv6 import IPPROTO_ICMPV6
from tests.support import (
    GUEST_MAC,
    GW4,
    GW6,
    HOST4,
    HOST6,
    OUR_MAC,
    FakeTap,
    in_fresh_netns,
    make_conf,
    parse_frame,
)
from tests.test_udp_handler import spin

P_HOST4, P_GW4 = socket.inet_pton(socket.AF_INET, HOST4), socket.inet_pton(socket.AF_INET, GW4)
P_HOST6, P_GW6 = (socket.inet_pton(socket.AF_INET6, HOST6),
                  socket.inet_pton(socket.AF_INET6, GW6))
def echo_frame(v6: bool, ident: int, seq: int, data: bytes, dst: bytes | None = None) -> bytes:
    if v6:
        msg = build_icmp6(P_HOST6, dst or P_GW6, 128, 0, struct.pack("!HH", ident, seq), data)
        return build_ipv6_frame(OUR_MAC, GUEST_MAC, P_HOST6, dst or P_GW6, IPPROTO_ICMPV6, msg)
    msg = build_icmp4(8, 0, struct.pack("!HH", ident, seq), data)
    return build_ipv4_frame(OUR_MAC, GUEST_MAC, P_HOST4, dst or P_GW4, 1, msg)


class Echo:
    def __init__(self, offload: bool = False) -> None:
        self.conf = make_conf()
        self.loop = Loop()
        self.tap = FakeTap(offload)
        self.icmp = IcmpHandler(self.conf, self.loop, self.tap, GuestState(self.conf, GUEST_MAC))

    def send(self, frame: bytes) -> None:
        view = memoryview(frame)
        if frame[12:14] == b"\x86\xdd":
            self.icmp.on_frame6(view, 14, 54, len(frame), echo_key6(view, 14, 54))
        else:
            self.icmp.on_frame4(view, 14, 34, len(frame), echo_key4(view, 14, 34))

    def close(self) -> None:
        self.icmp.close_all()
        self.loop.close()


def check_reply(frame: bytes, v6: bool, ident: int, seq: int, data: bytes) -> None:
    ip, l4 = parse_frame(frame)
    if v6:
        assert (ip.src, ip.dst) == (P_GW6, P_HOST6)
        assert l4_checksum6(P_GW6, P_HOST6, IPPROTO_ICMPV6, l4) == 0
        assert l4[0] == 129
    else:
        assert (ip.src, ip.dst) == (P_GW4, P_HOST4)
        assert checksum(l4) == 0 and l4[0] == 0
    assert struct.unpack_from("!HH", l4, 4) == (ident, seq)
    assert l4[8:] == data


@pytest.mark.parametrize("offload", [False, True])
def test_echo_through_ping_sockets(offload):
    def body():
        e = Echo(offload)
        try:
            for v6 in (False, True):
                for seq in (1, 2):
                    e.send(echo_frame(v6, 0x4242, seq, b"abcdefgh" * 100))
                e.send(echo_frame(v6, 0x0007, 1, b"other identifier"))
                spin(e.loop, 0.1)
            return e.tap.frames, len(e.icmp.flows), dict(e.icmp.counters)
        finally:
            e.close()

    frames, flows, counters = in_fresh_netns(body, "0 2147483647")
    assert flows == 4 and counters["opened"] == 4, counters
    assert len(frames) == 6, counters
    # replies of one flow keep their order; flows may interleave
    for v6, group in ((False, frames[:3]), (True, frames[3:])):
        by_id = sorted(group, key=lambda f: f[-10:] == b"identifier")
        check_reply(by_id[0], v6, 0x4242, 1, b"abcdefgh" * 100)
        check_reply(by_id[1], v6, 0x4242, 2, b"abcdefgh" * 100)
        check_reply(by_id[2], v6, 0x0007, 1, b"other identifier")


def test_forbidden_ping_sockets_are_noted_once(caplog):
    def body():
        e = Echo()
        try:
            with caplog.at_level(logging.WARNING, logger="icmp"):
                for seq in range(3):
                    e.send(echo_frame(False, 1, seq, b"x"))
                    e.send(echo_frame(True, 1, seq, b"x"))
            return e.tap.frames, dict(e.icmp.counters)
        finally:
            e.close()

    frames, counters = in_fresh_netns(body)          # a new namespace says "1 0"
    assert frames == [] and counters["socket_fail"] == 6
    notes = [r.getMessage() for r in caplog.records if "ping_group_range" in r.getMessage()]
    assert len(notes) == 1 and '"1 0"' in notes[0], notes


def test_other_icmp_from_the_guest_is_dropped():
    e = Echo()
    try:
        unreach = build_ipv4_frame(OUR_MAC, GUEST_MAC, P_HOST4, P_GW4, 1,
                                   build_icmp4(3, 3, b"\0" * 4, b"\x45" + b"\0" * 27))
        e.send(unreach)
        e.send(echo_frame(False, 1, 1, b"")[:14 + 20 + 4])   # runt
        e.send(echo_frame(False, 1, 1, b"x", dst=socket.inet_aton("224.0.0.1")))
        assert dict(e.icmp.counters) == {"not_echo": 1, "runt": 1, "bad_dst": 1}
        assert not e.icmp.flows
    finally:
        e.close()
