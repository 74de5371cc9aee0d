"""ARP packets for Ethernet hardware and IPv4 protocol addresses (RFC 826), 28 bytes."""

from __future__ import annotations

import struct

from common.packet.errors import MalformedPacket
from common.record import record

ARPHRD_ETHER = 1
ARP_PTYPE_IP = 0x0800
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
ARP_LEN = 28

_ARP = struct.Struct("!HHBBH6s4s6s4s")


@record(slots=True)
class Arp:
    op: int
    sha: bytes      # sender hardware address
    spa: bytes      # sender protocol (IPv4) address
    tha: bytes      # target hardware address
    tpa: bytes      # target protocol address


def parse_arp(data: bytes | bytearray | memoryview) -> Arp:
    """The ARP packet at the start of `data` (trailing Ethernet padding is ignored)."""
    if len(data) < ARP_LEN:
        raise MalformedPacket(f"ARP packet too short: {len(data)} bytes")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if htype != ARPHRD_ETHER or ptype != ARP_PTYPE_IP or hlen != 6 or plen != 4:
        raise MalformedPacket(
            f"not Ethernet/IPv4 ARP: htype {htype} ptype {ptype:#06x} hlen {hlen} plen {plen}")
    return Arp(op, sha, spa, tha, tpa)


def build_arp(arp: Arp) -> bytes:
    if len(arp.sha) != 6 or len(arp.tha) != 6 or len(arp.spa) != 4 or len(arp.tpa) != 4:
        raise ValueError("ARP addresses must be 6-byte MACs and 4-byte IPv4 addresses")
    return _ARP.pack(ARPHRD_ETHER, ARP_PTYPE_IP, 6, 4, arp.op,
                     arp.sha, arp.spa, arp.tha, arp.tpa)
