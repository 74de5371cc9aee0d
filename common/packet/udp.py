"""UDP headers (RFC 768): parse, build with the pseudo-header checksum, pack in place.

A computed checksum of 0 is sent as 0xffff (0 means "no checksum" over IPv4
and is invalid over IPv6, RFC 8200 section 8.1).
"""

from __future__ import annotations

import struct

from common.packet.checksum import csum_add, csum_finish, pseudo4, pseudo6
from common.packet.errors import MalformedPacket
from common.packet.ipv4 import IPPROTO_UDP
from common.record import record

UDP_HLEN = 8

_HDR = struct.Struct("!HHHH")


@record(slots=True)
class Udp:
    sport: int
    dport: int
    length: int
    checksum: int


def parse_udp(data: bytes | bytearray | memoryview) -> tuple[Udp, memoryview]:
    """The header and a view of the payload, trimmed to the UDP length."""
    mv = memoryview(data)
    if len(mv) < UDP_HLEN:
        raise MalformedPacket(f"UDP datagram too short: {len(mv)} bytes")
    sport, dport, length, csum = _HDR.unpack_from(mv)
    if length < UDP_HLEN or length > len(mv):
        raise MalformedPacket(f"UDP length {length} invalid for {len(mv)} bytes received")
    return Udp(sport, dport, length, csum), mv[UDP_HLEN:length]


def _pack(buf: bytearray | memoryview, offset: int, sport: int, dport: int, length: int,
          pseudo: int) -> None:
    if length > 0xffff:
        raise ValueError(f"UDP payload too long: {length - UDP_HLEN} bytes")
    _HDR.pack_into(buf, offset, sport, dport, length, 0)
    csum = csum_finish(csum_add(memoryview(buf)[offset:offset + length], pseudo)) or 0xffff
    struct.pack_into("!H", buf, offset + 6, csum)


def pack_udp4_into(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                   sport: int, dport: int, payload_len: int) -> None:
    """Write the header at `buf[offset:]`, the payload already being behind it."""
    length = UDP_HLEN + payload_len
    _pack(buf, offset, sport, dport, length, pseudo4(src, dst, IPPROTO_UDP, length))


def pack_udp6_into(buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes,
                   sport: int, dport: int, payload_len: int) -> None:
    length = UDP_HLEN + payload_len
    _pack(buf, offset, sport, dport, length, pseudo6(src, dst, IPPROTO_UDP, length))


def build_udp4(src: bytes, dst: bytes, sport: int, dport: int,
               payload: bytes | bytearray | memoryview) -> bytes:
    buf = bytearray(UDP_HLEN) + payload
    pack_udp4_into(buf, 0, src, dst, sport, dport, len(payload))
    return bytes(buf)


def build_udp6(src: bytes, dst: bytes, sport: int, dport: int,
               payload: bytes | bytearray | memoryview) -> bytes:
    buf = bytearray(UDP_HLEN) + payload
    pack_udp6_into(buf, 0, src, dst, sport, dport, len(payload))
    return bytes(buf)
