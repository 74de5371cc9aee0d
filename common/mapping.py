"""Address translation between what the guest sees and what host sockets use.

Guest -> host (destination of a new flow):
- the `--map-host-loopback` address (by default the gateway) reaches the
  host's loopback, 127.0.0.1 or ::1;
- the `--map-guest-addr` address reaches the host's own global address,
  which the guest cannot otherwise address because it has a copy of it;
- the `--dns-forward` address, port 53, reaches the host's resolver
  (`--dns-host`, by default the first nameserver in resolv.conf);
- anything else is used as it is.

Host -> guest (source of what the guest receives, for inbound connections
and for replies): the host's loopback appears as the map-host-loopback
address (or the gateway), the host's own addresses as the map-guest-addr
address when set (otherwise as the loopback mapping, so the guest never
sees its own address as a peer), and the DNS resolver of a forwarded query
as the dns-forward address.  Replies keep the address the guest used
(flows remember it); this is what a new host-side peer looks like.

Never across (`forbidden`): a guest flow whose source or destination is a
loopback address (127.0.0.0/8, ::1), unspecified or in 0.0.0.0/8, or in
IPv6 any ::/96 (unspecified, loopback, IPv4-compatible) or ::ffff:0:0/96
(IPv4-mapped, which RFC 4291 keeps off the wire: a host IPv6 socket would
carry it to the IPv4 loopback).  A host socket connecting to such a
destination reaches the host's own loopback services, which the guest may
reach only through the map-host-loopback address.

All addresses here are packed bytes (4 or 16), the form frames carry.
"""

from __future__ import annotations

import ipaddress
import socket

from common.conf import Config

LOOPBACK4 = socket.inet_pton(socket.AF_INET, "127.0.0.1")
LOOPBACK6 = socket.inet_pton(socket.AF_INET6, "::1")
DNS_PORT = 53
_V6_ZERO96 = bytes(12)
_V6_MAPPED96 = bytes(10) + b"\xff\xff"
_V4_NEVER = (0, 127)        # first octet: "this network" (0.0.0.0/8), loopback


def forbidden(v6: bool, src: bytes, dst: bytes) -> bool:
    """True when no guest flow may go from `src` to `dst` (see the module docstring)."""
    if v6:
        return (src[:12] in (_V6_ZERO96, _V6_MAPPED96)
                or dst[:12] in (_V6_ZERO96, _V6_MAPPED96))
    return src[0] in _V4_NEVER or dst[0] in _V4_NEVER


def _packed(addr) -> bytes | None:
    return addr.packed if addr is not None else None


class AddressMap:
    def __init__(self, conf: Config) -> None:
        self.conf = conf
        c4, c6 = conf.ip4, conf.ip6
        self.lo_alias4 = _packed(c4.map_host_loopback) if c4 else None
        self.lo_alias6 = _packed(c6.map_host_loopback) if c6 else None
        self.guest_alias4 = _packed(c4.map_guest_addr) if c4 else None
        self.guest_alias6 = _packed(c6.map_guest_addr) if c6 else None
        self.dns_fwd4 = _packed(c4.dns_forward) if c4 else None
        self.dns_fwd6 = _packed(c6.dns_forward) if c6 else None
        self.dns_host4 = _packed(c4.dns_host) if c4 else None
        self.dns_host6 = _packed(c6.dns_host) if c6 else None
        # the host's own addresses, as the guest would otherwise see them
        self.host_own4 = ({i.ip.packed for i in c4.host_addrs} | {c4.addr.packed}) if c4 else set()
        self.host_own6 = ({i.ip.packed for i in c6.host_addrs}
                          | ({c6.addr.packed} if c6.addr else set())) if c6 else set()
        self.host_primary4 = (c4.host_addrs[0].ip.packed if c4 and c4.host_addrs
                              else _packed(c4.addr) if c4 else None)
        self.host_primary6 = (c6.host_addrs[0].ip.packed if c6 and c6.host_addrs
                              else _packed(c6.addr) if c6 else None)
        # what stands for "the host" when no mapping address is configured
        self.fallback4 = (_packed(c4.map_host_loopback) or _packed(c4.gateway)
                          or c4.our_addr.packed) if c4 else None
        self.fallback6 = (_packed(c6.map_host_loopback) or _packed(c6.gateway)
                          or c6.our_ll.packed) if c6 else None
        # host-side link-local destinations are on the outbound (or the host's) interface
        self.scope6 = scope_id((c6.outbound_if or c6.host_ifname) if c6 else None)
        # -o and --outbound-if4/6: where new host sockets for guest flows leave from
        self.out4 = str(c4.outbound) if c4 and c4.outbound else None
        self.out6 = str(c6.outbound) if c6 and c6.outbound else None
        self.out4_if = c4.outbound_if if c4 else None
        self.out6_if = c6.outbound_if if c6 else None

    # ------------------------------------------------------------ guest -> host

    def to_host(self, v6: bool, dst: bytes, port: int) -> tuple[bytes, int]:
        """The host-side (address, port) a guest flow to (dst, port) connects to."""
        if v6:
            if dst == self.lo_alias6:
                return LOOPBACK6, port
            if dst == self.guest_alias6 and self.host_primary6:
                return self.host_primary6, port
            if port == DNS_PORT and dst == self.dns_fwd6 and self.dns_host6:
                return self.dns_host6, port
        else:
            if dst == self.lo_alias4:
                return LOOPBACK4, port
            if dst == self.guest_alias4 and self.host_primary4:
                return self.host_primary4, port
            if port == DNS_PORT and dst == self.dns_fwd4 and self.dns_host4:
                return self.dns_host4, port
        return dst, port

    def host_sockaddr(self, v6: bool, addr: bytes, port: int) -> tuple:
        """The sockaddr a host socket connects to; link-local IPv6 needs the interface."""
        if v6:
            scope = self.scope6 if addr[0] == 0xFE and addr[1] & 0xC0 == 0x80 else 0
            return (socket.inet_ntop(socket.AF_INET6, addr), port, 0, scope)
        return (socket.inet_ntop(socket.AF_INET, addr), port)

    def bind_outbound(self, sock: socket.socket, v6: bool, port: int | None = None) -> None:
        """Put a new host socket on the outbound device and source address.

        With `port` it is always bound: to that port where free, else any
        (datagram sockets keep the guest's port or identifier); without, only
        when an outbound address is set (TCP leaves the port to connect()).
        """
        ifname = self.out6_if if v6 else self.out4_if
        if ifname:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        addr = self.out6 if v6 else self.out4
        if port is None:
            if addr:
                sock.bind((addr, 0))
            return
        addr = addr or ("::" if v6 else "0.0.0.0")
        try:
            sock.bind((addr, port))
        except OSError:
            sock.bind((addr, 0))

    # ------------------------------------------------------------ host -> guest

    def to_guest_source(self, v6: bool, src: bytes) -> bytes:
        """How a host-side peer at `src` appears to the guest."""
        if v6:
            if src == LOOPBACK6 or ipaddress.IPv6Address(src).is_loopback:
                return self.lo_alias6 or self.fallback6
            if src in self.host_own6:
                return self.guest_alias6 or self.fallback6
            return src
        if src[0] == 127:
            return self.lo_alias4 or self.fallback4
        if src in self.host_own4:
            return self.guest_alias4 or self.fallback4
        return src


def scope_id(ifname: str | None) -> int:
    """The index of the interface link-local destinations are reached on (0: unknown)."""
    try:
        return socket.if_nametoindex(ifname) if ifname else 0
    except OSError:
        return 0
