"""ICMP errors the host reports on a flow's socket, rebuilt for the guest.

With IP_RECVERR / IPV6_RECVERR set, an ICMP error about a datagram we sent
(port unreachable, fragmentation needed, ...) is queued on the socket's error
queue: `recvmsg(MSG_ERRQUEUE)` returns the quoted payload of our datagram,
the destination it went to, and a control message holding a
`struct sock_extended_err` (ee_errno, ee_origin, ee_type, ee_code, ee_pad,
ee_info, ee_data) followed by the address of the node that sent the error
(ip(7), ipv6(7)).

The guest sent its own datagram, with its own addresses and ports, so the
error it receives must quote *that* datagram: `error_for_guest` rebuilds the
guest's IP and UDP headers around the quoted payload and wraps them in an
ICMP or ICMPv6 error of the same type and code.  Everything here is pure:
bytes in, bytes out.  Errors the kernel made up locally (origin LOCAL, e.g.
EMSGSIZE) concern our socket, not the path, and are not forwarded.
"""

from __future__ import annotations

import struct

from common.packet.checksum import checksum
from common.packet.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    ICMP_PARAMETERPROB,
    ICMP_TIME_EXCEEDED,
    ICMPV6_DEST_UNREACH,
    ICMPV6_PARAMPROB,
    ICMPV6_PKT_TOOBIG,
    ICMPV6_TIME_EXCEED,
    build_icmp4_error,
    build_icmp6_error,
)
from common.record import record

SOL_IP, SOL_IPV6 = 0, 41
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3

_EE = struct.Struct("=IBBBBII")
_UDP = struct.Struct("!HHHH")

FORWARDED4 = frozenset((ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMP_PARAMETERPROB))
FORWARDED6 = frozenset((ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEED,
                        ICMPV6_PARAMPROB))


@record(slots=True, frozen=True)
class SockError:
    errno: int
    origin: int
    type: int
    code: int
    info: int
    offender: bytes | None     # packed address of the node that sent the ICMP error


def parse_sock_error(level: int, type_: int, data: bytes) -> SockError | None:
    """The sock_extended_err in one control message, or None if it is not one."""
    if (level, type_) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
        return None
    if len(data) < _EE.size:
        return None
    err, origin, type_, code, _pad, info, _data = _EE.unpack_from(data)
    offender = None
    rest = data[_EE.size:]
    if len(rest) >= 8:
        family = struct.unpack_from("=H", rest)[0]
        if family == 2:                                   # sockaddr_in
            offender = bytes(rest[4:8])
        elif family == 10 and len(rest) >= 24:            # sockaddr_in6
            offender = bytes(rest[8:24])
    return SockError(err, origin, type_, code, info, offender)


def quoted_udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4+UDP datagram as the guest sent it (UDP checksum 0: "none", valid in IPv4)."""
    ulen = 8 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0,
                               src, dst))
    struct.pack_into("!H", ip, 10, checksum(ip))
    return bytes(ip) + _UDP.pack(sport, dport, ulen, 0) + payload


def quoted_udp6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv6+UDP datagram as the guest sent it (its checksum is not known: 0)."""
    ulen = 8 + len(payload)
    return (struct.pack("!IHBB16s16s", 0x60000000, ulen, 17, 64, src, dst)
            + _UDP.pack(sport, dport, ulen, 0) + payload)


def error_for_guest(v6: bool, err: SockError, *, guest: bytes, remote: bytes,
                    guest_port: int, remote_port: int, payload: bytes,
                    guest_mtu: int, sender: bytes | None = None) -> bytes | None:
    """The ICMP/ICMPv6 message (checksummed) telling the guest about `err`, or None.

    `guest`:`guest_port` sent to `remote`:`remote_port` (addresses as the
    guest knows them); `payload` is the quoted part of that datagram as the
    error queue returned it.  Reported MTUs are capped to what the guest's
    link itself allows, for it can do nothing with a larger one.  `sender` is
    the source of the error as the guest will see it (default: `remote`); only
    the ICMPv6 checksum depends on it.
    """
    if v6:
        if err.origin != SO_EE_ORIGIN_ICMP6 or err.type not in FORWARDED6:
            return None
        rest = b"\0\0\0\0"
        if err.type == ICMPV6_PKT_TOOBIG:
            rest = struct.pack("!I", min(err.info, guest_mtu))
        elif err.type == ICMPV6_PARAMPROB:
            rest = struct.pack("!I", err.info)
        quote = quoted_udp6(guest, remote, guest_port, remote_port, payload)
        return build_icmp6_error(sender or remote, guest, err.type, err.code, quote, rest)
    if err.origin != SO_EE_ORIGIN_ICMP or err.type not in FORWARDED4:
        return None
    rest = b"\0\0\0\0"
    if err.type == ICMP_DEST_UNREACH and err.code == ICMP_FRAG_NEEDED:
        rest = struct.pack("!HH", 0, min(err.info, guest_mtu, 0xFFFF))
    elif err.type == ICMP_PARAMETERPROB:
        rest = struct.pack("!I", (err.info & 0xFF) << 24)
    quote = quoted_udp4(guest, remote, guest_port, remote_port, payload)
    return build_icmp4_error(err.type, err.code, quote, rest)
