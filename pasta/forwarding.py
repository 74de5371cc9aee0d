"""pasta's forwarded ports: -t/-T and -u/-U (and the splice paths they feed).

- `-t` listens on the host.  A client on the host's loopback is spliced
  (unless `--no-splice`) to the namespace's own address, so that services
  bound to the namespace's loopback only are not exposed on the host (to its
  loopback with `--host-lo-to-ns-lo`, or `--splice-only`); any other client
  becomes a TCP connection towards the guest through the tap.
- `-T` listens on the namespace's loopback and splices to the host's
  loopback.
- `-u` and `-U` do the same for UDP: `-u` sockets belong to `common.udp`,
  which hands datagrams from loopback clients to `pasta.udp_splice`; `-U`
  sockets on the namespace's loopback go straight to `pasta.udp_splice`.

`auto` on either side follows the ports bound on the other side, read from
/proc/net/tcp{,6} (udp{,6}): the namespace's files are opened once by the namespace
thread and re-read from here.  Each direction leaves out the ports the other
direction bound, so the two never chase each other's listeners.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from common.conf import Config
from common.flow import FlowTable
from common.gate import Gate
from common.guest import GuestState
from common.listeners import PortForwarder, host_socket, tcp_listener
from common.loop import Loop
from common.procnet import ProcNetFile, scan_ports
from common.tcp.handler import TcpHandler
from common.udp import UdpHandler, bind_udp, udp_listener
from pasta.nsthread import NsThread
from pasta.pool import SocketPool
from pasta.splice import Splicer, ns_loopback
from pasta.udp_splice import UdpSplicer

log = logging.getLogger("pasta")


POOL_TARGET = 16               # namespace sockets kept ready for spliced connections
UDP_POOL_TARGET = 8            # and for spliced UDP flows


def _make_sockets(family: int, n: int) -> list[socket.socket]:
    """Runs in the namespace thread."""
    return [socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC) for _ in range(n)]


def _make_dgram_sockets(family: int, n: int) -> list[socket.socket]:
    """Runs in the namespace thread."""
    return [socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC) for _ in range(n)]


def _open_ns_tables(names: tuple[str, ...]) -> list[ProcNetFile]:
    """Runs in the namespace thread: /proc/thread-self/net is that thread's namespace."""
    return [ProcNetFile.open(n, "/proc/thread-self/net") for n in names]


def _is_loopback(addr: bytes) -> bool:
    return addr[0] == 127 if len(addr) == 4 else addr == socket.inet_pton(socket.AF_INET6, "::1")


