"""Forwarded ports at run time: the listening sockets of one protocol and direction.

A `PortForwarder` turns a `ForwardSpec` into bound sockets and keeps them in
step with it: an explicit spec is bound once at start-up (failing loudly if
no port at all could be bound, as C pasta does); `auto` re-reads the other
side's bound ports about once a second and binds or closes to match, never
following ports that we ourselves bound over there (the forwarder of the
opposite direction tells us which, through `exclude`).

What a bound port *is* belongs to the protocol: the forwarder calls
`open_port(family, addr, port, ifname, to_port)` and gets back an object
with `close()`, or None when binding failed.  `tcp_listener` below is the TCP
one; UDP has its own.  The sockets are made by `make_socket`, which for the
namespace side creates them inside the namespace.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from common.fwd import ForwardSpec, PortMap
from common.loop import IN, Loop

log = logging.getLogger("fwd")

SCAN_INTERVAL = 1.0
BACKLOG = 1024

SocketFactory = Callable[[int, int], socket.socket]
AcceptHandler = Callable[[socket.socket, bytes, int, int, bool], None]


class BindError(Exception):
    """An explicit spec bound nothing; the message is one line."""


class Bound:
    """Something with close(): what open_port returns."""

    def close(self) -> None: ...


class PortForwarder:
    def __init__(self, loop: Loop, spec: ForwardSpec, name: str, *,
                 families: tuple[int, ...], loopback_only: bool,
                 open_port: Callable[[int, str, int, str | None, int], Bound | None],
                 scan: Callable[[], set[int]] | None = None,
                 exclude: Callable[[], set[int]] | None = None) -> None:
        self.loop = loop
        self.spec = spec
        self.name = name
        self.families = families
        self.loopback_only = loopback_only
        self.open_port = open_port
        self.scan = scan
        self.exclude = exclude or (lambda: set())
        self.bound: dict[int, list[Bound]] = {}     # source port -> its sockets
        self._timer = None

    @property
    def ports(self) -> set[int]:
        return set(self.bound)

    def describe_bound(self) -> str:
        """The bound ports, for the log: a list, or a count and range when long."""
        ports = sorted(self.bound)
        if len(ports) > 8:
            return f"{len(ports)} ports ({ports[0]}-{ports[-1]})"
        return ", ".join(map(str, ports))

    def start(self) -> None:
        if self.spec.auto:
            if self.scan is None:
                raise ValueError(f"{self.name} auto needs a port scanner")
            self.rescan()
            self._timer = self.loop.call_every(SCAN_INTERVAL, self.rescan)
            return
        for m in self.spec.maps:
            self._bind(m)
        if self.spec.maps and not self.bound:
            raise BindError(f"failed to bind any port for {self.name} "
                            f"{' '.join(self.spec.text) or self.spec.describe()}")

    def _addresses(self, m: PortMap) -> list[tuple[int, str]]:
        if m.addr is not None:
            family = socket.AF_INET6 if isinstance(m.addr, IPv6Address) else socket.AF_INET
            return [(family, str(m.addr))] if family in self.families else []
        out = []
        for family in self.families:
            if self.loopback_only:
                out.append((family, "::1" if family == socket.AF_INET6 else "127.0.0.1"))
            else:
                out.append((family, "::" if family == socket.AF_INET6 else "0.0.0.0"))
        return out

    def _bind(self, m: PortMap) -> None:
        got = []
        for family, addr in self._addresses(m):
            b = self.open_port(family, addr, m.port, m.ifname, m.to_port)
            if b is not None:
                got.append(b)
        if got:
            self.bound[m.port] = got

    def _unbind(self, port: int) -> None:
        for b in self.bound.pop(port, ()):
            b.close()

    def rescan(self) -> None:
        try:
            wanted = self.scan() - self.exclude() if self.scan else set()
        except OSError as exc:
            log.debug("%s auto: scan failed: %s", self.name, exc)
            return
        wanted -= self.spec.excluded
        for port in list(self.bound):
            if port not in wanted:
                log.debug("%s auto: port %d no longer bound, closing", self.name, port)
                self._unbind(port)
        for port in sorted(wanted - set(self.bound)):
            log.debug("%s auto: forwarding port %d", self.name, port)
            self._bind(PortMap(port, port))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for port in list(self.bound):
            self._unbind(port)


# ---------------------------------------------------------------- TCP listening sockets


class TcpListener:
    """One listening socket; accepted connections go to `on_accept`."""

    def __init__(self, loop: Loop, sock: socket.socket, to_port: int,
                 on_accept: AcceptHandler) -> None:
        self.loop = loop
        self.sock = sock
        self.v6 = sock.family == socket.AF_INET6
        self.to_port = to_port
        self.on_accept = on_accept
        loop.add(sock.fileno(), IN, self._readable)

    def _readable(self, _events: int) -> None:
        accept = self.sock.accept
        v6 = self.v6
        for _ in range(64):
            try:
                conn, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s: connection refused", exc.strerror)
                return
            addr = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, peer[0])
            self.on_accept(conn, addr, peer[1], self.to_port, v6)

    def close(self) -> None:
        self.loop.remove(self.sock.fileno())
        self.sock.close()


def tcp_listener(loop: Loop, make_socket: SocketFactory, on_accept: AcceptHandler):
    """An `open_port` for TCP: bind and listen, quietly None when the port is taken."""

    def open_port(family: int, addr: str, port: int, ifname: str | None,
                  to_port: int) -> TcpListener | None:
        try:
            sock = make_socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot create a socket for port %d: %s", port, exc.strerror)
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if ifname:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.bind((addr, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            log.debug("cannot listen on %s port %d: %s", addr, port, exc.strerror)
            sock.close()
            return None
        return TcpListener(loop, sock, to_port, on_accept)

    return open_port


def host_socket(family: int, type_: int) -> socket.socket:
    return socket.socket(family, type_ | socket.SOCK_CLOEXEC)


def packed(addr: str | IPv4Address | IPv6Address) -> bytes:
    text = str(addr)
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)

