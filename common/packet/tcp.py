"""TCP headers (RFC 9293) and options (MSS, window scale RFC 7323, SACK RFC 2018,
timestamps RFC 7323): parse, encode, build with the pseudo-header checksum.

Option values are reported as received (a window scale above 14 is the
caller's to clamp).  Unknown option kinds are skipped; an option whose
length is below 2, runs past the header, or does not fit its known kind
makes the whole header malformed.
"""

from __future__ import annotations

import struct

from common.packet.checksum import csum_add, csum_finish, pseudo4, pseudo6
from common.packet.errors import MalformedPacket
from common.packet.ipv4 import IPPROTO_TCP
from common.record import record

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

TCP_HLEN = 20
TCP_MAX_OPTLEN = 40

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_HDR = struct.Struct("!HHIIBBHHH")
_II = struct.Struct("!II")


@record(frozen=True, slots=True)
class TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None       # (TSval, TSecr)
    sack: tuple[tuple[int, int], ...] = ()          # (left edge, right edge) blocks


NO_OPTIONS = TcpOptions()


@record(slots=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int             # as received, not scaled
    checksum: int
    urgent: int
    header_len: int
    options: TcpOptions


# Linux's SYN options, in its order: MSS, SACK permitted, timestamps, NOP, window scale
_LINUX_SYN_HEAD = b"\x02\x04"
_LINUX_SYN_MID = b"\x04\x02\x08\x0a"
_LINUX_SYN_TAIL = b"\x01\x03\x03"


def syn_options(data: bytes | bytearray | memoryview) -> tuple[int | None, int | None]:
    """(MSS, window scale) of a SYN's option bytes, as `parse_tcp_options` finds them
    (MalformedPacket alike), with Linux's usual layout recognised at a glance: a
    guest's every connection starts with one of these."""
    if (len(data) == 20 and data[0:2] == _LINUX_SYN_HEAD and data[4:8] == _LINUX_SYN_MID
            and data[16:19] == _LINUX_SYN_TAIL):
        return data[2] << 8 | data[3], data[19]
    opts = parse_tcp_options(data)
    return opts.mss, opts.wscale


def parse_tcp_options(data: bytes | bytearray | memoryview) -> TcpOptions:
    """The options we understand from the option bytes of a header."""
    mv = memoryview(data)
    end = len(mv)
    if not end:
        return NO_OPTIONS
    mss = wscale = timestamps = None
    sack_permitted = False
    sack: tuple[tuple[int, int], ...] = ()
    i = 0
    while i < end:
        kind = mv[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedPacket(f"TCP option {kind} has no length byte")
        length = mv[i + 1]
        if length < 2 or i + length > end:
            raise MalformedPacket(f"TCP option {kind} length {length} invalid")
        if kind == OPT_MSS:
            if length != 4:
                raise MalformedPacket(f"TCP MSS option length {length}")
            mss = mv[i + 2] << 8 | mv[i + 3]
        elif kind == OPT_WSCALE:
            if length != 3:
                raise MalformedPacket(f"TCP window scale option length {length}")
            wscale = mv[i + 2]
        elif kind == OPT_SACK_PERM:
            if length != 2:
                raise MalformedPacket(f"TCP SACK-permitted option length {length}")
            sack_permitted = True
        elif kind == OPT_TIMESTAMP:
            if length != 10:
                raise MalformedPacket(f"TCP timestamp option length {length}")
            timestamps = _II.unpack_from(mv, i + 2)
        elif kind == OPT_SACK:
            if (length - 2) % 8 or length == 2:
                raise MalformedPacket(f"TCP SACK option length {length}")
            sack = tuple(_II.unpack_from(mv, j) for j in range(i + 2, i + length, 8))
        i += length
    return TcpOptions(mss, wscale, sack_permitted, timestamps, sack)


def encode_tcp_options(opts: TcpOptions) -> bytes:
    """Option bytes in Linux's order and alignment, NOP-padded to a multiple of 4.

    Raises ValueError if they do not fit the 40 bytes a header has room for.
    """
    out = bytearray()
    if opts.mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, opts.mss)
    if opts.timestamps is not None:
        out += bytes((OPT_SACK_PERM, 2) if opts.sack_permitted else (OPT_NOP, OPT_NOP))
        out += bytes((OPT_TIMESTAMP, 10)) + _II.pack(*opts.timestamps)
    elif opts.sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    if opts.wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, opts.wscale))
    if opts.sack:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(opts.sack)))
        for left, right in opts.sack:
            out += _II.pack(left, right)
    if len(out) > TCP_MAX_OPTLEN:
        raise ValueError(f"TCP options need {len(out)} bytes, more than {TCP_MAX_OPTLEN}")
    return bytes(out)