class PastaForwarding:
    def __init__(self, conf: Config, loop: Loop, ns: NsThread, tcp: TcpHandler | None,
                 splice: bool, udp: UdpHandler | None = None, *,
                 guest: GuestState | None = None, host_lo_to_ns_lo: bool = False,
                 gate: Gate | None = None, flows: FlowTable | None = None) -> None:
        """`flows`: the data plane's flow table (--splice-only: none, one of our own)."""
        self.conf = conf
        self.flows = flows if flows is not None else FlowTable(loop, gate=gate)
        self.loop = loop
        self.ns = ns
        self.tcp = tcp
        self.udp = udp
        self.guest = guest
        # without a guest (--splice-only) only the namespace's loopback is there to reach
        ns_dest = ns_loopback if host_lo_to_ns_lo or guest is None else self._ns_address
        ns.attach(loop)
        pool = SocketPool(lambda family, n, done: ns.submit(_make_sockets, family, n,
                                                            done=done), POOL_TARGET)
        self.splicer = Splicer(loop, pool, ns_dest, gate=gate, flows=self.flows)
        self.splice_in = splice
        self.files: list[ProcNetFile] = []
        host_families = tuple(f for f, c in ((socket.AF_INET, conf.ip4),
                                             (socket.AF_INET6, conf.ip6)) if c is not None)
        if conf.splice_only:            # no guest addresses, both loopbacks
            host_families = (socket.AF_INET, socket.AF_INET6)
        # scans are ready even without an `auto` rule: the control socket may add one
        ns_tcp = self._scanner(("tcp", "tcp6"), in_ns=True)
        host_tcp = self._scanner(("tcp", "tcp6"), in_ns=False)
        self.tcp_in = PortForwarder(
            loop, conf.tcp_in, "-t", families=host_families, loopback_only=False,
            open_port=tcp_listener(loop, host_socket, self._accept_host,
                                   freebind=conf.freebind),
            scan=ns_tcp, exclude=lambda: self.tcp_out.ports)
        self.tcp_out = PortForwarder(
            loop, conf.tcp_out, "-T", families=(socket.AF_INET, socket.AF_INET6),
            loopback_only=True,
            open_port=tcp_listener(loop, self._ns_socket, self.splicer.accept_host),
            scan=host_tcp, exclude=lambda: self.tcp_in.ports)
        udp_pool = SocketPool(lambda family, n, done: ns.submit(_make_dgram_sockets, family,
                                                                n, done=done), UDP_POOL_TARGET)
        self.udp_splicer = UdpSplicer(loop, lambda family, n: ns.call(_make_dgram_sockets,
                                                                      family, n),
                                      ns_dest=ns_dest, gate=gate, pool=udp_pool,
                                      flows=self.flows)
        ns_udp = self._scanner(("udp", "udp6"), in_ns=True)
        host_udp = self._scanner(("udp", "udp6"), in_ns=False)
        self.udp_in = PortForwarder(
            loop, conf.udp_in, "-u", families=host_families, loopback_only=False,
            open_port=udp_listener(loop, host_socket, lambda: self.udp,
                                   self.udp_splicer.from_host if splice else None,
                                   freebind=conf.freebind),
            scan=ns_udp, exclude=lambda: self.udp_out.ports)
        self.udp_out = PortForwarder(
            loop, conf.udp_out, "-U", families=(socket.AF_INET, socket.AF_INET6),
            loopback_only=True, open_port=self._open_udp_ns,
            scan=host_udp, exclude=lambda: self.udp_in.ports)

    def _ns_address(self, v6: bool) -> str | None:
        """Where host loopback clients reach the namespace: its own address (the one its
        frames come from), never its loopback, so loopback-only services stay private."""
        assert self.guest is not None
        addr = self.guest.addr6 if v6 else self.guest.addr4
        return str(addr) if addr is not None else None

    def _scanner(self, tables: tuple[str, ...], *, in_ns: bool) -> Callable[[], set[int]]:
        """A scan of the bound ports in /proc/net `tables`, of the namespace or the host;
        the files are opened now (the namespace's by its thread) and kept."""
        if in_ns:
            files = self.ns.call(_open_ns_tables, tables)
        else:
            files = [ProcNetFile.open(t) for t in tables]
        self.files += files
        return lambda: scan_ports(files)

    def _ns_socket(self, family: int, type_: int) -> socket.socket:
        return self.ns.call(socket.socket, family, type_ | socket.SOCK_CLOEXEC)

    def _open_udp_ns(self, family: int, addr: str, port: int, ifname: str | None,
                     to_port: int, to_addr: bytes | None = None):
        sock = bind_udp(self._ns_socket, family, addr, port, ifname, strict=True)
        assert sock is not None
        return self.udp_splicer.ns_listener(sock, to_port)

    def _accept_host(self, sock: socket.socket, peer: bytes, peer_port: int, to_port: int,
                     v6: bool, to_addr: bytes | None = None) -> None:
        # a forward with a target address goes through the tap, as in C pasta
        if self.splice_in and to_addr is None and _is_loopback(peer):
            self.splicer.from_host(sock, to_port, v6)
        elif self.tcp is not None:
            self.tcp.accept(sock, peer, peer_port, to_port, v6, to_addr)
        else:
            sock.close()

    def start(self) -> None:
        if self.conf.services.tcp:
            self.tcp_in.start()
            self.tcp_out.start()
        if self.tcp_in.bound:
            log.info("TCP forwarded to the namespace: %s", self.tcp_in.describe_bound())
        if self.tcp_out.bound:
            log.info("TCP forwarded from the namespace: %s", self.tcp_out.describe_bound())
        if self.conf.services.udp:
            self.udp_in.start()
            self.udp_out.start()
        if self.udp_in.bound:
            log.info("UDP forwarded to the namespace: %s", self.udp_in.describe_bound())
        if self.udp_out.bound:
            log.info("UDP forwarded from the namespace: %s", self.udp_out.describe_bound())

    def close(self) -> None:
        self.tcp_in.close()
        self.tcp_out.close()
        self.splicer.close_all()
        self.udp_in.close()
        self.udp_out.close()
        self.udp_splicer.close_all()
        for f in self.files:
            f.close()

