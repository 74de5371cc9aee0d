"""IPv4 headers (RFC 791): parse with validation, build, pack in place with checksum.

Options are neither parsed nor built: `header_len` tells where the payload
starts, and everything we send has a plain 20-byte header.
"""

from __future__ import annotations

import struct

from common.packet.checksum import checksum, csum_finish
from common.packet.errors import MalformedPacket
from common.record import record

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPV4_HLEN = 20
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFMASK = 0x1fff

_HDR = struct.Struct("!BBHHHBBH4s4s")


@record(slots=True)
class IPv4:
    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    tos: int
    df: bool
    mf: bool
    frag_offset: int        # in bytes (the header field times 8)
    header_len: int
    total_length: int


def parse_ipv4(data: bytes | bytearray | memoryview,
               verify_checksum: bool = False) -> tuple[IPv4, memoryview]:
    """The header and a view of the payload, trimmed to the total length."""
    mv = memoryview(data)
    size = len(mv)
    if size < IPV4_HLEN:
        raise MalformedPacket(f"IPv4 packet too short: {size} bytes")
    vihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(mv)
    if vihl >> 4 != 4:
        raise MalformedPacket(f"not IPv4: version {vihl >> 4}")
    hlen = (vihl & 0xf) * 4
    if hlen < IPV4_HLEN:
        raise MalformedPacket(f"IPv4 header length {hlen} below 20")
    if total < hlen or total > size:
        raise MalformedPacket(f"IPv4 total length {total} invalid for header {hlen}, "
                              f"{size} bytes received")
    if verify_checksum and checksum(mv[:hlen]):
        raise MalformedPacket("IPv4 header checksum mismatch")
    return (IPv4(src, dst, proto, ttl, ident, tos, bool(frag & IP_DF), bool(frag & IP_MF),
                 (frag & IP_OFFMASK) << 3, hlen, total),
            mv[hlen:total])


def pack_ipv4_into(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                   proto: int, payload_len: int, *, ttl: int = 64, ident: int = 0,
                   tos: int = 0, df: bool = True) -> None:
    """Write a 20-byte header, checksum included, at `buf[offset:]`."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    total = IPV4_HLEN + payload_len
    if total > 0xffff:
        raise ValueError(f"IPv4 payload too long: {payload_len} bytes")
    frag = IP_DF if df else 0
    # the header's words summed from the values, without reading the buffer back
    acc = (0x4500 | tos) + total + ident + frag + (ttl << 8 | proto) \
        + int.from_bytes(src, "big") + int.from_bytes(dst, "big")
    _HDR.pack_into(buf, offset, 0x45, tos, total, ident, frag, ttl, proto,
                   csum_finish(acc), src, dst)


def build_ipv4(src: bytes, dst: bytes, proto: int,
               payload: bytes | bytearray | memoryview, *, ttl: int = 64, ident: int = 0,
               tos: int = 0, df: bool = True) -> bytes:
    buf = bytearray(IPV4_HLEN)
    pack_ipv4_into(buf, 0, src, dst, proto, len(payload), ttl=ttl, ident=ident, tos=tos, df=df)
    buf += payload
    return bytes(buf)
