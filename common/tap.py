"""The guest-facing link: tap backends behind one interface.

A backend moves whole Ethernet frames between the guest and us:

- `TunTap` (pasta): a /dev/net/tun file descriptor opened with
  IFF_TAP|IFF_NO_PI, optionally with a virtio-net header in front of each
  frame (IFF_VNET_HDR).  With the header, frames we send may leave the TCP/UDP
  checksum to the kernel (`csum_offload`): the receiving stack in the
  namespace trusts a partial checksum exactly as for loopback traffic.  A read
  gives one frame, and only a read that fails says the queue is empty, which
  costs a system call and an exception object (more than handling a small
  frame).  So a frame the sink says ends a request (it returns True: a TCP
  segment with PSH, after which the guest mostly waits for the answer) ends
  the read, unless the tap was readable on the loop's previous turn too (a
  burst, where the queue is drained as usual); what is left, if anything,
  epoll reports again at once (the tap is level-triggered).
- `StreamTap` (passt): a UNIX stream socket to QEMU where each frame is
  preceded by its length as a 4-byte big-endian integer.  Checksums are never
  offloaded (the guest verifies them).  Output that the socket cannot take at
  once waits in a bounded queue, flushed on EPOLLOUT (`on_writable`); past the
  bound, `send` drops the frame and returns False.
- `VhostUserTap` (passt --vhost-user, in `passt/vhost/tap.py`: it needs the
  vhost-user control plane, which only passt has): frames straight from and
  into the guest's virtio-net rings in shared memory.

The interface, used by the protocol handlers in `common/`:

- `headroom`: bytes every caller leaves free in front of a frame it passes to
  `send`, so the backend can write its own header there without copying.
- `csum_offload`: when True, the caller fills the L4 checksum field with the
  pseudo-header sum only and passes `csum_start`/`csum_offset` (offsets from
  the Ethernet header); when False it computes full checksums.
- `read(sink)`: hand on at most a batch of available frames, calling
  `sink(frame)` with a memoryview that is only valid during the call, each
  frame exactly once even if the sink raises; a sink's true result says the
  frame likely ends what the guest sends for now (a backend may stop there).
  Returns False when the link is gone.  A backend that may keep complete
  frames after a read (with no new event to announce them) says so in
  `backlog`.
- `send(buf, start, end, csum_start, csum_offset, gso, gso_size)`: send
  buf[start:end]; returns False when the frame was dropped.  `gso` asks a
  backend that offloads checksums to cut a large TCP segment into `gso_size`
  pieces: an abstract kind (`GSO_TCP4`, `GSO_TCP6`) each backend translates
  into its own header, so callers know nothing of virtio.
- `send_frame(frame)`: the slow path for small frames built as bytes.
- `send_many(frames)`, optional: several `send`s, each a (buf, start, end), in
  one system call (passt's stream socket); returns how many were dropped.  The
  TCP handler holds a run of data segments in separate buffers for it.
- `payload(frame, start, end)`, optional: a backend whose `read` may leave a
  TCP segment's payload where it arrived (vhost-user: in guest memory, only
  the headers copied) has it; frame[start:end] is then only valid through the
  buffers it returns (for `sendmsg`), during the sink call.  The TCP handler,
  the one reader of guest TCP payloads, uses it when present.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable

from common.pcap import Pcap
from common.ratelimit import RateLimited

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object

log = logging.getLogger("tap")
_limited = RateLimited(log)

FRAME_MAX = 65535 + 14            # largest Ethernet frame: 64 KiB IP packet + header
VNET_HDR_LEN = 10                 # struct virtio_net_hdr, without num_buffers
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
HEADROOM = 16                     # >= every backend's header, keeps payloads aligned

# what `send` may ask a backend to segment a frame as, and virtio-net's name for each
GSO_NONE, GSO_TCP4, GSO_TCP6 = 0, 1, 2
VIRTIO_GSO = (VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)

_VNET = struct.Struct("=BBHHHH")
READ_BATCH = 128                  # frames per readable event before yielding to others

Sink = Callable[[memoryview], object]


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
             gso: int = GSO_NONE, gso_size: int = 0) -> bool: ...
    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool: ...


class TunTap:
    """A tap file descriptor from /dev/net/tun (pasta)."""

    def __init__(self, fd: int, vnet_hdr: bool, pcap: Pcap | None = None,
                 loop=None) -> None:
        self.fd = fd
        self.loop = loop                  # common.loop.Loop: its turns tell bursts apart
        self.vnet_hdr = vnet_hdr
        self.headroom = HEADROOM
        self.csum_offload = vnet_hdr
        self.pcap = pcap
        self.frames_in = self.frames_out = self.dropped_out = 0
        self._skip = VNET_HDR_LEN if vnet_hdr else 0
        self._rbuf = bytearray(self._skip + FRAME_MAX + 64)
        self._rview = memoryview(self._rbuf)
        self._file = open(fd, "rb", buffering=0, closefd=False)
        self._zero_hdr = bytes(VNET_HDR_LEN)
        self.read_turn = -2               # the loop's turn of the last read (Loop.burst)

    def fileno(self) -> int:
        return self.fd

    def read(self, sink: Sink) -> bool:
        readinto = self._file.readinto
        view = self._rview
        skip = self._skip
        pcap = self.pcap
        burst = self.loop is None or self.loop.burst(self)
        for _ in range(READ_BATCH):
            try:
                n = readinto(view)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return True
                _limited.log("tap-read", logging.ERROR, "tap read: %s", exc)
                return exc.errno not in (errno.EBADFD, errno.EBADF, errno.EIO)
            if n is None:
                return True
            if n <= skip:
                continue
            frame = view[skip:n]
            self.frames_in += 1
            if pcap is not None:
                pcap.write(frame)
            if sink(frame) and not burst:
                return True               # the rest, if any: epoll says so at once
        return True

    def send(self, buf: bytearray, start: int, end: int,
             csum_start: int = 0, csum_offset: int = 0,
             gso: int = GSO_NONE, gso_size: int = 0) -> bool:
        if self.pcap is not None:
            self.pcap.write(memoryview(buf)[start:end])
        if self.vnet_hdr:
            start -= VNET_HDR_LEN
            _VNET.pack_into(buf, start, VIRTIO_NET_HDR_F_NEEDS_CSUM if csum_start else 0,
                            VIRTIO_GSO[gso], 0, gso_size, csum_start, csum_offset)
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


# ---------------------------------------------------------------- passt: UNIX stream


STREAM_LEN = struct.Struct("!I")
STREAM_RBUF = 1 << 20             # receive buffer: many frames per recv()
STREAM_SNDBUF = 4 << 20           # asked of the kernel (capped by net.core.wmem_max)
STREAM_PENDING_MAX = 4 << 20      # our own output queue, beyond the socket's buffer
STREAM_RECV_BATCH = 16            # recv() calls per readable event


class StreamTap:
    """A connected UNIX stream socket to QEMU (passt): each frame after its length.

    Reading: one preallocated buffer; each recv() takes as much as is there,
    then the complete frames in the buffer go to the sink as views into it,
    so several frames per read and a frame split across reads cost no copy.
    One `read` hands on at most READ_BATCH frames; what is left waits in the
    buffer (`backlog`: the data plane comes back for it on the next turn of
    the loop, as the socket may have nothing new to wake us).  Each frame is
    handed on exactly once, even when the sink raises.  The unparsed tail
    moves to the front only when too little room is left behind it for a
    largest frame.  A length beyond `FRAME_MAX` means the stream lost its
    framing: `read` reports the link gone.

    Writing: the length goes into the caller's headroom, one send() per
    frame, or one sendmsg() for a run of them (`send_many`).  What the
    socket does not take (QEMU reads as fast as its guest does) is queued,
    in order, up to `pending_max` bytes; while anything is queued, new
    frames join the queue and we watch EPOLLOUT (the loop calls
    `on_writable`).  A frame that does not fit is dropped and `send` returns
    False: TCP then treats it as lost, so a slow guest gets back-pressure
    through its own acknowledgements, never unbounded buffering.
    """

    def __init__(self, sock: socket.socket, loop=None, pcap: Pcap | None = None, *,
                 pending_max: int = STREAM_PENDING_MAX, sndbuf: int = STREAM_SNDBUF) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop                  # common.loop.Loop, to watch EPOLLOUT while queued
        self.pcap = pcap
        self.headroom = HEADROOM
        self.csum_offload = False
        self.pending_max = pending_max
        self.frames_in = self.frames_out = self.dropped_out = 0
        self.bad_frames = 0
        self.peak_queued = 0              # the most output ever waiting, bytes
        sock.setblocking(False)
        if sndbuf:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            except OSError as exc:
                log.debug("stream tap: SO_SNDBUF: %s", exc)
        self._rbuf = bytearray(STREAM_RBUF + 4 + FRAME_MAX)
        self._rview = memoryview(self._rbuf)
        self._rstart = 0                  # first unparsed byte
        self._rend = 0                    # end of received data
        self._pending = bytearray()
        self._iov: list[memoryview] = []      # send_many's, reused
        self._broken = False

    def fileno(self) -> int:
        return self.fd

    @property
    def queued(self) -> int:
        """Bytes waiting for the socket to take them."""
        return len(self._pending)

    @property
    def blocked(self) -> bool:
        """True while output is queued: more frames only add to the wait."""
        return bool(self._pending)

    # ------------------------------------------------------------ reading

    def read(self, sink: Sink) -> bool:
        """Hand on at most READ_BATCH frames: first those left in the buffer by the last
        call, then what recv() brings.  `backlog` says whether complete frames are left
        for the next call (the socket may have nothing new to wake us for them)."""
        if self._rend != self._rstart:          # left by the last call (else no call)
            budget = self._deliver(sink, READ_BATCH)
            if budget < 0:
                return False
        else:
            budget = READ_BATCH
        recv_into = self.sock.recv_into
        view = self._rview
        for _ in range(STREAM_RECV_BATCH):
            if budget == 0:
                break
            # no complete frame is buffered now: at most the start of one, which moves to
            # the front when too little room is left behind it for a largest frame
            end = self._rend
            if len(self._rbuf) - end < 4 + FRAME_MAX:
                start = self._rstart
                end = end - start
                self._rbuf[:end] = bytes(view[start:self._rend])
                self._rstart, self._rend = 0, end
            room = len(view) - end
            try:
                n = recv_into(view[end:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("guest socket: %s", exc.strerror or exc)
                return False
            if n == 0:
                if end > self._rstart:
                    log.debug("guest socket closed inside a frame (%d bytes)",
                              end - self._rstart)
                return False
            self._rend = end + n
            budget = self._deliver(sink, budget)
            if budget < 0:
                return False
            if n < room:
                # the socket is empty for now: no recv() only to hear EAGAIN, the loop
                # watches it level-triggered and says when more came
                break
        return True

    @property
    def backlog(self) -> bool:
        """True when a complete frame waits in our buffer for the next `read`."""
        avail = self._rend - self._rstart
        return avail >= 4 and avail - 4 >= STREAM_LEN.unpack_from(self._rbuf, self._rstart)[0]

    def _deliver(self, sink: Sink, budget: int) -> int:
        """Hand up to `budget` complete frames in the buffer to `sink`, each exactly
        once (our position moves past a frame before the sink sees it, so a sink that
        raises never gets it again); the budget left, or -1 if the framing is lost."""
        buf = self._rbuf
        view = self._rview
        pos = self._rstart
        end = self._rend
        pcap = self.pcap
        unpack = STREAM_LEN.unpack_from
        while budget and end - pos >= 4:
            (length,) = unpack(buf, pos)
            if length > FRAME_MAX:
                self.bad_frames += 1
                _limited.log("stream-framing", logging.ERROR,
                             "guest sent a frame length of %d bytes (at most %d): "
                             "dropping the connection", length, FRAME_MAX)
                return -1
            if end - pos - 4 < length:
                break
            frame = view[pos + 4:pos + 4 + length]
            pos += 4 + length
            self._rstart = pos
            budget -= 1
            self.frames_in += 1
            if pcap is not None:
                pcap.write(frame)
            sink(frame)
        if pos == end:
            self._rstart = self._rend = 0
        return budget

    # ------------------------------------------------------------ writing

    def send(self, buf: bytearray, start: int, end: int,
             csum_start: int = 0, csum_offset: int = 0,
             gso: int = GSO_NONE, gso_size: int = 0) -> bool:
        hdr = start - 4
        length = end - start
        STREAM_LEN.pack_into(buf, hdr, length)
        mv = memoryview(buf)
        return self._write(mv[hdr:end], mv[start:end])

    def send_many(self, frames: list[tuple[bytearray, int, int]]) -> int:
        """Send buf[start:end] of each of `frames`, in order, with one system call (each
        frame as `send` would, the same headroom); how many were dropped."""
        if self._pending or self._broken or len(frames) == 1:
            dropped = 0
            for buf, start, end in frames:
                if not self.send(buf, start, end):
                    dropped += 1
            return dropped
        iov = self._iov
        total = 0
        for buf, start, end in frames:
            STREAM_LEN.pack_into(buf, start - 4, end - start)
            iov.append(memoryview(buf)[start - 4:end])
            total += end - start + 4
        try:
            sent = self.sock.sendmsg(iov)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            iov.clear()
            self._broken = True
            self.dropped_out += len(frames)
            log.debug("guest socket write: %s", exc)
            return len(frames)
        if sent < total:
            # the rest waits, in order, as `_write` queues the rest of one frame
            pending = self._pending
            for part in iov:
                if sent >= len(part):
                    sent -= len(part)
                    continue
                pending += part[sent:]
                sent = 0
            if len(pending) > self.peak_queued:
                self.peak_queued = len(pending)
            self._watch_out(True)
        iov.clear()
        self.frames_out += len(frames)
        if self.pcap is not None:
            for buf, start, end in frames:
                self.pcap.write(memoryview(buf)[start:end])
        return 0

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        data = STREAM_LEN.pack(len(frame)) + frame
        return self._write(data, memoryview(data)[4:])

    def _write(self, data, frame) -> bool:
        """Send or queue `data` (length and frame); False when dropped."""
        pending = self._pending
        if self._broken:
            self.dropped_out += 1
            return False
        if pending:
            if len(pending) + len(data) > self.pending_max:
                self.dropped_out += 1
                return False
            pending += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                # the guest went away: the read side reports it and ends the link
                self._broken = True
                self.dropped_out += 1
                log.debug("guest socket write: %s", exc)
                return False
            if sent < len(data):
                pending += data[sent:]
                self._watch_out(True)
        if len(pending) > self.peak_queued:
            self.peak_queued = len(pending)
        self.frames_out += 1
        if self.pcap is not None:
            self.pcap.write(frame)
        return True

    def on_writable(self) -> None:
        """EPOLLOUT: move queued output into the socket."""
        pending = self._pending
        while pending:
            try:
                sent = self.sock.send(pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._broken = True
                log.debug("guest socket write: %s", exc)
                pending.clear()
                break
            del pending[:sent]
        self._watch_out(False)

    def _watch_out(self, on: bool) -> None:
        loop = self.loop
        if loop is not None and loop.watching(self.fd):
            from common.loop import IN, OUT  # tap does not need the loop otherwise

            loop.modify(self.fd, IN | OUT if on else IN)

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove(self.fd)
        self.sock.close()
