"""The splice path: loopback TCP between the host and the namespace, socket to socket.

When the client is on a loopback (a host client on 127.0.0.1/::1 to a `-t`
port, or a namespace client on its loopback to a `-T` port) no frame needs
to exist: we accept on one side, connect on the other side, and move bytes
with splice(2) through a pipe per direction.  A namespace client reaches the
host's loopback.  A host client reaches the namespace where `ns_dest` says:
by default the namespace's own address (its kernel picks that address as our
source too, so the service sees a connection from its own address), so that
a service listening on the namespace's loopback only is not exposed on the
host; with `--host-lo-to-ns-lo`, the namespace's loopback, as before.  The data never enters
Python; each wakeup costs a couple of system calls per direction.

Sockets in the namespace are made by the namespace thread.  Making one there
is a round trip to that thread, so a few are made ahead of time
(`pasta.pool.SocketPool`) and handed out as connections arrive; the pool is
refilled asynchronously, and a host client that finds it empty waits in its
socket (its bytes stay queued there) until a socket arrives: the loop never
waits for the thread.

Lifecycle of a `SpliceConn`: CONNECTING (our connect() in progress; the
client's bytes wait in its socket) -> open in both directions -> each
direction half-closes on its own (EOF read and the pipe drained:
shutdown(SHUT_WR) on the other socket) -> both closed: forget it.  An error
or reset on either socket aborts both, with SO_LINGER 0 so the peers see a
reset too.

Per connection the work is system calls, so we keep their number down: a
connection that closed cleanly leaves its pipes empty, and up to
`PIPE_POOL` sets of them are kept for the next connections (making a pipe
and sizing it costs four calls per direction, with the close); the sockets
are closed without asking epoll to forget them first (closing does that).
Wake-ups cost more than system calls here, so we avoid the ones that say
nothing: a loopback handshake completes inside connect(), so a second connect()
tells us it is done (no wait for the socket to turn writable), and a socket is
watched for "writable" only once a direction found it full (`_Dir.out`), not
after every read of the other side.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from _socket import socket as raw_socket
from collections import Counter
from collections.abc import Callable
from functools import partial

from common.flow import TCP_SPLICE, Flow, FlowTable
from common.flowinfo import splice_record
from common.gate import Gate
from common.loop import ET, IN, OUT, RDHUP, Loop
from pasta.pool import SocketPool

log = logging.getLogger("splice")

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
EVENTS = IN | RDHUP | ET        # and OUT once a direction found the socket full
CONNECTING = EVENTS | OUT       # writable: connect() completed
_ERR = 0x008
_HUP = 0x010
_LINGER0 = struct.pack("ii", 1, 0)
MAX_CONNS = 32768              # spliced connections at most (their quota in the table)
FDS_PER_CONN = 6               # two sockets, two pipes
PIPE_FDS = 4                   # a connection's two pipes
PAGE = 4096
PIPE_BUFS_DEFAULT = 16         # buffers of a pipe we could not resize
PIPE_POOL = 8                  # sets of empty pipes kept for the next connections


class _Dir:
    """One direction: bytes read from `src` wait in the pipe until `dst` takes them."""
    __slots__ = ("src", "dst", "dst_sock", "pr", "pw", "short", "pending", "hup", "eof",
                 "done", "moved", "out")

    def __init__(self, src: int, dst_sock: socket.socket, pr: int, pw: int,
                 short: int, out: bool) -> None:
        self.src, self.dst, self.dst_sock = src, dst_sock.fileno(), dst_sock
        self.pr, self.pw = pr, pw
        self.short = short     # a read into the empty pipe shorter than this took all
        self.pending = 0       # bytes in the pipe
        self.hup = False       # src's end of stream was announced (EPOLLRDHUP/HUP)
        self.eof = False       # src reached end of file
        self.done = False      # dst shut down for writing
        self.moved = 0         # bytes read from src (for the flow log and pesto --flows)
        self.out = out         # dst is watched for OUT


class SpliceConn(Flow):
    """A spliced connection: `inbound`, a is the host's client (-t), else the namespace's
    (-T).  In the flow table once connected (`ends`: guest, host, noted then)."""
    __slots__ = ("a", "b", "fwd", "rev", "connecting", "pipes")

    def __init__(self, a: socket.socket, b: socket.socket, inbound: bool, now: float,
                 v6: bool) -> None:
        super().__init__(TCP_SPLICE, None, v6, inbound, now, (b"", 0))
        self.a = a
        self.b = b
        self.connecting = True
        self.pipes: list[int] = []
        self.fwd: _Dir | None = None
        self.rev: _Dir | None = None


def _pipe() -> tuple[int, int, int]:
    """A pipe (read end, write end) and how many buffers it has."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        return r, w, PIPE_BUFS_DEFAULT  # over the per-user pipe budget: still works
    return r, w, PIPE_SIZE // PAGE


