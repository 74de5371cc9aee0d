"""DHCPv6 server for the one guest (RFC 8415; DNS options RFC 3646; Client FQDN RFC 4704).

Owns the answers to DHCPv6 client messages.  Sans-I/O: `handle` takes one
frame from the guest and returns the reply frames; `respond` does the same at
the level of DHCPv6 messages.  Knows nothing of the tap backend or the mode.

Theory of operation.  There is one address to give, `conf.ip6.addr` (the
host's own, by default), and one client, so there are no bindings to keep:
every client gets that address in its first IA_NA, with infinite lifetimes
and T1/T2 (it never needs renewing while we run), plus the resolvers, search
list and FQDN the configuration offers.  Our Server Identifier is a DUID-LL
(RFC 8415 11.4) built from our MAC, so it is stable for a given MAC.

    client sends           we answer
    SOLICIT                ADVERTISE (preference 255: the client need not wait
                           for other servers), or REPLY with Rapid Commit when
                           the client asked for it
    REQUEST/RENEW/REBIND   REPLY with the address (other addresses the client
                           holds are returned with lifetime 0: drop them)
    CONFIRM                REPLY, status Success if every address is in our
                           prefix, NotOnLink otherwise; no reply if none given
    INFORMATION-REQUEST    REPLY with the options only
    RELEASE/DECLINE        REPLY, status Success

Messages are dropped (RFC 8415 16) when they lack a Client Identifier (all
but INFORMATION-REQUEST), carry a Server Identifier where none is allowed
(SOLICIT, CONFIRM, REBIND), lack ours where one is required (REQUEST, RENEW,
RELEASE, DECLINE) or carry someone else's, or when an INFORMATION-REQUEST
carries an IA.  Malformed frames and options, and messages not sent to
All_DHCP_Relay_Agents_and_Servers, All_DHCP_Servers or our link-local address
are dropped too: `handle` returns [].

The UDP checksum is not checked: on a tap opened with IFF_VNET_HDR and
TUN_F_CSUM, the guest kernel hands us its UDP datagrams with the checksum left
to be completed (only the pseudo-header sum in the field, CHECKSUM_PARTIAL),
and the link itself, a local file descriptor or socket, does not corrupt data.
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

from common.conf import Config
from common.guest import GuestState
from common.ndp import encode_domain
from common.packet.errors import MalformedPacket
from common.packet.ethernet import ETH_P_IPV6, parse_ethernet
from common.packet.frames import udp6_frame
from common.packet.ipv6 import IPPROTO_UDP, parse_ipv6
from common.packet.udp import parse_udp

CLIENT_PORT = 546
SERVER_PORT = 547
ALL_DHCP_RELAY_AGENTS_AND_SERVERS = IPv6Address("ff02::1:2").packed
ALL_DHCP_SERVERS = IPv6Address("ff05::1:3").packed

# message types (RFC 8415 7.3)
SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
RECONFIGURE = 10
INFORMATION_REQUEST = 11
RELAY_FORW = 12
RELAY_REPL = 13

# option codes (RFC 8415 21, RFC 3646, RFC 4704)
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IA_TA = 4
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_CLIENT_FQDN = 39

# status codes (RFC 8415 21.13)
STATUS_SUCCESS = 0
STATUS_UNSPEC_FAIL = 1
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3
STATUS_NOT_ON_LINK = 4
STATUS_USE_MULTICAST = 5
STATUS_NO_PREFIX_AVAIL = 6

# Client FQDN flags (RFC 4704 4.1)
FQDN_S = 0x01
FQDN_O = 0x02
FQDN_N = 0x04

INFINITE = 0xffffffff
DUID_LL = 3
HWTYPE_ETHERNET = 1
DUID_MAX = 130                   # type code plus at most 128 octets (RFC 8415 11.1)
# a reply must fit the link: of each kind of IA only this many are answered, and of the
# addresses an IA_NA holds only this many are returned with lifetime 0 (a guest's own
# IAs would otherwise make a reply several times its message's size)
IA_ANSWERED = 8
STALE_ANSWERED = 4

_OPT_HDR = struct.Struct("!HH")
_IA_NA = struct.Struct("!III")    # IAID, T1, T2
_IAADDR = struct.Struct("!16sII")  # address, preferred lifetime, valid lifetime

Options = dict[int, list[memoryview]]

_IA_CODES = (OPT_IA_NA, OPT_IA_TA, OPT_IA_PD)
# what each client message must (True) or must not (False) carry as Server ID;
# None: optional, but when present it must be ours
_SERVER_ID_RULE: dict[int, bool | None] = {
    SOLICIT: False, REQUEST: True, CONFIRM: False, RENEW: True, REBIND: False,
    RELEASE: True, DECLINE: True, INFORMATION_REQUEST: None,
}


# ---------------------------------------------------------------- parsing


def parse_options(data: memoryview) -> Options:
    """Option code -> the option bodies, in order; MalformedPacket if one is truncated."""
    opts: Options = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 4 > end:
            raise MalformedPacket("DHCPv6 option header truncated")
        code, length = _OPT_HDR.unpack_from(data, pos)
        pos += 4
        if pos + length > end:
            raise MalformedPacket(f"DHCPv6 option {code} runs past the message")
        opts.setdefault(code, []).append(data[pos:pos + length])
        pos += length
    return opts


def parse_message(data: bytes | bytearray | memoryview) -> tuple[int, bytes, Options]:
    """(message type, 3-byte transaction id, options) of a client/server message."""
    mv = memoryview(data)
    if len(mv) < 4:
        raise MalformedPacket(f"DHCPv6 message too short: {len(mv)} bytes")
    return mv[0], bytes(mv[1:4]), parse_options(mv[4:])


def _ia_addresses(ia: memoryview, head: int = _IA_NA.size) -> list[bytes]:
    """The addresses of the IAADDR options in an IA_NA body (IA_TA: `head` 4)."""
    inner = parse_options(ia[head:])
    out = []
    for body in inner.get(OPT_IAADDR, ()):
        if len(body) < _IAADDR.size:
            raise MalformedPacket("IAADDR option too short")
        parse_options(body[_IAADDR.size:])
        out.append(bytes(body[:16]))
    return out


def _check_ias(opts: Options) -> None:
    for body in opts.get(OPT_IA_NA, ()):
        if len(body) < _IA_NA.size:
            raise MalformedPacket("IA_NA option too short")
        _ia_addresses(body)
    for body in opts.get(OPT_IA_TA, ()):
        if len(body) < 4:
            raise MalformedPacket("IA_TA option too short")
        _ia_addresses(body, 4)
    for body in opts.get(OPT_IA_PD, ()):
        if len(body) < _IA_NA.size:
            raise MalformedPacket("IA_PD option too short")


# ---------------------------------------------------------------- building


def _opt(code: int, data: bytes | bytearray | memoryview) -> bytes:
    return _OPT_HDR.pack(code, len(data)) + data


def _status(code: int, message: str) -> bytes:
    return _opt(OPT_STATUS_CODE, struct.pack("!H", code) + message.encode())


def server_duid(conf: Config) -> bytes:
    """Our DUID: DUID-LL over our MAC."""
    return struct.pack("!HH", DUID_LL, HWTYPE_ETHERNET) + conf.our_mac


def _ia_na(iaid: bytes, addrs: list[tuple[bytes, int]], status: bytes = b"") -> bytes:
    body = bytearray(iaid)
    body += struct.pack("!II", INFINITE, INFINITE)
    for addr, lifetime in addrs:
        body += _opt(OPT_IAADDR, _IAADDR.pack(addr, lifetime, lifetime))
    body += status
    return _opt(OPT_IA_NA, body)


def _leases(msg_type: int, opts: Options, conf: Config) -> tuple[bytes, bool]:
    """The IA options answering the client's IAs, and whether an address was given."""
    assert conf.ip6 is not None
    ours = conf.ip6.addr.packed
    stale = msg_type in (REQUEST, RENEW, REBIND)
    out = bytearray()
    given = False
    for body in opts.get(OPT_IA_NA, ())[:IA_ANSWERED]:
        iaid = bytes(body[:4])
        held = _ia_addresses(body)
        # addresses the client holds that are not ours: lifetime 0 tells it to drop them
        old = [(a, 0) for a in dict.fromkeys(held) if a != ours][:STALE_ANSWERED] \
            if stale else []
        if not given:
            out += _ia_na(iaid, [(ours, INFINITE)] + old)
            given = True
        else:
            out += _ia_na(iaid, old, _status(STATUS_NO_ADDRS_AVAIL, "one address per client"))
    for body in opts.get(OPT_IA_TA, ())[:IA_ANSWERED]:
        out += _opt(OPT_IA_TA, bytes(body[:4]) +
                    _status(STATUS_NO_ADDRS_AVAIL, "no temporary addresses"))
    for body in opts.get(OPT_IA_PD, ())[:IA_ANSWERED]:
        out += _opt(OPT_IA_PD, bytes(body[:4]) + bytes(8) +
                    _status(STATUS_NO_PREFIX_AVAIL, "no prefix delegation"))
    return bytes(out), given


