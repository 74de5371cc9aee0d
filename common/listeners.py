"""Forwarded ports at run time: the listening sockets of one forwarding table.

A `PortForwarder` keeps the sockets of one table (`common.fwd`, one protocol
and direction) in step with its rules: at start-up every port of an exact
rule must bind (else `BindError`, naming the port and the reason, and
nothing stays bound), a best-effort rule must bind at least one port, and
scanning (`auto`) rules bind the ports the other side listens on, re-read
about once a second (never ports that we ourselves bound over there: the
forwarder of the opposite direction tells us which, through `exclude`).

`apply(rules)` replaces the table at run time (the control socket's
requests): it binds what is new first and gives up, closing only what it
opened, if an exact port fails, so a request is all or nothing; then it
closes the sockets of ports no longer forwarded.  Accepted connections are
not ours to close: a deleted forward's established connections run on.

What a bound port *is* belongs to the protocol: the forwarder calls
`open_port(family, addr, port, ifname, to_port, to_addr)` and gets back an
object with `close()` and writable `to_port`/`to_addr`, or an OSError.
`tcp_listener` below is the TCP one; UDP has its own.  The sockets are made
by `make_socket`, which for the namespace side creates them in the namespace.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from _socket import socket as raw_socket
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address

from common.fwd import ForwardSpec, Rule
from common.loop import IN, Loop, Timer
from common.ratelimit import RateLimited

log = logging.getLogger("fwd")
_limited = RateLimited(log)

# out of descriptors or memory, accept() leaves the connection queued and the listener
# (level-triggered) readable: we stop watching it this long, then try again
ACCEPT_BACKOFF = 0.1
ACCEPT_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def pause_accepting(loop: Loop, fd: int, handler: Callable[[int], None], exc: OSError,
                    what: str) -> Timer:
    """Stop watching listener `fd` for ACCEPT_BACKOFF seconds, then watch it again with
    `handler`; said at most once a second.  Cancel the timer returned if `fd` closes."""
    loop.remove(fd)
    _limited.warning("accept-exhausted", "%s: %s: not accepting connections for %d ms",
                     what, exc.strerror, ACCEPT_BACKOFF * 1000)

    def resume() -> None:
        if not loop.watching(fd):
            loop.add(fd, IN, handler)

    return loop.call_later(ACCEPT_BACKOFF, resume)

SCAN_INTERVAL = 1.0
BACKLOG = 1024
IP_FREEBIND = 15
IPV6_FREEBIND = 78

SocketFactory = Callable[[int, int], socket.socket]
AcceptHandler = Callable[[socket.socket, bytes, int, int, bool, "bytes | None"], None]
Key = tuple["IPv4Address | IPv6Address | None", "str | None", int]   # addr, ifname, port


class BindError(Exception):
    """A forward could not be bound; the message is one line."""


class Bound:
    """What open_port returns."""
    to_port: int
    to_addr: bytes | None

    def close(self) -> None: ...




def set_freebind(sock: socket.socket, family: int) -> None:
    """IP(V6)_FREEBIND: bind addresses the host does not have (yet), --freebind."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


class _Entry:
    __slots__ = ("to_port", "to_addr", "socks")

    def __init__(self, to_port: int, to_addr: bytes | None, socks: list[Bound]) -> None:
        self.to_port, self.to_addr, self.socks = to_port, to_addr, socks


class _Pending:
    """A table change whose new sockets are bound: commit() or abort() it."""

    def __init__(self, forwarder: PortForwarder, rules: tuple[Rule, ...],
                 want: dict) -> None:
        self.forwarder = forwarder
        self.rules = rules
        self.want = want
        self.opened: dict[Key, _Entry] = {}

    def commit(self) -> None:
        self.forwarder._commit(self)        # its own helper

    def abort(self) -> None:
        for e in self.opened.values():
            for b in e.socks:
                b.close()
        self.opened.clear()


