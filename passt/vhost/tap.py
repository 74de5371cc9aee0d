"""`VhostUserTap`: the third tap backend, frames through the guest's virtio-net rings.

It offers `common.tap.TapBackend`, so the data plane and every protocol
handler serve a vhost-user guest as they serve a tap or a stream socket.

Guest to us (the TX queue): `fileno()` is the device's own epoll set of
kick eventfds, so one readiness event of the main loop means "some queue
was kicked" (edge-triggered: a kick's count is never read, one system call
less per drain).  `read(sink)` drains the TX ring: each buffer's descriptors are
gathered into one preallocated frame buffer (copying also means the guest
cannot change a frame while a handler parses it), except a TCP segment's
payload past its first descriptor and its headers: that stays in guest
memory and the TCP handler sends it to the socket from there (`payload`,
`common.tap`'s scatter capability), one copy instead of two; its virtio-net
header is skipped (partial checksums and large segments need nothing from us: the
handlers never verify L4 checksums and take segments of any size), and the
frame goes to `sink`.  The buffers go back in the used ring, published and
signalled once per drain.  A drain takes at most `TX_BATCH` buffers; if
more are waiting it kicks itself so that other events get their turn.  A
disabled ring is drained and its frames discarded, as the specification
asks.

Us to guest (the RX queue): `send` writes the 12-byte header in the
caller's headroom, takes as many receive buffers as the frame needs
(mergeable buffers: a 64 KiB frame spans many), copies header and frame
across them, and returns them in the used ring.  The guest is signalled
once per loop iteration (a zero-delay timer), not per frame.  With no
buffers left, frames wait in a bounded queue (as `StreamTap`'s output does)
and we ask the guest to kick when it adds buffers; past the bound a frame
is dropped and `send` returns False, which TCP treats as a loss.

Offloads: when the guest negotiated GUEST_CSUM and GUEST_TSO4/6,
`csum_offload` is True: the handlers leave the TCP/UDP checksum partial and
may pass 64 KiB TCP segments with a GSO type and size, which go into the
header as they are.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import deque

from common.pcap import Pcap
from common.tap import (
    FRAME_MAX,
    GSO_NONE,
    HEADROOM,
    VIRTIO_GSO,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    Sink,
)
from passt.vhost.device import RX, TX, VhostUserDevice
from passt.vhost.protocol import F
from passt.vhost.virtqueue import Piece, RingError, Virtqueue

log = logging.getLogger("vhost")

TX_BATCH = 256                    # guest buffers per drain before others get a turn
PENDING_MAX = 4 << 20             # frames waiting for receive buffers, bytes
HEADERS_MAX = 14 + 60 + 60         # TX: bytes always copied out of guest memory (headers)
_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
_NUM_BUFFERS = struct.Struct("<H")


class VhostUserTap:
    def __init__(self, device: VhostUserDevice, loop=None, pcap: Pcap | None = None) -> None:
        self.dev = device
        self.loop = loop                  # common.loop.Loop: batches the guest notifications
        self.pcap = pcap
        self.headroom = HEADROOM
        self.hdr_len = device.hdr_len
        self.mrg_rxbuf = device.has(F.NET_MRG_RXBUF)
        self.csum_offload = device.guest_offload
        self.frames_in = self.frames_out = self.dropped_out = 0
        self.bad_frames = 0               # TX buffers too short or too long for a frame
        self.gso_in = self.gso_out = 0    # large segments from and to the guest
        self.payload_in_place = 0         # TCP segments whose payload we sent from the ring
        self.peak_queued = 0
        self._rbuf = bytearray(self.hdr_len + FRAME_MAX)
        self._rview = memoryview(self._rbuf)
        self._tx_pieces: list[Piece] = []
        self._tail: list[memoryview] = []  # the payload of the frame being handled, in place
        self._tail_at = 0                 # where in that frame the tail starts
        self._iov: list[memoryview] = []
        self._rx_pieces: list[Piece] = []
        self._rx_heads: list[tuple[int, int]] = []   # head, index of its first piece
        self._scratch = bytearray(HEADROOM + FRAME_MAX)
        self._pending: deque[bytearray] = deque()
        self._pending_bytes = 0
        self._notify_timer = None

    def fileno(self) -> int:
        return self.dev.epoll.fileno()

    @property
    def queued(self) -> int:
        return self._pending_bytes

    @property
    def blocked(self) -> bool:
        return bool(self._pending)

    # ------------------------------------------------------------ guest -> us

    def read(self, sink: Sink) -> bool:
        dev = self.dev
        for fd, _events in dev.epoll.poll(0):
            if fd == dev.rx.kick_fd:
                self._flush_pending()
            elif fd == dev.tx.kick_fd:
                self._drain_tx(sink)
        return True

    def _drain_tx(self, sink: Sink) -> None:
        q = self.dev.tx
        if not q.ready:
            return
        pieces = self._tx_pieces
        buf = self._rbuf
        view = self._rview
        cap = len(buf)
        hdr = self.hdr_len
        pcap = self.pcap
        # payloads stay in guest memory unless every frame must be seen whole (capture)
        tail = self._tail if pcap is None else None
        done = 0
        try:
            q.no_kicks()
            while True:
                n = q.avail()
                if not n:
                    if not q.want_kicks(q.last_avail):
                        break
                    q.no_kicks()
                    continue
                while n and done < TX_BATCH:
                    n -= 1
                    done += 1
                    head = q.pop()
                    if tail:
                        tail.clear()              # a frame dropped below left its own
                    total = q.gather(head, buf, tail, 1)     # the first descriptor
                    if total < 0:
                        # not the usual shape: the general walk copies it, or says why not
                        if tail:
                            tail.clear()
                        pieces.clear()
                        total = q.chain(head, pieces, False)
                        if total <= cap:
                            pos = 0
                            for v, off, length in pieces:
                                buf[pos:pos + length] = v[off:off + length]
                                pos += length
                    q.push(head, 0)
                    if total > cap or total < hdr + 14:
                        self.bad_frames += 1
                        continue
                    if not q.enabled:
                        continue
                    if buf[1]:
                        self.gso_in += 1
                    if tail:
                        self._keep_tail(buf, hdr, total)
                    frame = view[hdr:total]
                    self.frames_in += 1
                    if pcap is not None:
                        pcap.write(frame)
                    try:
                        sink(frame)
                    finally:
                        if tail:
                            tail.clear()
                            self._iov.clear()
                if done >= TX_BATCH:
                    if q.avail() and q.kick_fd is not None:
                        os.eventfd_write(q.kick_fd, 1)     # come back after the others
                    break
        except RingError as exc:
            q.fail(exc)
        except BaseException:
            # a handler failed mid-drain (a bug, the loop logs it): kicks may be off, so
            # come back by ourselves rather than wait for one that never comes
            if q.ready and q.kick_fd is not None:
                os.eventfd_write(q.kick_fd, 1)
            raise
        finally:
            pieces.clear()
            self._tail.clear()
            self._iov.clear()
            if q.mapped:
                q.publish()
                q.notify()

    def _keep_tail(self, buf: bytearray, hdr: int, total: int) -> None:
        """Leave the tail in guest memory only for a TCP segment (its handler takes the
        payload through `payload`), once every header is copied; else copy it all now."""
        tail = self._tail
        at = total
        for piece in tail:
            at -= len(piece)
        if self._tcp_headers_end(buf, hdr, at) == 0:
            # the longest headers we may read: Ethernet, IPv4 with options, TCP with options
            want = hdr + HEADERS_MAX if hdr + HEADERS_MAX < total else total
            while at < want:
                piece = tail[0]
                length = len(piece)
                n = want - at if want - at < length else length
                buf[at:at + n] = piece[:n]
                at += n
                if n == length:
                    del tail[0]
                else:
                    tail[0] = piece[n:]
            if not tail:
                return
            if self._tcp_headers_end(buf, hdr, at) == 0:
                for piece in tail:
                    buf[at:at + len(piece)] = piece
                    at += len(piece)
                tail.clear()
                return
        self._tail_at = at - hdr
        self.payload_in_place += 1

    @staticmethod
    def _tcp_headers_end(buf: bytearray, hdr: int, at: int) -> int:
        """Where the TCP header ends if buf[:at] holds a TCP segment's headers whole, else 0.

        Linux puts a segment's headers (and the virtio-net header) in its first
        descriptor: that is all the copy a segment with its payload in place needs."""
        if at < hdr + 54:                  # Ethernet, IPv4 and TCP without options
            return 0
        l4 = 0
        if buf[hdr + 12] == 0x08 and buf[hdr + 13] == 0x00:
            if buf[hdr + 23] == 6:
                l4 = hdr + 14 + (buf[hdr + 14] & 0x0F) * 4
        elif buf[hdr + 12] == 0x86 and buf[hdr + 13] == 0xDD:
            if buf[hdr + 20] == 6:
                l4 = hdr + 54
        if l4 and l4 + 20 <= at:
            end = l4 + (buf[l4 + 12] >> 4) * 4
            if end <= at:
                return end
        return 0

    def payload(self, frame: memoryview, start: int, end: int) -> list[memoryview]:
        """frame[start:end] as the buffers that hold it (`common.tap`'s optional scatter
        capability): the copied head, then the tail's pieces of guest memory."""
        tail = self._tail
        at = self._tail_at
        if not tail or end <= at:
            return [frame[start:end]]
        if start == at and end == len(frame):
            return tail                   # the whole payload is the tail (the usual case)
        iov = self._iov
        iov.clear()
        if start < at:
            iov.append(frame[start:at])
        pos = at
        for piece in tail:
            nxt = pos + len(piece)
            if nxt > start:
                iov.append(piece[start - pos if start > pos else 0:end - pos])
                if nxt >= end:
                    break
            pos = nxt
        return iov

    # ------------------------------------------------------------ us -> guest

    def send(self, buf: bytearray, start: int, end: int,
             csum_start: int = 0, csum_offset: int = 0,
             gso: int = GSO_NONE, gso_size: int = 0) -> bool:
        hdr = start - self.hdr_len
        if self.hdr_len == 12:
            # num_buffers says 1 here; a frame over several buffers gets its count there
            _NUM_BUFFERS.pack_into(buf, start - 2, 1)
        if gso:
            # header length: up to the end of the TCP header, whose length is in doff
            doff = buf[start + csum_start + 12] >> 4
            _HDR.pack_into(buf, hdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_GSO[gso],
                           csum_start + 4 * doff, gso_size, csum_start, csum_offset)
            self.gso_out += 1
        elif csum_start:
            _HDR.pack_into(buf, hdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0,
                           csum_start, csum_offset)
        else:
            _HDR.pack_into(buf, hdr, 0, 0, 0, 0, 0, 0)
        mv = memoryview(buf)
        if self._put(mv[hdr:end]):
            if self.pcap is not None:
                self.pcap.write(mv[start:end])
            return True
        return False

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        n = len(frame)
        if n > FRAME_MAX:
            self.dropped_out += 1
            return False
        scratch = self._scratch
        scratch[HEADROOM:HEADROOM + n] = frame
        return self.send(scratch, HEADROOM, HEADROOM + n)

    def _put(self, data: memoryview) -> bool:
        """Header and frame into the RX ring, or into the queue while it has no room."""
        q = self.dev.rx
        if not q.ready or not q.enabled:
            self.dropped_out += 1
            return False
        if self._pending:
            self._flush_pending()
        if not self._pending:
            written = self._write_rx(q, data)
            if written is not None:
                if written:
                    self.frames_out += 1
                    self._schedule_notify()
                else:
                    self.dropped_out += 1
                return written
        if self._pending_bytes + len(data) > PENDING_MAX:
            self.dropped_out += 1
            return False
        self._pending.append(bytearray(data))
        self._pending_bytes += len(data)
        if self._pending_bytes > self.peak_queued:
            self.peak_queued = self._pending_bytes
        self.frames_out += 1
        if len(self._pending) == 1 and q.want_kicks(q.seen):
            self._flush_pending()        # buffers came while we asked
        return True

    def _write_rx(self, q: Virtqueue, data: memoryview) -> bool | None:
        """Copy `data` into receive buffers: True written, False dropped, None no room."""
        try:
            taken = q.fill(data, self.mrg_rxbuf)
        except RingError as exc:
            q.fail(exc)
            return False
        if taken > 0:
            q.publish()
            return True
        if taken == 0:
            return None
        return self._write_rx_any(q, data)

    def _write_rx_any(self, q: Virtqueue, data: memoryview) -> bool | None:
        """`_write_rx` for buffers of any shape: chains, indirect tables, across regions."""
        need = len(data)
        pieces = self._rx_pieces
        heads = self._rx_heads
        pieces.clear()
        heads.clear()
        try:
            avail = q.avail()
            room = 0
            while room < need:
                if not avail:
                    q.unpop(len(heads))
                    return None
                head = q.pop()
                avail -= 1
                heads.append((head, len(pieces)))
                room += q.chain(head, pieces, True)
                if not self.mrg_rxbuf:
                    break
            if room < need:
                # one buffer per frame without mergeable buffers, and this one is too small
                q.push(heads[0][0], 0)
                q.publish()
                return False
            if self.hdr_len == 12:
                _NUM_BUFFERS.pack_into(data, 10, len(heads))
            pos = 0
            nheads = len(heads)
            for h in range(nheads):
                head, first = heads[h]
                last = heads[h + 1][1] if h + 1 < nheads else len(pieces)
                written = 0
                for p in range(first, last):
                    v, off, length = pieces[p]
                    n = need - pos
                    if n > length:
                        n = length
                    v[off:off + n] = data[pos:pos + n]
                    pos += n
                    written += n
                    if pos == need:
                        break
                q.push(head, written)
            q.publish()
            return True
        except RingError as exc:
            q.fail(exc)
            return False
        finally:
            pieces.clear()

    def _flush_pending(self) -> None:
        pending = self._pending
        q = self.dev.rx
        while pending:
            if not q.ready or not q.enabled:
                self._drop_pending()
                return
            data = pending[0]
            written = self._write_rx(q, memoryview(data))
            if written is None:
                if not q.want_kicks(q.seen):
                    break                 # the guest kicks the RX queue when it adds some
                continue
            pending.popleft()
            self._pending_bytes -= len(data)
            if not written:
                self.dropped_out += 1
                continue
            self._schedule_notify()
        if not pending:
            if q.mapped:
                q.no_kicks()

    def _drop_pending(self) -> None:
        self.dropped_out += len(self._pending)
        self._pending.clear()
        self._pending_bytes = 0

    def _schedule_notify(self) -> None:
        if self.loop is None:
            self.notify()
        elif self._notify_timer is None:
            self._notify_timer = self.loop.call_later(0, self.notify)

    def notify(self) -> None:
        """Signal the guest for everything given back since the last signal."""
        self._notify_timer = None
        q = self.dev.rx
        if q.mapped:
            q.notify()

    # ------------------------------------------------------------ the end

    def stopped(self) -> None:
        """The RX ring stopped (or its memory changed): queued frames are dropped."""
        self._drop_pending()

    def close(self) -> None:
        if self._notify_timer is not None:
            self._notify_timer.cancel()
            self._notify_timer = None
        self._drop_pending()
        if self.loop is not None and self.loop.watching(self.fileno()):
            self.loop.remove(self.fileno())


__all__ = ["VhostUserTap", "RX", "TX"]
