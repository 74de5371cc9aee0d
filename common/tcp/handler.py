"""TCP translation: guest segments <-> host stream sockets (see `conn` for the design).

The handler is the only code that changes a connection's state, through
`_event` and `_flag` (the tables are in `conn`); what to do with each
segment, ACK and timeout is decided by the pure functions of `decide`.  It
talks to the outside through narrow seams:

- `on_frame4/on_frame6(frame, l3, l4, end, key)`: a TCP segment from the
  guest, registered with the frame demux, which also cut out its flow key;
- `flush()`: called once per batch of guest frames, sends the ACKs that the
  batch made due (one per connection, however many segments it carried);
- `accept(sock, peer, to_port, v6)`: a host connection for a forwarded port;
- the flow table (`common.flow`): connections live there, with every other
  flow, and its timer wakes a connection when it asked (`_on_timer`);
- the loop: socket readiness (edge-triggered).

Frames go out through `SegmentWriter.write`; nothing here knows the tap
backend.

The per-segment path is written for its usual case, a request-response
exchange on an established connection: an ACK of everything sent, in-order
data, the window open.  That case is told by a comparison or two and skips
the decisions it does not need (`decide.acked`'s bounds, `fin_acked` before
the stream's end, a `_push` that would stop at DRAINED), and `_flag` is
called only when a flag changes (DRAINED, which each exchange would clear
and set again, is settled once at the end of `_push`).

What the guest may choose is bounded: its MSS is clamped to [536 or 1220, our
link's], and one call of `_push` sends at most PUSH_BATCH frames; a
connection with more to send is pushed again on the next turn of the loop
(`_push_later`), after every other event had its turn.  How many connections
may exist is the flow table's limit, sized from the descriptors we may open.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import socket
import struct
import time
from _socket import socket as raw_socket
from collections import Counter
from functools import partial
from ipaddress import IPv4Address, IPv6Address

from common import log as plog
from common.conf import Config
from common.dnsmsg import DnsStream
from common.flow import (
    PROTO_TCP,
    TCP,
    FlowTable,
    coarse,
    key_addrs,
    key_ports,
    make_key,
)
from common.flowheader import FlowHeader
from common.flowinfo import tcp_record
from common.guest import GuestState
from common.loop import ET, IN, OUT, RDHUP, Loop
from common.mapping import AddressMap, forbidden
from common.packet.errors import MalformedPacket
from common.packet.tcp import syn_options
from common.tap import TapBackend
from common.tcp import decide
from common.tcp.conn import (
    ACK_DELAYED,
    ACK_QUEUED,
    CLOSED,
    DRAINED,
    DROPPED,
    ESTABLISHED,
    EVENT_NAMES,
    FIN_ACKED,
    FIN_SENT,
    FLAG_NAMES,
    GUEST_FIN,
    GUEST_SYN,
    M32,
    OPENING,
    PEER_FIN,
    PHASES,
    RECOVERING,
    SOCK_EOF,
    SOCK_FULL,
    SYN_SENT,
    SYNACK_SENT,
    WND_CLOSED,
    TcpConn,
    names,
)
from common.tcp.decide import ACK_EVERY, RTO_INITIAL, seq_after
from common.tcp.isn import initial_seq
from common.tcp.segment import (
    ACK,
    FIN,
    PAYLOAD_MAX4,
    PAYLOAD_MAX6,
    PSH,
    RST,
    SYN,
    SegmentWriter,
)

log = logging.getLogger("tcp")

SO_PEEK_OFF = 42
TIOCOUTQ = 0x5411
MSG_PEEK = socket.MSG_PEEK
MSG_TRUNC = socket.MSG_TRUNC

OUR_WSCALE = 8                 # our windows go up to 16 MiB
MSS_MIN4, MSS_MIN6 = 536, 1220  # the guest's MSS is clamped to these (RFC 9293, RFC 8200)
PUSH_BATCH = 64                # frames one call of _push sends; the rest on a later turn
RTO_INBOUND_SYN = 1.0          # our SYN to the guest: RFC 6298's initial RTO
HANDSHAKE_TIMEOUT = 10.0       # SYN / SYN-ACK / connect()
IDLE_TIMEOUT = 7200.0          # no activity at all
DELAYED_ACK = 0.001            # longest we hold a delayed ACK (see decide.delay_ack), seconds
WINDOW_RECHECK = 1 << 18       # measure the socket's free space again below this estimate
DISCARD_ONE = 32 << 20         # acknowledged bytes one recv(MSG_TRUNC) discards at most
KEEP_MAX = 2048                # an answer read and kept, not peeked: at most this (see conn)

_HDR = struct.Struct("!HHIIBBH")
_OUTQ = struct.Struct("i")
_LINGER0 = struct.pack("ii", 1, 0)
SOCK_EVENTS = IN | OUT | RDHUP | ET
SOCK_EVENTS_OPEN = IN | RDHUP | ET      # connected, the window open: OUT says nothing new
_ERR = 0x008     # EPOLLERR
_FLAGS_IN_STEP = ACK_QUEUED | ACK_DELAYED | WND_CLOSED | DROPPED   # changes that do more
_EVENTS_TIMED = GUEST_SYN | SYNACK_SENT | SYN_SENT | ESTABLISHED | FIN_SENT  # set timers
_EVENTS_ON_TOP = GUEST_FIN | PEER_FIN | SOCK_EOF | FIN_ACKED       # no timer, no phase
_HUP = 0x010     # EPOLLHUP


def _syn_options(mss: int, wscale: int | None) -> bytes:
    opts = struct.pack("!BBH", 2, 4, min(mss, 0xFFFF))
    if wscale is not None:
        opts += struct.pack("!BBBB", 1, 3, 3, wscale)
    return opts


class TcpHandler:
    def __init__(self, conf: Config, loop: Loop, tap: TapBackend, guest: GuestState,
                 addrmap: AddressMap | None = None, *, flows: FlowTable | None = None) -> None:
        self.conf = conf
        self.loop = loop
        self.guest = guest
        self.map = addrmap or AddressMap(conf)
        self.table = flows if flows is not None else FlowTable(loop)
        self.table.serve(TCP, release=self._release, timer=self._on_timer, record=tcp_record)
        self.conns: dict[bytes, TcpConn] = self.table.index[PROTO_TCP]   # by key
        self.writer = SegmentWriter(tap, conf.our_mac, guest)
        self.pending_acks: list[TcpConn] = []
        self.delayed_acks: list[TcpConn] = []
        self._delack_timer = None
        self.counters: Counter[str] = Counter()
        self.mss4 = conf.mtu - 40
        self.mss6 = conf.mtu - 60
        # the options of our SYNs and SYN-ACKs, by family and window scaling: packed once
        self._syn_opts = {(v6, ws): _syn_options(self.mss6 if v6 else self.mss4, ws)
                          for v6 in (False, True) for ws in (None, OUR_WSCALE)}
        self.bcast4 = conf.ip4.network.broadcast_address.packed if conf.ip4 else b""
        self.gso = self.writer.can_gso
        # a backend that leaves payloads where they arrived (see common.tap) hands them
        # over as buffers for sendmsg, instead of one copy in the frame
        self._payload = getattr(tap, "payload", None)
        # MSG_TRUNC discards without copying, but recv_into still wants a buffer this
        # large: an anonymous map is never touched, so it costs address space, not memory
        self._discard = memoryview(mmap.mmap(-1, DISCARD_ONE))
        self._more: set[TcpConn] = set()          # conns whose _push stopped at the batch
        self._more_timer = None

    # ================================================================ state changes

    def _event(self, conn: TcpConn, ev: int) -> None:
        """Record a lifecycle event (table in `conn`), with the timers it implies."""
        old = conn.events
        if ev & _EVENTS_ON_TOP:
            # the closing events but FIN_SENT: they only accumulate (four of a
            # connection's nine events, so told first)
            if not old & ev:
                conn.events = old | ev
                if plog.TRACE_ON:
                    log.log(plog.TRACE, "tcp %r: %s", conn, EVENT_NAMES[ev])
            return
        if ev & PHASES:
            new = (old & ~PHASES) | ev
        elif ev == CLOSED:
            new = CLOSED
        else:
            new = old | ev
        if new == old:
            return
        conn.events = new
        if plog.TRACE_ON:
            log.log(plog.TRACE, "tcp %r: %s", conn, EVENT_NAMES[ev])
        if not ev & _EVENTS_TIMED:
            return                          # CLOSED: no timer to set
        if ev == GUEST_SYN:
            # woken first when a SYN-ACK's RTO would be (connect() is quick, mostly):
            # then SYNACK_SENT's timer needs no wake-up of its own
            now = self.loop.now
            conn.deadline = now + HANDSHAKE_TIMEOUT
            self.table.arm(conn, now + RTO_INITIAL)
        elif ev == SYNACK_SENT or ev == SYN_SENT:
            now = self.loop.now
            conn.deadline = now + HANDSHAKE_TIMEOUT
            conn.rto = RTO_INITIAL if ev == SYNACK_SENT else RTO_INBOUND_SYN
            conn.rto_at = now + conn.rto
            self.table.arm(conn, conn.rto_at)
        elif ev == ESTABLISHED:
            conn.deadline = 0.0
            conn.rto_at = 0.0
            conn.retries = 0
        elif ev == FIN_SENT:
            self._arm_rto(conn)

    def _flag(self, conn: TcpConn, flags: int, on: bool = True) -> None:
        """Set (or clear) transient flags (table in `conn`), keeping the ACK queues, the
        socket's epoll interest and the timer in step."""
        old = conn.flags
        new = old | flags if on else old & ~flags
        if new == old:
            return
        conn.flags = new
        if plog.TRACE_ON:
            log.log(plog.TRACE, "tcp %r: %s%s", conn, "" if on else "~",
                    names(old ^ new, FLAG_NAMES))
        changed = old ^ new
        if not changed & _FLAGS_IN_STEP:
            return                          # DRAINED, SOCK_FULL, ...: nothing to keep
        if on:
            if changed & ACK_QUEUED:
                self.pending_acks.append(conn)
            if changed & ACK_DELAYED:
                self.delayed_acks.append(conn)
                if self._delack_timer is None:
                    self._delack_timer = self.loop.call_later(DELAYED_ACK, self._flush_delayed)
            if changed & (WND_CLOSED | DROPPED):
                # re-arm: polling a full socket makes the kernel wake us once it drains
                # (and OUT joins the interest of a socket registered without it)
                self.loop.modify(conn.fd, SOCK_EVENTS)
            if changed & WND_CLOSED:
                conn.wnd_poll = decide.next_poll(0.0)
                conn.wnd_poll_at = self.loop.now + conn.wnd_poll
                self.table.arm(conn, conn.wnd_poll_at)
        elif changed & WND_CLOSED:
            conn.wnd_poll = conn.wnd_poll_at = 0.0

    # ================================================================ guest side

    def on_frame(self, frame: memoryview, l3: int, l4: int, end: int, key: bytes) -> int | None:
        """A TCP segment from the guest, over IPv4 or IPv6 (the demux's `on_frame4` and
        `on_frame6` alike: one call less per segment than a method for each); true for
        data that ends a request (PSH), after which the guest mostly waits for us."""
        if end - l4 < 20:
            self.counters["runt"] += 1
            return
        sport, dport, seq, ack, doff, flags, window = _HDR.unpack_from(frame, l4)
        hlen = (doff >> 4) << 2
        data = l4 + hlen
        if hlen < 20 or data > end:
            self.counters["malformed"] += 1
            return
        plen = end - data
        if plog.TRACE_ON:
            log.log(plog.TRACE, "tcp guest %s:%d > :%d flags %#x seq %d ack %d len %d",
                    "v6" if frame[l3] >= 0x60 else "v4", sport, dport, flags, seq, ack, plen)
        conn = self.conns.get(key)
        if conn is None:
            v6 = frame[l3] >= 0x60
            # no flow exists with such a key, so checking new keys is enough
            gaddr, raddr = key_addrs(key, v6)
            if forbidden(v6, gaddr, raddr):
                self.counters["bad_addr"] += 1
                return
            if not sport or not dport:
                self.counters["port_zero"] += 1
                return
            if flags & (SYN | ACK | RST) == SYN:
                self._open_outbound(key, v6, gaddr, raddr, sport, dport, frame, l4, data,
                                    seq, window)
            elif not flags & RST:
                self._reset_unknown(key, v6, flags, seq, ack, plen)
            return
        conn.last = self.loop.now
        conn.frames_up += 1
        ev = conn.events
        if flags & RST:
            self._on_guest_rst(conn, seq)
            return
        if ev & OPENING:
            if not self._on_handshake(conn, frame, l4, data, seq, ack, flags, window):
                return
        if flags & ACK:
            self._on_guest_ack(conn, ack, window, plen)
            if conn.events & CLOSED:
                return
        if plen or flags & FIN:
            self._on_guest_data(conn, frame, seq, data, plen, flags)
            return flags & PSH            # a request's end: the guest waits (common.tap)
        elif seq != conn.rcv_nxt and conn.events & ESTABLISHED:
            # a zero-window probe or keep-alive (both use rcv_nxt - 1): it wants our ACK,
            # the only way the guest learns of a window update we sent and lost
            self.counters["probe"] += 1
            self._send_ack(conn)

    on_frame4 = on_frame6 = on_frame

    # ---------------------------------------------------------------- opening

    def _open_outbound(self, key: bytes, v6: bool, gaddr: bytes, raddr: bytes, gport: int,
                       rport: int, frame: memoryview, l4: int, data: int, seq: int,
                       window: int) -> None:
        if (raddr[0] == 0xFF) if v6 else (raddr[0] >= 224 or raddr == self.bcast4):
            self.counters["bad_dst"] += 1
            return
        table = self.table
        verdict = table.decide(PROTO_TCP, v6, gaddr, gport, raddr, rport)
        if verdict is not None and not verdict.allow:
            self.counters["denied"] += 1
            if table.gate.reset:
                self._rst_reply(key, v6, SYN, seq, 0, 0)
            return
        host_addr, host_port = self.map.to_host(v6, raddr, rport)
        try:
            mss, wscale = syn_options(frame[l4 + 20:data])
        except MalformedPacket:
            self.counters["malformed"] += 1
            return
        if not table.reserve(TCP, 1, by_guest=True):
            self.counters["limit"] += 1
            self._rst_reply(key, v6, SYN, seq, 0, 0)
            return
        try:
            sock = self._new_socket(v6)
        except OSError as exc:
            table.unreserve(1)
            self.counters["socket_fail"] += 1
            log.debug("tcp: no socket for new connection: %s", exc)
            self._rst_reply(key, v6, SYN, seq, 0, 0)
            return
        hdr = FlowHeader(v6, PROTO_TCP, raddr, gaddr, rport, gport)
        conn = TcpConn(key, sock, hdr, False, self.loop.now, (host_addr, host_port))
        conn.frames_up = 1                      # its SYN
        conn.rcv_nxt = (seq + 1) & M32
        conn.guest_mss = self._clamp_mss(mss, v6)
        conn.guest_wscale = min(wscale, 14) if wscale is not None else -1
        conn.snd_wnd = window          # SYN windows are never scaled
        table.add(conn, 1, verdict)
        self._event(conn, GUEST_SYN)
        # the guest's address as it uses it (the same as known, mostly: no object then)
        guest = self.guest
        if v6:
            if guest.addr6 is None or guest.addr6.packed != gaddr:
                guest.observe_addr6(IPv6Address(gaddr))
        elif guest.addr4 is None or guest.addr4.packed != gaddr:
            guest.observe_addr4(IPv4Address(gaddr))
        dest = self.map.host_sockaddr(v6, host_addr, host_port)
        err = sock.connect_ex(dest)
        if err == errno.EINPROGRESS:
            # a local peer's handshake ran inside connect(): asking again says it is
            # done, and the SYN-ACK goes out now, not after a wake-up for "writable"
            # (a remote peer answers EALREADY, one cheap call for a round trip's wait)
            err = sock.connect_ex(dest)
        if err == 0:
            # registered once connected: no interest in OUT until a full socket needs
            # it (`_flag`); data the far end already sent makes epoll report it at once
            self.loop.add(conn.fd, SOCK_EVENTS_OPEN, partial(self._sock_event, conn))
            self._connected(conn)
            if not conn.events & CLOSED:
                self._flag(conn, DRAINED)
        elif err in (errno.EALREADY, errno.EAGAIN):
            self.loop.add(conn.fd, SOCK_EVENTS, partial(self._sock_event, conn))
        else:
            self._connect_failed(conn, err)

    def _clamp_mss(self, mss: int | None, v6: bool) -> int:
        """The guest's MSS within [the protocol's minimum, our link's]: an MSS of 1
        would turn one window of data into as many frames as bytes."""
        lo, hi = (MSS_MIN6, self.mss6) if v6 else (MSS_MIN4, self.mss4)
        if not mss:
            return lo
        return lo if mss < lo else hi if mss > hi else mss

    def _new_socket(self, v6: bool) -> socket.socket:
        # the C type: socket.socket's __init__ and close() are Python code
        sock = raw_socket(socket.AF_INET6 if v6 else socket.AF_INET,
                          socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            if v6:      # an IPv4-mapped destination must never reach IPv4 (see mapping)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.map.bind_outbound(sock, v6)
        except OSError:
            sock.close()
            raise
        return sock

    def _connected(self, conn: TcpConn) -> None:
        """Our connect() for a guest SYN completed: answer SYN-ACK."""
        hdr = conn.hdr
        isn = initial_seq(hdr.src + hdr.sport.to_bytes(2, "big"),
                          hdr.dst + hdr.dport.to_bytes(2, "big"))
        conn.snd_una = isn
        conn.snd_nxt = conn.snd_max = (isn + 1) & M32
        conn.rcv_wnd = self._free_space(conn, True)
        gate = self.table.gate
        if gate is not None and gate.watch_dns(PROTO_TCP, hdr.src, hdr.sport):
            conn.dns = DnsStream(conn.snd_nxt)
        self._event(conn, SYNACK_SENT)
        self._send_synack(conn)

    def _our_wscale(self, conn: TcpConn) -> int:
        return OUR_WSCALE if conn.guest_wscale >= 0 else 0

    def _wnd_field(self, conn: TcpConn) -> int:
        """Our last estimated window as the header's 16-bit field, scaled."""
        return decide.window_field(conn.rcv_wnd, OUR_WSCALE if conn.guest_wscale >= 0 else 0)

    def _arm_rto(self, conn: TcpConn) -> None:
        """Start the retransmission (or persist) timer unless it is running."""
        if not conn.rto_at:
            conn.rto = conn.rto or RTO_INITIAL
            # the clock, not this turn's `now`: a long turn of the loop (batches of
            # frames, other flows) must not make a fresh timer look overdue
            conn.rto_at = rto_at = time.monotonic() + conn.rto
            if rto_at < conn.timer_at or not conn.timer_at:     # else woken early enough
                self.table.arm(conn, rto_at)

    def _send(self, conn: TcpConn, *, seq: int, flags: int, window: int, payload: int = 0,
              options: bytes = b"") -> bool:
        """One segment of this connection to the guest, acknowledging rcv_nxt unless it is
        a SYN of ours (which acknowledges nothing)."""
        conn.frames_down += 1
        return self.writer.write(conn.hdr, seq=seq, ack=0 if flags == SYN else conn.rcv_nxt,
                                 flags=flags, window=window, payload=payload,
                                 mss=conn.guest_mss, options=options)

    def _send_synack(self, conn: TcpConn) -> None:
        wscale = OUR_WSCALE if conn.guest_wscale >= 0 else None
        conn.ack_sent = conn.rcv_nxt            # it acknowledges the SYN: the first
        #                                         request's ACK may wait for the answer
        self._send(conn, seq=conn.snd_una, flags=SYN | ACK, window=min(conn.rcv_wnd, 0xFFFF),
                   options=self._syn_opts[conn.v6, wscale])

    def _connect_failed(self, conn: TcpConn, err: int) -> None:
        refused = err == errno.ECONNREFUSED
        self.counters["refused" if refused else "connect_fail"] += 1
        log.debug("tcp: connect failed: %s", errno.errorcode.get(err, err))
        self._send(conn, seq=0, flags=RST | ACK, window=0)
        self._close(conn, "refused" if refused else "error")

    def _on_handshake(self, conn: TcpConn, frame: memoryview, l4: int, data: int, seq: int,
                      ack: int, flags: int, window: int) -> bool:
        """A segment while opening; True when the connection is now established
        and the segment's ACK/data should be processed as usual."""
        ev = conn.events
        if ev & SYN_SENT:                      # inbound: waiting for the guest's SYN-ACK
            if not decide.synack_ok(flags, ack, conn.snd_nxt):
                return False
            try:
                mss, wscale = syn_options(frame[l4 + 20:data])
            except MalformedPacket:
                return False
            conn.rcv_nxt = (seq + 1) & M32
            conn.guest_mss = self._clamp_mss(mss, conn.v6)
            conn.guest_wscale = min(wscale, 14) if wscale is not None else -1
            conn.snd_una = ack
            conn.snd_wnd = window
            self._event(conn, ESTABLISHED)
            conn.rcv_wnd = self._free_space(conn, True)
            self._send_ack(conn)
            self._push(conn)
            return False
        if ev & GUEST_SYN:                     # a retransmitted SYN: still connecting
            return False
        # SYNACK_SENT: waiting for the guest's ACK
        if flags & SYN:
            self._send_synack(conn)
            return False
        if not decide.handshake_ack_ok(flags, ack, conn.snd_nxt):
            return False
        conn.snd_una = ack
        conn.snd_wnd = window << conn.guest_wscale if conn.guest_wscale > 0 else window
        self._event(conn, ESTABLISHED)
        self._push(conn)       # the far end may have spoken first (edge-triggered: no new event)
        return True

    # ---------------------------------------------------------------- established

    def _on_guest_ack(self, conn: TcpConn, ack: int, window: int, plen: int) -> None:
        wscale = conn.guest_wscale
        wnd = window << wscale if wscale > 0 else window
        una = conn.snd_una
        if ack == una:
            # nothing newly acknowledged: a window update, a duplicate ACK, or just the
            # ACK that the guest's data carries
            if wnd != conn.snd_wnd:
                grew = wnd > conn.snd_wnd
                conn.snd_wnd = wnd
                if grew:
                    if conn.snd_nxt == una:
                        conn.rto_at = 0.0          # stop probing: a fresh RTO for what we send
                        conn.rto = RTO_INITIAL
                    self._push(conn)
                return
            if plen == 0 and conn.snd_max != una:
                conn.dup_acks += 1
                if decide.starts_recovery(conn.dup_acks, bool(conn.flags & RECOVERING)):
                    self.counters["fast_retransmit"] += 1
                    self._flag(conn, RECOVERING)
                    conn.recover = conn.snd_max
                    self._retransmit_one(conn)
            return
        snd_max = conn.snd_max
        if ack == snd_max:
            n = (ack - una) & M32               # all we sent (the usual case): in bounds
        else:
            n = decide.acked(ack, una, snd_max)
            if n == decide.BEYOND:
                self.counters["ack_beyond"] += 1
                return
        ev = conn.events
        if ev & SOCK_EOF and decide.fin_acked(ev, ack, conn.fin_seq):
            n -= 1
            self._event(conn, FIN_ACKED)
        if n:
            conn.bytes_down += n
            kept = conn.kept
            if kept:
                # the answer we read (see conn): gone from the socket, nothing to discard
                k = len(kept)
                if n < k:
                    conn.kept = kept[n:]
                    n = 0
                else:
                    conn.kept = b""
                    n -= k
        if n:
            # _discard_acked's first recv written out: it is the only one, mostly
            try:
                got = conn.sock.recv_into(self._discard, min(n, DISCARD_ONE), MSG_TRUNC)
            except OSError as exc:
                log.debug("tcp: discarding acknowledged data: %s", exc)
            else:
                if 0 < got < n:
                    self._discard_acked(conn, n - got)
        conn.snd_una = ack
        nxt = conn.snd_nxt
        if ack != nxt and seq_after(ack, nxt):
            conn.snd_nxt = nxt = ack      # we had rewound, but the guest already had this
        conn.snd_wnd = wnd
        conn.dup_acks = 0
        conn.retries = 0
        conn.rto = RTO_INITIAL
        if conn.flags & RECOVERING:
            if seq_after(conn.recover, ack):
                self._retransmit_one(conn)      # partial ACK: the next hole
            else:
                self._flag(conn, RECOVERING, False)
        if snd_max != ack:
            conn.rto_at = rto_at = self.loop.now + conn.rto
            if rto_at < conn.timer_at or not conn.timer_at:
                self.table.arm(conn, rto_at)
        else:
            conn.rto_at = 0.0
        ev = conn.events
        if ev & FIN_ACKED and ev & GUEST_FIN:
            self._close(conn, "fin")
            return
        if conn.flags & DRAINED and nxt == ack and wnd > 0 and not ev & SOCK_EOF:
            # the usual case of a request-response exchange: all acknowledged, the
            # window open, and the last peek found nothing more (_push would stop there)
            return
        self._push(conn)

    def _retransmit_one(self, conn: TcpConn) -> None:
        """Resend the segment at snd_una (the hole the guest's ACKs point at) only."""
        outstanding = decide.retransmit_span(conn.events, conn.snd_una, conn.snd_max,
                                             conn.fin_seq)
        wnd_field = self._wnd_field(conn)
        if not outstanding:
            if conn.events & SOCK_EOF:
                self._send(conn, seq=conn.fin_seq, flags=FIN | ACK, window=wnd_field)
            return
        if conn.kept:                       # what is at snd_una is no longer in the socket
            self._send_kept(conn, wnd_field)
            return
        writer = self.writer
        if conn.v6:
            payload, seg_max = writer.payload6, PAYLOAD_MAX6 if self.gso else conn.guest_mss
        else:
            payload, seg_max = writer.payload4, PAYLOAD_MAX4 if self.gso else conn.guest_mss
        sock = conn.sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
            got = sock.recv_into(payload, min(outstanding, seg_max), MSG_PEEK)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, (conn.snd_nxt - conn.snd_una) & M32)
        except BlockingIOError:
            return
        except OSError as exc:
            self._sock_error(conn, exc.errno)
            return
        if got:
            self._send(conn, seq=conn.snd_una, flags=ACK, window=wnd_field, payload=got)

    def _send_kept(self, conn: TcpConn, wnd_field: int) -> None:
        """Send again, from our copy, the answer we read from the socket (`conn.kept`):
        the segment at snd_una."""
        kept = conn.kept
        n = len(kept)
        writer = self.writer
        (writer.payload6 if conn.v6 else writer.payload4)[:n] = kept
        self._send(conn, seq=conn.snd_una, flags=ACK | PSH, window=wnd_field, payload=n)

    def _discard_acked(self, conn: TcpConn, n: int) -> None:
        recv_into = conn.sock.recv_into
        view = self._discard
        try:
            while n > 0:
                got = recv_into(view, min(n, len(view)), MSG_TRUNC)
                if got <= 0:
                    break
                n -= got
        except OSError as exc:
            log.debug("tcp: discarding acknowledged data: %s", exc)

    def _on_guest_data(self, conn: TcpConn, frame: memoryview, seq: int, data: int,
                       plen: int, flags: int) -> None:
        ev = conn.events
        if ev & GUEST_FIN or not ev & ESTABLISHED:
            # after its FIN the guest can only be retransmitting: our ACK was lost
            self._send_ack(conn)
            return
        if seq != conn.rcv_nxt:
            skip = decide.trim(seq, conn.rcv_nxt, plen, bool(flags & FIN))
            if skip < 0:
                # a gap (make the guest resend), or a retransmission of what we have
                # (our ACK was lost): say where we are, now
                self.counters["out_of_order" if skip == decide.GAP else "duplicate"] += 1
                self._send_ack(conn)
                return
            data += skip
            plen -= skip
        if plen:
            try:
                if self._payload is None:
                    sent = conn.sock.send(frame[data:data + plen])
                else:
                    sent = conn.sock.sendmsg(self._payload(frame, data, data + plen))
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._sock_error(conn, exc.errno)
                return
            conn.rcv_nxt = (conn.rcv_nxt + sent) & M32
            conn.rcv_wnd -= sent
            conn.bytes_up += sent
            if sent < plen:
                self._flag(conn, DROPPED | ACK_QUEUED)
                self.counters["sock_full"] += 1
                return
        if flags & FIN:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & M32
            self._event(conn, GUEST_FIN)
            done = conn.events & FIN_ACKED
            if not done:
                # else the close() below sends the FIN: the guest acknowledged all we
                # read, and what it acknowledged was discarded, so nothing unread makes
                # it a reset (the usual end of a request: one system call less)
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self._send_ack(conn)
            if done:
                self._close(conn, "fin")
            return
        # a small segment: an answer may be on its way, and it will carry the ACK; a
        # larger one: a later segment's ACK acknowledges it too (decide.ACK_EVERY)
        # (_flag only for a change: the flag stays set across a run of exchanges)
        mss = conn.guest_mss             # decide.delay_ack written out
        unacked = (conn.rcv_nxt - conn.ack_sent) & M32
        if (unacked < 2 * mss if plen < (mss >> 1)
                else plen <= mss and unacked < ACK_EVERY * mss):
            if not conn.flags & ACK_DELAYED:
                self._flag(conn, ACK_DELAYED)
        elif not conn.flags & ACK_QUEUED:
            self._flag(conn, ACK_QUEUED)

    def _on_guest_rst(self, conn: TcpConn, seq: int) -> None:
        if not decide.rst_acceptable(seq, conn.rcv_nxt, conn.rcv_wnd, conn.events):
            self.counters["rst_out_of_window"] += 1
            return
        self._abort(conn, "rst")

    # ---------------------------------------------------------------- ACKs and window

    def _free_space(self, conn: TcpConn, unused: bool = False) -> int:
        """Bytes the socket's send buffer can still take: the window we offer; records
        whether the kernel counts it full (SOCK_FULL, see `decide.free_space`).
        `unused`: nothing was written to the socket yet, so nothing is queued."""
        sock = conn.sock
        try:
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            queued = (0 if unused
                      else _OUTQ.unpack(fcntl.ioctl(conn.fd, TIOCOUTQ, b"\0\0\0\0"))[0])
        except OSError:
            return 0
        free, full = decide.free_space(sndbuf, queued)
        if full != bool(conn.flags & SOCK_FULL):
            self._flag(conn, SOCK_FULL, full)
        return free

    def flush(self) -> None:
        """Send the ACKs the last batch of guest frames made due (unless data carried them)."""
        pending = self.pending_acks
        if not pending:
            return
        self.pending_acks = []
        for conn in pending:
            fl = conn.flags
            self._flag(conn, ACK_QUEUED, False)
            if not conn.events & CLOSED and (conn.ack_sent != conn.rcv_nxt or fl & DROPPED):
                self._send_ack(conn)
        if self._delack_timer is not None:
            # a bulk transfer: the ACK just sent covers the segments whose ACK waited, and
            # the timer would wake us only to find nothing due
            for conn in self.delayed_acks:
                if conn.ack_sent != conn.rcv_nxt and not conn.events & CLOSED:
                    break
            else:
                self._delack_timer.cancel()
                self._flush_delayed()

    def _flush_delayed(self) -> None:
        self._delack_timer = None
        delayed = self.delayed_acks
        self.delayed_acks = []
        for conn in delayed:
            self._flag(conn, ACK_DELAYED, False)
            if not conn.events & CLOSED and conn.ack_sent != conn.rcv_nxt:
                self._send_ack(conn)

    def _window(self, conn: TcpConn) -> int:
        """The window to offer: our running estimate while it is comfortable, else measured.

        The estimate only ever undercounts (the kernel frees space as the far
        end acknowledges, we only subtract what we write), so it is safe.
        """
        est = conn.rcv_wnd
        if est < WINDOW_RECHECK:
            est = conn.rcv_wnd = self._free_space(conn)
        return est

    def _send_ack(self, conn: TcpConn) -> None:
        free = self._window(conn)
        # SOCK_FULL is fresh whenever the window is small: _window measured it
        if conn.flags & SOCK_FULL:
            self._flag(conn, WND_CLOSED)
        conn.ack_sent = conn.rcv_nxt
        self._send(conn, seq=conn.snd_nxt, flags=ACK,
                   window=decide.window_field(free, self._our_wscale(conn)))

    def _window_update(self, conn: TcpConn) -> None:
        """The socket drained after we closed our window or dropped data."""
        dropped = conn.flags & DROPPED
        self._flag(conn, WND_CLOSED | DROPPED, False)
        conn.rcv_wnd = self._free_space(conn)
        self._send_ack(conn)
        if dropped:
            # three duplicates: the guest resends what we could not take, at once
            for _ in range(3):
                self._send(conn, seq=conn.snd_nxt, flags=ACK, window=self._wnd_field(conn))

    # ================================================================ host side

    def _sock_event(self, conn: TcpConn, events: int) -> None:
        ev = conn.events
        if ev & CLOSED:
            return
        conn.last = self.loop.now
        if ev & GUEST_SYN:
            if events & (OUT | _ERR | _HUP):
                # writable alone means connected; ask why only when it is not
                err = (conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                       if events & (_ERR | _HUP) else 0)
                if err:
                    self._connect_failed(conn, err)
                    return
                self._connected(conn)
                if not events & (IN | RDHUP | _HUP):
                    # nothing to read yet, and the first byte brings an event: no peek
                    # when the guest's ACK ends the handshake
                    self._flag(conn, DRAINED)
                    return
                ev = conn.events
            else:
                return
        if events & _ERR:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._sock_error(conn, err)
                return
        if events & (IN | RDHUP | _HUP):
            if events & (RDHUP | _HUP):
                self._event(conn, PEER_FIN)   # the end of the stream is queued: peek to it
            if ev & ESTABLISHED:
                self._push(conn, True)        # which ends DRAINED
            elif conn.flags & DRAINED:
                # still opening: the end of the handshake peeks (_on_handshake)
                self._flag(conn, DRAINED, False)
        if events & OUT and conn.flags & (WND_CLOSED | DROPPED):
            self._window_update(conn)

    def _push(self, conn: TcpConn, sock_event: bool = False) -> None:
        """Send what the socket holds beyond snd_nxt, within the guest's window.

        A socket event (`sock_event`) ends DRAINED, and most often the peek
        finds the queue short again: the flag then changes (through _flag)
        only if it ends up different, once, at the end."""
        ev = conn.events
        if not ev & ESTABLISHED:            # CLOSED too: it replaces every other event
            return
        room = conn.snd_wnd - ((conn.snd_nxt - conn.snd_una) & M32)   # decide.send_room
        drained = conn.flags & DRAINED      # as the flag stands
        if drained and sock_event and (ev & SOCK_EOF or room <= 0):
            self._flag(conn, DRAINED, False)  # no peek below: the event ends it now
            drained = 0
        if ev & SOCK_EOF:                   # no FIN to think of before the stream's end
            fin = decide.fin_state(ev, conn.fin_seq, conn.snd_nxt)
            if fin == decide.FIN_OUT:
                return
            if fin == decide.FIN_DUE:
                self._send_fin(conn, self._wnd_field(conn))
                return
        if room <= 0 or (drained and not sock_event):
            if room <= 0 and conn.snd_nxt == conn.snd_una:
                # the guest's window is shut and nothing is in flight: persist, so that
                # a lost window update cannot stall us (see _retransmit)
                self._arm_rto(conn)
            return
        # _wnd_field and decide.window_field written out: this runs for every answer
        wnd_field = conn.rcv_wnd >> OUR_WSCALE if conn.guest_wscale >= 0 else conn.rcv_wnd
        if not 0 <= wnd_field < 0xFFFF:
            wnd_field = 0 if wnd_field < 0 else 0xFFFF
        writer = self.writer
        if conn.v6:
            payload = writer.payload6
            seg_max = PAYLOAD_MAX6 if self.gso else conn.guest_mss
        else:
            payload = writer.payload4
            seg_max = PAYLOAD_MAX4 if self.gso else conn.guest_mss
        sock = conn.sock
        dns = conn.dns
        hdr = conn.hdr
        mss = conn.guest_mss
        # a tap that takes runs of frames: one peek fills the payloads of several
        # segments (not for a watched DNS stream, which reads each segment's bytes)
        can_hold = writer.can_hold
        multi = writer.free_payloads if can_hold and dns is None else None
        batch = PUSH_BATCH
        now_drained = False
        # a request's answer, mostly: read, not peeked, when nothing is in flight (see conn)
        keep = multi is None and conn.rr and conn.snd_nxt == conn.snd_una
        while room > 0:
            if not batch:
                # enough for one turn: the rest after the other flows had theirs (no
                # event would bring us back, the socket's edge has passed)
                self._push_later(conn)
                break
            try:
                if multi is not None:
                    bufs, want = multi(hdr.v6, room, seg_max, batch)
                    got = sock.recvmsg_into(bufs, 0, MSG_PEEK)[0]
                else:
                    want = room if room < seg_max else seg_max
                    if keep:
                        keep = False
                        if want > KEEP_MAX:
                            want = KEEP_MAX
                        got = sock.recv_into(payload, want)
                        if got:
                            conn.kept = bytes(payload[:got])
                            if got == want:
                                conn.rr = False   # more than an answer: peek from now on
                    else:
                        got = sock.recv_into(payload, want, MSG_PEEK)
            except BlockingIOError:
                now_drained = True
                break
            except OSError as exc:
                self._sock_error(conn, exc.errno)
                return
            if got == 0:
                conn.fin_seq = conn.snd_nxt
                self._event(conn, SOCK_EOF)
                self._send_fin(conn, wnd_field)
                break
            short = got < want              # the socket had less: its queue is empty now
            left = got
            with_fin = False
            while left:
                # the segments the peek filled, each up to seg_max; a short read ends
                # in the last one
                seg = left if left < seg_max else seg_max
                left -= seg
                batch -= 1
                last = short and not left
                if dns is not None:
                    self.table.gate.dns_stream(dns, conn.snd_nxt, payload[:seg])
                flags = ACK | PSH if last else ACK
                end = (conn.snd_nxt + seg) & M32
                # the far end's FIN came after all its data (EPOLLRDHUP): a short read
                # then took the last byte, and this segment carries our FIN too
                with_fin = (last and conn.events & PEER_FIN
                            and (not conn.events & SOCK_EOF or conn.fin_seq == end))
                if with_fin:
                    flags |= FIN
                    if not conn.events & SOCK_EOF:
                        conn.fin_seq = end
                        self._event(conn, SOCK_EOF)
                conn.frames_down += 1                           # _send, written out
                if not writer.write(hdr, seq=conn.snd_nxt, ack=conn.rcv_nxt, flags=flags,
                                    window=wnd_field, payload=seg, mss=mss, hold=True):
                    # the tap did not take it: as if lost, the guest's ACKs will tell
                    self.counters["tap_drop"] += 1
                if can_hold:
                    payload = writer.payload6 if hdr.v6 else writer.payload4  # next free
                conn.snd_nxt = end
                conn.ack_sent = conn.rcv_nxt
                room -= seg
            if with_fin:
                conn.snd_nxt = (end + 1) & M32
                if conn.events & FIN_SENT:
                    self._arm_rto(conn)         # again, after a rewind
                else:
                    self._event(conn, FIN_SENT)
                break
            if short and not conn.events & PEER_FIN:
                # the queue is empty for now; a new arrival brings a new event (edge)
                now_drained = True
                conn.rr = got <= KEEP_MAX     # an answer, likely: read the next one
                break
        if writer.held:                     # the segments held for one write
            dropped = writer.flush()
            if dropped:
                self.counters["tap_drop"] += dropped
        if now_drained != bool(drained):
            self._flag(conn, DRAINED, now_drained)
        nxt = conn.snd_nxt
        if 0 < ((nxt - conn.snd_max) & M32) < 0x80000000:      # seq_after(nxt, snd_max)
            conn.snd_max = nxt
        if nxt != conn.snd_una and not conn.rto_at:
            # _arm_rto written out (each answer of an exchange starts the timer)
            conn.rto = rto = conn.rto or RTO_INITIAL
            conn.rto_at = rto_at = time.monotonic() + rto
            if rto_at < conn.timer_at or not conn.timer_at:
                self.table.arm(conn, rto_at)

    def _push_later(self, conn: TcpConn) -> None:
        self._more.add(conn)
        if self._more_timer is None:
            self._more_timer = self.loop.call_later(0, self._push_more)

    def _push_more(self) -> None:
        self._more_timer = None
        more, self._more = self._more, set()
        for conn in more:
            if not conn.events & CLOSED:
                self._push(conn)

    def _send_fin(self, conn: TcpConn, wnd_field: int) -> None:
        self._send(conn, seq=conn.fin_seq, flags=FIN | ACK, window=wnd_field)
        conn.ack_sent = conn.rcv_nxt
        conn.snd_nxt = (conn.fin_seq + 1) & M32
        if seq_after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt
        if conn.events & FIN_SENT:
            self._arm_rto(conn)                 # again, after a rewind
        else:
            self._event(conn, FIN_SENT)

    def _rewind(self, conn: TcpConn) -> None:
        """Go back to the oldest unacknowledged byte: peek it again and resend."""
        conn.snd_nxt = conn.snd_una
        conn.dup_acks = 0
        self._flag(conn, RECOVERING | DRAINED, False)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            pass
        if conn.kept:
            # the socket's queue starts after the answer we read: that goes first, from
            # our copy, and the peek (offset 0) goes on after it
            self._send_kept(conn, self._wnd_field(conn))
            conn.snd_nxt = (conn.snd_una + len(conn.kept)) & M32

    def _sock_error(self, conn: TcpConn, err: int | None) -> None:
        """The socket failed (reset by the far end, or worse): reset the guest."""
        self.counters["sock_error"] += 1
        log.debug("tcp: socket error %s on %r", errno.errorcode.get(err or 0, err), conn)
        self._send(conn, seq=conn.snd_nxt, flags=RST | ACK, window=0)
        self._close(conn, "rst" if err in (errno.ECONNRESET, errno.EPIPE) else "error")

    # ---------------------------------------------------------------- inbound

    def accept(self, sock: socket.socket, peer: bytes, peer_port: int, to_port: int,
               v6: bool, to_addr: bytes | None = None) -> None:
        """A connection accepted on a forwarded port: open it towards the guest, at
        `to_addr` if the forward names one (else the guest's own address)."""
        guest_addr = self.guest.addr6 if v6 else self.guest.addr4
        if guest_addr is None and to_addr is None:
            self.counters["no_guest_addr"] += 1
            _close_abortive(sock)
            return
        gaddr = to_addr if to_addr is not None else guest_addr.packed
        src = self.map.to_guest_source(v6, peer)
        key = make_key(gaddr, src, to_port, peer_port)
        if key in self.conns:
            self.counters["collision"] += 1
            _close_abortive(sock)
            return
        table = self.table
        verdict = table.decide(PROTO_TCP, v6, gaddr, to_port, peer, peer_port, inbound=True)
        if verdict is not None and not verdict.allow:
            self.counters["denied"] += 1
            _close_abortive(sock)               # accepted already: a reset either way
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            _close_abortive(sock)
            return
        if not table.reserve(TCP, 1, by_guest=False):
            self.counters["limit"] += 1
            _close_abortive(sock)
            return
        hdr = FlowHeader(v6, PROTO_TCP, src, gaddr, peer_port, to_port)
        conn = TcpConn(key, sock, hdr, True, self.loop.now, (peer, peer_port))
        isn = initial_seq(src + peer_port.to_bytes(2, "big"), gaddr + to_port.to_bytes(2, "big"))
        conn.snd_una = isn
        conn.snd_nxt = conn.snd_max = (isn + 1) & M32
        conn.guest_wscale = 0
        conn.rcv_wnd = self._free_space(conn, True)
        table.add(conn, 1, verdict)
        self._event(conn, SYN_SENT)
        self.loop.add(conn.fd, SOCK_EVENTS, partial(self._sock_event, conn))
        self._send_syn(conn)

    def _send_syn(self, conn: TcpConn) -> None:
        self._send(conn, seq=conn.snd_una, flags=SYN, window=min(conn.rcv_wnd, 0xFFFF),
                   options=self._syn_opts[conn.v6, OUR_WSCALE])

    # ================================================================ timers and closing

    def _on_timer(self, conn: TcpConn, now: float) -> float:
        """The flow table's wake-up: what is due now, then when to come back."""
        why = decide.timed_out(now, conn.deadline, conn.last, IDLE_TIMEOUT)
        if why is not None:
            self.counters["handshake_timeout" if why == decide.HANDSHAKE else "idle_timeout"] += 1
            if why == decide.IDLE or conn.events & (GUEST_SYN | SYNACK_SENT):
                self._send(conn, seq=conn.snd_nxt, flags=RST | ACK, window=0)
            self._abort(conn, "timeout")
            return 0.0
        if conn.flags & WND_CLOSED and now >= conn.wnd_poll_at:
            conn.rcv_wnd = self._free_space(conn)
            if not conn.flags & SOCK_FULL:
                self._window_update(conn)
            else:
                conn.wnd_poll = decide.next_poll(conn.wnd_poll)
                conn.wnd_poll_at = now + conn.wnd_poll
        if conn.rto_at and now >= conn.rto_at:
            self._retransmit(conn, now)
            if conn.events & CLOSED:
                return 0.0
        return decide.next_wake(conn.deadline, conn.rto_at,
                                conn.wnd_poll_at if conn.flags & WND_CLOSED else 0.0,
                                coarse(conn.last + IDLE_TIMEOUT))

    def _retransmit(self, conn: TcpConn, now: float) -> None:
        action = decide.rto_action(conn.events, conn.snd_una, conn.snd_nxt, conn.snd_wnd,
                                   conn.retries, conn.fin_seq)
        if action == decide.RTO_PROBE:
            # zero-window probe (snd_una - 1, no data): the guest's answer repeats its window.
            # Answered probes are no failure; a silent guest ends at the idle timeout
            self.counters["window_probe"] += 1
            conn.rto = decide.backoff(conn.rto)
            conn.rto_at = now + conn.rto
            self._send(conn, seq=(conn.snd_una - 1) & M32, flags=ACK,
                       window=self._wnd_field(conn))
            return
        conn.retries += 1
        if action == decide.RTO_GIVE_UP:
            self.counters["retries_exceeded"] += 1
            self._send(conn, seq=conn.snd_nxt, flags=RST | ACK, window=0)
            self._abort(conn, "timeout")
            return
        conn.rto = decide.backoff(conn.rto)
        conn.rto_at = now + conn.rto
        if action == decide.RTO_SYN:
            self._send_syn(conn)
        elif action == decide.RTO_SYNACK:
            self._send_synack(conn)
        elif action == decide.RTO_REWIND:
            self.counters["rto_retransmit"] += 1
            self._rewind(conn)
            conn.rto_at = 0.0
            self._push(conn)
            if not conn.rto_at:
                conn.rto_at = now + conn.rto
        else:
            conn.rto_at = 0.0

    def _abort(self, conn: TcpConn, why: str) -> None:
        """Close with a reset towards the host-side peer."""
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        self._close(conn, why)

    def _close(self, conn: TcpConn, why: str) -> None:
        """The one place a connection ends (through the flow table, which calls
        `_release`); `why` goes to the flow log."""
        if not conn.events & CLOSED:
            self._event(conn, CLOSED)
            self.table.close(conn, why)

    def _release(self, conn: TcpConn) -> None:
        """The flow table's callback: the connection is gone, its socket goes too."""
        if not conn.events & CLOSED:                 # closed by the table (exit)
            self._event(conn, CLOSED)
        self.loop.forget(conn.fd)        # closing the (never duplicated) fd leaves epoll
        conn.sock.close()

    def _reset_unknown(self, key: bytes, v6: bool, flags: int, seq: int, ack: int,
                       plen: int) -> None:
        """A segment for no connection we know: answer RST."""
        self.counters["unknown"] += 1
        self._rst_reply(key, v6, flags, seq, ack, plen)

    def _rst_reply(self, key: bytes, v6: bool, flags: int, seq: int, ack: int,
                   plen: int) -> None:
        """The RST that answers a segment (a SYN we refuse, or for no connection)."""
        gaddr, raddr = key_addrs(key, v6)
        gport, rport = key_ports(key, v6)
        hdr = FlowHeader(v6, PROTO_TCP, raddr, gaddr, rport, gport)
        rseq, rack, rflags = decide.reset_reply(flags, seq, ack, plen)
        self.writer.write(hdr, seq=rseq, ack=rack, flags=rflags, window=0)

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._abort(conn, "exit")
        if self._more_timer is not None:
            self._more_timer.cancel()
        self._more.clear()
        if self._delack_timer is not None:
            self._delack_timer.cancel()
            self._delack_timer = None


def _close_abortive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()
