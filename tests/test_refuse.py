"""Refusal frames (common.refuse): ICMP and ICMPv6 "administratively prohibited" quoting
the guest's own packet, from the address it tried to reach, checksums right."""

from __future__ import annotations

import socket

from common.packet.checksum import checksum, l4_checksum6
from common.packet.frames import udp4_frame, udp6_frame
from common.refuse import prohibited4, prohibited6
from tests.support import GUEST_MAC, OUR_MAC, parse_frame

G4, R4 = socket.inet_aton("10.0.0.2"), socket.inet_aton("192.0.2.9")
G6 = socket.inet_pton(socket.AF_INET6, "2001:db8::2")
R6 = socket.inet_pton(socket.AF_INET6, "2001:db8:9::9")


def test_ipv4_udp_prohibited():
    guest = udp4_frame(OUR_MAC, GUEST_MAC, G4, R4, 40000, 5353, b"q" * 2000)
    frame = prohibited4(GUEST_MAC, OUR_MAC, guest[14:])
    ip, l4 = parse_frame(frame)
    assert (ip.src, ip.dst) == (R4, G4) and ip.proto == 1
    assert l4[0] == 3 and l4[1] == 13 and checksum(l4) == 0
    assert l4[8:] == guest[14:14 + 548]          # within 576 bytes, quoting the guest's own
    assert len(frame) - 14 <= 576


def test_ipv6_udp_prohibited():
    guest = udp6_frame(OUR_MAC, GUEST_MAC, G6, R6, 40000, 5353, b"q" * 3000)
    frame = prohibited6(GUEST_MAC, OUR_MAC, guest[14:])
    ip, l4 = parse_frame(frame)
    assert (ip.src, ip.dst) == (R6, G6) and ip.next_header == 58
    assert l4[0] == 1 and l4[1] == 1
    assert l4_checksum6(R6, G6, 58, l4) == 0
    assert l4[8:] == guest[14:14 + 1232] and len(frame) - 14 <= 1280
