"""How a flow the policy denies is answered, as a firewall would: the frames.

`--deny-action reset` (the default) answers a denied TCP SYN with a reset
(the TCP handler's own RST builder) and a denied UDP datagram or ICMP echo
request with "communication administratively prohibited": ICMP destination
unreachable code 13 (RFC 1812 5.2.7.1) or ICMPv6 destination unreachable
code 1 (RFC 4443 3.1), quoting the guest's packet as any ICMP error does.
`drop` answers nothing.  The error comes from the address the guest tried
to reach, as when a host's own firewall rejects a packet.  Pure: bytes in,
a frame out.
"""

from __future__ import annotations

from common.packet.frames import build_ipv4_frame, build_ipv6_frame
from common.packet.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_PKT_FILTERED,
    ICMPV6_ADM_PROHIBITED,
    ICMPV6_DEST_UNREACH,
    build_icmp4_error,
    build_icmp6_error,
)
from common.packet.ipv4 import IPPROTO_ICMP
from common.packet.ipv6 import IPPROTO_ICMPV6

Buffer = bytes | bytearray | memoryview


def prohibited4(guest_mac: bytes, our_mac: bytes, packet: Buffer) -> bytes:
    """The frame answering the guest's IPv4 `packet` (from its IP header on) with
    ICMP administratively prohibited, from the packet's destination."""
    src, dst = bytes(packet[12:16]), bytes(packet[16:20])
    msg = build_icmp4_error(ICMP_DEST_UNREACH, ICMP_PKT_FILTERED, packet)
    return build_ipv4_frame(guest_mac, our_mac, dst, src, IPPROTO_ICMP, msg)


def prohibited6(guest_mac: bytes, our_mac: bytes, packet: Buffer) -> bytes:
    """The same for an IPv6 `packet`: ICMPv6 destination unreachable, code 1."""
    src, dst = bytes(packet[8:24]), bytes(packet[24:40])
    msg = build_icmp6_error(dst, src, ICMPV6_DEST_UNREACH, ICMPV6_ADM_PROHIBITED, packet)
    return build_ipv6_frame(guest_mac, our_mac, dst, src, IPPROTO_ICMPV6, msg, hop_limit=64)
