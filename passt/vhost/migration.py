"""What one passt hands the next across a live migration: the guest as we knew it.

With DEVICE_STATE negotiated, QEMU asks the source back-end to write its
state into a pipe once the device has stopped (SET_DEVICE_STATE_FD, save),
carries the bytes in its migration stream, and gives them to the
destination back-end the same way (load), then asks each whether that
worked (CHECK_DEVICE_STATE).

Our state is what we observed of the guest (`common.guest.GuestState`): its
MAC and the addresses it uses, so that the destination can send to the guest
(replies, forwarded ports, router advertisements) before the guest sends
anything.  Connections do not move: the destination has other host sockets,
and the guest's TCP connections are reset when they next send (C passt moves
them with TCP_REPAIR, which needs CAP_NET_ADMIN; we have no capabilities).

Layout, network byte order:

    8  magic "passtpy\\0"     4  version (1)     4  length of what follows (44)
    6  MAC   1  flags (1: MAC seen, 2: IPv4, 4: IPv6, 8: IPv6 link-local)   1  zero
    4  IPv4 address   16  IPv6 address   16  IPv6 link-local address

A state that is not exactly this (another magic, version or length, a
multicast MAC, unknown flags) is refused whole: the guest state is unchanged.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

from common.guest import GuestState

MAGIC = b"passtpy\0"
VERSION = 1
_HEAD = struct.Struct("!8sII")
_BODY = struct.Struct("!6sBx4s16s16s")
MAC_SEEN, HAS4, HAS6, HAS6_LL = 1, 2, 4, 8
STATE_SIZE = _HEAD.size + _BODY.size


class StateError(ValueError):
    """The bytes are not a state this version can take."""


def save(guest: GuestState) -> bytes:
    flags = (MAC_SEEN if guest.mac_seen else 0) | (HAS4 if guest.addr4 else 0) \
        | (HAS6 if guest.addr6 else 0) | (HAS6_LL if guest.addr6_ll else 0)
    body = _BODY.pack(guest.mac, flags,
                      guest.addr4.packed if guest.addr4 else bytes(4),
                      guest.addr6.packed if guest.addr6 else bytes(16),
                      guest.addr6_ll.packed if guest.addr6_ll else bytes(16))
    return _HEAD.pack(MAGIC, VERSION, len(body)) + body


def load(data: bytes, guest: GuestState) -> None:
    """Apply a saved state to `guest`, or raise StateError and change nothing."""
    if len(data) != STATE_SIZE:
        raise StateError(f"{len(data)} bytes, a version {VERSION} state has {STATE_SIZE}")
    magic, version, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a state of passt for Python")
    if version != VERSION or length != _BODY.size:
        raise StateError(f"state version {version} ({length} bytes), we take {VERSION}")
    mac, flags, a4, a6, ll = _BODY.unpack_from(data, _HEAD.size)
    if flags & ~(MAC_SEEN | HAS4 | HAS6 | HAS6_LL):
        raise StateError(f"unknown flags {flags:#x}")
    if flags & MAC_SEEN and mac[0] & 1:
        raise StateError("a multicast MAC")
    addr4 = IPv4Address(a4) if flags & HAS4 else None
    addr6 = IPv6Address(a6) if flags & HAS6 else None
    addr6_ll = IPv6Address(ll) if flags & HAS6_LL else None
    if flags & MAC_SEEN:
        guest.observe_mac(mac)
    if addr4 is not None:
        guest.observe_addr4(addr4)
    if addr6 is not None:
        guest.observe_addr6(addr6)
    if addr6_ll is not None:
        guest.observe_addr6(addr6_ll)
