"""The loopback fast path for UDP: a loopback client and the other side, socket to socket.

When the client of a forwarded UDP conversation is on a loopback (a host
client on 127.0.0.1/::1 sending to a `-u` port, or a namespace client on its
loopback sending to a `-U` port), no frame needs to exist.  Each such
conversation is a flow:

    client --(datagram)--> listening socket L   (the port the client sent to)
    flow socket O, on the other side, bound where free to the client's
    port, connected to ADDR:to_port --> the server

ADDR is the host's loopback for a namespace client.  For a host client it is
what `ns_dest` says, as for TCP (`pasta.splice`): by default the namespace's
own address, O bound to it too, so a service on the namespace's loopback
only is not exposed and the server hears from its own address; with
`--host-lo-to-ns-lo`, the namespace's loopback.

Datagrams from the client, read from L, are sent on O; the server's replies,
read from O, go back to the client with sendto() on L, so the client hears
from the port it talked to.  A readable event reads one datagram, or drains
the socket (up to a bound, the loop being level-triggered) when it was read
on the loop's previous turn too (`Loop.reads`), through one preallocated
buffer.

`-u` listeners belong to `common.udp` (they also feed the tap path); they
hand us datagrams from loopback clients through their `local` hook
(`from_host`).  `-U` listeners live in the namespace and are ours
(`ns_listener`).  Sockets in the namespace are made by the namespace thread,
a few at a time and asynchronously (`pool`, as in the TCP splice path); only
when the pool ran dry does a new flow wait for one, through a call bounded in
time (`ns_sockets`).  Flows expire like tap
flows (`common.flow`): 30 s idle, 180 s once the server has answered.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from common.flow import UDP_SPLICE, DatagramExpiry, Flow, FlowTable
from common.flowinfo import udp_splice_record
from common.gate import Gate
from common.loop import ERR, IN, Loop
from common.udp.handler import (
    IDLE_TIMEOUT,
    IDLE_TIMEOUT_REPLIED,
    MAX_FLOWS,
    UdpListener,
    drain_errors,
    set_buffers,
)
from pasta.pool import SocketPool
from pasta.splice import NsDest, ns_loopback

log = logging.getLogger("udp_splice")

DRAIN_MAX = 256
POOL_TARGET = 8
BUF_SIZE = 65536
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


class SpliceFlow(Flow):
    __slots__ = ("lfd", "out", "out_fd", "back", "peer", "owner", "read_turn")

    def __init__(self, lfd: int, now: float, out: socket.socket, back: socket.socket,
                 peer: tuple, owner: object, inbound: bool) -> None:
        super().__init__(UDP_SPLICE, None, out.family == socket.AF_INET6, inbound, now,
                         (b"", 0))
        self.lfd = lfd             # the listening socket's descriptor: its clients by peer
        self.out = out             # ours, connected to the server's loopback port
        self.out_fd = out.fileno()
        self.back = back           # the listening socket the client sent to
        self.peer = peer           # the client's address, for replies
        self.owner = owner         # the listener (has .closed)
        self.read_turn = -2        # the loop's turn when `out` was last read


class NsListener:
    """A -U port: a socket on the namespace's loopback whose clients reach the host's."""

    def __init__(self, splicer: UdpSplicer, sock: socket.socket, to_port: int) -> None:
        self.splicer = splicer
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.to_port = to_port
        self.closed = False
        self.read_turn = -2        # the loop's turn when the socket was last read
        splicer.loop.add(self.fd, IN, self._event)

    def _event(self, events: int) -> None:
        if events & ERR:
            drain_errors(self.sock)
        if events & IN:
            self.splicer.drain_ns_listener(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.splicer.forget_listener(self.fd)
        self.splicer.loop.remove(self.fd)
        self.sock.close()


class UdpSplicer:
    def __init__(self, loop: Loop, ns_sockets: Callable[[int, int], list[socket.socket]], *,
                 ns_dest: NsDest = ns_loopback, idle: float = IDLE_TIMEOUT,
                 idle_replied: float = IDLE_TIMEOUT_REPLIED, gate: Gate | None = None,
                 pool: SocketPool | None = None, flows: FlowTable | None = None) -> None:
        """ns_sockets(family, n): n new non-blocking UDP sockets inside the namespace, at
        once (bounded); pool: the same, made ahead of time (None: made n at a time by
        ns_sockets); ns_dest(v6): the namespace address host loopback clients reach
        (None: none now); flows: the flow table (shared with the data plane), else one
        of its own."""
        self.loop = loop
        self.gate = gate or (flows.gate if flows is not None else None) or Gate()
        self.ns_sockets = ns_sockets
        self.ns_dest = ns_dest
        self.table = flows if flows is not None else FlowTable(loop, gate=self.gate)
        self.expiry = DatagramExpiry(self.table, idle, idle_replied)
        self.table.serve(UDP_SPLICE, release=self._release, timer=self.expiry,
                         record=udp_splice_record, quota=MAX_FLOWS)
        self.counters: Counter[str] = Counter()
        self._buf = bytearray(BUF_SIZE)
        self._view = memoryview(self._buf)
        # listening socket fd -> client address -> flow
        self._peers: dict[int, dict[tuple, SpliceFlow]] = {}
        self.pool = pool
        self._pool: dict[int, list[socket.socket]] = {socket.AF_INET: [], socket.AF_INET6: []}

    # ------------------------------------------------------------ entry points

    def from_host(self, listener: UdpListener, data: memoryview, peer: tuple) -> None:
        """`local` hook of -u listeners: a datagram from a host loopback client."""
        peers = self._peers.get(listener.fd)
        flow = peers.get(peer) if peers is not None else None
        if flow is None or flow.owner is not listener:
            if flow is not None:                 # a closed listener's fd, reused
                self.table.close(flow)
            family = socket.AF_INET6 if listener.v6 else socket.AF_INET
            dest = self.ns_dest(listener.v6)
            if dest is None:
                self.counters["no_ns_addr"] += 1
                return
            flow = self._open(listener.fd, listener.sock, listener, peer, family,
                              listener.to_port, self._ns_sock, dest, False)
            if flow is None:
                return
        self._forward(flow, data)

    def ns_listener(self, sock: socket.socket, to_port: int) -> NsListener:
        """A bound namespace loopback socket for a -U port."""
        return NsListener(self, sock, to_port)

    def drain_ns_listener(self, lst: NsListener) -> None:
        view = self._view
        recvfrom_into = lst.sock.recvfrom_into
        peers = self._peers.get(lst.fd)
        for _ in range(self.loop.reads(lst, DRAIN_MAX)):
            try:
                n, peer = recvfrom_into(view)
            except BlockingIOError:
                return
            except OSError:
                continue
            flow = peers.get(peer) if peers is not None else None
            if flow is None:
                flow = self._open(lst.fd, lst.sock, lst, peer, lst.family, lst.to_port,
                                  self._host_sock, LOOPBACK[lst.family], True)
                if flow is None:
                    continue
                peers = self._peers[lst.fd]
            self._forward(flow, view[:n])

    def forget_listener(self, fd: int) -> None:
        for flow in list(self._peers.get(fd, {}).values()):
            self.table.close(flow, "closed")
        self._peers.pop(fd, None)

    # ------------------------------------------------------------ flows

    def _ns_sock(self, family: int) -> socket.socket:
        if self.pool is not None:
            s = self.pool.take(family)
            if s is not None:
                return s
            self.counters["pool_empty"] += 1
            return self.ns_sockets(family, 1)[0]
        pool = self._pool[family]
        if not pool:
            pool.extend(self.ns_sockets(family, POOL_TARGET))
        return pool.pop()

    @staticmethod
    def _host_sock(family: int) -> socket.socket:
        return socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)

    def _open(self, fd: int, back: socket.socket, owner: object, peer: tuple, family: int,
              to_port: int, make: Callable[[int], socket.socket],
              addr: str, by_guest: bool) -> SpliceFlow | None:
        table = self.table
        if not table.reserve(UDP_SPLICE, 1, by_guest=by_guest):
            self.counters["limit"] += 1
            return None
        try:
            out = make(family)
        except OSError as exc:
            table.unreserve(1)
            self.counters["socket_fail"] += 1
            log.debug("udp splice: no socket: %s", exc)
            return None
        set_buffers(out)
        try:
            if family == socket.AF_INET6:
                out.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                out.bind((addr, peer[1]))      # the client's port, where free
            except OSError:
                out.bind((addr, 0))
            out.connect((addr, to_port))
        except OSError as exc:
            self.counters["connect_fail"] += 1
            log.debug("udp splice: to port %d: %s", to_port, exc)
            out.close()
            table.unreserve(1)
            return None
        flow = SpliceFlow(fd, time.monotonic(), out, back, peer, owner, not by_guest)
        table.add(flow, 1, self.gate.forwarded)
        self.expiry.start(flow)
        self._peers.setdefault(fd, {})[peer] = flow
        self.loop.add(flow.out_fd, IN, partial(self._reply, flow))
        self.counters["opened"] += 1
        return flow

    def _forward(self, flow: SpliceFlow, data: memoryview) -> None:
        flow.last = time.monotonic()
        try:
            flow.out.send(data)
            flow.bytes_up += len(data)          # client to server (flowinfo says which way)
            flow.frames_up += 1
        except BlockingIOError:
            self.counters["sock_full"] += 1
        except OSError:
            # ECONNREFUSED: nobody listens on the other side (yet); the datagram is lost,
            # as it would be on a link
            self.counters["send_error"] += 1

    def _reply(self, flow: SpliceFlow, _events: int) -> None:
        if flow.closed:
            return
        if flow.owner.closed:          # the forwarded port went away
            self.table.close(flow, "closed")
            return
        view = self._view
        recv_into = flow.out.recv_into
        sendto = flow.back.sendto
        peer = flow.peer
        got = 0
        for _ in range(self.loop.reads(flow, DRAIN_MAX)):
            try:
                n = recv_into(view)
            except BlockingIOError:
                break
            except OSError:
                continue
            got += 1
            try:
                sendto(view[:n], peer)
                flow.bytes_down += n
                flow.frames_down += 1
            except OSError:
                self.counters["reply_drop"] += 1
        if got:
            self.table.reply_seen(flow, time.monotonic())

    def _release(self, flow: SpliceFlow) -> None:
        """The flow table's callback: a flow is gone (expired, evicted or closed)."""
        peers = self._peers.get(flow.lfd)
        if peers is not None and peers.get(flow.peer) is flow:
            del peers[flow.peer]
        self.loop.remove(flow.out_fd)
        flow.out.close()

    def close_all(self) -> None:
        self.table.close_kind(UDP_SPLICE)
        self._peers.clear()
        for pool in self._pool.values():
            for s in pool:
                s.close()
            pool.clear()
        if self.pool is not None:
            self.pool.close()
