"""DNS answers, read for the addresses they give (RFC 1035): bytes in, records out.

Used by the egress policy's `--allow-dns-name`: answers the host's resolver
sends back through `--dns-forward` are read for their question and their A,
AAAA and CNAME records.  Nothing here changes a message or decides anything.

Everything in a message is treated as hostile: every offset is checked, a
compression pointer may only point backwards (so no loop), a name is at most
255 bytes, a label holding a '.' makes the name unusable (it would read as two
labels), and a message that breaks any of this is simply not used.

`DnsStream` reassembles DNS over TCP (two-byte length, then the message,
RFC 7766) from the bytes as they are sent to the guest, which may repeat
(retransmissions) but never skip.
"""

from __future__ import annotations

import struct

A, CNAME, AAAA = 1, 5, 28
CLASS_IN = 1
ANSWERS_MAX = 256
NAME_MAX = 255
MESSAGE_MAX = 65535
M32 = 0xFFFFFFFF

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")

Record = tuple[str, int, int, "bytes | str"]      # owner, type, TTL, address or CNAME target


class BadMessage(ValueError):
    """Not a DNS message we can read."""


def read_name(msg: bytes, off: int) -> tuple[str, int]:
    """The (lower-case, dot-joined) name at `off`, and the offset after it where it is."""
    labels: list[bytes] = []
    total = 0
    end = -1
    pos = off
    while True:
        if pos >= len(msg):
            raise BadMessage("name runs past the end")
        n = msg[pos]
        if n >= 0xC0:
            if pos + 1 >= len(msg):
                raise BadMessage("truncated pointer")
            target = (n & 0x3F) << 8 | msg[pos + 1]
            if target >= pos:
                raise BadMessage("pointer does not point backwards")
            if end < 0:
                end = pos + 2
            pos = target
            continue
        if n & 0xC0:
            raise BadMessage("unknown label type")
        if n == 0:
            break
        label = msg[pos + 1:pos + 1 + n]
        if len(label) != n:
            raise BadMessage("label runs past the end")
        if b"." in label:
            raise BadMessage("a label holds a dot")
        total += n + 1
        if total > NAME_MAX:
            raise BadMessage("name too long")
        labels.append(label)
        pos += 1 + n
    if end < 0:
        end = pos + 1
    return b".".join(labels).lower().decode("latin-1"), end


def parse_answer(msg: bytes) -> tuple[str, list[Record]]:
    """(question, records) of a successful response: A and AAAA records with their
    address (packed), CNAMEs with their target; other types are skipped.  BadMessage
    if it is not a response with NOERROR and exactly one question."""
    if len(msg) < _HEADER.size:
        raise BadMessage("shorter than a header")
    _id, flags, qd, an, _ns, _ar = _HEADER.unpack_from(msg)
    if not flags & 0x8000 or flags & 0x7800 or flags & 0x000F:
        raise BadMessage("not a successful standard response")
    if qd != 1:
        raise BadMessage("not one question")
    question, off = read_name(msg, _HEADER.size)
    off += 4                                        # type, class
    records: list[Record] = []
    for _ in range(min(an, ANSWERS_MAX)):
        owner, off = read_name(msg, off)
        if off + _RR.size > len(msg):
            raise BadMessage("record header runs past the end")
        rtype, rclass, ttl, rdlen = _RR.unpack_from(msg, off)
        off += _RR.size
        rdata_end = off + rdlen
        if rdata_end > len(msg):
            raise BadMessage("record data runs past the end")
        if ttl & 0x80000000:
            ttl = 0                                 # RFC 2181 8: treat as zero
        if rclass == CLASS_IN:
            if rtype == A and rdlen == 4 or rtype == AAAA and rdlen == 16:
                records.append((owner, rtype, ttl, bytes(msg[off:rdata_end])))
            elif rtype == CNAME:
                target, name_end = read_name(msg, off)
                if name_end != rdata_end:
                    raise BadMessage("CNAME data is not one name")
                records.append((owner, rtype, ttl, target))
        off = rdata_end
    return question, records


class DnsStream:
    """DNS over TCP, one direction: feed it the bytes sent at each sequence number;
    it returns the whole messages they complete.  Bytes seen before (a
    retransmission) are skipped; a gap, or more than a message's worth of
    buffered bytes, ends the stream (`broken`): nothing more is read from it."""
    __slots__ = ("pos", "buf", "broken")

    def __init__(self, start_seq: int) -> None:
        self.pos = start_seq & M32       # sequence number of the next byte not yet seen
        self.buf = bytearray()
        self.broken = False

    def feed(self, seq: int, data: bytes | memoryview) -> list[bytes]:
        if self.broken:
            return []
        skip = (self.pos - seq) & M32
        if skip >= 0x80000000:           # starts after pos: we missed bytes
            self.broken = True
            self.buf.clear()
            return []
        if skip >= len(data):
            return []
        data = data[skip:]
        self.pos = (self.pos + len(data)) & M32
        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 2:
            n = buf[0] << 8 | buf[1]
            if len(buf) < 2 + n:
                break
            out.append(bytes(buf[2:2 + n]))
            del buf[:2 + n]
        if len(buf) > MESSAGE_MAX + 2:
            self.broken = True
            buf.clear()
        return out
