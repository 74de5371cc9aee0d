"""DHCP server (RFC 2131, options RFC 2132): one lease, the configured address, forever.

Sans-I/O: `handle(frame, conf, guest)` takes one Ethernet frame carrying a
BOOTP request to port 67 and returns the reply frames (none or one).  It
never raises: truncated messages, a wrong magic cookie, BOOTP without a
DHCP message type or options running past their field are dropped (an empty
list; the caller counts drops).

Theory of operation.  There is one client and one address to give it
(`conf.ip4.addr`), so no lease database is kept:

- DISCOVER -> OFFER of `conf.ip4.addr`;
- REQUEST  -> ACK if the address it asks for (option 50, else `ciaddr`) is
  ours to give, NAK if it is another one, nothing if it names another
  server (option 54: it chose someone else's offer);
- INFORM   -> ACK with configuration but no address and no lease time;
- DECLINE, RELEASE, anything else -> nothing.

Leases are infinite (0xffffffff), so clients never renew.  Replies come from
`conf.ip4.our_addr` (also the server identifier), UDP 67 -> 68, Ethernet to
the client's `chaddr`.  They are broadcast (255.255.255.255), except an ACK
to a client that already has its address (`ciaddr` set: RENEWING or INFORM),
which is unicast to it (RFC 2131 4.1); a NAK is always broadcast.

Options: message type, server identifier, lease time, subnet mask, router,
MTU (capped to 65535), and the client identifier echoed (RFC 6842) come
first, then resolvers, host name, client FQDN (RFC 4702) and the domain
search list (RFC 3397, with name compression).  Replies fit the client's
maximum message size (option 57, else 576 bytes of IP datagram) and are
padded to the 300-byte BOOTP minimum.  Options longer than 255 bytes are
split into consecutive instances (RFC 3396); when the options field is full
the `file` and `sname` fields carry the rest (option overload, 52).  If even
that is not enough, the search list loses its last domains, then other
options are left out, lowest priority first.
"""

from __future__ import annotations

import struct

from common.conf import Config
from common.guest import GuestState
from common.packet.errors import MalformedPacket
from common.packet.ethernet import ETH_P_IP, parse_ethernet
from common.packet.frames import udp4_frame
from common.packet.ipv4 import IPPROTO_UDP, parse_ipv4
from common.packet.udp import parse_udp
from common.record import record

SERVER_PORT = 67
CLIENT_PORT = 68
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1
MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTP_FIXED_LEN = 236                # up to the end of `file`
OPTIONS_OFFSET = BOOTP_FIXED_LEN + 4  # after the magic cookie
BOOTP_MIN_LEN = 300                  # RFC 1542 2.1
MIN_DATAGRAM = 576                   # what every client must accept (RFC 2131 4.1)
IP_UDP_HLEN = 28
SNAME_OFFSET, SNAME_LEN = 44, 64
FILE_OFFSET, FILE_LEN = 108, 128
BROADCAST_FLAG = 0x8000
LEASE_INFINITE = 0xffffffff

# message types (option 53)
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# option codes
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_MTU = 26
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MSG_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MAX_MSG_SIZE = 57
OPT_CLIENT_ID = 61
OPT_CLIENT_FQDN = 81
OPT_DOMAIN_SEARCH = 119
OPT_END = 255

OVERLOAD_FILE = 1
OVERLOAD_SNAME = 2

# RFC 4702 flags in our answer: names in wire format (E), we update no DNS (N)
FQDN_FLAG_E = 0x04
FQDN_FLAG_N = 0x08

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s")
_BROADCAST4 = b"\xff" * 4
_ZERO4 = b"\0" * 4


# ---------------------------------------------------------------- parsing


@record(slots=True)
class DhcpMessage:
    op: int
    htype: int
    hlen: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes                    # all 16 bytes of the field
    options: dict[int, bytes]        # repeated instances concatenated (RFC 3396)

    @property
    def msg_type(self) -> int | None:
        value = self.options.get(OPT_MSG_TYPE)
        return value[0] if value and len(value) == 1 else None


