"""Writing TCP segments to the guest: preallocated frame buffers, headers packed in place.

One buffer per address family and purpose (data, control), each laid out as

    [tap headroom][Ethernet][IPv4 or IPv6][TCP, 20 bytes][payload ...]

Data segments are filled payload first: the socket's bytes are peeked
straight into the payload area (`payload4`/`payload6` views), then the
headers are packed in front of them and the checksum done last, so no byte
is copied in Python.  Control segments (SYN, SYN-ACK with options, bare
ACK, FIN, RST) use their own small buffers, so an ACK built in the middle of
a burst never overwrites peeked data.

One method writes every segment, `write`, with keyword-only arguments: a
sequence number passed as an acknowledgement cannot go unnoticed.

Runs of data segments: a tap that can send several frames in one system call
(passt's stream socket, `send_many`) gets the segments `_push` writes in one
turn that way, up to HOLD_MAX at once; each then needs its own data buffer,
so there are up to HOLD_MAX of them per family, rotated (`payload4/6` always
point at the free one).

Checksums: when the tap takes partial checksums (pasta's virtio-net header),
the TCP checksum field carries the folded pseudo-header sum and the tap is
told where the checksum starts; otherwise (passt) the full checksum is
computed here.  Payloads larger than the guest's MSS go out as one GSO frame
when the tap can segment (pasta, vhost-user), which is what makes a 1500-byte
MTU cost about as much as a 65520-byte one; the tap is told the abstract kind
(`common.tap.GSO_TCP4/6`) and speaks its own header.
"""

from __future__ import annotations

import struct

from common.flowheader import FlowHeader
from common.packet.checksum import csum_add, csum_finish
from common.packet.ethernet import ETH_P_IP, ETH_P_IPV6, frame_buffer
from common.tap import GSO_TCP4, GSO_TCP6, TapBackend

