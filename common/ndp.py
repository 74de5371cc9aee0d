"""NDP responder: we are the guest's only neighbour and its router (RFC 4861, 4862, 8106).

Owns the answers to Router and Neighbor Solicitations from the guest, and the
Router Advertisement (solicited and periodic).  Sans-I/O: `handle` takes one
frame and returns the reply frames; `router_advertisement` builds the RA the
event loop also sends on its own timer (every `RA_INTERVAL` seconds;
`next_ra_delay` gives the RFC 4861 schedule with quicker first ones).  Knows
nothing of the tap backend or the mode.

Theory of operation.  Everything the guest can reach on its link is really us:
the gateway, our link-local address, the other hosts of the host's prefix, and
every address the guest might try.  So a Neighbor Solicitation for any target
is answered with our MAC, with two exceptions that would break the guest:

- targets that are the guest's own addresses (configured, or seen as sources
  of its frames): claiming them would make the guest think someone else
  holds them;
- Duplicate Address Detection probes (source ::) for anything but the few
  addresses we hold ourselves: the target is the guest's tentative address,
  e.g. the SLAAC address it derives from our Prefix Information, which we do
  not know in advance.  Answering would make DAD fail and SLAAC give up.

Advertisements and Redirects from the guest carry nothing we act on.
Invalid input (RFC 4861 sections 6.1 and 7.1: hop limit not 255, bad ICMPv6
checksum, non-zero code, short body, zero-length or truncated options,
multicast target, fragments) is dropped: `handle` returns [].
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from ipaddress import IPv6Address

from common.conf import Config
from common.guest import GuestState
from common.packet.checksum import l4_checksum6
from common.packet.errors import MalformedPacket
from common.packet.ethernet import ETH_P_IPV6, parse_ethernet
from common.packet.frames import build_ipv6_frame
from common.packet.icmp import (
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_REDIRECT,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    build_icmp6,
    parse_icmp,
)
from common.packet.ipv6 import IPPROTO_ICMPV6, parse_ipv6

# option types (RFC 4861 4.6, RFC 8106 5)
OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
OPT_PREFIX_INFO = 3
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

# RA header flags (RFC 4861 4.2) and Prefix Information flags (4.6.2)
RA_MANAGED = 0x80
RA_OTHER = 0x40
PREFIX_ON_LINK = 0x80
PREFIX_AUTONOMOUS = 0x40
# NA flags (RFC 4861 4.4), first byte of the reserved field
NA_ROUTER = 0x80
NA_SOLICITED = 0x40
NA_OVERRIDE = 0x20

INFINITE = 0xffffffff
ROUTER_LIFETIME = 65535          # seconds, the largest the field holds (RFC 8319)
CUR_HOP_LIMIT = 64
DNS_LIFETIME = INFINITE          # RDNSS/DNSSL: the resolvers do not change while we run
IPV6_MIN_MTU = 1280
DNSSL_MAX = 255 * 8              # the option length field counts 8-octet units

# Unsolicited RAs (RFC 4861 6.2.4): one router on a point-to-point link, so no
# randomisation is needed against synchronised routers; the first few come
# sooner so a guest that missed the answer to its solicitation still configures.
RA_INTERVAL = 60.0                       # seconds, within MinRtrAdvInterval..MaxRtrAdvInterval
MAX_INITIAL_RTR_ADVERT_INTERVAL = 16.0
MAX_INITIAL_RTR_ADVERTISEMENTS = 3

ALL_NODES = IPv6Address("ff02::1").packed
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
UNSPECIFIED = bytes(16)
_SOLICITED_NODE_PREFIX = IPv6Address("ff02::1:ff00:0").packed[:13]

_NA_REST = struct.Struct("!B3x")
_RA_REST = struct.Struct("!BBH")
_RA_TIMERS = struct.Struct("!II")
_PREFIX_OPT = struct.Struct("!BBBBIII16s")
_MTU_OPT = struct.Struct("!BBHI")
_DNS_OPT_HDR = struct.Struct("!BBHI")


def multicast_mac(addr: bytes) -> bytes:
    """The Ethernet address an IPv6 multicast group maps to (RFC 2464 7)."""
    return b"\x33\x33" + bytes(addr[12:16])


def encode_domain(name: str) -> bytes | None:
    """A fully qualified name in DNS wire format (RFC 1035 3.1), no compression.

    None when it cannot be encoded (empty or over-long labels, non-ASCII that
    IDNA rejects, longer than 255 bytes).
    """
    name = name.rstrip(".")
    if not name:
        return None
    out = bytearray()
    try:
        labels = [label.encode("idna") if not label.isascii() else label.encode()
                  for label in name.split(".")]
    except UnicodeError:
        return None
    for label in labels:
        if not 0 < len(label) < 64:
            return None
        out.append(len(label))
        out += label
    out.append(0)
    return bytes(out) if len(out) <= 255 else None


def parse_options(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(type, whole option) for each ND option; MalformedPacket on a bad length."""
    pos, end = 0, len(data)
    while pos < end:
        if pos + 2 > end:
            raise MalformedPacket("ND option truncated")
        length = data[pos + 1] * 8
        if not length:
            raise MalformedPacket("ND option of length 0")
        if pos + length > end:
            raise MalformedPacket("ND option runs past the message")
        yield data[pos], data[pos:pos + length]
        pos += length


