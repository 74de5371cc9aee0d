"""One vhost-user front-end (QEMU) on the control socket, and the data plane while its rings run.

Reading: the socket is non-blocking; a message is read as its 12-byte
header, then exactly its payload, so the descriptors the front-end sends
with a message (SCM_RIGHTS, at most 8) always arrive with that message's
bytes and are never mixed with the next one's.  A message may arrive in
pieces: what we have waits in the connection until the rest comes.  Every
received descriptor is marked close-on-exec by the kernel and owned by the
message (see `device`).  End of file, a read error, a header we cannot
parse, or more descriptors than a message may carry end the connection.

The data plane: when both rings have started, a `VhostUserTap` and a
`DataPlane` (flows, observed guest addresses) are built over the device.
They live as long as the connection: rings that stop and start again (the
guest's driver reset, a paused VM) keep the flows, as a stream socket
does across a guest reboot.  Only a change of the negotiated offloads
(another driver) builds a new tap and data plane.

`on_gone` is called once, after the connection was torn down.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable

from common.conf import Config
from common.dataplane import DataPlane
from common.gate import Gate
from common.guest import GuestState
from common.loop import IN, Loop
from common.mapping import AddressMap
from common.pcap import Pcap
from passt.vhost import migration
from passt.vhost import protocol as P
from passt.vhost.device import VhostUserDevice
from passt.vhost.protocol import Message, ProtocolError
from passt.vhost.tap import VhostUserTap

log = logging.getLogger("vhost")

MESSAGES_PER_EVENT = 64
_ANC_SIZE = socket.CMSG_SPACE(P.FDS_MAX * 4)


class VhostUserConnection:
    def __init__(self, sock: socket.socket, conf: Config, loop: Loop,
                 pcap: Pcap | None = None, on_gone: Callable[[], None] | None = None,
                 on_dataplane: Callable[[DataPlane | None], None] | None = None,
                 addrmap: AddressMap | None = None, gate: Gate | None = None) -> None:
        """`addrmap`: the session's, made at set-up (see DataPlane); `gate`: the process's."""
        self.sock = sock
        self.addrmap = addrmap
        self.gate = gate
        self.fd = sock.fileno()
        self.conf = conf
        self.loop = loop
        self.pcap = pcap
        self.on_gone = on_gone or (lambda: None)
        self.on_dataplane = on_dataplane or (lambda _dp: None)
        # what we learn of the guest outlives a data plane (the driver may change its
        # features, the rings restart) and moves with the guest when it migrates
        self.guest = GuestState(conf)
        self.device = VhostUserDevice(on_change=self._changed,
                                      save_state=lambda: migration.save(self.guest),
                                      load_state=lambda data: migration.load(data, self.guest))
        self.tap: VhostUserTap | None = None
        self.dataplane: DataPlane | None = None
        self._buf = bytearray(P.HEADER_SIZE + P.PAYLOAD_MAX)
        self._view = memoryview(self._buf)
        self._have = 0                 # bytes of the current message received so far
        self._want = P.HEADER_SIZE     # bytes it will have once complete
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []
        self._closed = False
        sock.setblocking(False)

    def start(self) -> None:
        self.loop.add(self.fd, IN, self._readable)

    # ------------------------------------------------------------ messages

    def _readable(self, _events: int) -> None:
        try:
            for _ in range(MESSAGES_PER_EVENT):
                msg = self._receive()
                if msg is None:
                    return
                out = self.device.handle(msg)
                if out is not None:
                    self._send(out)
                if self._closed:
                    return
        except ProtocolError as exc:
            log.error("vhost-user: %s: closing the connection", exc)
            self.close()
        except EOFError as exc:
            log.info("vhost-user front-end disconnected%s", f" ({exc})" if str(exc) else "")
            self.close()

    def _receive(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        while self._have < self._want:
            try:
                n, anc, flags, _ = self.sock.recvmsg_into(
                    [self._view[self._have:self._want]], _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise EOFError(exc.strerror or str(exc)) from None
            self._take_fds(anc)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError("more descriptors than a message may carry")
            if n == 0:
                raise EOFError("")
            self._have += n
            if self._have == P.HEADER_SIZE and self._header is None:
                self._header = P.parse_header(self._view[:P.HEADER_SIZE])
                self._want = P.HEADER_SIZE + self._header[2]
        request, flags, size = self._header
        msg = Message(request, flags, bytes(self._view[P.HEADER_SIZE:P.HEADER_SIZE + size]),
                      self._fds)
        self._fds = []
        self._have, self._want, self._header = 0, P.HEADER_SIZE, None
        if len(msg.fds) > P.FDS_MAX:
            msg_fds = msg.take_fds()
            _close_all(msg_fds)
            raise ProtocolError(f"{msg.name} came with {len(msg_fds)} descriptors")
        return msg

    def _take_fds(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                count = len(data) // 4
                self._fds.extend(struct.unpack(f"={count}i", data[:4 * count]))

    def _send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise ProtocolError("the front-end does not read its replies") from None
            raise EOFError(exc.strerror or str(exc)) from None
        if sent != len(data):
            raise ProtocolError("the front-end does not read its replies")

    # ------------------------------------------------------------ the data plane

    def _changed(self) -> None:
        dev = self.device
        if self.tap is not None and not dev.rx.started:
            self.tap.stopped()
        if not dev.running:
            return
        if self.dataplane is not None:
            assert self.tap is not None
            current = (self.tap.hdr_len, self.tap.csum_offload, self.tap.mrg_rxbuf)
            wanted = (dev.hdr_len, dev.guest_offload, dev.has(P.F.NET_MRG_RXBUF))
            if current == wanted:
                return
            self.device.limited.log("features changed", logging.INFO,
                         "vhost-user: the guest's driver changed its features: flows start over")
            self._stop_dataplane()
        self.tap = VhostUserTap(dev, self.loop, self.pcap)
        self.dataplane = DataPlane(self.conf, self.loop, self.tap, self.guest, self.addrmap,
                                   gate=self.gate)
        self.dataplane.on_tap_gone = lambda: None      # the control socket says when
        self.dataplane.start()
        self.device.limited.log("link up", logging.INFO,
                     "vhost-user: guest link up (%s offloads, %s receive buffers)",
                 "checksum and segmentation" if self.tap.csum_offload else "no",
                 "mergeable" if self.tap.mrg_rxbuf else "single")
        self.on_dataplane(self.dataplane)

    def _stop_dataplane(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop()
            self.dataplane = None
            self.on_dataplane(None)
        if self.tap is not None:
            tap = self.tap
            log.info("guest link: %d frames in (%d large segments), %d out (%d large "
                     "segments), %d dropped, %d bad, queue peak %d bytes", tap.frames_in,
                     tap.gso_in, tap.frames_out, tap.gso_out, tap.dropped_out, tap.bad_frames,
                     tap.peak_queued)
            tap.close()
            self.tap = None

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_dataplane()
        self.device.close()
        _close_all(self._fds)
        self._fds = []
        if self.loop.watching(self.fd):
            self.loop.remove(self.fd)
        self.sock.close()
        self.on_gone()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
