"""Which ports are bound, from /proc/net/{tcp,tcp6,udp,udp6} (see proc(5)).

This module owns reading and decoding those tables; `auto` port forwarding
(pasta) calls it about once a second and decides what to forward itself.

A table line reads `sl: LOCAL REMOTE ST ...` where LOCAL is `ADDR:PORT`: the
port is 4 hex digits, most significant first; the address is the 32-bit words
of the in-kernel (network order) address, each printed as a native integer, so
on a little-endian host every 4-byte group appears reversed (127.0.0.1 is
0100007F).  IPv4 has one word, IPv6 four.  ST is the TCP state in hex: 0A is
LISTEN; for UDP 07 (TCP_CLOSE) is a bound, unconnected socket, 01 a connected
one, which receives only from its peer and so is not a service to forward.

Cost: the tables hold one line per socket, thousands on a busy host, mostly
established connections.  One compiled regex over the whole buffer picks the
few wanted lines at C speed; only those become Python objects.  The file is
opened once (in the namespace to watch: a /proc/net file keeps showing the
network namespace it was opened in) and re-read from offset 0 on every scan.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from ipaddress import IPv4Address, IPv6Address

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import BinaryIO

STATE_TCP_LISTEN = b"0A"
STATE_UDP_UNCONNECTED = b"07"
TABLES = ("tcp", "tcp6", "udp", "udp6")

Addr = IPv4Address | IPv6Address

_READ_SIZE = 1 << 16
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_MAX_LINE = 512            # the longest tcp6/udp6 line is about 200 bytes


def _line_re(state: bytes) -> re.Pattern[bytes]:
    # "   12: LOCALADDR:PORT REMOTEADDR:PORT ST "
    return re.compile(rb"^ *[0-9]+: ([0-9A-Fa-f]{8}(?:[0-9A-Fa-f]{24})?):([0-9A-Fa-f]{4}) "
                      rb"[0-9A-Fa-f]+:[0-9A-Fa-f]{4} " + state + rb" ", re.MULTILINE)


_PATTERNS = {"tcp": _line_re(STATE_TCP_LISTEN), "udp": _line_re(STATE_UDP_UNCONNECTED)}


def _pattern(proto: str) -> re.Pattern[bytes]:
    try:
        return _PATTERNS[proto]
    except KeyError:
        raise ValueError(f"unknown protocol {proto!r} (tcp or udp)") from None


def _as_bytes(text: str | bytes) -> bytes:
    return text.encode("ascii", "replace") if isinstance(text, str) else text


def decode_addr(hexaddr: str | bytes, byteorder: str = sys.byteorder) -> Addr:
    """A /proc/net address field (8 or 32 hex digits) as an address object.

    `byteorder` is the order the kernel printed its words in: this host's.
    """
    raw = bytes.fromhex(hexaddr.decode() if isinstance(hexaddr, bytes) else hexaddr)
    if len(raw) not in (4, 16):
        raise ValueError(f"bad /proc/net address {hexaddr!r}")
    if byteorder == "little":
        words = len(raw) // 4
        raw = struct.pack(f">{words}I", *struct.unpack(f"<{words}I", raw))
    return IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)


def listening_ports(text: str | bytes, proto: str,
                    byteorder: str = sys.byteorder) -> set[tuple[Addr, int]]:
    """(local address, port) of each listening TCP / bound unconnected UDP socket.

    `text` is the content of /proc/net/tcp or tcp6 (proto "tcp"), udp or udp6
    ("udp"); the family follows from the width of the address field.
    `byteorder` is that of the host that wrote `text`.
    """
    return {(decode_addr(addr, byteorder), int(port, 16))
            for addr, port in _pattern(proto).findall(_as_bytes(text)) if port != b"0000"}


def bound_ports(text: str | bytes, proto: str) -> set[int]:
    """Just the port numbers of `listening_ports`, without decoding addresses."""
    return {int(port, 16) for _addr, port in _pattern(proto).findall(_as_bytes(text))} - {0}


class ProcNetFile:
    """One /proc/net table, kept open and re-read from offset 0 on each scan.

    `source` is a path (opened here), an open file descriptor or an open binary
    file; pass the latter two when the file must be opened inside another
    network namespace.  The reader owns what it is given and closes it, unless
    `owned=False`.  `proto` ("tcp" or "udp") defaults from a /proc/net path.
    """

    def __init__(self, source: str | os.PathLike[str] | int | BinaryIO,
                 proto: str | None = None, *, owned: bool = True) -> None:
        self._file: BinaryIO | None = None
        if isinstance(source, int):
            self.fd, self.name = source, f"fd {source}"
        elif isinstance(source, str | os.PathLike):
            self.name = os.fspath(source)
            self.fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
            owned = True
        else:
            self._file = source
            self.fd, self.name = source.fileno(), getattr(source, "name", "file")
        if proto is None:
            base = os.path.basename(str(self.name)).rstrip("6")
            if base not in ("tcp", "udp"):
                self._close_owned(owned)
                raise ValueError(f"cannot tell the protocol of {self.name}: pass proto")
            proto = base
        self.proto = proto
        self._re = _pattern(proto)
        self._owned = owned

    @classmethod
    def open(cls, table: str, netdir: str = "/proc/net") -> ProcNetFile:
        """Open `table` ("tcp", "tcp6", "udp" or "udp6") of the current namespace."""
        if table not in TABLES:
            raise ValueError(f"unknown /proc/net table {table!r}")
        return cls(os.path.join(netdir, table), table.rstrip("6"))

    def read(self) -> bytes:
        """The whole table as it is now."""
        os.lseek(self.fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            chunk = os.read(self.fd, _READ_SIZE)
            chunks.append(chunk)
            # seq_file fills a read with whole lines until the next one would
            # not fit its page-sized buffer, or the table ends.  A read leaving
            # room for another line is therefore the last: asking again for the
            # empty EOF read would make the kernel walk its socket hash once more
            # (about 1.7 ms here, as much as the whole scan).  Reads from regular
            # files (tests) are short only at their end, too.
            if len(chunk) <= _PAGE_SIZE - _MAX_LINE:
                return b"".join(chunks)

    def ports(self) -> set[int]:
        """Ports of listening (TCP) or bound unconnected (UDP) sockets."""
        return {int(port, 16) for _addr, port in self._re.findall(self.read())} - {0}

    def sockets(self) -> set[tuple[Addr, int]]:
        """(address, port) of the same sockets as `ports`."""
        return listening_ports(self.read(), self.proto)

    def close(self) -> None:
        self._close_owned(self._owned)
        self.fd = -1

    def _close_owned(self, owned: bool) -> None:
        if not owned or self.fd < 0:
            return
        if self._file is not None:
            self._file.close()
        else:
            os.close(self.fd)

    def __enter__(self) -> ProcNetFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scan_ports(files: list[ProcNetFile]) -> set[int]:
    """Union of `ports()` over several tables (e.g. tcp and tcp6)."""
    found: set[int] = set()
    for f in files:
        found |= f.ports()
    return found