def parse_tcp(data: bytes | bytearray | memoryview) -> tuple[Tcp, memoryview]:
    """The header (options parsed) and a view of the payload."""
    mv = memoryview(data)
    size = len(mv)
    if size < TCP_HLEN:
        raise MalformedPacket(f"TCP segment too short: {size} bytes")
    sport, dport, seq, ack, doff, flags, window, csum, urgent = _HDR.unpack_from(mv)
    hlen = (doff >> 4) * 4
    if hlen < TCP_HLEN or hlen > size:
        raise MalformedPacket(f"TCP header length {hlen} invalid for {size} bytes received")
    opts = parse_tcp_options(mv[TCP_HLEN:hlen]) if hlen > TCP_HLEN else NO_OPTIONS
    return Tcp(sport, dport, seq, ack, flags, window, csum, urgent, hlen, opts), mv[hlen:]


def pack_tcp_into(buf: bytearray | memoryview, offset: int, sport: int, dport: int,
                  seq: int, ack: int, flags: int, window: int, options: bytes = b"",
                  urgent: int = 0) -> int:
    """Write the header and option bytes (a multiple of 4 long) at `buf[offset:]`,
    checksum field zero; returns the header length."""
    hlen = TCP_HLEN + len(options)
    if len(options) & 3 or len(options) > TCP_MAX_OPTLEN:
        raise ValueError(f"TCP option bytes must be a multiple of 4 up to 40: {len(options)}")
    _HDR.pack_into(buf, offset, sport, dport, seq, ack, hlen << 2, flags, window, 0, urgent)
    if options:
        buf[offset + TCP_HLEN:offset + hlen] = options
    return hlen


def set_tcp_checksum(buf: bytearray | memoryview, offset: int, length: int,
                     pseudo: int) -> None:
    """Fill in the checksum of the segment at `buf[offset:offset + length]` (its field
    zero), given the pseudo-header accumulator (`pseudo4`/`pseudo6`)."""
    csum = csum_finish(csum_add(memoryview(buf)[offset:offset + length], pseudo))
    struct.pack_into("!H", buf, offset + 16, csum)


def _build(sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
           payload: bytes | bytearray | memoryview, options: TcpOptions | bytes | None,
           urgent: int) -> bytearray:
    if isinstance(options, TcpOptions):
        options = encode_tcp_options(options)
    options = options or b""
    buf = bytearray(TCP_HLEN + len(options))
    pack_tcp_into(buf, 0, sport, dport, seq, ack, flags, window, options, urgent)
    buf += payload
    return buf


def build_tcp4(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
               flags: int, window: int, payload: bytes | bytearray | memoryview = b"",
               options: TcpOptions | bytes | None = None, urgent: int = 0) -> bytes:
    buf = _build(sport, dport, seq, ack, flags, window, payload, options, urgent)
    set_tcp_checksum(buf, 0, len(buf), pseudo4(src, dst, IPPROTO_TCP, len(buf)))
    return bytes(buf)


def build_tcp6(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
               flags: int, window: int, payload: bytes | bytearray | memoryview = b"",
               options: TcpOptions | bytes | None = None, urgent: int = 0) -> bytes:
    buf = _build(sport, dport, seq, ack, flags, window, payload, options, urgent)
    set_tcp_checksum(buf, 0, len(buf), pseudo6(src, dst, IPPROTO_TCP, len(buf)))
    return bytes(buf)
