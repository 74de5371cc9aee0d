"""What every frame of one flow towards the guest shares, computed once per flow.

Frames go from `src`:`sport` (the far end, as the guest knows it) to
`dst`:`dport` (the guest).  The IPv4 header words that never change and the
pseudo-header words are summed here once, so each frame's IP checksum and
L4 pseudo-header sum are a couple of additions and a fold (`fold`).  Used by
the TCP segment writer and the UDP/ICMP datagram writer alike.
"""

from __future__ import annotations

import struct

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
TTL = 64


def fold(s: int) -> int:
    """Fold a one's complement sum (of any size) to 16 bits, not complemented."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


# the 16-bit words of two addresses of a family, by their joint length: one unpack
_WORDS = {8: struct.Struct("!4H"), 32: struct.Struct("!16H")}


class FlowHeader:
    __slots__ = ("v6", "proto", "src", "dst", "sport", "dport", "ip_sum", "pseudo_sum")

    def __init__(self, v6: bool, proto: int, src: bytes, dst: bytes, sport: int = 0,
                 dport: int = 0) -> None:
        self.v6 = v6
        self.proto = proto
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        words = sum(_WORDS[len(src) << 1].unpack(src + dst))
        # IPv4 header words that never change: version/IHL/TOS, DF, TTL and protocol;
        # folded already, so that one more 16-bit word needs one step of folding
        self.ip_sum = 0 if v6 else fold(0x4500 + 0x4000 + (TTL << 8 | proto) + words)
        # ICMPv4 has no pseudo-header
        self.pseudo_sum = 0 if proto == PROTO_ICMP else fold(words + proto)
