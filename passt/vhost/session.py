"""passt with --vhost-user: the same session as over a stream socket, with a vhost-user guest.

Everything `passt.session.Session` does stays (the socket, `-F`, the
forwarded ports, one guest at a time, `--one-off`, waiting for the next
guest): only what an accepted connection becomes differs.  Here it is a
`VhostUserConnection`, which builds the data plane itself once the
front-end has started the rings, and tells us so that forwarded
connections reach it.
"""

from __future__ import annotations

import logging
import socket

from common.dataplane import DataPlane
from passt.session import Session
from passt.vhost.connection import VhostUserConnection

log = logging.getLogger("passt")


def vhost_hint(path: str) -> list[str]:
    """How to connect QEMU to the vhost-user socket (shared guest memory is required)."""
    return [
        f"UNIX domain socket bound at {path}",
        "",
        "You can start qemu with:",
        f"    kvm ... -m $RAMSIZE -chardev socket,id=chr0,path={path} "
        "-netdev vhost-user,id=netdev0,chardev=chr0 -device virtio-net,netdev=netdev0 "
        "-object memory-backend-memfd,id=memfd0,share=on,size=$RAMSIZE "
        "-numa node,memdev=memfd0",
    ]


class VhostUserSession(Session):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn: VhostUserConnection | None = None

    def instructions(self) -> list[str]:
        if self.path is None:
            return [f"vhost-user: using connected socket from file descriptor {self.fd}"]
        return vhost_hint(self.path)

    def _attach(self, sock: socket.socket) -> None:
        self.guests += 1
        log.info("vhost-user front-end connected%s",
                 f" (#{self.guests})" if self.guests > 1 else "")
        conn = VhostUserConnection(sock, self.conf, self.loop, self.pcap,
                                   on_gone=lambda: self._conn_gone(conn),
                                   on_dataplane=self._set_dataplane, addrmap=self.addrmap,
                                   gate=self.gate)
        self.conn = conn
        self.tap = conn                  # "a guest is served": others are turned away
        conn.start()

    def _set_dataplane(self, dataplane: DataPlane | None) -> None:
        self.dataplane = dataplane

    def _conn_gone(self, conn: VhostUserConnection) -> None:
        if conn is self.conn:
            self._guest_gone()

    def _detach(self) -> None:
        conn, self.conn = self.conn, None
        self.tap = None
        if conn is not None:
            conn.close()
        self.dataplane = None
