"""One TCP connection between the guest and a host socket: its state and sequence space.

Rules of this module (after h11's): a connection's state is two fields,
`events` (its lifecycle: what happened, in order, never undone) and `flags`
(transient conditions, set and cleared as they come and go), and each
changes only through one method of the handler, `_event` and `_flag`, which
keep the socket's epoll interest and the connection's timer in step and log
every change at --trace.  The tables below list every event and every flag;
the handler follows them.  Nothing here knows the mode (pasta or passt) or
the tap backend; the decisions themselves are pure functions in `decide`.

Theory of operation
-------------------
A connection has two byte streams and we keep a copy of neither, but for a
small answer (below).

Guest -> host.  The guest's segments carry sequence numbers in the guest's
space; `rcv_nxt` is the next one we expect.  An in-order segment is written
to the host socket at once; `rcv_nxt` advances by what the socket accepted,
and that is what we acknowledge, so an acknowledged byte is a byte the kernel
owns.  A segment that does not start at `rcv_nxt` is not stored: an old one
is trimmed, a future one (something was lost) is answered with a duplicate
ACK so the guest retransmits.  The window we advertise is the free space of
the socket's send buffer, zero while it is full; when it drains (EPOLLOUT)
we send a window update, followed by duplicate ACKs if we had to drop data
the guest had already sent, so it retransmits at once instead of waiting for
its timer.  A small segment's ACK waits a moment (DELAYED_ACK) for an answer
to carry it; any other waits only for the end of the batch of guest frames,
so a burst of segments costs one ACK.

Host -> guest.  Our own sequence space starts at an RFC 6528 ISN.  Socket
data is read with MSG_PEEK: with SO_PEEK_OFF set, each peek continues where
the last stopped, so the socket's receive queue *is* our retransmission
buffer.  `snd_una` is the oldest byte the guest has not acknowledged (the
first byte of the receive queue), `snd_nxt` the next we will send (the peek
offset).  When the guest acknowledges n bytes we discard them from the socket
(recv with MSG_TRUNC: no copy), which also moves the peek offset back by n.
We send only within the guest's window.  On three duplicate ACKs we resend
the one segment at `snd_una` (peek offset briefly back to 0), and again at
each partial ACK until everything sent before the loss is acknowledged
(NewReno, RFC 6582, without SACK).  On a retransmission timeout we rewind:
peek offset back to 0, `snd_nxt` back to `snd_una`, and send again; an ACK
beyond the rewound `snd_nxt` (up to `snd_max`, the highest ever sent) moves
it forward without resending what the guest already has.  Our FIN is one
sequence number after the data (`fin_seq`): it is resent like data, after a
rewind once the data before it went out again.

Small answers.  A request's answer would cost a recv() to discard once
acknowledged.  When nothing is in flight and the last read that emptied the
socket's queue took at most KEEP_MAX bytes (`rr`: answers, not a bulk
transfer), the next data is read, not peeked (at most KEEP_MAX bytes; a read
that fills that ends `rr`), and its copy kept (`kept`, the bytes from
`snd_una` on) until the guest acknowledges it: the ACK then costs no system
call.  The socket's queue starts after the kept bytes, and the peek offset,
which the kernel moves back by what a plain read takes, stays right; a
retransmission sends the kept bytes first, from the copy.

Opening.  Guest SYN: a non-blocking connect() to the (mapped) destination;
when it completes we answer SYN-ACK with our MSS (from the MTU) and a window
scale, and the connection is established once the guest ACKs it; a failed
connect() answers RST.  Host connection (port forwarding): we send SYN to the
guest; its SYN-ACK establishes the connection, a RST closes the host socket
abortively.  Either way the handshake must end within HANDSHAKE_TIMEOUT.

Closing.  A FIN from the guest, once every byte before it reached the
socket, becomes shutdown(SHUT_WR) and is acknowledged.  End of file on the
socket, once every byte before it was sent, becomes our FIN.  When both FINs
are acknowledged, whichever came first (both at once is a simultaneous
close, nothing special), or either side resets, the socket is closed and the
connection forgotten.  RST from the guest closes the socket with SO_LINGER
0, so the far end sees a reset; a reset or error on the socket becomes RST
to the guest; so does a connection idle for IDLE_TIMEOUT.

Timers.  One wake-up per connection in the flow table (`common.flow`),
asked for the earliest of: the handshake deadline, the retransmission
timeout (`rto_at`), the next look at a full socket (`wnd_poll_at`) and, to
the second, the idle deadline.  An established connection with nothing in
flight asks only for the idle deadline, two hours away.

Events (`events`): the lifecycle, in the order it happens
---------------------------------------------------------
The opening events replace one another; the closing ones accumulate on top
of ESTABLISHED; CLOSED replaces everything.

    event        when                                        then
    GUEST_SYN    a guest SYN for a new flow (outbound)       connect(); handshake deadline
    SYNACK_SENT  our connect() completed                     SYN-ACK to the guest; RTO
    SYN_SENT     accept() on a forwarded port (inbound)      SYN to the guest; RTO, deadline
    ESTABLISHED  the guest's ACK of our SYN-ACK, or its       deadline and RTO off; data flows
                 SYN-ACK to our SYN
    GUEST_FIN    guest FIN, every byte before it written      shutdown(SHUT_WR), ACK
    PEER_FIN     EPOLLRDHUP: the far end's FIN is queued      peek on to the end of the stream
    SOCK_EOF     a peek reached the end of the stream         fin_seq fixed: FIN after the data
    FIN_SENT     our FIN went to the guest                    the RTO covers it
    FIN_ACKED    the guest acknowledged our FIN
    CLOSED       GUEST_FIN and FIN_ACKED; RST either way;     socket closed (with a reset but
                 a timeout; a socket error                    after both FINs), flow forgotten

Flags (`flags`): transient conditions
-------------------------------------
    flag         set when                                   cleared when
    ACK_QUEUED   guest data or FIN wants our ACK            the batch of frames ends (flush)
    ACK_DELAYED  a small segment, or a larger one before    DELAYED_ACK later (if still due)
                 the ACK_EVERY-th, wants our ACK
    WND_CLOSED   we advertised a window while the socket    it drains: EPOLLOUT or a look at
                 was full (EPOLLOUT re-armed, timer armed)  the socket finds room; update sent
    DROPPED      the socket took less than the guest sent   with WND_CLOSED's window update
                 (EPOLLOUT re-armed)                        (three duplicate ACKs follow it)
    SOCK_FULL    a measurement: the kernel counts the send  the next measurement finds room
                 buffer full (only then comes EPOLLOUT)
    RECOVERING   the third duplicate ACK (fast retransmit)  everything sent before it is
                                                            acknowledged, or a rewind
    DRAINED      a peek found nothing more to send, or      a socket event (data or its end),
                 connect() completed with nothing to read   or a rewind
"""