ETH_LEN = 14
TCP_LEN = 20
MAX_IP_PACKET = 65535
PAYLOAD_MAX4 = MAX_IP_PACKET - 20 - TCP_LEN
PAYLOAD_MAX6 = MAX_IP_PACKET - TCP_LEN        # IPv6 payload length excludes its header

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_CSUM = struct.Struct("!H")
HOLD_MAX = 4                # data segments held for one `send_many` (each a buffer of 64 KiB)

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class SegmentWriter:
    def __init__(self, tap: TapBackend, our_mac: bytes, guest) -> None:
        self.tap = tap
        self.guest = guest                   # GuestState: the destination MAC may change
        self.offload = tap.csum_offload
        self.can_gso = tap.csum_offload
        h = tap.headroom
        self.eth = h
        self.l3 = h + ETH_LEN
        self.l4_4 = self.l3 + 20
        self.l4_6 = self.l3 + 40
        self.data4 = frame_buffer(self.l4_4 + TCP_LEN + PAYLOAD_MAX4, h, our_mac, ETH_P_IP)
        self.data6 = frame_buffer(self.l4_6 + TCP_LEN + PAYLOAD_MAX6, h, our_mac, ETH_P_IPV6)
        self.ctrl4 = frame_buffer(self.l4_4 + 60, h, our_mac, ETH_P_IP)
        self.ctrl6 = frame_buffer(self.l4_6 + 60, h, our_mac, ETH_P_IPV6)
        self.payload_off4 = self.l4_4 + TCP_LEN
        self.payload_off6 = self.l4_6 + TCP_LEN
        self.payload4 = memoryview(self.data4)[self.payload_off4:]
        self.payload6 = memoryview(self.data6)[self.payload_off6:]
        self.frames = 0
        self._mac = b""                      # the destination MAC the buffers carry
        # a tap that sends a run of frames in one call (`send_many`) gets the data
        # segments of a `hold` run that way: each in a buffer of its own, made on first use
        self._send_many = getattr(tap, "send_many", None)
        self.can_hold = self._send_many is not None and not self.offload
        self._bufs: list[memoryview] = []
        self._our_mac = our_mac
        self._slots4 = [self.data4]
        self._slots6 = [self.data6]
        self._slot4 = self._slot6 = 0
        self.held: list[tuple[bytearray, int, int]] = []   # segments waiting for `flush`

    def _stamp(self, mac: bytes) -> None:
        """Write the guest's (new) MAC address into every buffer, once per change."""
        eth = self.eth
        for buf in (*self._slots4, *self._slots6, self.ctrl4, self.ctrl6):
            buf[eth:eth + 6] = mac
        self._mac = mac

    def write(self, hdr: FlowHeader, *, seq: int, ack: int, flags: int, window: int,
              payload: int = 0, mss: int = 0, options: bytes = b"", hold: bool = False) -> bool:
        """Send one segment to the guest: `payload` bytes already peeked into
        `payload4`/`payload6` (a data segment, cut into `mss` pieces by the tap where it
        can), or none (a control segment, with TCP `options` if any); `window` is the
        header's 16-bit field, already scaled.  False when the tap dropped it.

        `hold`: a data segment may wait, with up to HOLD_MAX others, for `flush` (or
        the next segment written without `hold`), which sends them with one call of a
        tap that can (`payload4`/`payload6` then point at a free buffer: read them
        again after each write)."""
        if self.held and not hold:
            self.flush()
        mac = self.guest.mac
        if mac is not self._mac:             # GuestState replaces it when it changes
            self._stamp(mac)
        v6 = hdr.v6
        if v6:
            buf, l4 = (self.data6 if payload else self.ctrl6), self.l4_6
        else:
            buf, l4 = (self.data4 if payload else self.ctrl4), self.l4_4
        if options:
            # options sit where a data segment's payload would start: only control buffers
            olen = len(options)
            buf[l4 + TCP_LEN:l4 + TCP_LEN + olen] = options
            tcp_len = TCP_LEN + olen + payload
            doff = (TCP_LEN + olen) << 2
        else:
            tcp_len = TCP_LEN + payload
            doff = TCP_LEN << 2
        l3 = self.l3
        # the header's sums are folded already: adding a 16-bit length, one step of
        # folding is all (`fold` written out: a call each was a tenth of this method)
        if v6:
            _IP6.pack_into(buf, l3, 0x60000000, tcp_len, 6, 64, hdr.src, hdr.dst)
        else:
            s = hdr.ip_sum + 20 + tcp_len
            _IP4.pack_into(buf, l3, 0x45, 0, 20 + tcp_len, 0, 0x4000, 64, 6,
                           ((s & 0xFFFF) + (s >> 16)) ^ 0xFFFF, hdr.src, hdr.dst)
        pseudo = hdr.pseudo_sum + tcp_len
        end = l4 + tcp_len
        if self.offload:
            # the tap completes the checksum (and segments, where it can: `can_gso`
            # goes with offload, always)
            _TCP.pack_into(buf, l4, hdr.sport, hdr.dport, seq, ack, doff, flags, window,
                           (pseudo & 0xFFFF) + (pseudo >> 16), 0)
            eth = self.eth
            if payload > mss:
                ok = self.tap.send(buf, eth, end, l4 - eth, 16, GSO_TCP6 if v6 else GSO_TCP4,
                                   mss)
            else:
                ok = self.tap.send(buf, eth, end, l4 - eth, 16)
        else:
            _TCP.pack_into(buf, l4, hdr.sport, hdr.dport, seq, ack, doff, flags, window, 0, 0)
            _CSUM.pack_into(buf, l4 + 16, csum_finish(csum_add(
                memoryview(buf)[l4:end], (pseudo & 0xFFFF) + (pseudo >> 16))))
            if hold and payload and self.can_hold:
                held = self.held
                held.append((buf, self.eth, end))
                self._next_slot(v6)
                ok = True
                if len(held) == HOLD_MAX:
                    self.flush()
            else:
                ok = self.tap.send(buf, self.eth, end)
        self.frames += 1
        return ok

    def flush(self) -> int:
        """Send the held segments (see `write`); how many the tap dropped."""
        held = self.held
        if not held:
            return 0
        dropped = self._send_many(held)
        held.clear()
        return dropped

    def free_payloads(self, v6: bool, room: int, seg_max: int,
                      limit: int) -> tuple[list[memoryview], int]:
        """For a tap that takes runs (`can_hold`): the payload areas of the free data
        buffers, in the order `write(hold=True)` will use them, each at most `seg_max`
        bytes and `room` in all, at most `limit` of them; and their total size.  One
        peek (recvmsg_into) can fill several segments' payloads at once."""
        bufs = self._bufs
        bufs.clear()
        n = HOLD_MAX - len(self.held)
        if n > limit:
            n = limit
        i = self._slot6 if v6 else self._slot4
        off = self.payload_off6 if v6 else self.payload_off4
        want = 0
        while n and room > 0:
            w = seg_max if room > seg_max else room
            bufs.append(memoryview(self._slot(v6, i))[off:off + w])
            want += w
            room -= w
            n -= 1
            i = i + 1 if i + 1 < HOLD_MAX else 0
        return bufs, want

    def _slot(self, v6: bool, i: int) -> bytearray:
        """The family's i-th data buffer, made on first use."""
        slots = self._slots6 if v6 else self._slots4
        if i == len(slots):
            size, ethertype = ((len(self.data6), ETH_P_IPV6) if v6
                               else (len(self.data4), ETH_P_IP))
            buf = frame_buffer(size, self.eth, self._our_mac, ethertype)
            buf[self.eth:self.eth + 6] = self._mac or bytes(6)   # as `_stamp` left the rest
            slots.append(buf)
        return slots[i]

    def _next_slot(self, v6: bool) -> None:
        """Point the family's data buffer and payload view at the next free buffer: the
        one after the newest held (free: never more than HOLD_MAX are held)."""
        i = (self._slot6 if v6 else self._slot4) + 1
        if i == HOLD_MAX:
            i = 0
        buf = self._slot(v6, i)
        if v6:
            self._slot6 = i
            self.data6 = buf
            self.payload6 = memoryview(buf)[self.payload_off6:]
        else:
            self._slot4 = i
            self.data4 = buf
            self.payload4 = memoryview(buf)[self.payload_off4:]
