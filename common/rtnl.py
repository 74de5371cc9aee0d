"""rtnetlink for the helper process: pyroute2's message classes over a plain socket.

pyroute2 knows the rtnetlink messages and their hundreds of attribute types;
we keep it for that.  Its `IPRoute` (0.9) runs every request through an
asyncio loop: importing it costs 75-150 ms and each request about a
millisecond, on the critical path of pasta's start-up (podman starts one
pasta per container).  The message classes alone (`ifinfmsg`, `ifaddrmsg`,
`rtmsg`) cost about 25 ms, and what we do with them is small: one request
at a time on a blocking NETLINK_ROUTE socket, either a dump (read until
NLMSG_DONE) or a change with NLM_F_ACK (read the one NLMSG_ERROR, 0 or
-errno).  Messages come back as pyroute2 objects (`msg["index"]`,
`msg.get_attr("IFLA_IFNAME")`).

Only the helper imports this module (`common.helper`: it loads pyroute2's
modules without the package's `__init__`, which imports the whole library).
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

__all__ = ["NLM_F_CREATE", "NLM_F_EXCL", "RTM_DELADDR", "RTM_GETADDR", "RTM_GETLINK",
           "RTM_GETROUTE", "RTM_NEWADDR", "RTM_NEWLINK", "RTM_NEWROUTE", "NetlinkError",
           "Rtnl", "ifaddrmsg", "ifinfmsg", "rtmsg"]

NLM_F_CREATE = 0x400
NLM_F_EXCL = 0x200
NETLINK_ROUTE = 0
_HEADER = struct.Struct("=IHHII")        # nlmsghdr: length, type, flags, sequence, port
_RECV = 1 << 16


class Rtnl:
    """One NETLINK_ROUTE socket, one request at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg, msg_type: int, flags: int) -> int:
        self.seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = self.seq
        msg["header"]["pid"] = 0
        msg.encode()
        self.sock.send(msg.data)
        return self.seq

    def _replies(self, seq: int):
        """(type, flags, bytes of one message) of the replies to `seq`, until the end."""
        while True:
            data = self.sock.recv(_RECV)
            off = 0
            while off + _HEADER.size <= len(data):
                length, mtype, flags, mseq, _port = _HEADER.unpack_from(data, off)
                if length < _HEADER.size or off + length > len(data):
                    raise NetlinkError(errno.EBADMSG, "truncated netlink message")
                if mseq == seq:
                    yield mtype, flags, data[off:off + length]
                off += (length + 3) & ~3

    def dump(self, cls, msg_type: int, **fields: int) -> list:
        """Every object a GET dump returns (`fields`: the request's header fields,
        a family, say: the kernel filters dumps by family only)."""
        req = cls()
        for key, value in fields.items():
            req[key] = value
        seq = self._send(req, msg_type, NLM_F_REQUEST | NLM_F_DUMP)
        out = []
        for mtype, _flags, raw in self._replies(seq):
            if mtype == NLMSG_DONE:
                return out
            if mtype == NLMSG_ERROR:
                _raise(raw)
                continue
            msg = cls(raw)
            msg.decode()
            out.append(msg)
        return out                      # pragma: no cover - _replies ends only by return

    def change(self, cls, msg_type: int, fields: dict, attrs: list[tuple[str, object]],
               flags: int = 0) -> None:
        """A change (NEWLINK, NEWADDR, ...), acknowledged: NetlinkError(errno) if refused."""
        req = cls()
        for key, value in fields.items():
            req[key] = value
        req["attrs"] = attrs
        seq = self._send(req, msg_type, NLM_F_REQUEST | NLM_F_ACK | flags)
        for mtype, _flags, raw in self._replies(seq):
            if mtype == NLMSG_ERROR:
                _raise(raw)
                return

    def link_index(self, name: str) -> int | None:
        for link in self.dump(ifinfmsg, RTM_GETLINK):
            if link.get_attr("IFLA_IFNAME") == name:
                return link["index"]
        return None


def _raise(raw: bytes) -> None:
    """An NLMSG_ERROR: code 0 is the acknowledgement, else -errno."""
    (code,) = struct.unpack_from("=i", raw, _HEADER.size)
    if code:
        raise NetlinkError(-code, os.strerror(-code))
