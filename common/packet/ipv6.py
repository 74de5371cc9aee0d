"""IPv6 headers (RFC 8200): parse (skipping extension headers), build, pack in place.

`parse_ipv6` walks Hop-by-Hop, Routing, Destination Options and Fragment
headers and returns the upper-layer protocol and payload.  A Fragment header
sets `fragment`; for a non-first fragment (`frag_offset` > 0) the payload is
the middle of the upper-layer message, not its header, so callers that need
the L4 header should drop those.
"""

from __future__ import annotations

import struct

from common.packet.errors import MalformedPacket
from common.packet.ipv4 import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP  # noqa: F401
from common.record import record

IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPV6_HLEN = 40

# extension headers with the generic (next header, length in 8-octet units - 1) layout
_GENERIC_EXT = frozenset((IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS))

_HDR = struct.Struct("!IHBB16s16s")
_FRAG = struct.Struct("!BxH")


@record(slots=True)
class IPv6:
    src: bytes
    dst: bytes
    next_header: int        # the upper-layer protocol, after extension headers
    hop_limit: int
    payload_length: int     # the header field: extension headers included
    flow_label: int
    traffic_class: int
    fragment: bool          # a Fragment header was present
    frag_offset: int = 0    # in bytes
    frag_more: bool = False


def parse_ipv6(data: bytes | bytearray | memoryview) -> tuple[IPv6, memoryview]:
    """The header and a view of the upper-layer payload, trimmed to the payload length."""
    mv = memoryview(data)
    size = len(mv)
    if size < IPV6_HLEN:
        raise MalformedPacket(f"IPv6 packet too short: {size} bytes")
    vtcfl, plen, nh, hlim, src, dst = _HDR.unpack_from(mv)
    if vtcfl >> 28 != 6:
        raise MalformedPacket(f"not IPv6: version {vtcfl >> 28}")
    end = IPV6_HLEN + plen
    if end > size:
        raise MalformedPacket(f"IPv6 payload length {plen} exceeds the {size - IPV6_HLEN} "
                              "bytes received")
    pos = IPV6_HLEN
    fragment, frag_offset, frag_more = False, 0, False
    while nh in _GENERIC_EXT or nh == IPPROTO_FRAGMENT:
        if pos + 8 > end:
            raise MalformedPacket(f"IPv6 extension header {nh} truncated")
        if nh == IPPROTO_FRAGMENT:
            nxt, offlg = _FRAG.unpack_from(mv, pos)
            fragment, frag_offset, frag_more = True, offlg & 0xfff8, bool(offlg & 1)
            hlen = 8
        else:
            nxt, hlen = mv[pos], (mv[pos + 1] + 1) * 8
            if pos + hlen > end:
                raise MalformedPacket(f"IPv6 extension header {nh} truncated")
        nh, pos = nxt, pos + hlen
    return (IPv6(src, dst, nh, hlim, plen, vtcfl & 0xfffff, (vtcfl >> 20) & 0xff,
                 fragment, frag_offset, frag_more),
            mv[pos:end])


def pack_ipv6_into(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                   next_header: int, payload_len: int, *, hop_limit: int = 255,
                   flow_label: int = 0, traffic_class: int = 0) -> None:
    """Write the 40-byte header at `buf[offset:]`."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if payload_len > 0xffff:
        raise ValueError(f"IPv6 payload too long: {payload_len} bytes (no jumbograms)")
    _HDR.pack_into(buf, offset, 6 << 28 | traffic_class << 20 | flow_label, payload_len,
                   next_header, hop_limit, src, dst)


def build_ipv6(src: bytes, dst: bytes, next_header: int,
               payload: bytes | bytearray | memoryview, *, hop_limit: int = 255,
               flow_label: int = 0, traffic_class: int = 0) -> bytes:
    buf = bytearray(IPV6_HLEN)
    pack_ipv6_into(buf, 0, src, dst, next_header, len(payload), hop_limit=hop_limit,
                   flow_label=flow_label, traffic_class=traffic_class)
    buf += payload
    return bytes(buf)
