"""Ethernet II headers: parse, build, pack in place.

No 802.1Q tags: the tap and the QEMU socket never carry them to us.
"""

from __future__ import annotations

import struct

from common.packet.errors import MalformedPacket
from common.record import record

ETH_HLEN = 14
ETH_ALEN = 6
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST_MAC = b"\xff" * 6

_HDR = struct.Struct("!6s6sH")


@record(slots=True)
class Ethernet:
    dst: bytes
    src: bytes
    ethertype: int


def parse_ethernet(frame: bytes | bytearray | memoryview) -> tuple[Ethernet, memoryview]:
    """The header and a view of the payload (which may carry trailing padding)."""
    mv = memoryview(frame)
    if len(mv) < ETH_HLEN:
        raise MalformedPacket(f"Ethernet frame too short: {len(mv)} bytes")
    dst, src, ethertype = _HDR.unpack_from(mv)
    return Ethernet(dst, src, ethertype), mv[ETH_HLEN:]


def _check_macs(dst: bytes, src: bytes) -> None:
    if len(dst) != ETH_ALEN or len(src) != ETH_ALEN:
        raise ValueError("MAC addresses must be 6 bytes")


def build_ethernet(dst: bytes, src: bytes, ethertype: int,
                   payload: bytes | bytearray | memoryview) -> bytes:
    _check_macs(dst, src)
    return _HDR.pack(dst, src, ethertype) + payload


def pack_ethernet_into(buf: bytearray | memoryview, offset: int, dst: bytes, src: bytes,
                       ethertype: int) -> None:
    """Write the 14-byte header at `buf[offset:]`."""
    _check_macs(dst, src)
    _HDR.pack_into(buf, offset, dst, src, ethertype)


def frame_buffer(size: int, offset: int, src: bytes, ethertype: int) -> bytearray:
    """A preallocated output buffer, its header at `offset` holding our source MAC and the
    ethertype (the destination is written per frame: the guest's MAC may change)."""
    buf = bytearray(size)
    pack_ethernet_into(buf, offset, bytes(6), src, ethertype)
    return buf
