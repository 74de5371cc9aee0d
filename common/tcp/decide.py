"""The TCP translation's decisions as pure functions: numbers in, a decision out.

No sockets, no clock (times are arguments), no connection objects: what the
handler (`common.tcp.handler`) does with a segment, an ACK or a timer is
decided here from sequence numbers, sizes and states, so each rule can be
tested on its own (`tests/test_tcp_decide.py`).  The names of the states are
`common.tcp.conn`'s.
"""

from __future__ import annotations

from common.tcp.conn import (
    ESTABLISHED,
    M32,
    OPENING,
    SOCK_EOF,
    SYN_SENT,
    SYNACK_SENT,
)

RTO_INITIAL = 0.2
RTO_MAX = 10.0
MAX_RETRIES = 12               # retransmissions without progress before giving up
DUP_ACKS = 3                   # duplicate ACKs that start a fast retransmit
ACK_EVERY = 4                  # full-sized guest segments per ACK of a bulk transfer
WND_POLL_FIRST = 0.05          # first look at a full socket whose EPOLLOUT we wait for
WND_POLL_MAX = 1.0             # and the longest between two looks

_ACK, _SYN, _RST = 0x10, 0x02, 0x04


def seq_after(a: int, b: int) -> bool:
    """a > b in 32-bit sequence space."""
    return 0 < ((a - b) & M32) < 0x80000000


# ---------------------------------------------------------------- guest -> host

GAP = -1           # the segment starts after rcv_nxt: something was lost, ask again
DUPLICATE = -2     # everything in it was had already: our ACK was lost, say it again


def trim(seq: int, rcv_nxt: int, plen: int, fin: bool) -> int:
    """How many bytes at the front of a segment (`plen` payload bytes at `seq`, and a
    FIN after them if `fin`) we already had: 0 for an in-order segment, up to `plen`
    (then only its FIN is new); GAP or DUPLICATE when nothing in it can be taken."""
    offset = (seq - rcv_nxt) & M32
    if not offset:
        return 0
    if offset < 0x80000000:
        return GAP
    skip = (-offset) & M32
    if skip < plen:
        return skip
    if fin and skip == plen:
        return plen
    return DUPLICATE


def delay_ack(plen: int, mss: int, unacked: int) -> bool:
    """Whether the ACK of a segment of `plen` bytes may wait a moment (`unacked` bytes
    not acknowledged yet, this one's included).  A small segment's ACK waits for an
    answer to carry it, while less than two segments' worth is unacknowledged; a larger
    one's (up to the MSS) waits for more while at most ACK_EVERY - 1 segments' worth is,
    so a bulk transfer gets an ACK every ACK_EVERY segments (or when the delay ends).
    RFC 9293 3.8.6.3 asks for one at least every second full-sized segment (a SHOULD):
    each ACK costs a frame built by us and handled by the guest, and with passt's
    64 KiB segments the guest's window holds many more than ACK_EVERY of them.  A GSO
    segment of more than one MSS is acknowledged at once."""
    if plen < (mss >> 1):
        return unacked < 2 * mss
    return plen <= mss and unacked < ACK_EVERY * mss


def free_space(sndbuf: int, queued: int) -> tuple[int, bool]:
    """(bytes the socket's send buffer can still take: the window we offer, whether the
    kernel counts it full) from SO_SNDBUF and what is queued (TIOCOUTQ).  The kernel
    calls a stream socket writable while its free space is at least half of what is
    queued: only a full socket gets an EPOLLOUT when it drains, so only then may we
    close our window and wait for that."""
    free = sndbuf - queued - (sndbuf >> 4)
    return (free if free > 0 else 0), queued * 3 > sndbuf * 2


def window_field(free: int, wscale: int) -> int:
    """The 16-bit window field that offers `free` bytes under our window scale; none
    for a negative estimate (a guest that wrote beyond our window drives it there)."""
    field = free >> wscale
    return field if 0 <= field < 0xFFFF else 0 if field < 0 else 0xFFFF


def rst_acceptable(seq: int, rcv_nxt: int, rcv_wnd: int, events: int) -> bool:
    """A guest RST is taken anywhere in the window we advertised (RFC 5961 is for the
    open net), and anywhere while opening."""
    return bool(events & OPENING) or ((seq - rcv_nxt) & M32) <= max(rcv_wnd, 1)


def reset_reply(flags: int, seq: int, ack: int, plen: int) -> tuple[int, int, int]:
    """(seq, ack, flags) of the RST that answers a segment for no connection (RFC 9293,
    3.10.7.1): from its ACK if it has one, else acknowledging all it occupied."""
    if flags & _ACK:
        return ack, 0, _RST
    end = seq + plen + (1 if flags & _SYN else 0) + (1 if flags & 0x01 else 0)
    return 0, end & M32, _RST | _ACK


def synack_ok(flags: int, ack: int, snd_nxt: int) -> bool:
    """The guest's answer to our SYN (inbound) establishes the connection."""
    return flags & (_SYN | _ACK) == _SYN | _ACK and ack == snd_nxt