def _options(data: memoryview) -> list[tuple[int, memoryview]]:
    return list(parse_options(data))


# ---------------------------------------------------------------- input

# advertisements and redirects are validated like solicitations, then only learnt from
_ND_TYPES = frozenset((ND_ROUTER_SOLICIT, ND_ROUTER_ADVERT, ND_NEIGHBOR_SOLICIT,
                       ND_NEIGHBOR_ADVERT, ND_REDIRECT))


def handle(frame: bytes | bytearray | memoryview, conf: Config,
           guest: GuestState) -> list[bytes]:
    """The reply frames to one frame from the guest ([] if none, or if it is invalid)."""
    if conf.ip6 is None or not conf.services.ndp:
        return []
    try:
        eth, l3 = parse_ethernet(frame)
        if eth.ethertype != ETH_P_IPV6:
            return []
        ip, l4 = parse_ipv6(l3)
        if ip.next_header != IPPROTO_ICMPV6 or ip.fragment or ip.hop_limit != 255:
            return []
        icmp, body = parse_icmp(l4)
        if icmp.type not in _ND_TYPES or icmp.code != 0:
            return []
        if l4_checksum6(ip.src, ip.dst, IPPROTO_ICMPV6, l4):
            return []
        if ip.src[0] == 0xff:
            return []
        if icmp.type == ND_ROUTER_SOLICIT:
            return _router_solicitation(eth.src, ip.src, body, conf, guest)
        if icmp.type == ND_NEIGHBOR_SOLICIT:
            return _neighbor_solicitation(eth.src, ip.src, ip.dst, body, conf, guest)
        _observe(eth.src, ip.src, guest)
        return []
    except MalformedPacket:
        return []


def _observe(mac: bytes, src: bytes, guest: GuestState) -> None:
    guest.observe_mac(mac)
    if src != UNSPECIFIED:
        guest.observe_addr6(IPv6Address(bytes(src)))


def _router_solicitation(mac: bytes, src: bytes, body: memoryview, conf: Config,
                         guest: GuestState) -> list[bytes]:
    opts = _options(body)
    if src == UNSPECIFIED and any(t == OPT_SOURCE_LL for t, _ in opts):
        return []
    _observe(mac, src, guest)
    if not conf.services.ra:
        return []
    # RFC 4861 6.2.6 allows a unicast answer; a solicitation from :: gets the multicast one
    return [router_advertisement(conf, guest, None if src == UNSPECIFIED else bytes(src))]


def _neighbor_solicitation(mac: bytes, src: bytes, dst: bytes, body: memoryview,
                           conf: Config, guest: GuestState) -> list[bytes]:
    if len(body) < 16:
        return []
    target = bytes(body[:16])
    if target[0] == 0xff:
        return []
    opts = _options(body[16:])
    dad = src == UNSPECIFIED
    if dad and (dst[:13] != _SOLICITED_NODE_PREFIX
                or any(t == OPT_SOURCE_LL for t, _ in opts)):
        return []
    _observe(mac, src, guest)
    if target == UNSPECIFIED or target in _guest_addrs(conf, guest):
        return []
    if dad:
        if target not in _our_addrs(conf):
            return []
        # RFC 4861 7.2.4: to all-nodes, not solicited
        return [neighbor_advertisement(conf, target, ALL_NODES, ALL_NODES_MAC,
                                       NA_ROUTER | NA_OVERRIDE)]
    return [neighbor_advertisement(conf, target, bytes(src), bytes(mac),
                                   NA_ROUTER | NA_SOLICITED | NA_OVERRIDE)]