def _parse_options(area: memoryview, options: dict[int, bytes]) -> None:
    i, end = 0, len(area)
    while i < end:
        code = area[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > end or i + 2 + area[i + 1] > end:
            raise MalformedPacket(f"DHCP option {code} runs past its field")
        data = bytes(area[i + 2:i + 2 + area[i + 1]])
        options[code] = options.get(code, b"") + data
        i += 2 + len(data)


def parse_dhcp(data: bytes | bytearray | memoryview) -> DhcpMessage:
    """A BOOTP message with DHCP options (the magic cookie is required)."""
    mv = memoryview(data)
    if len(mv) < OPTIONS_OFFSET:
        raise MalformedPacket(f"BOOTP message too short: {len(mv)} bytes")
    if mv[BOOTP_FIXED_LEN:OPTIONS_OFFSET] != MAGIC_COOKIE:
        raise MalformedPacket("no DHCP magic cookie")
    op, htype, hlen, _hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr = \
        _HEADER.unpack_from(mv)
    options: dict[int, bytes] = {}
    _parse_options(mv[OPTIONS_OFFSET:], options)
    overload = (options.get(OPT_OVERLOAD) or b"\0")[0]
    # RFC 3396: concatenation order is options, then file, then sname
    if overload & OVERLOAD_FILE:
        _parse_options(mv[FILE_OFFSET:FILE_OFFSET + FILE_LEN], options)
    if overload & OVERLOAD_SNAME:
        _parse_options(mv[SNAME_OFFSET:SNAME_OFFSET + SNAME_LEN], options)
    return DhcpMessage(op, htype, hlen, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr,
                       chaddr, options)


# ---------------------------------------------------------------- option encoding


def encode_dns_name(name: str) -> bytes | None:
    """RFC 1035 wire format of a fully qualified name, or None if it has no valid form."""
    name = name.rstrip(".")
    try:
        labels = [label.encode("ascii") for label in name.split(".")] if name else []
    except UnicodeEncodeError:
        try:
            labels = [label.encode("idna") for label in name.split(".")]
        except UnicodeError:
            return None
    if any(not 0 < len(label) < 64 for label in labels):
        return None
    wire = b"".join(bytes((len(label),)) + label for label in labels) + b"\0"
    return wire if len(wire) <= 255 else None


def _labels(wire: bytes) -> list[bytes]:
    """The labels of an uncompressed name in wire format."""
    labels, i = [], 0
    while wire[i]:
        labels.append(wire[i + 1:i + 1 + wire[i]])
        i += 1 + wire[i]
    return labels


def encode_domain_search(names: list[str] | tuple[str, ...]) -> bytes:
    """The RFC 3397 domain search list: names in wire format, each suffix already
    written replaced by a compression pointer to it (offsets from the start of
    the option data, as if all instances were concatenated)."""
    out = bytearray()
    seen: dict[tuple[bytes, ...], int] = {}
    for name in names:
        wire = encode_dns_name(name)
        if wire is None or wire == b"\0":
            continue
        labels = _labels(wire)
        for k in range(len(labels)):
            suffix = tuple(label.lower() for label in labels[k:])
            if suffix in seen:
                out += struct.pack("!H", 0xc000 | seen[suffix])
                break
            if len(out) < 0x4000:
                seen[suffix] = len(out)
            out += bytes((len(labels[k]),)) + labels[k]
        else:
            out += b"\0"
    return bytes(out)


def encode_client_fqdn(fqdn: str) -> bytes | None:
    wire = encode_dns_name(fqdn)
    if wire is None:
        return None
    return bytes((FQDN_FLAG_E | FQDN_FLAG_N, 255, 255)) + wire


class _OptionAreas:
    """The options field, then `file`, then `sname`, filled in priority order.

    An option of up to 255 bytes goes whole into the first area with room for
    it.  A longer one, or a list (`split`) that fits nowhere whole, is split
    into instances that fill the areas in order, as RFC 3396 concatenation
    requires.  Room is kept in the options field for the overload option and
    in every area for its end option.
    """

    def __init__(self, options_room: int) -> None:
        self.room = [options_room - 3 - 1, FILE_LEN - 1, SNAME_LEN - 1]
        self.areas = [bytearray(), bytearray(), bytearray()]

    def _free(self, area: int) -> int:
        return self.room[area] - len(self.areas[area])

    def put(self, code: int, data: bytes, split: bool = False) -> bool:
        """Place one option; False (and nothing placed) if it does not fit."""
        if len(data) <= 255:
            for area in range(3):
                if self._free(area) >= 2 + len(data):
                    self.areas[area] += bytes((code, len(data))) + data
                    return True
            if not split:
                return False
        pieces: list[tuple[int, bytes]] = []
        area, used, pos = 0, len(self.areas[0]), 0
        while pos < len(data):
            take = min(self.room[area] - used - 2, 255, len(data) - pos)
            if take < 1:
                area += 1
                if area == 3:
                    return False
                used = len(self.areas[area])
                continue
            pieces.append((area, data[pos:pos + take]))
            used, pos = used + 2 + take, pos + take
        for area, chunk in pieces:
            self.areas[area] += bytes((code, len(chunk))) + chunk
        return True

    def put_first(self, code: int, candidates) -> None:
        """Place the first candidate value that fits (they come longest first)."""
        for data in candidates:
            if data and self.put(code, data, split=True):
                return

    def overload(self) -> int:
        return (OVERLOAD_FILE if self.areas[1] else 0) | (OVERLOAD_SNAME if self.areas[2] else 0)


# ---------------------------------------------------------------- replies


def _max_message_len(request: DhcpMessage, conf: Config) -> int:
    """The longest BOOTP message the client takes: its option 57 (the size of the
    whole IP datagram) or 576, within our MTU."""
    size = MIN_DATAGRAM
    value = request.options.get(OPT_MAX_MSG_SIZE)
    if value is not None and len(value) == 2:
        size = max(size, struct.unpack("!H", value)[0])
    return min(size, max(conf.mtu, MIN_DATAGRAM)) - IP_UDP_HLEN


def build_reply(request: DhcpMessage, conf: Config, msg_type: int) -> bytes:
    """The BOOTP/DHCP message answering `request` with `msg_type` (OFFER, ACK, NAK)."""
    ip4 = conf.ip4
    assert ip4 is not None
    inform = request.msg_type == DHCPINFORM
    nak = msg_type == DHCPNAK
    areas = _OptionAreas(_max_message_len(request, conf) - OPTIONS_OFFSET)

    areas.put(OPT_MSG_TYPE, bytes((msg_type,)))
    areas.put(OPT_SERVER_ID, ip4.our_addr.packed)
    if not nak:
        if not inform:
            areas.put(OPT_LEASE_TIME, struct.pack("!I", LEASE_INFINITE))
        mask = (0xffffffff << (32 - ip4.prefix_len)) & 0xffffffff
        areas.put(OPT_SUBNET_MASK, struct.pack("!I", mask))
        if ip4.gateway is not None:
            areas.put(OPT_ROUTER, ip4.gateway.packed)
        areas.put(OPT_MTU, struct.pack("!H", min(conf.mtu, 0xffff)))
    if OPT_CLIENT_ID in request.options:
        areas.put(OPT_CLIENT_ID, request.options[OPT_CLIENT_ID])
    if not nak:
        if conf.offer_dns and ip4.dns:
            dns = [a.packed for a in ip4.dns]
            areas.put_first(OPT_DNS, (b"".join(dns[:k]) for k in range(len(dns), 0, -1)))
        if conf.hostname:
            wire = encode_dns_name(conf.hostname)
            if wire is not None and wire != b"\0":     # the option is the dotted text
                areas.put(OPT_HOSTNAME, b".".join(_labels(wire)))
        if conf.fqdn:
            fqdn = encode_client_fqdn(conf.fqdn)
            if fqdn is not None:
                areas.put(OPT_CLIENT_FQDN, fqdn)
        if conf.offer_search and conf.search:
            names = list(conf.search)
            areas.put_first(OPT_DOMAIN_SEARCH, (encode_domain_search(names[:k])
                                                for k in range(len(names), 0, -1)))

    yiaddr = _ZERO4 if nak or inform else ip4.addr.packed
    ciaddr = request.ciaddr if msg_type == DHCPACK else _ZERO4
    msg = bytearray(OPTIONS_OFFSET)
    _HEADER.pack_into(msg, 0, BOOTREPLY, request.htype, request.hlen, 0, request.xid, 0,
                      request.flags, ciaddr, yiaddr, _ZERO4, request.giaddr, request.chaddr)
    overload = areas.overload()
    if overload & OVERLOAD_FILE:
        msg[FILE_OFFSET:FILE_OFFSET + len(areas.areas[1]) + 1] = areas.areas[1] + b"\xff"
    if overload & OVERLOAD_SNAME:
        msg[SNAME_OFFSET:SNAME_OFFSET + len(areas.areas[2]) + 1] = areas.areas[2] + b"\xff"
    msg[BOOTP_FIXED_LEN:OPTIONS_OFFSET] = MAGIC_COOKIE
    msg += areas.areas[0]
    if overload:
        msg += bytes((OPT_OVERLOAD, 1, overload))
    msg.append(OPT_END)
    if len(msg) < BOOTP_MIN_LEN:
        msg += bytes(BOOTP_MIN_LEN - len(msg))
    return bytes(msg)


def _answer(request: DhcpMessage, conf: Config) -> tuple[int, bytes] | None:
    """The reply type and the IP destination for `request`, or None for no reply."""
    ip4 = conf.ip4
    assert ip4 is not None
    kind = request.msg_type
    if kind == DHCPDISCOVER:
        return DHCPOFFER, _BROADCAST4
    if kind == DHCPINFORM:
        return DHCPACK, request.ciaddr if request.ciaddr != _ZERO4 else _BROADCAST4
    if kind != DHCPREQUEST:
        return None
    server = request.options.get(OPT_SERVER_ID)
    if server is not None and server != ip4.our_addr.packed:
        return None                         # the client took another server's offer
    wanted = request.options.get(OPT_REQUESTED_IP)
    if wanted is None and request.ciaddr != _ZERO4:
        wanted = request.ciaddr
    if wanted is not None and wanted != ip4.addr.packed:
        return DHCPNAK, _BROADCAST4
    # a client that has its address hears unicast (RFC 2131 4.1)
    return DHCPACK, request.ciaddr if request.ciaddr != _ZERO4 else _BROADCAST4


def handle(frame: bytes | memoryview, conf: Config, guest: GuestState) -> list[bytes]:
    """Reply frames for one DHCP frame from the guest (an empty list: nothing to send)."""
    if conf.ip4 is None:
        return []
    try:
        eth, l3 = parse_ethernet(frame)
        if eth.ethertype != ETH_P_IP:
            return []
        ip, l4 = parse_ipv4(l3)
        if ip.proto != IPPROTO_UDP or ip.mf or ip.frag_offset:
            return []
        udp, payload = parse_udp(l4)
        if udp.dport != SERVER_PORT:
            return []
        request = parse_dhcp(payload)
    except MalformedPacket:
        return []
    if request.op != BOOTREQUEST or request.htype != HTYPE_ETHER or request.hlen != 6:
        return []
    requested = request.options.get(OPT_REQUESTED_IP)
    if requested is not None and len(requested) != 4:
        return []
    chaddr = request.chaddr[:6]
    if chaddr[0] & 1 or chaddr == b"\0" * 6:
        return []

    answer = _answer(request, conf)
    if answer is None:
        return []
    msg_type, ip_dst = answer
    guest.observe_mac(chaddr)
    if msg_type == DHCPACK and request.msg_type == DHCPREQUEST:
        guest.observe_addr4(conf.ip4.addr)
    reply = build_reply(request, conf, msg_type)
    return [udp4_frame(chaddr, conf.our_mac, conf.ip4.our_addr.packed, ip_dst,
                       SERVER_PORT, CLIENT_PORT, reply)]