def handshake_ack_ok(flags: int, ack: int, snd_nxt: int) -> bool:
    """The guest's answer to our SYN-ACK (outbound) establishes the connection."""
    return bool(flags & _ACK) and ack == snd_nxt


# ---------------------------------------------------------------- host -> guest

BEYOND = -1        # an ACK for what we never sent


def acked(ack: int, snd_una: int, snd_max: int) -> int:
    """Sequence numbers a guest ACK newly acknowledges (0: none, a duplicate or a window
    update), or BEYOND."""
    n = (ack - snd_una) & M32
    if n > ((snd_max - snd_una) & M32):
        return BEYOND
    return n


def fin_acked(events: int, ack: int, fin_seq: int) -> bool:
    """Whether an ACK covers our FIN."""
    return bool(events & SOCK_EOF) and ack == (fin_seq + 1) & M32


def starts_recovery(dup_acks: int, recovering: bool) -> bool:
    """The duplicate ACK that starts a fast retransmit of the hole at snd_una."""
    return dup_acks == DUP_ACKS and not recovering


def send_room(snd_wnd: int, snd_una: int, snd_nxt: int) -> int:
    """Bytes the guest's window still has room for (<= 0: none)."""
    return snd_wnd - ((snd_nxt - snd_una) & M32)


FIN_NOT_YET, FIN_DUE, FIN_OUT = 0, 1, 2


def fin_state(events: int, fin_seq: int, snd_nxt: int) -> int:
    """Where our FIN stands: not yet (data before it, or no end of stream yet), due now
    (every byte before it went out, again after a rewind) or out (in flight or acked)."""
    if not events & SOCK_EOF:
        return FIN_NOT_YET
    if snd_nxt == fin_seq:
        return FIN_DUE
    if snd_nxt == (fin_seq + 1) & M32:
        return FIN_OUT
    return FIN_NOT_YET


def retransmit_span(events: int, snd_una: int, snd_max: int, fin_seq: int) -> int:
    """Data bytes a fast retransmit may resend from snd_una (0: only a FIN, if any)."""
    end = fin_seq if events & SOCK_EOF else snd_max
    n = (end - snd_una) & M32
    return 0 if n >= 0x80000000 else n


# ---------------------------------------------------------------- timers

(RTO_PROBE, RTO_GIVE_UP, RTO_SYN, RTO_SYNACK, RTO_REWIND, RTO_NOTHING) = range(6)


def rto_action(events: int, snd_una: int, snd_nxt: int, snd_wnd: int, retries: int,
               fin_seq: int) -> int:
    """What a retransmission timeout does, `retries` being the count before this one:

    RTO_PROBE     the guest's window is shut and nothing is in flight: a window probe
                  (no retry counted: an answered probe is no failure)
    RTO_GIVE_UP   MAX_RETRIES retransmissions made no progress: reset
    RTO_SYN       resend our SYN (inbound, opening)
    RTO_SYNACK    resend our SYN-ACK (outbound, opening)
    RTO_REWIND    go back to snd_una and send again (data and our FIN)
    RTO_NOTHING   nothing is outstanding any more: the timer stops
    """
    if (events & ESTABLISHED and snd_nxt == snd_una and snd_wnd <= 0
            and fin_state(events, fin_seq, snd_nxt) != FIN_OUT):
        return RTO_PROBE
    if retries + 1 > MAX_RETRIES:
        return RTO_GIVE_UP
    if events & SYN_SENT:
        return RTO_SYN
    if events & SYNACK_SENT:
        return RTO_SYNACK
    if events & ESTABLISHED and snd_nxt != snd_una:
        return RTO_REWIND
    return RTO_NOTHING


def backoff(rto: float) -> float:
    """The next retransmission timeout: doubled, up to RTO_MAX."""
    rto *= 2
    return rto if rto < RTO_MAX else RTO_MAX


HANDSHAKE, IDLE = "handshake", "idle"


def timed_out(now: float, deadline: float, last: float, idle: float) -> str | None:
    """Whether a connection ends now: its handshake deadline passed (HANDSHAKE), or it
    carried nothing for `idle` seconds (IDLE)."""
    if deadline and now >= deadline:
        return HANDSHAKE
    if now >= last + idle:
        return IDLE
    return None


def next_poll(interval: float) -> float:
    """The wait before the next look at a full socket: from WND_POLL_FIRST, doubling up
    to WND_POLL_MAX (EPOLLOUT is what normally ends the wait; this is the safety net)."""
    if not interval:
        return WND_POLL_FIRST
    interval *= 2
    return interval if interval < WND_POLL_MAX else WND_POLL_MAX


def next_wake(deadline: float, rto_at: float, wnd_poll_at: float, idle_at: float) -> float:
    """The earliest time a connection needs its timer: the first of its deadlines that is
    set (0 means unset), the idle one included (always set)."""
    t = idle_at
    for d in (deadline, rto_at, wnd_poll_at):
        if d and d < t:
            t = d
    return t