def _guest_addrs(conf: Config, guest: GuestState) -> set[bytes]:
    assert conf.ip6 is not None
    return {a.packed for a in (conf.ip6.addr, guest.addr6, guest.addr6_ll) if a is not None}


def _our_addrs(conf: Config) -> set[bytes]:
    """Addresses we hold on the link ourselves: DAD for them must fail."""
    c = conf.ip6
    assert c is not None
    return {a.packed for a in (c.our_ll, c.gateway, c.map_host_loopback, c.map_guest_addr,
                               c.dns_forward) if a is not None}


# ---------------------------------------------------------------- output


def neighbor_advertisement(conf: Config, target: bytes, dst: bytes, dst_mac: bytes,
                           flags: int) -> bytes:
    """An NA frame claiming `target` for our MAC, sent from `target` itself."""
    body = target + bytes((OPT_TARGET_LL, 1)) + conf.our_mac
    l4 = build_icmp6(target, dst, ND_NEIGHBOR_ADVERT, 0, _NA_REST.pack(flags), body)
    return build_ipv6_frame(dst_mac, conf.our_mac, target, dst, IPPROTO_ICMPV6, l4)


def router_advertisement(conf: Config, guest: GuestState, dst: bytes | None = None) -> bytes:
    """The RA frame: to `dst` (and the guest's MAC), or to all nodes when None."""
    c = conf.ip6
    assert c is not None
    if dst is None:
        dst, dst_mac = ALL_NODES, ALL_NODES_MAC
    else:
        dst_mac = multicast_mac(dst) if dst[0] == 0xff else guest.mac
    src = c.our_ll.packed
    flags = RA_MANAGED | RA_OTHER if conf.services.dhcpv6 else 0
    rest = _RA_REST.pack(CUR_HOP_LIMIT, flags, ROUTER_LIFETIME)
    body = bytearray(_RA_TIMERS.pack(0, 0))         # reachable time, retrans timer: unspecified
    body += bytes((OPT_SOURCE_LL, 1)) + conf.our_mac
    if conf.mtu >= IPV6_MIN_MTU:
        body += _MTU_OPT.pack(OPT_MTU, 1, 0, conf.mtu)
    prefix = c.prefix
    if prefix is not None:              # local mode: a router, but no prefix to take
        body += _PREFIX_OPT.pack(OPT_PREFIX_INFO, 4, prefix.prefixlen,
                                 PREFIX_ON_LINK | PREFIX_AUTONOMOUS, INFINITE, INFINITE, 0,
                                 prefix.network_address.packed)
    if conf.offer_dns and c.dns:
        body += rdnss_option(a.packed for a in c.dns)
    if conf.offer_search and conf.search:
        body += dnssl_option(conf.search)
    l4 = build_icmp6(src, dst, ND_ROUTER_ADVERT, 0, rest, body)
    return build_ipv6_frame(dst_mac, conf.our_mac, src, dst, IPPROTO_ICMPV6, l4)


def rdnss_option(addrs: Iterable[bytes]) -> bytes:
    """Recursive DNS Server option (RFC 8106 5.1); at most 127 addresses fit."""
    packed = list(addrs)[:127]
    if not packed:
        return b""
    return _DNS_OPT_HDR.pack(OPT_RDNSS, 1 + 2 * len(packed), 0, DNS_LIFETIME) + b"".join(packed)


def dnssl_option(names: Iterable[str]) -> bytes:
    """DNS Search List option (RFC 8106 5.2): wire names, zero-padded to 8 octets.

    Names that do not encode are skipped, and so are those that would push the
    option past its largest size.
    """
    data = bytearray()
    for name in names:
        wire = encode_domain(name)
        if wire is not None and _DNS_OPT_HDR.size + len(data) + len(wire) <= DNSSL_MAX:
            data += wire
    if not data:
        return b""
    data += bytes(-(_DNS_OPT_HDR.size + len(data)) % 8)
    length = (_DNS_OPT_HDR.size + len(data)) // 8
    return _DNS_OPT_HDR.pack(OPT_DNSSL, length, 0, DNS_LIFETIME) + data


def next_ra_delay(sent: int) -> float:
    """Seconds from one unsolicited RA to the next, given how many were sent so far."""
    if sent < MAX_INITIAL_RTR_ADVERTISEMENTS:
        return MAX_INITIAL_RTR_ADVERT_INTERVAL
    return RA_INTERVAL
