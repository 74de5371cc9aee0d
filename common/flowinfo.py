"""What flows are alive, as plain records: the read-only view `pesto --flows` shows.

The contract is `FlowRecord` and `FlowSource` (a callable giving an iterable of
records).  The adapters below read today's tables (TCP connections, UDP and
ICMP flows, the splice paths); when the flow tables are rebuilt (issue 13),
only these adapters change, not the control socket nor pesto.

Reading happens only when a client asks, so it may cost a system call per
flow (TCP_INFO for the byte counts of TCP sockets); nothing here runs on the
data path.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

FlowSource = Callable[[], Iterable["FlowRecord"]]

TCP_INFO = 11
_TCP_INFO_LEN = 136
_BYTES = struct.Struct("=QQ")         # tcpi_bytes_acked, tcpi_bytes_received
_BYTES_AT = 120
_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


@dataclass(frozen=True, slots=True)
class FlowRecord:
    proto: str                       # "tcp", "udp", "icmp"
    path: str                        # "tap" (through the guest link) or "splice"
    guest: str                       # the guest's (namespace's) end, "ADDR:PORT"
    host: str                        # the far end as the host sees it, "ADDR:PORT"
    inbound: bool                    # opened from the host side (a forwarded port)
    to_guest: int | None             # bytes towards the guest; None: not counted
    from_guest: int | None           # bytes from the guest
    age: float | None                # seconds since it opened

    def as_dict(self) -> dict:
        return asdict(self)


def endpoint(family: int, addr: bytes | str, port: int) -> str:
    text = addr if isinstance(addr, str) else socket.inet_ntop(family, addr)
    return f"[{text}]:{port}" if family == socket.AF_INET6 else f"{text}:{port}"


def tcp_bytes(sock: socket.socket) -> tuple[int | None, int | None]:
    """(bytes this socket sent and had acknowledged, bytes it received), from TCP_INFO."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None, None
    if len(info) < _BYTES_AT + _BYTES.size:
        return None, None
    return _BYTES.unpack_from(info, _BYTES_AT)


def _sockname(sock: socket.socket, peer: bool) -> str:
    try:
        a = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return "?"
    return endpoint(sock.family, a[0], a[1])


def _age(opened: float | None, now: float) -> float | None:
    return None if opened is None else round(now - opened, 1)


def tcp_flows(handler) -> Iterator[FlowRecord]:
    """A TcpHandler's connections: the host socket says the far end and the bytes."""
    now = time.monotonic()
    for conn in list(handler.conns.values()):
        f = conn.flow
        family = socket.AF_INET6 if f.v6 else socket.AF_INET
        sent, received = tcp_bytes(conn.sock)
        yield FlowRecord("tcp", "tap", endpoint(family, f.dst, f.dport),
                         _sockname(conn.sock, peer=True), bool(conn.inbound),
                         received, sent, _age(getattr(conn, "opened", None), now))


def datagram_flows(handler, proto: str = "udp") -> Iterator[FlowRecord]:
    """A UdpHandler's (or IcmpHandler's) flows, from the frames they build."""
    now = time.monotonic()
    for flow in list(handler.table.flows.values()):
        h = getattr(flow, "hdr", None)
        if h is None or flow.closed:
            continue
        family = socket.AF_INET6 if h.v6 else socket.AF_INET
        host = (endpoint(family, flow.peer[0], flow.peer[1]) if getattr(flow, "peer", None)
                else _sockname(flow.sock, peer=True) if getattr(flow, "sock", None) else "?")
        yield FlowRecord(_PROTO.get(h.proto, proto), "tap", endpoint(family, h.dst, h.dport),
                         host, getattr(flow, "listener", None) is not None,
                         getattr(flow, "bytes_down", None), getattr(flow, "bytes_up", None),
                         _age(getattr(flow, "opened", None), now))


def splice_flows(splicer) -> Iterator[FlowRecord]:
    """TCP through the splice path: the host-side socket gives the far end and bytes."""
    now = time.monotonic()
    for c in list(splicer.conns):
        if c.closed:
            continue
        inbound = getattr(c, "inbound", True)
        host_sock, ns_sock = (c.a, c.b) if inbound else (c.b, c.a)
        sent, received = tcp_bytes(host_sock)
        yield FlowRecord("tcp", "splice", _sockname(ns_sock, peer=inbound),
                         _sockname(host_sock, peer=inbound), inbound,
                         received, sent, _age(getattr(c, "opened", None), now))


def udp_splice_flows(splicer) -> Iterator[FlowRecord]:
    """UDP through the splice path: -u from a host loopback client, -U from the namespace."""
    now = time.monotonic()
    for flow in list(splicer.table.flows.values()):
        if flow.closed:
            continue
        peer = flow.peer
        family = socket.AF_INET6 if ":" in str(peer[0]) else socket.AF_INET
        client = endpoint(family, peer[0], peer[1])
        server = _sockname(flow.out, peer=True)
        inbound = type(flow.owner).__name__ != "NsListener"
        yield FlowRecord("udp", "splice", server if inbound else client,
                         client if inbound else server, inbound,
                         getattr(flow, "bytes_down", None), getattr(flow, "bytes_up", None),
                         _age(getattr(flow, "opened", None), now))


def chain(*sources: FlowSource) -> FlowSource:
    """One source from several (skipping those that are None)."""
    def flows() -> Iterator[FlowRecord]:
        for source in sources:
            if source is not None:
                yield from source()
    return flows
