"""ICMP (RFC 792) and ICMPv6 (RFC 4443, NDP types of RFC 4861) messages.

Both share one layout: type, code, checksum, four type-specific bytes
(`rest`: identifier and sequence of an echo, the MTU of a Packet Too Big,
flags of a Neighbor Advertisement...), then the body.  ICMPv6 checksums
cover the IPv6 pseudo-header; ICMP ones do not.  The error builders quote as
much of the offending packet as keeps the whole error within the minimum
MTU: 576 bytes for IPv4 (RFC 1812 4.3.2.3), 1280 for IPv6 (RFC 4443 2.4(c)),
assuming a plain 20- or 40-byte outer header.
"""

from __future__ import annotations

import struct

from common.packet.checksum import checksum, csum_add, csum_finish, pseudo6
from common.packet.errors import MalformedPacket
from common.packet.ipv6 import IPPROTO_ICMPV6
from common.record import record

ICMP_HLEN = 8

# ICMP types and codes
ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_REDIRECT = 5
ICMP_ECHO = 8
ICMP_TIME_EXCEEDED = 11
ICMP_PARAMETERPROB = 12
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PROT_UNREACH = 2
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMP_PKT_FILTERED = 13      # communication administratively prohibited (RFC 1812)
ICMP_EXC_TTL = 0
ICMP_EXC_FRAGTIME = 1

# ICMPv6 types and codes
ICMPV6_DEST_UNREACH = 1
ICMPV6_PKT_TOOBIG = 2
ICMPV6_TIME_EXCEED = 3
ICMPV6_PARAMPROB = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ICMPV6_NOROUTE = 0
ICMPV6_ADM_PROHIBITED = 1
ICMPV6_ADDR_UNREACH = 3
ICMPV6_PORT_UNREACH = 4
ICMPV6_EXC_HOPLIMIT = 0
ICMPV6_EXC_FRAGTIME = 1
ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_REDIRECT = 137

IPV4_MIN_MTU = 576
IPV6_MIN_MTU = 1280
ICMP4_ERROR_QUOTE_MAX = IPV4_MIN_MTU - 20 - ICMP_HLEN     # 548
ICMP6_ERROR_QUOTE_MAX = IPV6_MIN_MTU - 40 - ICMP_HLEN     # 1232

_HDR = struct.Struct("!BBH4s")
_ZERO4 = b"\0" * 4


@record(slots=True)
class Icmp:
    type: int
    code: int
    checksum: int
    rest: bytes             # the 4 bytes after the checksum


def parse_icmp(data: bytes | bytearray | memoryview) -> tuple[Icmp, memoryview]:
    """The header and a view of the body after the 8-byte header (ICMP or ICMPv6)."""
    mv = memoryview(data)
    if len(mv) < ICMP_HLEN:
        raise MalformedPacket(f"ICMP message too short: {len(mv)} bytes")
    type, code, csum, rest = _HDR.unpack_from(mv)
    return Icmp(type, code, csum, rest), mv[ICMP_HLEN:]


def _message(type: int, code: int, rest: bytes, body: bytes | bytearray | memoryview,
             pseudo: int | None) -> bytes:
    if len(rest) != 4:
        raise ValueError("ICMP rest-of-header must be 4 bytes")
    buf = bytearray(_HDR.pack(type, code, 0, rest)) + body
    if pseudo is None:
        csum = checksum(buf)
    else:
        csum = csum_finish(csum_add(buf, pseudo))
    struct.pack_into("!H", buf, 2, csum)
    return bytes(buf)


def build_icmp4(type: int, code: int, rest: bytes,
                body: bytes | bytearray | memoryview) -> bytes:
    return _message(type, code, rest, body, None)


def build_icmp6(src: bytes, dst: bytes, type: int, code: int, rest: bytes,
                body: bytes | bytearray | memoryview) -> bytes:
    length = ICMP_HLEN + len(body)
    return _message(type, code, rest, body, pseudo6(src, dst, IPPROTO_ICMPV6, length))


def build_icmp4_error(type: int, code: int, original_datagram: bytes | bytearray | memoryview,
                      rest: bytes = _ZERO4) -> bytes:
    """An ICMP error quoting the start of `original_datagram` (from its IP header on)."""
    return build_icmp4(type, code, rest, original_datagram[:ICMP4_ERROR_QUOTE_MAX])


def build_icmp6_error(src: bytes, dst: bytes, type: int, code: int,
                      original_packet: bytes | bytearray | memoryview,
                      rest: bytes = _ZERO4) -> bytes:
    """An ICMPv6 error quoting the start of `original_packet` (from its IPv6 header on)."""
    return build_icmp6(src, dst, type, code, rest, original_packet[:ICMP6_ERROR_QUOTE_MAX])
