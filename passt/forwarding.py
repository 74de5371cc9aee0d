"""passt's forwarded ports: -t and -u listen on the host and reach the guest.

There is no splice path in passt: every connection accepted on a forwarded
TCP port becomes a connection towards the guest through the tap, opened by
the TCP handler of the guest connected at that moment.  With no guest
connected, the host-side client is reset at once.  The listening sockets
live as long as passt, across guests.  UDP (-u) datagrams go to the UDP
handler of the guest connected at that moment, or are dropped.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from common.conf import Config
from common.dataplane import DataPlane
from common.listeners import PortForwarder, host_socket, tcp_listener
from common.loop import Loop
from common.udp import UdpHandler, udp_listener

log = logging.getLogger("passt")

_LINGER0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


class PasstForwarding:
    def __init__(self, conf: Config, loop: Loop,
                 dataplane: Callable[[], DataPlane | None]) -> None:
        """`dataplane()` returns the current guest's DataPlane, or None between guests."""
        self.conf = conf
        self.loop = loop
        self.dataplane = dataplane
        families = tuple(f for f, c in ((socket.AF_INET, conf.ip4), (socket.AF_INET6, conf.ip6))
                         if c is not None)
        self.tcp_in = PortForwarder(
            loop, conf.tcp_in, "-t", families=families, loopback_only=False,
            open_port=tcp_listener(loop, host_socket, self._accept_tcp,
                                   freebind=conf.freebind))
        self.udp_in = PortForwarder(
            loop, conf.udp_in, "-u", families=families, loopback_only=False,
            open_port=udp_listener(loop, host_socket, self._udp_handler,
                                   freebind=conf.freebind))

    def _udp_handler(self) -> UdpHandler | None:
        dp = self.dataplane()
        return dp.udp if dp is not None else None

    def _accept_tcp(self, sock: socket.socket, peer: bytes, peer_port: int, to_port: int,
                    v6: bool, to_addr: bytes | None = None) -> None:
        dp = self.dataplane()
        tcp = dp.tcp if dp is not None else None
        if tcp is None:
            log.debug("TCP connection to forwarded port %d with no guest: reset", to_port)
            _reset(sock)
            return
        tcp.accept(sock, peer, peer_port, to_port, v6, to_addr)

    def start(self) -> None:
        """Bind every forwarded port; BindError when a spec bound nothing at all."""
        services = self.conf.services
        if services.tcp:
            self.tcp_in.start()
            if self.tcp_in.bound:
                log.info("TCP forwarded to the guest: %s", self.tcp_in.describe_bound())
        if services.udp:
            self.udp_in.start()
            if self.udp_in.bound:
                log.info("UDP forwarded to the guest: %s", self.udp_in.describe_bound())

    def close(self) -> None:
        self.tcp_in.close()
        self.udp_in.close()

