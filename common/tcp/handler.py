"""TCP translation: guest segments <-> host stream sockets (see `conn` for the design).

The handler owns the connection table and is the only code that changes a
connection's state.  It talks to the outside through four narrow seams:

- `on_frame4/on_frame6(frame, l3, l4, end)`: a TCP segment from the guest,
  registered with the frame demux;
- `flush()`: called once per batch of guest frames, sends the ACKs that the
  batch made due (one per connection, however many segments it carried);
- `accept(sock, peer, to_port, v6)`: a host connection for a forwarded port;
- the loop: socket readiness (edge-triggered) and a periodic tick for
  retransmission, handshake and idle timeouts.

Frames go out through `SegmentWriter`; nothing here knows the tap backend.

What the guest may choose is bounded: its MSS is clamped to [536 or 1220, our
link's], and one call of `_push` sends at most PUSH_BATCH frames; a
connection with more to send is pushed again on the next turn of the loop
(`_push_later`), after every other event had its turn.  The table holds at
most `max_conns` connections, sized from the descriptors we may open
(`common.budget`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import socket
import struct
import time
from collections import Counter
from functools import partial
from ipaddress import IPv4Address, IPv6Address

from common import budget
from common import log as plog
from common.budget import FdBudget
from common.conf import Config
from common.dnsmsg import DnsStream
from common.flowheader import PROTO_TCP, FlowHeader
from common.flowinfo import tcp_record
from common.gate import Gate
from common.guest import GuestState
from common.loop import ET, IN, OUT, RDHUP, Loop
from common.mapping import AddressMap, forbidden
from common.packet.errors import MalformedPacket
from common.packet.tcp import parse_tcp_options
from common.tap import TapBackend
from common.tcp.conn import (
    ACK_DELAYED,
    ACK_QUEUED,
    CLOSED,
    CONNECTING,
    DRAINED,
    DROPPED,
    ESTABLISHED,
    FIN_ACKED,
    FIN_SENT,
    GUEST_FIN,
    M32,
    OPENING,
    PEER_FIN,
    RECOVERING,
    SOCK_EOF,
    SOCK_FULL,
    SYN_SENT,
    SYNACK_SENT,
    WND_CLOSED,
    TcpConn,
    seq_after,
)
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
MAX_CONNS = 65536              # explicit flow limit (and the descriptor budget)
MSS_MIN4, MSS_MIN6 = 536, 1220  # the guest's MSS is clamped to these (RFC 9293, RFC 8200)
PUSH_BATCH = 64                # frames one call of _push sends; the rest on a later turn
TICK = 0.05                    # timer resolution, seconds
RTO_INITIAL = 0.2
RTO_MAX = 10.0
MAX_RETRIES = 12               # retransmissions without progress before giving up
HANDSHAKE_TIMEOUT = 10.0       # SYN / SYN-ACK / connect()
IDLE_TIMEOUT = 7200.0          # no activity at all
IDLE_SCAN = 10.0
DELAYED_ACK = 0.001            # longest we hold the ACK of a small segment, seconds
WINDOW_RECHECK = 1 << 18       # measure the socket's free space again below this estimate

_HDR = struct.Struct("!HHIIBBH")
_OUTQ = struct.Struct("i")
_LINGER0 = struct.pack("ii", 1, 0)
SOCK_EVENTS = IN | OUT | RDHUP | ET


def _syn_options(mss: int, wscale: int | None) -> bytes:
    opts = struct.pack("!BBH", 2, 4, min(mss, 0xFFFF))
    if wscale is not None:
        opts += struct.pack("!BBBB", 1, 3, 3, wscale)
    return opts


class TcpHandler:
    def __init__(self, conf: Config, loop: Loop, tap: TapBackend, guest: GuestState,
                 addrmap: AddressMap | None = None, *, max_conns: int = MAX_CONNS,
                 fds: FdBudget | None = None, gate: Gate | None = None) -> None:
        self.conf = conf
        self.max_conns = max_conns
        self.fds = fds or budget.shared()         # one descriptor per connection
        self.loop = loop
        self.guest = guest
        self.gate = gate or Gate()
        self.map = addrmap or AddressMap(conf)
        self.writer = SegmentWriter(tap, conf.our_mac, guest)
        self.conns: dict[bytes, TcpConn] = {}
        self.pending_acks: list[TcpConn] = []
        self.delayed_acks: list[TcpConn] = []
        self._delack_timer = None
        self.timed: set[TcpConn] = set()          # conns with an armed deadline or RTO
        self.counters: Counter[str] = Counter()
        self.mss4 = conf.mtu - 40
        self.mss6 = conf.mtu - 60
        self.bcast4 = conf.ip4.network.broadcast_address.packed if conf.ip4 else b""
        self.gso = self.writer.can_gso
        # MSG_TRUNC discards without copying, but recv_into still wants a buffer this
        # large: an anonymous map is never touched, so it costs address space, not memory
        self._discard = memoryview(mmap.mmap(-1, 32 << 20))
        self.now = time.monotonic()
        self._tick_timer = loop.call_every(TICK, self._tick)
        self._idle_timer = loop.call_every(IDLE_SCAN, self._idle_scan)
        self._more: set[TcpConn] = set()          # conns whose _push stopped at the batch
        self._more_timer = None

    # ================================================================ guest side

    def on_frame4(self, frame: memoryview, l3: int, l4: int, end: int) -> None:
        if end - l4 < 20:
            self.counters["runt"] += 1
            return
        if l4 == l3 + 20:
            key = bytes(frame[l3 + 12:l3 + 24])
        else:
            key = bytes(frame[l3 + 12:l3 + 20]) + bytes(frame[l4:l4 + 4])
        self._segment(key, False, frame, l3, l4, end)

    def on_frame6(self, frame: memoryview, l3: int, l4: int, end: int) -> None:
        if end - l4 < 20:
            self.counters["runt"] += 1
            return
        if l4 == l3 + 40:
            key = bytes(frame[l3 + 8:l3 + 44])
        else:
            key = bytes(frame[l3 + 8:l3 + 40]) + bytes(frame[l4:l4 + 4])
        self._segment(key, True, frame, l3, l4, end)

    def _segment(self, key: bytes, v6: bool, frame: memoryview, l3: int, l4: int,
                 end: int) -> None:
        sport, dport, seq, ack, doff, flags, window = _HDR.unpack_from(frame, l4)
        hlen = (doff >> 4) << 2
        data = l4 + hlen
        if hlen < 20 or data > end:
            self.counters["malformed"] += 1
            return
        plen = end - data
        if plog.TRACE_ON:
            log.log(plog.TRACE, "tcp guest %s:%d > :%d flags %#x seq %d ack %d len %d",
                    "v6" if v6 else "v4", sport, dport, flags, seq, ack, plen)
        conn = self.conns.get(key)
        if conn is None:
            # no flow exists with such a key, so checking new keys is enough
            if forbidden(v6, key[:16], key[16:32]) if v6 else forbidden(v6, key[:4], key[4:8]):
                self.counters["bad_addr"] += 1
                return
            if not sport or not dport:
                self.counters["port_zero"] += 1
                return
            if flags & (SYN | ACK | RST) == SYN:
                self._open_outbound(key, v6, frame, l3, l4, data, seq, window)
            elif not flags & RST:
                self._reset_unknown(v6, frame, l3, sport, dport, seq, ack, flags, plen)
            return
        conn.last_activity = self.now
        conn.frames_up += 1
        st = conn.state
        if flags & RST:
            self._on_guest_rst(conn, seq)
            return
        if st & OPENING:
            if not self._on_handshake(conn, frame, l4, data, seq, ack, flags, window):
                return
        if flags & ACK:
            self._on_guest_ack(conn, ack, window, plen)
            if conn.state & CLOSED:
                return
        if plen or flags & FIN:
            self._on_guest_data(conn, frame, seq, data, plen, flags)
        elif seq != conn.rcv_nxt and conn.state & ESTABLISHED:
            # a zero-window probe or keep-alive (both use rcv_nxt - 1): it wants our ACK,
            # the only way the guest learns of a window update we sent and lost
            self.counters["probe"] += 1
            self._send_ack(conn)

    # ---------------------------------------------------------------- opening

    def _open_outbound(self, key: bytes, v6: bool, frame: memoryview, l3: int, l4: int,
                       data: int, seq: int, window: int) -> None:
        if len(self.conns) >= self.max_conns:
            self.counters["limit"] += 1
            self._rst_for_syn(v6, frame, l3, l4, seq)
            return
        if v6:
            gaddr, raddr = bytes(frame[l3 + 8:l3 + 24]), bytes(frame[l3 + 24:l3 + 40])
        else:
            gaddr, raddr = bytes(frame[l3 + 12:l3 + 16]), bytes(frame[l3 + 16:l3 + 20])
        gport, rport = struct.unpack_from("!HH", frame, l4)
        if (raddr[0] == 0xFF) if v6 else (raddr[0] >= 224 or raddr == self.bcast4):
            self.counters["bad_dst"] += 1
            return
        verdict = self.gate.check(PROTO_TCP, v6, gaddr, gport, raddr, rport)
        if not verdict.allow:
            self.counters["denied"] += 1
            if self.gate.reset:
                self._rst_for_syn(v6, frame, l3, l4, seq)
            return
        host_addr, host_port = self.map.to_host(v6, raddr, rport)
        try:
            opts = parse_tcp_options(frame[l4 + 20:data])
        except MalformedPacket:
            self.counters["malformed"] += 1
            return
        if not self.fds.take(by_guest=True):
            self.counters["limit"] += 1
            self._rst_for_syn(v6, frame, l3, l4, seq)
            return
        try:
            sock = self._new_socket(v6)
        except OSError as exc:
            self.fds.give()
            self.counters["socket_fail"] += 1
            log.debug("tcp: no socket for new connection: %s", exc)
            self._rst_for_syn(v6, frame, l3, l4, seq)
            return
        flow = FlowHeader(v6, PROTO_TCP, raddr, gaddr, rport, gport)
        conn = TcpConn(key, sock, flow, inbound=False)
        conn.host, conn.host_port = host_addr, host_port
        conn.frames_up = 1                      # its SYN
        conn.rcv_nxt = (seq + 1) & M32
        conn.guest_mss = self._clamp_mss(opts.mss, v6)
        conn.guest_wscale = min(opts.wscale, 14) if opts.wscale is not None else -1
        conn.snd_wnd = window          # SYN windows are never scaled
        conn.state = CONNECTING
        conn.last_activity = self.now
        conn.deadline = self.now + HANDSHAKE_TIMEOUT
        self.conns[key] = conn
        self.timed.add(conn)
        self.gate.opened(conn, verdict, tcp_record)
        if v6:
            self.guest.observe_addr6(IPv6Address(gaddr))
        else:
            self.guest.observe_addr4(IPv4Address(gaddr))
        conn.sock_event = partial(self._sock_event, conn)
        self.loop.add(conn.fd, SOCK_EVENTS, conn.sock_event)
        err = sock.connect_ex(self.map.host_sockaddr(v6, host_addr, host_port))
        if err == 0:
            self._connected(conn)
        elif err not in (errno.EINPROGRESS, errno.EAGAIN):
            self._connect_failed(conn, err)

    def _clamp_mss(self, mss: int | None, v6: bool) -> int:
        """The guest's MSS within [the protocol's minimum, our link's]: an MSS of 1
        would turn one window of data into as many frames as bytes."""
        lo, hi = (MSS_MIN6, self.mss6) if v6 else (MSS_MIN4, self.mss4)
        if not mss:
            return lo
        return lo if mss < lo else hi if mss > hi else mss

    def _new_socket(self, v6: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
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
        flow = conn.flow
        isn = initial_seq(flow.src + flow.sport.to_bytes(2, "big"),
                          flow.dst + flow.dport.to_bytes(2, "big"))
        conn.snd_una = isn
        conn.snd_nxt = conn.snd_max = (isn + 1) & M32
        conn.state = SYNACK_SENT
        conn.deadline = self.now + HANDSHAKE_TIMEOUT
        conn.rto = RTO_INITIAL
        conn.rto_at = self.now + conn.rto
        conn.rcv_wnd = self._free_space(conn)
        if self.gate.watch_dns(PROTO_TCP, flow.src, flow.sport):
            conn.dns = DnsStream(conn.snd_nxt)
        self._send_synack(conn)

    def _our_wscale(self, conn: TcpConn) -> int:
        return OUR_WSCALE if conn.guest_wscale >= 0 else 0

    def _wnd_field(self, conn: TcpConn) -> int:
        """Our last estimated window as the header's 16-bit field, scaled."""
        return min(conn.rcv_wnd >> self._our_wscale(conn), 0xFFFF)

    def _arm_rto(self, conn: TcpConn) -> None:
        """Start the retransmission (or persist) timer unless it is running."""
        if not conn.rto_at:
            conn.rto = conn.rto or RTO_INITIAL
            # the clock, not the last tick's `now`: a long turn of the loop (batches of
            # frames, other flows) must not make a fresh timer look overdue
            conn.rto_at = time.monotonic() + conn.rto
            self.timed.add(conn)

    def _send_synack(self, conn: TcpConn) -> None:
        conn.frames_down += 1
        wscale = OUR_WSCALE if conn.guest_wscale >= 0 else None
        mss = self.mss6 if conn.flow.v6 else self.mss4
        self.writer.send_ctrl(conn.flow, conn.snd_una, conn.rcv_nxt, SYN | ACK,
                              min(conn.rcv_wnd, 0xFFFF), _syn_options(mss, wscale))

    def _connect_failed(self, conn: TcpConn, err: int) -> None:
        self.counters["refused" if err == errno.ECONNREFUSED else "connect_fail"] += 1
        log.debug("tcp: connect failed: %s", errno.errorcode.get(err, err))
        flow = conn.flow
        self.writer.send_ctrl(flow, 0, conn.rcv_nxt, RST | ACK, 0)
        self._close(conn, "refused" if err == errno.ECONNREFUSED else "error")

    def _on_handshake(self, conn: TcpConn, frame: memoryview, l4: int, data: int, seq: int,
                      ack: int, flags: int, window: int) -> bool:
        """A segment while opening; True when the connection is now established
        and the segment's ACK/data should be processed as usual."""
        st = conn.state
        if st & SYN_SENT:                      # inbound: waiting for the guest's SYN-ACK
            if flags & (SYN | ACK) != SYN | ACK or ack != conn.snd_nxt:
                return False
            try:
                opts = parse_tcp_options(frame[l4 + 20:data])
            except MalformedPacket:
                return False
            conn.rcv_nxt = (seq + 1) & M32
            conn.guest_mss = self._clamp_mss(opts.mss, conn.flow.v6)
            conn.guest_wscale = min(opts.wscale, 14) if opts.wscale is not None else -1
            conn.snd_una = ack
            conn.snd_wnd = window
            conn.state = ESTABLISHED
            conn.deadline = 0.0
            conn.rto_at = 0.0
            conn.retries = 0
            conn.rcv_wnd = self._free_space(conn)
            self._send_ack(conn)
            self._push(conn)
            return False
        if st & CONNECTING:                    # a retransmitted SYN: still connecting
            return False
        # SYNACK_SENT: waiting for the guest's ACK
        if flags & SYN:
            self._send_synack(conn)
            return False
        if not flags & ACK or ack != conn.snd_nxt:
            return False
        conn.snd_una = ack
        conn.snd_wnd = window << conn.guest_wscale if conn.guest_wscale > 0 else window
        conn.state = ESTABLISHED
        conn.deadline = 0.0
        conn.rto_at = 0.0
        conn.retries = 0
        self._push(conn)       # the far end may have spoken first (edge-triggered: no new event)
        return True

    # ---------------------------------------------------------------- established

    def _on_guest_ack(self, conn: TcpConn, ack: int, window: int, plen: int) -> None:
        wscale = conn.guest_wscale
        wnd = window << wscale if wscale > 0 else window
        acked = (ack - conn.snd_una) & M32
        if acked:
            if acked > ((conn.snd_max - conn.snd_una) & M32):
                self.counters["ack_beyond"] += 1
                return
            st = conn.state
            data_acked = acked
            if st & SOCK_EOF and ack == (conn.fin_seq + 1) & M32:
                data_acked -= 1
                conn.state = st = st | FIN_ACKED
            if data_acked:
                conn.bytes_down += data_acked
                self._discard_acked(conn, data_acked)
            conn.snd_una = ack
            if seq_after(ack, conn.snd_nxt):
                # we had rewound, but the guest already had this: carry on from here
                conn.snd_nxt = ack
                if st & SOCK_EOF and ack == (conn.fin_seq + 1) & M32:
                    conn.state = st = st | FIN_SENT
            conn.snd_wnd = wnd
            conn.dup_acks = 0
            conn.retries = 0
            conn.rto = RTO_INITIAL
            if st & RECOVERING:
                if seq_after(conn.recover, ack):
                    self._retransmit_one(conn)      # partial ACK: the next hole
                else:
                    conn.state = st = st & ~RECOVERING
            conn.rto_at = self.now + conn.rto if conn.snd_max != ack else 0.0
            if st & FIN_ACKED and st & GUEST_FIN:
                self._close(conn)
                return
            self._push(conn)
            return
        if wnd != conn.snd_wnd:
            grew = wnd > conn.snd_wnd
            conn.snd_wnd = wnd
            if grew:
                if conn.snd_nxt == conn.snd_una:
                    conn.rto_at = 0.0          # stop probing: a fresh RTO for what we send
                    conn.rto = RTO_INITIAL
                self._push(conn)
            return
        if plen == 0 and conn.snd_max != conn.snd_una:
            conn.dup_acks += 1
            if conn.dup_acks == 3 and not conn.state & RECOVERING:
                self.counters["fast_retransmit"] += 1
                conn.state |= RECOVERING
                conn.recover = conn.snd_max
                self._retransmit_one(conn)

    def _retransmit_one(self, conn: TcpConn) -> None:
        """Resend the segment at snd_una (the hole the guest's ACKs point at) only."""
        st = conn.state
        data_end = conn.fin_seq if st & SOCK_EOF else conn.snd_max
        outstanding = (data_end - conn.snd_una) & M32
        flow = conn.flow
        wnd_field = self._wnd_field(conn)
        if outstanding == 0 or outstanding >= 0x80000000:
            if st & SOCK_EOF:
                self.writer.send_ctrl(flow, conn.fin_seq, conn.rcv_nxt, FIN | ACK, wnd_field)
            return
        writer = self.writer
        if flow.v6:
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
            conn.frames_down += 1
            writer.send(flow, conn.snd_una, conn.rcv_nxt, ACK, wnd_field, got, conn.guest_mss)

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
        st = conn.state
        if st & GUEST_FIN or not st & ESTABLISHED:
            # after its FIN the guest can only be retransmitting: our ACK was lost
            self._send_ack(conn)
            return
        offset = (seq - conn.rcv_nxt) & M32
        if offset:
            if offset < 0x80000000:            # starts after a gap: make the guest resend
                self.counters["out_of_order"] += 1
                self._send_ack(conn)
                return
            skip = (-offset) & M32             # starts before rcv_nxt: trim what we had
            if skip >= plen:
                if not (flags & FIN and skip == plen):
                    # a retransmission of what we have: our ACK was lost, say it again now
                    self.counters["duplicate"] += 1
                    self._send_ack(conn)
                    return
                skip = plen
            data += skip
            plen -= skip
        if plen:
            try:
                sent = conn.sock.send(frame[data:data + plen])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._sock_error(conn, exc.errno)
                return
            conn.rcv_nxt = (conn.rcv_nxt + sent) & M32
            conn.rcv_wnd -= sent
            conn.bytes_up += sent
            if sent < plen:
                conn.state |= DROPPED
                self.counters["sock_full"] += 1
                self._queue_ack(conn)
                return
        if flags & FIN:
            conn.rcv_nxt = (conn.rcv_nxt + 1) & M32
            conn.state |= GUEST_FIN
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._send_ack(conn)
            if conn.state & FIN_ACKED:
                self._close(conn)
            return
        unacked = (conn.rcv_nxt - conn.ack_sent) & M32
        if plen < (conn.guest_mss >> 1) and unacked < 2 * conn.guest_mss:
            # a small segment: an answer may be on its way, and it will carry the ACK
            self._delay_ack(conn)
        else:
            self._queue_ack(conn)

    def _on_guest_rst(self, conn: TcpConn, seq: int) -> None:
        # accept a reset anywhere in the window we advertised (RFC 5961 is for the open net)
        if ((seq - conn.rcv_nxt) & M32) > max(conn.rcv_wnd, 1) and not conn.state & OPENING:
            self.counters["rst_out_of_window"] += 1
            return
        self._abort(conn, "rst")

    # ---------------------------------------------------------------- ACKs and window

    def _free_space(self, conn: TcpConn) -> int:
        """Bytes the socket's send buffer can still take: the window we offer.

        Also records whether the kernel would call the socket full (writable
        needs free space of at least half what is queued): only then will it
        wake us with EPOLLOUT when the buffer drains, so only then may we
        close our window and wait for that wake-up.
        """
        sock = conn.sock
        try:
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            queued = _OUTQ.unpack(fcntl.ioctl(conn.fd, TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return 0
        if queued * 3 > sndbuf * 2:
            conn.state |= SOCK_FULL
        else:
            conn.state &= ~SOCK_FULL
        free = sndbuf - queued - (sndbuf >> 4)
        return free if free > 0 else 0

    def _queue_ack(self, conn: TcpConn) -> None:
        if not conn.state & ACK_QUEUED:
            conn.state |= ACK_QUEUED
            self.pending_acks.append(conn)

    def _delay_ack(self, conn: TcpConn) -> None:
        if not conn.state & ACK_DELAYED:
            conn.state |= ACK_DELAYED
            self.delayed_acks.append(conn)
            if self._delack_timer is None:
                self._delack_timer = self.loop.call_later(DELAYED_ACK, self._flush_delayed)

    def flush(self) -> None:
        """Send the ACKs the last batch of guest frames made due (unless data carried them)."""
        pending = self.pending_acks
        if not pending:
            return
        self.pending_acks = []
        for conn in pending:
            st = conn.state
            conn.state = st & ~ACK_QUEUED
            if not st & CLOSED and (conn.ack_sent != conn.rcv_nxt or st & DROPPED):
                self._send_ack(conn)

    def _flush_delayed(self) -> None:
        self._delack_timer = None
        delayed = self.delayed_acks
        self.delayed_acks = []
        for conn in delayed:
            st = conn.state
            conn.state = st & ~ACK_DELAYED
            if not st & CLOSED and conn.ack_sent != conn.rcv_nxt:
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
        wscale = self._our_wscale(conn)
        limit = 0xFFFF << wscale
        if free > limit:
            free = limit
        # SOCK_FULL is fresh whenever the window is small: _window measured it
        if conn.state & SOCK_FULL and not conn.state & WND_CLOSED:
            # re-arm: polling a full socket makes the kernel wake us once it drains
            conn.state |= WND_CLOSED
            self.loop.modify(conn.fd, SOCK_EVENTS)
            self.timed.add(conn)
        conn.ack_sent = conn.rcv_nxt
        conn.frames_down += 1
        self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, ACK, free >> wscale)

    def _window_update(self, conn: TcpConn) -> None:
        """The socket drained after we closed our window or dropped data."""
        st = conn.state
        dropped = st & DROPPED
        conn.state = st & ~(WND_CLOSED | DROPPED)
        conn.rcv_wnd = self._free_space(conn)
        self._send_ack(conn)
        if dropped:
            # three duplicates: the guest resends what we could not take, at once
            for _ in range(3):
                self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, ACK,
                                      self._wnd_field(conn))

    # ================================================================ host side

    def _sock_event(self, conn: TcpConn, events: int) -> None:
        st = conn.state
        if st & CLOSED:
            return
        conn.last_activity = self.now
        if st & CONNECTING:
            if events & (OUT | _ERR | _HUP):
                err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._connect_failed(conn, err)
                else:
                    self._connected(conn)
            return
        if events & _ERR:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._sock_error(conn, err)
                return
        if events & (IN | RDHUP | _HUP) and st & ESTABLISHED:
            st &= ~DRAINED
            if events & (RDHUP | _HUP):
                st |= PEER_FIN             # the end of the stream is in the queue: peek to it
            conn.state = st
            self._push(conn)
        if events & OUT and conn.state & (WND_CLOSED | DROPPED):
            self._window_update(conn)

    def _push(self, conn: TcpConn) -> None:
        """Send what the socket holds beyond snd_nxt, within the guest's window."""
        st = conn.state
        if st & (FIN_SENT | CLOSED) or not st & ESTABLISHED:
            return
        room = conn.snd_wnd - ((conn.snd_nxt - conn.snd_una) & M32)
        flow = conn.flow
        writer = self.writer
        wnd_field = self._wnd_field(conn)
        if st & SOCK_EOF and conn.snd_nxt == conn.fin_seq:
            self._send_fin(conn, wnd_field)
            return
        if room <= 0 or st & DRAINED:
            if room <= 0 and conn.snd_nxt == conn.snd_una:
                # the guest's window is shut and nothing is in flight: persist, so that
                # a lost window update cannot stall us (see _retransmit)
                self._arm_rto(conn)
            return
        if flow.v6:
            payload = writer.payload6
            seg_max = PAYLOAD_MAX6 if self.gso else conn.guest_mss
        else:
            payload = writer.payload4
            seg_max = PAYLOAD_MAX4 if self.gso else conn.guest_mss
        recv_into = conn.sock.recv_into
        mss = conn.guest_mss
        batch = PUSH_BATCH
        while room > 0:
            if not batch:
                # enough for one turn: the rest after the other flows had theirs (no
                # event would bring us back, the socket's edge has passed)
                self._push_later(conn)
                break
            batch -= 1
            want = room if room < seg_max else seg_max
            try:
                got = recv_into(payload, want, MSG_PEEK)
            except BlockingIOError:
                conn.state |= DRAINED
                break
            except OSError as exc:
                self._sock_error(conn, exc.errno)
                return
            if got == 0:
                conn.state |= SOCK_EOF
                conn.fin_seq = conn.snd_nxt
                self._send_fin(conn, wnd_field)
                break
            conn.frames_down += 1
            if conn.dns is not None:
                self.gate.dns_stream(conn.dns, conn.snd_nxt, payload[:got])
            if not writer.send(flow, conn.snd_nxt, conn.rcv_nxt,
                               ACK | PSH if got < want else ACK, wnd_field, got, mss):
                # the tap did not take it: as if lost, the guest's ACKs will tell
                self.counters["tap_drop"] += 1
            conn.snd_nxt = (conn.snd_nxt + got) & M32
            conn.ack_sent = conn.rcv_nxt
            room -= got
            if got < want and not conn.state & PEER_FIN:
                # the queue is empty for now; a new arrival brings a new event (edge)
                conn.state |= DRAINED
                break
        if seq_after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt
        if conn.snd_nxt != conn.snd_una:
            self._arm_rto(conn)

    def _push_later(self, conn: TcpConn) -> None:
        self._more.add(conn)
        if self._more_timer is None:
            self._more_timer = self.loop.call_later(0, self._push_more)

    def _push_more(self) -> None:
        self._more_timer = None
        more, self._more = self._more, set()
        for conn in more:
            if not conn.state & CLOSED:
                self._push(conn)

    def _send_fin(self, conn: TcpConn, wnd_field: int) -> None:
        conn.frames_down += 1
        self.writer.send_ctrl(conn.flow, conn.fin_seq, conn.rcv_nxt, FIN | ACK, wnd_field)
        conn.ack_sent = conn.rcv_nxt
        conn.state |= FIN_SENT
        conn.snd_nxt = (conn.fin_seq + 1) & M32
        if seq_after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt
        self._arm_rto(conn)

    def _rewind(self, conn: TcpConn) -> None:
        """Go back to the oldest unacknowledged byte: peek it again and resend."""
        conn.snd_nxt = conn.snd_una
        conn.dup_acks = 0
        conn.state &= ~(FIN_SENT | RECOVERING | DRAINED)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            pass

    def _sock_error(self, conn: TcpConn, err: int | None) -> None:
        """The socket failed (reset by the far end, or worse): reset the guest."""
        self.counters["sock_error"] += 1
        log.debug("tcp: socket error %s on %r", errno.errorcode.get(err or 0, err), conn)
        self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, RST | ACK, 0)
        self._close(conn, "rst" if err in (errno.ECONNRESET, errno.EPIPE) else "error")

    # ---------------------------------------------------------------- inbound

    def accept(self, sock: socket.socket, peer: bytes, peer_port: int, to_port: int,
               v6: bool, to_addr: bytes | None = None) -> None:
        """A connection accepted on a forwarded port: open it towards the guest, at
        `to_addr` if the forward names one (else the guest's own address)."""
        guest_addr = self.guest.addr6 if v6 else self.guest.addr4
        if (guest_addr is None and to_addr is None) or len(self.conns) >= self.max_conns:
            self.counters["limit" if guest_addr or to_addr else "no_guest_addr"] += 1
            _close_abortive(sock)
            return
        gaddr = to_addr if to_addr is not None else guest_addr.packed
        src = self.map.to_guest_source(v6, peer)
        key = gaddr + src + struct.pack("!HH", to_port, peer_port)
        if key in self.conns:
            self.counters["collision"] += 1
            _close_abortive(sock)
            return
        verdict = self.gate.check_inbound(PROTO_TCP, v6, gaddr, to_port, peer, peer_port)
        if not verdict.allow:
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
        if not self.fds.take(by_guest=False):
            self.counters["limit"] += 1
            _close_abortive(sock)
            return
        flow = FlowHeader(v6, PROTO_TCP, src, gaddr, peer_port, to_port)
        conn = TcpConn(key, sock, flow, inbound=True)
        conn.host, conn.host_port = peer, peer_port
        isn = initial_seq(src + peer_port.to_bytes(2, "big"), gaddr + to_port.to_bytes(2, "big"))
        conn.snd_una = isn
        conn.snd_nxt = conn.snd_max = (isn + 1) & M32
        conn.state = SYN_SENT
        conn.guest_wscale = 0
        conn.last_activity = self.now
        conn.deadline = self.now + HANDSHAKE_TIMEOUT
        conn.rto = 1.0
        conn.rto_at = self.now + conn.rto
        conn.rcv_wnd = self._free_space(conn)
        self.conns[key] = conn
        self.timed.add(conn)
        self.gate.opened(conn, verdict, tcp_record)
        conn.sock_event = partial(self._sock_event, conn)
        self.loop.add(conn.fd, SOCK_EVENTS, conn.sock_event)
        self._send_syn(conn)

    def _send_syn(self, conn: TcpConn) -> None:
        conn.frames_down += 1
        mss = self.mss6 if conn.flow.v6 else self.mss4
        self.writer.send_ctrl(conn.flow, conn.snd_una, 0, SYN, min(conn.rcv_wnd, 0xFFFF),
                              _syn_options(mss, OUR_WSCALE))

    # ================================================================ timers and closing

    def _tick(self) -> None:
        now = self.now = time.monotonic()
        if not self.timed:
            return
        for conn in list(self.timed):
            st = conn.state
            if st & CLOSED:
                self.timed.discard(conn)
                continue
            if conn.deadline and now >= conn.deadline:
                self.counters["handshake_timeout"] += 1
                if st & CONNECTING or st & SYNACK_SENT:
                    self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, RST | ACK, 0)
                self._abort(conn, "timeout")
                continue
            if st & WND_CLOSED:
                conn.rcv_wnd = self._free_space(conn)
                if not conn.state & SOCK_FULL:
                    self._window_update(conn)
            if conn.rto_at and now >= conn.rto_at:
                self._retransmit(conn, now)
            if not (conn.deadline or conn.rto_at or conn.state & WND_CLOSED):
                self.timed.discard(conn)

    def _retransmit(self, conn: TcpConn, now: float) -> None:
        st = conn.state
        if (st & ESTABLISHED and not st & FIN_SENT and conn.snd_nxt == conn.snd_una
                and conn.snd_wnd <= 0):
            # zero-window probe (snd_una - 1, no data): the guest's answer repeats its window.
            # Answered probes are no failure; a silent guest ends at the idle timeout
            self.counters["window_probe"] += 1
            conn.rto = min(conn.rto * 2, RTO_MAX)
            conn.rto_at = now + conn.rto
            self.writer.send_ctrl(conn.flow, (conn.snd_una - 1) & M32, conn.rcv_nxt, ACK,
                                  self._wnd_field(conn))
            return
        conn.retries += 1
        if conn.retries > MAX_RETRIES:
            self.counters["retries_exceeded"] += 1
            self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, RST | ACK, 0)
            self._abort(conn, "timeout")
            return
        conn.rto = min(conn.rto * 2, RTO_MAX)
        conn.rto_at = now + conn.rto
        st = conn.state
        if st & SYN_SENT:
            self._send_syn(conn)
        elif st & SYNACK_SENT:
            self._send_synack(conn)
        elif st & ESTABLISHED and conn.snd_nxt != conn.snd_una:
            self.counters["rto_retransmit"] += 1
            self._rewind(conn)
            conn.rto_at = 0.0
            self._push(conn)
            if not conn.rto_at:
                conn.rto_at = now + conn.rto
        else:
            conn.rto_at = 0.0

    def _idle_scan(self) -> None:
        limit = self.now - IDLE_TIMEOUT
        for conn in [c for c in self.conns.values() if c.last_activity < limit]:
            self.counters["idle_timeout"] += 1
            self.writer.send_ctrl(conn.flow, conn.snd_nxt, conn.rcv_nxt, RST | ACK, 0)
            self._abort(conn, "timeout")

    def _abort(self, conn: TcpConn, why: str) -> None:
        """Close with a reset towards the host-side peer."""
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        self._close(conn, why)

    def _close(self, conn: TcpConn, why: str = "fin") -> None:
        """The one place a connection ends; `why` goes to the flow log."""
        if conn.state & CLOSED:
            return
        self.gate.closed(conn, why, tcp_record)
        conn.state = CLOSED
        self.loop.remove(conn.fd)
        conn.sock.close()
        self.fds.give()
        conn.sock_event = None
        self.conns.pop(conn.key, None)
        self.timed.discard(conn)

    def _reset_unknown(self, v6: bool, frame: memoryview, l3: int, sport: int, dport: int,
                       seq: int, ack: int, flags: int, plen: int) -> None:
        """A segment for no connection we know: answer RST (RFC 793, 3.4)."""
        self.counters["unknown"] += 1
        self._rst_reply(v6, frame, l3, sport, dport, seq, ack, flags, plen)

    def _rst_reply(self, v6: bool, frame: memoryview, l3: int, sport: int, dport: int,
                   seq: int, ack: int, flags: int, plen: int) -> None:
        if v6:
            src, dst = bytes(frame[l3 + 24:l3 + 40]), bytes(frame[l3 + 8:l3 + 24])
        else:
            src, dst = bytes(frame[l3 + 16:l3 + 20]), bytes(frame[l3 + 12:l3 + 16])
        flow = FlowHeader(v6, PROTO_TCP, src, dst, dport, sport)
        if flags & ACK:
            self.writer.send_ctrl(flow, ack, 0, RST, 0)
        else:
            end_seq = seq + plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self.writer.send_ctrl(flow, 0, end_seq & M32, RST | ACK, 0)

    def _rst_for_syn(self, v6: bool, frame: memoryview, l3: int, l4: int, seq: int) -> None:
        sport, dport = struct.unpack_from("!HH", frame, l4)
        self._rst_reply(v6, frame, l3, sport, dport, seq, 0, SYN, 0)

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._abort(conn, "exit")
        self._tick_timer.cancel()
        self._idle_timer.cancel()
        if self._more_timer is not None:
            self._more_timer.cancel()
        self._more.clear()


_ERR = 0x008     # EPOLLERR
_HUP = 0x010     # EPOLLHUP


def _close_abortive(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()