from __future__ import annotations

import socket

from common.flow import TCP, TapFlow
from common.flowheader import FlowHeader

M32 = 0xFFFFFFFF

# events
GUEST_SYN = 0x001      # guest sent SYN, our connect() is in progress
SYNACK_SENT = 0x002    # we answered the guest's SYN, waiting for its ACK
SYN_SENT = 0x004       # host connection accepted, we sent SYN to the guest
ESTABLISHED = 0x008
GUEST_FIN = 0x010      # guest's FIN passed on to the socket (shutdown SHUT_WR)
PEER_FIN = 0x020       # the far end closed (EPOLLRDHUP): its FIN is queued after the data
SOCK_EOF = 0x040       # a peek reached the end of the stream
FIN_SENT = 0x080       # we sent FIN to the guest
FIN_ACKED = 0x100      # the guest acknowledged our FIN
CLOSED = 0x200

OPENING = GUEST_SYN | SYNACK_SENT | SYN_SENT
PHASES = OPENING | ESTABLISHED          # setting one of these replaces the others

# flags
ACK_QUEUED = 0x01      # an ACK is due at the end of this batch of guest frames
ACK_DELAYED = 0x02     # an ACK is due in a moment, unless data carries it first
WND_CLOSED = 0x04      # we advertised a window while the socket was full: update when it drains
DROPPED = 0x08         # we dropped in-window data the socket could not take
SOCK_FULL = 0x10       # the kernel counts the socket's send buffer as full (not writable)
RECOVERING = 0x20      # fast retransmit done, until everything sent before it is acknowledged
DRAINED = 0x40         # the last peek found nothing more: wait for the socket to say otherwise

