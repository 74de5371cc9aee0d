"""What flows are alive, as plain records: the read-only view `pesto --flows` shows.

The contract is `FlowRecord` and `FlowSource` (a callable giving an iterable
of records).  The same records, one flow at a time (`tcp_record` and the
like), are what the flow log writes when a flow opens and closes
(`common.gate`).  The adapters below read today's tables (TCP connections,
UDP and ICMP flows, the splice paths); when the flow tables are rebuilt
(issue 13), only these adapters change, not the control socket nor pesto.

Reading happens when a client asks, and when a flow opens or closes; tap
flows keep their own byte and frame counters, the splice path asks its
sockets (TCP_INFO); nothing here runs per packet.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator

from common.flow import UDP_SPLICE
from common.record import asdict, record

FlowSource = Callable[[], Iterable["FlowRecord"]]

TCP_INFO = 11
_TCP_INFO_LEN = 136
_BYTES = struct.Struct("=QQ")         # tcpi_bytes_acked, tcpi_bytes_received
_BYTES_AT = 120
_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


@record(slots=True)                # not frozen: built twice per flow for the flow log
class FlowRecord:
    proto: str                       # "tcp", "udp", "icmp"
    path: str                        # "tap" (through the guest link), "loopback" (through
                                     # the link to the host's loopback), "splice"
    guest: str                       # the guest's (namespace's) end, "ADDR:PORT"
    host: str                        # the far end as the host sees it, "ADDR:PORT"
    inbound: bool                    # opened from the host side (a forwarded port)
    to_guest: int | None             # bytes towards the guest; None: not counted
    from_guest: int | None           # bytes from the guest
    age: float | None                # seconds since it opened
    id: int | None = None            # the flow log's id (common.gate), None: not given one
    verdict: str | None = None       # "allow" or "deny" (the egress policy)
    rule: str | None = None          # the rule that decided, as written, or "default allow"
    frames_to_guest: int | None = None
    frames_from_guest: int | None = None

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
    return None if opened is None else round(now - opened, 3)


def _policy(obj) -> tuple[str | None, str | None]:
    v = getattr(obj, "verdict", None)
    return (None, None) if v is None else (v.word, v.label)


def tcp_record(conn, now: float | None = None) -> FlowRecord:
    """One TcpConn (a `common.flow` flow), from the counters it keeps (exact, whatever
    the socket's state)."""
    now = time.monotonic() if now is None else now
    ends = conn.ends
    if ends is None:
        f = conn.hdr
        family = socket.AF_INET6 if f.v6 else socket.AF_INET
        ends = conn.ends = (conn.path, endpoint(family, f.dst, f.dport),
                            endpoint(family, conn.host_addr, conn.host_port))
    v = conn.verdict
    return FlowRecord("tcp", ends[0], ends[1], ends[2], bool(conn.inbound), conn.bytes_down,
                      conn.bytes_up, round(now - conn.opened, 3), conn.fid or None,
                      None if v is None else v.word, None if v is None else v.label,
                      conn.frames_down, conn.frames_up)


def tcp_flows(handler) -> Iterator[FlowRecord]:
    """A TcpHandler's connections."""
    now = time.monotonic()
    for conn in list(handler.conns.values()):
        yield tcp_record(conn, now)


def datagram_record(flow, proto: str = "udp", now: float | None = None) -> FlowRecord:
    """A UdpFlow or EchoFlow, from the frames it builds and the counters it keeps."""
    now = time.monotonic() if now is None else now
    h = flow.hdr
    ends = flow.ends
    if ends is None:
        family = socket.AF_INET6 if h.v6 else socket.AF_INET
        host_addr = flow.host_addr
        if getattr(flow, "peer", None):
            host = endpoint(family, flow.peer[0], flow.peer[1])
        elif h.sport:
            host = endpoint(family, host_addr, flow.host_port)
        else:
            host = socket.inet_ntop(family, host_addr)
        guest = endpoint(family, h.dst, h.dport) if h.dport else socket.inet_ntop(family, h.dst)
        path = flow.path
        ends = flow.ends = (path, guest, host)
    verdict, rule = _policy(flow)
    return FlowRecord(_PROTO.get(h.proto, proto), ends[0], ends[1], ends[2],
                      getattr(flow, "listener", None) is not None,
                      flow.bytes_down, flow.bytes_up, _age(flow.opened, now),
                      flow.fid or None, verdict, rule, flow.frames_down, flow.frames_up)


def datagram_flows(handler, proto: str = "udp") -> Iterator[FlowRecord]:
    """A UdpHandler's (or IcmpHandler's) flows."""
    now = time.monotonic()
    for flow in list(handler.flows.values()):
        if flow.closed:
            continue
        yield datagram_record(flow, proto, now)


def splice_record(c, now: float | None = None) -> FlowRecord:
    """TCP through the splice path: the host-side socket gives the far end; the bytes are
    what each direction moved (`a` is the client: the host's for -t, the namespace's
    for -T)."""
    now = time.monotonic() if now is None else now
    inbound = getattr(c, "inbound", True)
    host_sock, ns_sock = (c.a, c.b) if inbound else (c.b, c.a)
    fwd = c.fwd.moved if c.fwd is not None else 0
    rev = c.rev.moved if c.rev is not None else 0
    to_guest, from_guest = (fwd, rev) if inbound else (rev, fwd)
    verdict, rule = _policy(c)
    # the client's socket was accepted, the other one connected: peers on both sides are
    # the two ends (-T: the namespace's client and the host's server), noted while they
    # are connected (a closed socket has no peer)
    ends = getattr(c, "ends", None)
    if ends is None:
        ends = (_sockname(ns_sock, peer=True), _sockname(host_sock, peer=True))
        if "?" not in ends and hasattr(c, "ends"):
            c.ends = ends
    return FlowRecord("tcp", "splice", ends[0], ends[1], inbound,
                      to_guest, from_guest, _age(getattr(c, "opened", None), now),
                      getattr(c, "fid", 0) or None, verdict, rule)


def splice_flows(splicer) -> Iterator[FlowRecord]:
    now = time.monotonic()
    for c in list(splicer.conns):
        if not c.closed:
            yield splice_record(c, now)


def udp_splice_record(flow, now: float | None = None) -> FlowRecord:
    """UDP through the splice path: -u from a host loopback client, -U from the namespace."""
    now = time.monotonic() if now is None else now
    peer = flow.peer
    family = socket.AF_INET6 if ":" in str(peer[0]) else socket.AF_INET
    client = endpoint(family, peer[0], peer[1])
    server = _sockname(flow.out, peer=True)
    inbound = type(flow.owner).__name__ != "NsListener"
    verdict, rule = _policy(flow)
    # the flow counts "up" from the client and "down" back to it: the client is the
    # host's for -u (inbound), the namespace's for -U
    nbytes, frames = (flow.bytes_up, flow.bytes_down), (flow.frames_up, flow.frames_down)
    if not inbound:
        nbytes, frames = nbytes[::-1], frames[::-1]
    return FlowRecord("udp", "splice", server if inbound else client,
                      client if inbound else server, inbound, nbytes[0], nbytes[1],
                      _age(flow.opened, now), flow.fid or None, verdict, rule,
                      frames[0], frames[1])


def udp_splice_flows(splicer) -> Iterator[FlowRecord]:
    now = time.monotonic()
    for flow in splicer.table.of_kind(UDP_SPLICE):
        if not flow.closed:
            yield udp_splice_record(flow, now)


def chain(*sources: FlowSource) -> FlowSource:
    """One source from several (skipping those that are None)."""
    def flows() -> Iterator[FlowRecord]:
        for source in sources:
            if source is not None:
                yield from source()
    return flows
