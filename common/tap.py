"""The guest-facing link: tap backends behind one interface.

A backend moves whole Ethernet frames between the guest and us:

- `TunTap` (pasta): a /dev/net/tun file descriptor opened with
  IFF_TAP|IFF_NO_PI, optionally with a virtio-net header in front of each
  frame (IFF_VNET_HDR).  With the header, frames we send may leave the TCP/UDP
  checksum to the kernel (`csum_offload`): the receiving stack in the
  namespace trusts a partial checksum exactly as for loopback traffic.
- `StreamTap` (passt, in `passt/`): a UNIX stream socket where each frame
  is preceded by its length as a 4-byte big-endian integer.

The interface, used by the protocol handlers in `common/`:

- `headroom`: bytes every caller leaves free in front of a frame it passes to
  `send`, so the backend can write its own header there without copying.
- `csum_offload`: when True, the caller fills the L4 checksum field with the
  pseudo-header sum only and passes `csum_start`/`csum_offset` (offsets from
  the Ethernet header); when False it computes full checksums.
- `read(sink)`: drain available frames, calling `sink(frame)` with a
  memoryview that is only valid during the call.  Returns False when the
  link is gone.
- `send(buf, start, end, csum_start, csum_offset)`: send buf[start:end];
  returns False when the frame was dropped.
- `send_frame(frame)`: the slow path for small frames built as bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import Protocol

from common.pcap import Pcap

log = logging.getLogger("tap")

FRAME_MAX = 65535 + 14            # largest Ethernet frame: 64 KiB IP packet + header
VNET_HDR_LEN = 10                 # struct virtio_net_hdr, without num_buffers
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
HEADROOM = 16                     # >= every backend's header, keeps payloads aligned

_VNET = struct.Struct("=BBHHHH")
READ_BATCH = 128                  # frames per readable event before yielding to others

Sink = Callable[[memoryview], None]


class TapBackend(Protocol):
    headroom: int
    csum_offload: bool
    frames_in: int
    frames_out: int
    dropped_out: int

    def fileno(self) -> int: ...
    def read(self, sink: Sink) -> bool: ...
    def send(self, buf: bytearray, start: int, end: int,
             csum_start: int = 0, csum_offset: int = 0,
             gso_type: int = 0, gso_size: int = 0) -> bool: ...
    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool: ...


class TunTap:
    """A tap file descriptor from /dev/net/tun (pasta)."""

    def __init__(self, fd: int, vnet_hdr: bool, pcap: Pcap | None = None) -> None:
        self.fd = fd
        self.vnet_hdr = vnet_hdr
        self.headroom = HEADROOM
        self.csum_offload = vnet_hdr
        self.pcap = pcap
        self.frames_in = self.frames_out = self.dropped_out = 0
        self._skip = VNET_HDR_LEN if vnet_hdr else 0
        self._rbuf = bytearray(self._skip + FRAME_MAX + 64)
        self._rview = memoryview(self._rbuf)
        self._file = open(fd, "rb", buffering=0, closefd=False)   # noqa: SIM115
        self._zero_hdr = bytes(VNET_HDR_LEN)

    def fileno(self) -> int:
        return self.fd

    def read(self, sink: Sink) -> bool:
        readinto = self._file.readinto
        view = self._rview
        skip = self._skip
        pcap = self.pcap
        for _ in range(READ_BATCH):
            try:
                n = readinto(view)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return True
                log.error("tap read: %s", exc)
                return exc.errno not in (errno.EBADFD, errno.EBADF, errno.EIO)
            if n is None:
                return True
            if n <= skip:
                continue
            frame = view[skip:n]
            self.frames_in += 1
            if pcap is not None:
                pcap.write(frame)
            sink(frame)
        return True

    def send(self, buf: bytearray, start: int, end: int,
             csum_start: int = 0, csum_offset: int = 0,
             gso_type: int = 0, gso_size: int = 0) -> bool:
        if self.pcap is not None:
            self.pcap.write(memoryview(buf)[start:end])
        if self.vnet_hdr:
            start -= VNET_HDR_LEN
            _VNET.pack_into(buf, start, VIRTIO_NET_HDR_F_NEEDS_CSUM if csum_start else 0,
                            gso_type, 0, gso_size, csum_start, csum_offset)
        try:
            os.write(self.fd, memoryview(buf)[start:end])
        except OSError as exc:
            self.dropped_out += 1
            if exc.errno not in (errno.EAGAIN, errno.EIO, errno.ENOBUFS):
                log.debug("tap write: %s", exc)
            return False
        self.frames_out += 1
        return True

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        if self.pcap is not None:
            self.pcap.write(frame)
        try:
            if self.vnet_hdr:
                os.writev(self.fd, [self._zero_hdr, frame])
            else:
                os.write(self.fd, frame)
        except OSError as exc:
            self.dropped_out += 1
            log.debug("tap write: %s", exc)
            return False
        self.frames_out += 1
        return True

    def close(self) -> None:
        self._file.close()
        os.close(self.fd)