class PortForwarder:
    def __init__(self, loop: Loop, spec: ForwardSpec, name: str, *,
                 families: tuple[int, ...], loopback_only: bool,
                 open_port: Callable[..., Bound],
                 scan: Callable[[], set[int]] | None = None,
                 exclude: Callable[[], set[int]] | None = None) -> None:
        self.loop = loop
        self.rules: tuple[Rule, ...] = spec.rules
        self.text = spec.text
        self.name = name
        self.families = families
        self.loopback_only = loopback_only
        self.open_port = open_port
        self.scan = scan
        self.exclude = exclude or (lambda: set())
        self.entries: dict[Key, _Entry] = {}
        self.scanned: set[int] = set()
        self._timer = None
        self._applied: set[Rule] = set()       # rules whose ports were bound once

    @property
    def ports(self) -> set[int]:
        return {key[2] for key in self.entries}

    @property
    def bound(self) -> dict[int, list[Bound]]:
        """Source port -> its sockets (all addresses)."""
        out: dict[int, list[Bound]] = {}
        for (_, _, port), e in self.entries.items():
            out.setdefault(port, []).extend(e.socks)
        return out

    def describe_bound(self) -> str:
        """The bound ports, for the log: a list, or a count and range when long."""
        ports = sorted(self.ports)
        if len(ports) > 8:
            return f"{len(ports)} ports ({ports[0]}-{ports[-1]})"
        return ", ".join(map(str, ports))

    # ------------------------------------------------------------ the table

    def start(self) -> None:
        """Bind the table given at start-up; BindError if it cannot be."""
        self._applied = set()
        self.apply(self.rules)

    def apply(self, rules: Sequence[Rule]) -> None:
        """Make `rules` the table: all or nothing (BindError leaves it as it was)."""
        self.prepare(rules).commit()

    def prepare(self, rules: Sequence[Rule]) -> _Pending:
        """Bind what `rules` add, nothing else yet; BindError (having closed what it
        opened) if an exact port, or every port of a best-effort rule, fails.
        The caller then commits or aborts (several tables change together)."""
        rules = tuple(rules)
        if any(r.scan for r in rules):
            if self.scan is None:
                raise BindError(f"{self.name}: 'auto' needs a port scan, not available here")
            if not any(r.scan for r in self.rules) or not self.scanned:
                self._rescan_only()
        return self._prepare(rules, strict=True)

    def rescan(self) -> None:
        self._rescan_only()
        self._prepare(self.rules, strict=False).commit()

    def _rescan_only(self) -> None:
        if self.scan is None:
            return
        try:
            self.scanned = self.scan() - self.exclude()
        except OSError as exc:
            log.debug("%s auto: scan failed: %s", self.name, exc)

    def _set_timer(self) -> None:
        want = any(r.scan for r in self.rules)
        if want and self._timer is None:
            # due on the monotonic clock's whole seconds, as pasta's other once-a-second
            # timers (pasta/watch.py): an idle process wakes once for all of them
            self._timer = self.loop.call_every(
                SCAN_INTERVAL, self.rescan, first=SCAN_INTERVAL - time.monotonic() % SCAN_INTERVAL)
        elif not want and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wanted(self, rules: Sequence[Rule]) -> dict[Key, tuple[int, bytes | None, Rule]]:
        want: dict[Key, tuple[int, bytes | None, Rule]] = {}
        scanned = self.scanned
        for rule in rules:
            to_addr = packed(rule.to_addr) if rule.to_addr is not None else None
            # a scanned rule spans thousands of ports of which few are in use
            ports = sorted(p for p in scanned if p in rule.ports) if rule.scan else rule.ports
            for port in ports:
                want[(rule.addr, rule.ifname, port)] = (rule.target(port), to_addr, rule)
        return want

    def _prepare(self, rules: tuple[Rule, ...], *, strict: bool) -> _Pending:
        want = self._wanted(rules)
        pending = _Pending(self, rules, want)
        fresh = {r for r in rules if r not in self._applied}
        for key, (to_port, to_addr, rule) in want.items():
            if key in self.entries:
                continue
            try:
                pending.opened[key] = _Entry(to_port, to_addr,
                                             self._open(key, to_port, to_addr))
            except OSError as exc:
                if strict and rule in fresh and not rule.weak and not rule.scan:
                    pending.abort()
                    where = "" if key[0] is None else f" on {key[0]}"
                    where += f"%{key[1]}" if key[1] else ""
                    raise BindError(f"cannot bind {self.name} port {key[2]}{where}: "
                                    f"{exc.strerror or exc}") from None
                log.debug("%s: cannot bind port %d: %s", self.name, key[2], exc)
        if strict:
            for rule in fresh:
                keys = ((rule.addr, rule.ifname, p) for p in rule.ports)
                if rule.weak and not rule.scan and not any(
                        k in pending.opened or k in self.entries for k in keys):
                    pending.abort()
                    raise BindError(f"failed to bind any port for {self.name} {rule}")
        return pending

    def _commit(self, pending: _Pending) -> None:
        """Close what is no longer forwarded, retarget what changed, keep what opened."""
        want = pending.want
        for key in list(self.entries):
            entry = self.entries[key]
            if key not in want:
                for b in self.entries.pop(key).socks:
                    b.close()
                continue
            to_port, to_addr, _ = want[key]
            if (entry.to_port, entry.to_addr) != (to_port, to_addr):
                entry.to_port, entry.to_addr = to_port, to_addr
                for b in entry.socks:
                    b.to_port, b.to_addr = to_port, to_addr
        self.entries.update(pending.opened)
        self.rules = pending.rules
        self._applied = set(pending.rules)
        self._set_timer()

    def _addresses(self, addr) -> list[tuple[int, str]]:
        if addr is not None:
            family = socket.AF_INET6 if isinstance(addr, IPv6Address) else socket.AF_INET
            return [(family, str(addr))] if family in self.families else []
        out = []
        for family in self.families:
            if self.loopback_only:
                out.append((family, "::1" if family == socket.AF_INET6 else "127.0.0.1"))
            else:
                out.append((family, "::" if family == socket.AF_INET6 else "0.0.0.0"))
        return out

    def _open(self, key: Key, to_port: int, to_addr: bytes | None) -> list[Bound]:
        """Every socket of one port, or OSError (and none of them)."""
        addr, ifname, port = key
        socks: list[Bound] = []
        try:
            for family, text in self._addresses(addr):
                socks.append(self.open_port(family, text, port, ifname, to_port, to_addr))
        except OSError:
            for b in socks:
                b.close()
            raise
        if not socks:
            raise OSError(errno.EAFNOSUPPORT, "address family not in use")
        return socks

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self.entries.values():
            for b in entry.socks:
                b.close()
        self.entries.clear()


