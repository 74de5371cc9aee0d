"""ARP responder (RFC 826): we answer for every address on the guest's link but its own.

Sans-I/O: `handle(frame, conf, guest)` takes one Ethernet frame carrying ARP
and returns the reply frames (none or one).  It never raises: anything that
is not a well-formed Ethernet/IPv4 ARP request is ignored.

We are the only other host on the guest's link, so every neighbour the guest
may look for is us: the gateway, `our_addr`, the addresses we map
(`--map-host-loopback`, `--map-guest-addr`, `--dns-forward`) and any other
address of the guest's subnet (the configured one, and the one around the
address the guest was seen using).  What we never answer:

- the guest's own address (configured or observed): answering would make
  the guest's duplicate address detection (RFC 5227 probes) fail;
- announcements and gratuitous ARP (sender address equal to the target):
  the guest is telling, not asking;
- probes (RFC 5227: sender address 0.0.0.0): the guest is checking that an
  address it wants is free, and from us it is.

One exception: a probe from 0.0.0.0 for 0.0.0.0 is answered.  qrap sends one
to check that passt is listening, and waits for any reply.

Every ARP request or reply from the guest tells us its MAC and address; they
go to `guest.observe_mac` / `guest.observe_addr4`.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from common.conf import Config
from common.guest import GuestState
from common.packet.arp import ARPOP_REPLY, ARPOP_REQUEST, Arp, build_arp, parse_arp
from common.packet.errors import MalformedPacket
from common.packet.ethernet import ETH_P_ARP, build_ethernet, parse_ethernet

_ZERO4 = b"\0" * 4
_ZERO_MAC = b"\0" * 6


def _is_unicast_mac(mac: bytes) -> bool:
    return mac != _ZERO_MAC and not mac[0] & 1


def _in_subnet(target: IPv4Address, around: IPv4Address, prefix_len: int) -> bool:
    net = IPv4Network((around, prefix_len), strict=False)
    if target not in net:
        return False
    # the network and broadcast addresses are nobody's, except on /31 and /32
    return prefix_len >= 31 or target not in (net.network_address, net.broadcast_address)


def _answers_for(target: IPv4Address, conf: Config, guest: GuestState) -> bool:
    ip4 = conf.ip4
    assert ip4 is not None
    if target == ip4.addr or target == guest.addr4:
        return False
    if target in (ip4.our_addr, ip4.gateway, ip4.map_host_loopback, ip4.map_guest_addr,
                  ip4.dns_forward):
        return True
    if _in_subnet(target, ip4.addr, ip4.prefix_len):
        return True
    return guest.addr4 is not None and _in_subnet(target, guest.addr4, ip4.prefix_len)


def handle(frame: bytes | memoryview, conf: Config, guest: GuestState) -> list[bytes]:
    """Reply frames for one ARP frame from the guest (an empty list: nothing to send)."""
    if conf.ip4 is None:
        return []
    try:
        eth, payload = parse_ethernet(frame)
        if eth.ethertype != ETH_P_ARP:
            return []
        arp = parse_arp(payload)
    except MalformedPacket:
        return []

    if arp.op not in (ARPOP_REQUEST, ARPOP_REPLY):
        return []
    if _is_unicast_mac(arp.sha):
        guest.observe_mac(arp.sha)
    if arp.spa != _ZERO4:
        guest.observe_addr4(IPv4Address(arp.spa))
    if arp.op != ARPOP_REQUEST:
        return []

    if arp.spa == _ZERO4:
        if arp.tpa != _ZERO4:
            return []                       # address probe: the address is free
    elif arp.spa == arp.tpa or not _answers_for(IPv4Address(arp.tpa), conf, guest):
        return []                           # announcement, or not a neighbour we play

    requester = arp.sha if _is_unicast_mac(arp.sha) else eth.src
    reply = Arp(ARPOP_REPLY, sha=conf.our_mac, spa=arp.tpa, tha=arp.sha, tpa=arp.spa)
    return [build_ethernet(requester, conf.our_mac, ETH_P_ARP, build_arp(reply))]