EVENT_NAMES = {GUEST_SYN: "GUEST_SYN", SYNACK_SENT: "SYNACK_SENT", SYN_SENT: "SYN_SENT",
               ESTABLISHED: "ESTABLISHED", GUEST_FIN: "GUEST_FIN", PEER_FIN: "PEER_FIN",
               SOCK_EOF: "SOCK_EOF", FIN_SENT: "FIN_SENT", FIN_ACKED: "FIN_ACKED",
               CLOSED: "CLOSED"}
FLAG_NAMES = {ACK_QUEUED: "ACK_QUEUED", ACK_DELAYED: "ACK_DELAYED", WND_CLOSED: "WND_CLOSED",
              DROPPED: "DROPPED", SOCK_FULL: "SOCK_FULL", RECOVERING: "RECOVERING",
              DRAINED: "DRAINED"}


def names(bits: int, table: dict[int, str]) -> str:
    return "|".join(n for b, n in table.items() if bits & b) or "-"


class TcpConn(TapFlow):
    __slots__ = (
        "sock", "fd", "events", "flags",
        "rcv_nxt", "rcv_wnd", "ack_sent",
        "snd_una", "snd_nxt", "snd_max", "snd_wnd", "guest_wscale", "guest_mss", "fin_seq",
        "recover", "dup_acks", "rto", "rto_at", "retries", "deadline",
        "wnd_poll", "wnd_poll_at", "dns", "kept", "rr",
    )

    def __init__(self, key: bytes, sock: socket.socket, hdr: FlowHeader, inbound: bool,
                 now: float, host: tuple[bytes, int]) -> None:
        super().__init__(TCP, key, hdr.v6, inbound, now, host)
        self.hdr = hdr            # frames to the guest: from the remote as it knows it
        self.sock = sock
        self.fd = sock.fileno()
        self.events = 0
        self.flags = 0
        self.rcv_nxt = 0          # next sequence number expected from the guest
        self.rcv_wnd = 0          # free space in the socket's send buffer, as last estimated
        self.ack_sent = 0         # the rcv_nxt the guest last heard from us
        self.snd_una = 0          # oldest sequence number the guest has not acknowledged
        self.snd_nxt = 0          # next sequence number we send
        self.snd_max = 0          # highest sequence number sent so far, plus one
        self.recover = 0          # snd_max when fast recovery started
        self.snd_wnd = 0          # the guest's window, bytes (already scaled)
        self.guest_wscale = 0     # -1: the guest does not scale
        self.guest_mss = 536
        self.fin_seq = 0          # sequence number of our FIN, once SOCK_EOF
        self.dup_acks = 0
        self.rto = 0.0
        self.rto_at = 0.0         # retransmission (or persist) deadline, 0: none
        self.retries = 0
        self.deadline = 0.0       # handshake deadline, 0: none
        self.wnd_poll = 0.0       # next look at a full socket: in this long, at that time
        self.wnd_poll_at = 0.0
        self.dns = None           # a DnsStream when it carries DNS answers to learn from
        self.kept = b""           # an answer read from the socket, from snd_una on
        self.rr = True            # the last read that emptied the queue was small (see above)

    def __repr__(self) -> str:
        h = self.hdr
        return (f"<TcpConn {h.dst.hex()}:{h.dport} <-> {h.src.hex()}:{h.sport} "
                f"{names(self.events, EVENT_NAMES)} {names(self.flags, FLAG_NAMES)}>")