# ---------------------------------------------------------------- TCP listening sockets


class TcpListener:
    """One listening socket; accepted connections go to `on_accept`."""

    def __init__(self, loop: Loop, sock: socket.socket, to_port: int,
                 on_accept: AcceptHandler, to_addr: bytes | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.v6 = sock.family == socket.AF_INET6
        self.family = socket.AF_INET6 if self.v6 else socket.AF_INET
        self.to_port = to_port
        self.to_addr = to_addr
        self.on_accept = on_accept
        self._paused: Timer | None = None
        loop.add(sock.fileno(), IN, self._readable)

    def _readable(self, _events: int) -> None:
        # one connection per event: the socket is level-triggered, so the loop comes
        # back for the next one, and we spare the accept() that would fail with EAGAIN.
        # socket.accept() is _accept() and this, with two enum conversions more; the C
        # type spares socket.socket's __init__ and close(), which are Python code.
        try:
            fd, peer = self.sock._accept()
            conn = raw_socket(self.family, socket.SOCK_STREAM, 0, fd)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in ACCEPT_EXHAUSTED:
                self._paused = pause_accepting(
                    self.loop, self.sock.fileno(), self._readable, exc,
                    f"port {self.sock.getsockname()[1]}")
            return
        addr = socket.inet_pton(self.family, peer[0])
        self.on_accept(conn, addr, peer[1], self.to_port, self.v6, self.to_addr)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
        self.loop.remove(self.sock.fileno())
        self.sock.close()


def tcp_listener(loop: Loop, make_socket: SocketFactory, on_accept: AcceptHandler, *,
                 freebind: bool = False):
    """An `open_port` for TCP: bind and listen, or OSError."""

    def open_port(family: int, addr: str, port: int, ifname: str | None,
                  to_port: int, to_addr: bytes | None = None) -> TcpListener:
        sock = make_socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if freebind:
                set_freebind(sock, family)
            if ifname:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.bind((addr, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return TcpListener(loop, sock, to_port, on_accept, to_addr)

    return open_port


def host_socket(family: int, type_: int) -> socket.socket:
    return socket.socket(family, type_ | socket.SOCK_CLOEXEC)


def packed(addr: str | IPv4Address | IPv6Address) -> bytes:
    text = str(addr)
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)

