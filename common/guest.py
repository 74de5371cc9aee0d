"""What we have observed about the guest: its MAC and the addresses it uses.

The only mutable state shared between protocol handlers.  Frames from the
guest update it (`observe_*`); frames to the guest are addressed from it.
Until the guest has sent anything, the configured addresses and the
broadcast MAC stand in.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from common.conf import Config

BROADCAST_MAC = b"\xff" * 6


class GuestState:
    __slots__ = ("mac", "addr4", "addr6", "addr6_ll", "mac_seen")

    def __init__(self, conf: Config, mac: bytes | None = None) -> None:
        self.mac: bytes = mac or BROADCAST_MAC
        self.mac_seen = mac is not None
        self.addr4: IPv4Address | None = conf.ip4.addr if conf.ip4 else None
        self.addr6: IPv6Address | None = conf.ip6.addr if conf.ip6 else None
        self.addr6_ll: IPv6Address | None = None

    def observe_mac(self, mac: bytes) -> None:
        if mac != self.mac and not mac[0] & 1:
            self.mac = bytes(mac)
            self.mac_seen = True

    # a guest never becomes a loopback, unspecified, multicast or IPv4-mapped address:
    # inbound connections and pasta's host loopback clients are delivered to these

    def observe_addr4(self, addr: IPv4Address) -> None:
        if addr != self.addr4 and not (addr.is_unspecified or addr.is_loopback
                                       or addr.is_multicast or addr.packed[0] == 0):
            self.addr4 = addr

    def observe_addr6(self, addr: IPv6Address) -> None:
        if addr.is_link_local:
            self.addr6_ll = addr
        elif not (addr.is_unspecified or addr.is_multicast or addr.is_loopback
                  or addr.ipv4_mapped is not None or addr.packed[:12] == bytes(12)):
            self.addr6 = addr