def _pipe_pair() -> tuple[list[int], int]:
    """A connection's two pipes [r1, w1, r2, w2] and the fewer buffers of the two;
    on failure nothing is left open."""
    r1, w1, bufs1 = _pipe()
    try:
        r2, w2, bufs2 = _pipe()
    except OSError:
        os.close(r1)
        os.close(w1)
        raise
    return [r1, w1, r2, w2], min(bufs1, bufs2)


LOOPBACK = ("127.0.0.1", "::1")

NsDest = Callable[[bool], "str | None"]


def ns_loopback(v6: bool) -> str:
    """An `NsDest`: the namespace's loopback (--host-lo-to-ns-lo, --splice-only)."""
    return LOOPBACK[v6]


class Splicer:
    def __init__(self, loop: Loop, pool: SocketPool, ns_dest: NsDest = ns_loopback, *,
                 gate: Gate | None = None, flows: FlowTable | None = None) -> None:
        """pool: non-blocking stream sockets inside the namespace; ns_dest(v6): the
        namespace address host loopback clients reach (None: none now)."""
        self.loop = loop
        self.gate = gate or Gate()
        self.pool = pool
        self.ns_dest = ns_dest
        self.table = flows if flows is not None else FlowTable(loop, gate=self.gate)
        self.table.serve(TCP_SPLICE, release=self._release, record=splice_record,
                         quota=MAX_CONNS)
        self.conns: set[SpliceConn] = set()     # connecting or connected
        self.counters: Counter[str] = Counter()
        # empty pipes of connections that closed cleanly ([r1, w1, r2, w2], the fewest
        # buffers of the two), their descriptors taken from the budget while here
        self._pipes: list[tuple[list[int], int]] = []

    # ------------------------------------------------------------ entry points

    def from_host(self, sock: socket.socket, to_port: int, v6: bool) -> None:
        """A host loopback client on a -t port: connect to `ns_dest` in the namespace."""
        family = socket.AF_INET6 if v6 else socket.AF_INET
        dest = self.ns_dest(v6)
        if dest is None:
            self.counters["no_ns_addr"] += 1
            _abort_sock(sock)
            return
        peer = self.pool.take(family)
        if peer is not None:
            self._start(sock, peer, (dest, to_port), inbound=True)
            return
        self.counters["pool_wait"] += 1
        if not self.pool.wait(family, partial(self._pooled, sock, dest, to_port)):
            self._refuse(sock)

    def _pooled(self, sock: socket.socket, dest: str, to_port: int,
                peer: socket.socket | None) -> None:
        """The pool's answer to a host client that found it empty."""
        if peer is None:
            log.debug("splice: no namespace socket")
            self._refuse(sock)
            return
        self._start(sock, peer, (dest, to_port), inbound=True)

    def accept_host(self, sock: socket.socket, peer: bytes, peer_port: int, to_port: int,
                    v6: bool, to_addr: bytes | None = None) -> None:
        """A namespace loopback client on a -T port (the listener's AcceptHandler):
        connect to the host's loopback."""
        family = socket.AF_INET6 if v6 else socket.AF_INET
        try:
            # the C type: socket.socket's __init__ and close() are Python code
            peer_sock = raw_socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        except OSError as exc:
            log.debug("splice: no host socket: %s", exc)
            self._refuse(sock)
            return
        self._start(sock, peer_sock, (LOOPBACK[v6], to_port), inbound=False)

    # ------------------------------------------------------------ connection life

    def _refuse(self, sock: socket.socket) -> None:
        self.counters["refused"] += 1
        _abort_sock(sock)

    def _start(self, a: socket.socket, b: socket.socket, dest: tuple[str, int],
               inbound: bool = True) -> None:
        if not self.table.reserve(TCP_SPLICE, FDS_PER_CONN, by_guest=not inbound):
            self.counters["limit"] += 1
            b.close()
            self._refuse(a)
            return
        try:
            a.setblocking(False)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.table.unreserve(FDS_PER_CONN)
            b.close()
            self._refuse(a)
            return
        c = SpliceConn(a, b, inbound, self.loop.now, ":" in dest[0])
        self.conns.add(c)
        err = b.connect_ex(dest)
        if err == errno.EINPROGRESS:
            err = b.connect_ex(dest)    # the loopback handshake ran inside the first
        if err == 0:
            self.loop.add(b.fileno(), EVENTS, partial(self._event_b, c))
            self._connected(c)
        elif err == errno.EALREADY:     # no answer yet (the listener's queue is full)
            self.loop.add(b.fileno(), CONNECTING, partial(self._event_b, c))
        else:
            self.counters["connect_fail"] += 1
            self._abort(c)

    def _connected(self, c: SpliceConn, events: int = 0) -> None:
        """connect() completed; `events`: what b's epoll event said, if one told us (b
        is watched for OUT then); else b was registered just now, and epoll reports
        what it has."""
        if self._pipes:
            pipes, short = self._pipes.pop()
            self.table.unreserve(PIPE_FDS)      # the connection's own reservation holds them
        else:
            try:
                pipes, short = _pipe_pair()
            except OSError as exc:
                log.debug("splice: no pipes: %s", exc)
                self._abort(c)
                return
        c.pipes = pipes
        r1, w1, r2, w2 = pipes
        c.fwd = _Dir(c.a.fileno(), c.b, r1, w1, short, events != 0)
        c.rev = _Dir(c.b.fileno(), c.a, r2, w2, short, False)
        c.connecting = False
        self.counters["opened"] += 1
        self.table.add(c, FDS_PER_CONN, self.gate.forwarded)
        self.loop.add(c.a.fileno(), EVENTS, partial(self._event_a, c))
        self._move(c, c.fwd)            # the client's bytes may be waiting
        if events & (IN | RDHUP | _HUP) and not c.closed:
            if events & (RDHUP | _HUP):
                c.rev.hup = True        # that event is spent: it will not come again
            self._move(c, c.rev)

    def _event_a(self, c: SpliceConn, events: int) -> None:
        if c.closed:
            return
        if events & _ERR:
            self._abort(c)
            return
        if events & (IN | RDHUP | _HUP):
            if events & (RDHUP | _HUP):
                c.fwd.hup = True
            self._move(c, c.fwd)
        if not c.closed and events & OUT and c.rev.pending:
            self._move(c, c.rev)

    def _event_b(self, c: SpliceConn, events: int) -> None:
        if c.closed:
            return
        if c.connecting:
            if events & (OUT | _ERR | _HUP):
                # writable alone means connected; ask why only when it is not
                err = (c.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                       if events & (_ERR | _HUP) else 0)
                if err:
                    self.counters["connect_fail"] += 1
                    self._abort(c)
                else:
                    self._connected(c, events)
            return
        if events & _ERR:
            self._abort(c)
            return
        if events & (IN | RDHUP | _HUP):
            if events & (RDHUP | _HUP):
                c.rev.hup = True
            self._move(c, c.rev)
        if not c.closed and events & OUT and c.fwd.pending:
            self._move(c, c.fwd)

    def _move(self, c: SpliceConn, d: _Dir) -> None:
        """Move what src has to dst until one of them would block, or src is drained."""
        splice = os.splice
        took_all = False
        try:
            while True:
                if d.pending:
                    n = splice(d.pr, d.dst, d.pending, flags=FLAGS)
                    d.pending -= n
                    if d.pending:
                        continue
                    if took_all:
                        break
                if d.eof:
                    break
                n = splice(d.src, d.pw, PIPE_SIZE, flags=FLAGS)
                if n == 0:
                    d.eof = True
                    break
                # A read into an empty pipe stops short of the socket's queue only when
                # the pipe's buffers ran out (each holds a byte at least): shorter than
                # that, it took everything, and what comes later brings a new event
                # (edge-triggered).  So no read that would only fail with EAGAIN.  And
                # when the end of the stream was announced before the read (the peer's
                # FIN is only taken in order, after all its data), such a read took
                # everything up to the end: no read that would only return 0 either.
                took_all = not d.pending and n < d.short
                d.pending += n
                d.moved += n
                if took_all and d.hup:
                    d.eof = True
        except BlockingIOError:
            if d.pending and not d.out:         # dst is full: wake us when it drains
                d.out = True
                self.loop.modify(d.dst, EVENTS | OUT)
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                log.debug("splice: %s", exc)
            self._abort(c)
            return
        if d.eof and not d.pending and not d.done:
            d.done = True
            try:
                d.dst_sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            other = c.rev if d is c.fwd else c.fwd
            if other.done:
                self._close(c)

    def _abort(self, c: SpliceConn, why: str = "rst") -> None:
        for s in (c.a, c.b):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
            except OSError:
                pass
        self._close(c, why)

    def _close(self, c: SpliceConn, why: str = "fin") -> None:
        if c.closed:
            return
        if not c.connecting:
            self.table.close(c, why)            # which calls _release
            return
        c.closed = True                         # never listed: its reservation goes back
        self._release(c)
        self.table.unreserve(FDS_PER_CONN)

    def _release(self, c: SpliceConn) -> None:
        """Close what a connection holds (the flow table's callback, once connected)."""
        forget = self.loop.forget
        for s in (c.a, c.b):
            forget(s.fileno())          # closing the socket takes it out of epoll
            s.close()
        pipes, c.pipes = c.pipes, []
        if pipes:
            if (c.fwd is not None and c.fwd.done and c.rev.done
                    and len(self._pipes) < PIPE_POOL
                    and self.table.fds.take(PIPE_FDS, by_guest=False)):
                self._pipes.append((pipes, c.fwd.short))   # both drained: empty, as new
            else:
                for fd in pipes:
                    os.close(fd)
        self.conns.discard(c)

    def close_all(self) -> None:
        for c in list(self.conns):
            self._abort(c, "exit")
        self.pool.close()
        while self._pipes:
            for fd in self._pipes.pop()[0]:
                os.close(fd)
            self.table.unreserve(PIPE_FDS)


def _abort_sock(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()