def _config_options(opts: Options, conf: Config) -> bytes:
    """Resolvers, search list and FQDN, as far as the configuration offers them."""
    assert conf.ip6 is not None
    out = bytearray()
    if conf.offer_dns and conf.ip6.dns:
        out += _opt(OPT_DNS_SERVERS, b"".join(a.packed for a in conf.ip6.dns))
    if conf.offer_search and conf.search:
        names = b"".join(w for w in map(encode_domain, conf.search) if w is not None)
        if names:
            out += _opt(OPT_DOMAIN_LIST, names)
    if conf.fqdn:
        wire = encode_domain(conf.fqdn)
        if wire is not None:
            # we perform no DNS updates (N); say so if the client asked us to (O)
            asked = opts.get(OPT_CLIENT_FQDN)
            flags = FQDN_N | (FQDN_O if asked and len(asked[0]) and asked[0][0] & FQDN_S
                              else 0)
            out += _opt(OPT_CLIENT_FQDN, bytes((flags,)) + wire)
    return bytes(out)


def respond(msg_type: int, xid: bytes, opts: Options, conf: Config) -> bytes | None:
    """The server message answering one client message, or None to stay silent.

    MalformedPacket if an IA option inside is malformed.
    """
    assert conf.ip6 is not None
    if msg_type not in _SERVER_ID_RULE:
        return None
    rule = _SERVER_ID_RULE[msg_type]
    duid = server_duid(conf)
    server_ids = opts.get(OPT_SERVERID)
    if server_ids:
        if rule is False or any(s != duid for s in server_ids):
            return None
    elif rule is True:
        return None
    client_ids = opts.get(OPT_CLIENTID)
    if client_ids:
        if not 2 <= len(client_ids[0]) <= DUID_MAX:
            return None
    elif msg_type != INFORMATION_REQUEST:
        return None
    if msg_type == INFORMATION_REQUEST and any(c in opts for c in _IA_CODES):
        return None
    _check_ias(opts)

    reply_type = REPLY
    body = bytearray()
    body += _opt(OPT_SERVERID, duid)
    if client_ids:
        body += _opt(OPT_CLIENTID, client_ids[0])

    if msg_type == CONFIRM:
        addrs = [a for ia in opts.get(OPT_IA_NA, ()) for a in _ia_addresses(ia)]
        addrs += [a for ia in opts.get(OPT_IA_TA, ()) for a in _ia_addresses(ia, 4)]
        if not addrs:
            return None
        prefix = conf.ip6.prefix
        if all(IPv6Address(a) in prefix for a in addrs):
            body += _status(STATUS_SUCCESS, "all addresses on link")
        else:
            body += _status(STATUS_NOT_ON_LINK, "address not on link")
    elif msg_type in (RELEASE, DECLINE):
        body += _status(STATUS_SUCCESS, "done")
    else:
        if msg_type == SOLICIT:
            if OPT_RAPID_COMMIT in opts:
                body += _opt(OPT_RAPID_COMMIT, b"")
            else:
                reply_type = ADVERTISE
                body += _opt(OPT_PREFERENCE, b"\xff")
        if msg_type != INFORMATION_REQUEST:
            leases, given = _leases(msg_type, opts, conf)
            body += leases
            if msg_type == SOLICIT and not given:
                body += _status(STATUS_NO_ADDRS_AVAIL, "no IA_NA requested")
        body += _config_options(opts, conf)
    return bytes((reply_type,)) + xid + body


