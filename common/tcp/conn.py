"""One TCP connection between the guest and a host socket: its state and sequence space.

Rules of this module (after h11's): everything that changes a connection's
state is in this file or in `handler`'s methods named `_on_*`; nothing here
knows the mode (pasta or passt) or the tap backend.

Theory of operation
-------------------
A connection has two byte streams and we keep a copy of neither.

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
its timer.

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
it forward without resending what the guest already has.

Opening.  Guest SYN: a non-blocking connect() to the (mapped) destination;
when it completes we answer SYN-ACK with our MSS (from the MTU) and a window
scale, and the connection is established once the guest ACKs it; a failed
connect() answers RST.  Host connection (port forwarding): we send SYN to the
guest; its SYN-ACK establishes the connection, a RST closes the host socket
abortively.

Closing.  A FIN from the guest, once every byte before it reached the
socket, becomes shutdown(SHUT_WR) and is acknowledged.  End of file on the
socket, once every byte before it was sent, becomes our FIN (one sequence
number).  When both FINs are acknowledged, or either side resets, the socket
is closed and the connection forgotten.  RST from the guest closes the socket
with SO_LINGER 0, so the far end sees a reset; a reset or error on the socket
becomes RST to the guest.

State flags
-----------
The half-closes are independent, so the state is a set of flags rather than
one enum.  Transitions (event -> flags set):

    guest SYN (outbound)              -> CONNECTING
    connect() done                    -> SYNACK_SENT        (SYN-ACK to guest)
    guest ACK of SYN-ACK              -> ESTABLISHED
    accept() (inbound)                -> SYN_SENT           (SYN to guest)
    guest SYN-ACK                     -> ESTABLISHED        (ACK to guest)
    guest FIN, all data written       -> GUEST_FIN          (shutdown(SHUT_WR), ACK)
    socket EOF, all data sent         -> FIN_SENT           (FIN to guest)
    guest ACK of our FIN              -> FIN_ACKED
    GUEST_FIN and FIN_ACKED           -> closed
    RST either way, timeout, error    -> closed
"""

from __future__ import annotations

import socket
import time

from common.flowheader import FlowHeader

M32 = 0xFFFFFFFF

# state flags
CONNECTING = 0x001      # guest sent SYN, our connect() is in progress
SYNACK_SENT = 0x002     # we answered the guest's SYN, waiting for its ACK
SYN_SENT = 0x004        # host connection accepted, we sent SYN to the guest
ESTABLISHED = 0x008
GUEST_FIN = 0x010       # guest's FIN passed on to the socket (shutdown SHUT_WR)
SOCK_EOF = 0x020        # the socket reached end of file
FIN_SENT = 0x040        # we sent FIN to the guest
FIN_ACKED = 0x080       # the guest acknowledged our FIN
WND_CLOSED = 0x100      # we advertised a window smaller than one segment: update when it opens
DROPPED = 0x200         # we dropped in-window data the socket could not take
CLOSED = 0x400
ACK_QUEUED = 0x800      # an ACK is due at the end of this batch of guest frames
ACK_DELAYED = 0x2000    # an ACK is due in a moment, unless data carries it first
RECOVERING = 0x1000     # fast retransmit done, until everything sent before it is acknowledged
DRAINED = 0x4000        # the last peek found nothing more: wait for the socket to say otherwise
PEER_FIN = 0x8000       # the far end closed (EPOLLRDHUP): its FIN is queued after the data
SOCK_FULL = 0x10000     # the kernel counts the socket's send buffer as full (not writable)

OPENING = CONNECTING | SYNACK_SENT | SYN_SENT


def seq_after(a: int, b: int) -> bool:
    """a > b in 32-bit sequence space."""
    return 0 < ((a - b) & M32) < 0x80000000


class TcpConn:
    __slots__ = (
        "key", "sock", "fd", "flow", "state", "inbound",
        "rcv_nxt", "rcv_wnd", "ack_sent",
        "snd_una", "snd_nxt", "snd_max", "snd_wnd", "guest_wscale", "guest_mss", "fin_seq",
        "recover",
        "dup_acks", "last_ack", "rto", "rto_at", "retries",
        "deadline", "last_activity", "sock_event", "opened",
        "host", "host_port", "fid", "verdict", "dns", "ends",
        "bytes_up", "bytes_down", "frames_up", "frames_down",
    )

    def __init__(self, key: bytes, sock: socket.socket, flow: FlowHeader, inbound: bool) -> None:
        self.key = key
        self.sock = sock
        self.fd = sock.fileno()
        self.flow = flow
        self.inbound = inbound
        self.state = 0
        self.rcv_nxt = 0          # next sequence number expected from the guest
        self.rcv_wnd = 0          # free space in the socket's send buffer, as last estimated
        self.ack_sent = 0         # the rcv_nxt the guest last heard from us
        self.snd_una = 0          # oldest sequence number the guest has not acknowledged
        self.snd_nxt = 0          # next sequence number we send
        self.snd_max = 0          # highest sequence number sent so far, plus one
        self.recover = 0          # snd_max when fast recovery started
        self.snd_wnd = 0          # the guest's window, bytes (already scaled)
        self.guest_wscale = 0
        self.guest_mss = 536
        self.fin_seq = 0          # sequence number of our FIN, once sent
        self.dup_acks = 0
        self.last_ack = 0
        self.rto = 0.0
        self.rto_at = 0.0         # retransmission deadline, 0: none armed
        self.retries = 0
        self.deadline = 0.0       # handshake/close deadline, 0: none
        self.last_activity = 0.0
        self.sock_event = None    # the loop callback for our socket
        self.opened = time.monotonic()   # for `pesto --flows`
        self.host = b""           # the far end as the host sees it (packed), and its port
        self.host_port = 0
        self.fid = 0              # the flow log's id, and the policy's verdict (common.gate)
        self.verdict = None
        self.dns = None           # a DnsStream when it carries DNS answers to learn from
        self.ends = None          # (path, guest, host) as the flow log writes them, once made
        self.bytes_up = 0         # from the guest, taken by the socket
        self.bytes_down = 0       # to the guest, acknowledged by it
        self.frames_up = 0        # segments of this connection from the guest
        self.frames_down = 0      # segments we sent it (data, ACKs, FINs)

    def in_flight(self) -> int:
        """Bytes (and FIN) sent to the guest and not yet acknowledged."""
        return (self.snd_nxt - self.snd_una) & M32

    def __repr__(self) -> str:
        f = self.flow
        return f"<TcpConn {f.dst.hex()}:{f.dport} <-> {f.src.hex()}:{f.sport} {self.state:#x}>"