# ---------------------------------------------------------------- frames


def handle(frame: bytes | bytearray | memoryview, conf: Config,
           guest: GuestState) -> list[bytes]:
    """The reply frames to one frame from the guest ([] if none, or if it is invalid)."""
    c = conf.ip6
    if c is None or not conf.services.dhcpv6:
        return []
    try:
        eth, l3 = parse_ethernet(frame)
        if eth.ethertype != ETH_P_IPV6:
            return []
        ip, l4 = parse_ipv6(l3)
        if ip.next_header != IPPROTO_UDP or ip.fragment:
            return []
        udp, payload = parse_udp(l4)
        if udp.dport != SERVER_PORT:
            return []
        our_ll = c.our_ll.packed
        if ip.dst not in (ALL_DHCP_RELAY_AGENTS_AND_SERVERS, ALL_DHCP_SERVERS, our_ll):
            return []
        if ip.src[0] == 0xff or not any(ip.src):
            return []
        guest.observe_mac(eth.src)
        guest.observe_addr6(IPv6Address(ip.src))
        msg_type, xid, opts = parse_message(payload)
        reply = respond(msg_type, xid, opts, conf)
    except MalformedPacket:
        return []
    if reply is None or len(reply) > conf.mtu - 48:     # IPv6 and UDP headers: 48 bytes
        return []
    return [udp6_frame(bytes(eth.src), conf.our_mac, our_ll, bytes(ip.src),
                       SERVER_PORT, CLIENT_PORT, reply)]
