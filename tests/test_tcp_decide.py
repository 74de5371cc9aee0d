"""The TCP translation's decisions (`common.tcp.decide`): numbers in, a decision out."""

from __future__ import annotations

import pytest

from common.tcp import decide as d
from common.tcp.conn import (
    ESTABLISHED,
    FIN_SENT,
    GUEST_FIN,
    GUEST_SYN,
    PEER_FIN,
    SOCK_EOF,
    SYN_SENT,
    SYNACK_SENT,
)

M = 0xFFFFFFFF
ACK, SYN, FIN, RST = 0x10, 0x02, 0x01, 0x04


# ---------------------------------------------------------------- guest -> host

@pytest.mark.parametrize("seq, rcv_nxt, plen, fin, want", [
    (1000, 1000, 100, False, 0),              # in order
    (900, 1000, 200, False, 100),             # overlaps what we had: skip the old part
    (900, 1000, 100, True, 100),              # only its FIN is new
    (900, 1000, 100, False, d.DUPLICATE),     # all old: our ACK was lost
    (800, 1000, 100, True, d.DUPLICATE),      # all old, FIN included
    (1100, 1000, 100, False, d.GAP),          # a hole before it
    (M - 49, 50, 200, False, 100),            # across the wrap
    (10, M - 9, 5, False, d.GAP),             # ahead across the wrap
])
def test_trim(seq, rcv_nxt, plen, fin, want):
    assert d.trim(seq, rcv_nxt, plen, fin) == want


def test_delayed_ack_for_a_small_segment_or_until_every_fourth_full_one():
    mss = 1460
    assert d.ACK_EVERY == 4
    assert d.delay_ack(100, mss, 100)
    assert not d.delay_ack(100, mss, 2 * mss)           # two segments unacknowledged
    assert d.delay_ack(100, mss, 2 * mss - 1)
    assert d.delay_ack(mss, mss, mss)                   # the first full-sized segment waits
    assert d.delay_ack(mss // 2, mss, mss // 2)         # so does a mid-sized one
    assert d.delay_ack(mss, mss, 3 * mss)               # and the third
    assert not d.delay_ack(mss, mss, 4 * mss)           # the fourth one is acknowledged
    assert not d.delay_ack(mss // 2, mss, 4 * mss)      # four segments' worth
    assert d.delay_ack(mss // 2, mss, 4 * mss - 1)
    assert not d.delay_ack(3 * mss, mss, 3 * mss)       # a large (GSO) segment at once
    assert not d.delay_ack(mss + 1, mss, mss + 1)


def test_free_space_and_when_the_kernel_counts_the_socket_full():
    sndbuf = 16 * 4096
    free, full = d.free_space(sndbuf, 0)
    assert free == sndbuf - sndbuf // 16 and not full
    free, full = d.free_space(sndbuf, sndbuf)           # nothing left: a zero window
    assert free == 0 and full
    # writable (no EPOLLOUT to wait for) while free space >= half of what is queued
    assert not d.free_space(sndbuf, sndbuf * 2 // 3)[1]
    assert d.free_space(sndbuf, sndbuf * 2 // 3 + 1)[1]


def test_window_field_is_scaled_and_clamped():
    assert d.window_field(0, 8) == 0                   # zero window
    assert d.window_field(65535 * 256, 8) == 0xFFFF
    assert d.window_field(1 << 30, 8) == 0xFFFF
    assert d.window_field(1000, 0) == 1000
    assert d.window_field(255, 8) == 0                 # less than one unit: closed
    assert d.window_field(-1000, 8) == 0               # the guest wrote beyond it


def test_rst_is_taken_in_the_window_and_anywhere_while_opening():
    assert d.rst_acceptable(1000, 1000, 0, ESTABLISHED)
    assert d.rst_acceptable(1500, 1000, 500, ESTABLISHED)
    assert not d.rst_acceptable(1501, 1000, 500, ESTABLISHED)
    assert not d.rst_acceptable(999, 1000, 500, ESTABLISHED)
    assert d.rst_acceptable(12345, 1000, 500, SYN_SENT)


def test_reset_reply_to_a_segment_for_no_connection():
    assert d.reset_reply(ACK, 5, 777, 10) == (777, 0, RST)
    assert d.reset_reply(SYN, 100, 0, 0) == (0, 101, RST | ACK)
    assert d.reset_reply(FIN, 100, 0, 10) == (0, 111, RST | ACK)
    assert d.reset_reply(SYN | FIN, M, 0, 3) == (0, 4, RST | ACK)


def test_inbound_accept_the_guests_synack_establishes():
    # we sent SYN at isn 500: snd_nxt 501
    assert d.synack_ok(SYN | ACK, 501, 501)
    assert not d.synack_ok(SYN, 501, 501)               # no ACK
    assert not d.synack_ok(SYN | ACK, 500, 501)         # does not ack our SYN
    assert not d.synack_ok(ACK, 501, 501)


def test_outbound_the_guests_ack_of_our_synack_establishes():
    assert d.handshake_ack_ok(ACK, 501, 501)
    assert not d.handshake_ack_ok(ACK, 502, 501)
    assert not d.handshake_ack_ok(0, 501, 501)


# ---------------------------------------------------------------- host -> guest

def test_acked():
    assert d.acked(1100, 1000, 1500) == 100
    assert d.acked(1000, 1000, 1500) == 0               # duplicate or window update
    assert d.acked(1501, 1000, 1500) == d.BEYOND        # never sent
    assert d.acked(999, 1000, 1500) == d.BEYOND         # old: also out of range
    assert d.acked(10, M - 9, 20) == 20                 # across the wrap
    # after a rewind snd_nxt < snd_max: an ACK up to snd_max is still fine
    assert d.acked(1400, 1000, 1500) == 400


def test_fin_acked_only_once_our_fin_exists():
    assert d.fin_acked(ESTABLISHED | SOCK_EOF | FIN_SENT, 2001, 2000)
    assert not d.fin_acked(ESTABLISHED | SOCK_EOF | FIN_SENT, 2000, 2000)
    assert not d.fin_acked(ESTABLISHED, 2001, 2000)
    assert d.fin_acked(SOCK_EOF, 0, M)


def test_fast_retransmit_starts_on_the_third_duplicate_only():
    assert not d.starts_recovery(2, False)
    assert d.starts_recovery(3, False)
    assert not d.starts_recovery(4, False)
    assert not d.starts_recovery(3, True)


def test_send_room_zero_window():
    assert d.send_room(1000, 0, 0) == 1000
    assert d.send_room(1000, 0, 1000) == 0
    assert d.send_room(0, 0, 0) == 0                    # zero window: nothing to send
    assert d.send_room(500, 0, 1000) < 0                # window shrank under what is out


def test_fin_state_retransmission():
    ev = ESTABLISHED | SOCK_EOF
    assert d.fin_state(ESTABLISHED, 2000, 2000) == d.FIN_NOT_YET     # no end of stream
    assert d.fin_state(ev, 2000, 1500) == d.FIN_NOT_YET             # data before it
    assert d.fin_state(ev, 2000, 2000) == d.FIN_DUE
    assert d.fin_state(ev | FIN_SENT, 2000, 2001) == d.FIN_OUT
    # a rewind to before the FIN makes it due again once the data went out
    assert d.fin_state(ev | FIN_SENT, 2000, 1000) == d.FIN_NOT_YET
    assert d.fin_state(ev | FIN_SENT, 2000, 2000) == d.FIN_DUE
    assert d.fin_state(ev, M, M) == d.FIN_DUE
    assert d.fin_state(ev, M, 0) == d.FIN_OUT                       # across the wrap


def test_retransmit_span_stops_before_our_fin():
    assert d.retransmit_span(ESTABLISHED, 1000, 3000, 0) == 2000
    assert d.retransmit_span(ESTABLISHED | SOCK_EOF, 1000, 3001, 3000) == 2000
    assert d.retransmit_span(ESTABLISHED | SOCK_EOF, 3000, 3001, 3000) == 0   # FIN only


# ---------------------------------------------------------------- timers

def test_rto_rewinds_established_data_and_our_fin():
    assert d.rto_action(ESTABLISHED, 1000, 2000, 65535, 0, 0) == d.RTO_REWIND
    ev = ESTABLISHED | SOCK_EOF | FIN_SENT
    assert d.rto_action(ev, 2000, 2001, 65535, 0, 2000) == d.RTO_REWIND   # only the FIN
    assert d.rto_action(ESTABLISHED, 1000, 1000, 65535, 0, 0) == d.RTO_NOTHING


def test_rto_probes_a_shut_window_without_counting_a_retry():
    assert d.rto_action(ESTABLISHED, 1000, 1000, 0, 0, 0) == d.RTO_PROBE
    # a probe is no failure: never gives up, however many went before
    assert d.rto_action(ESTABLISHED, 1000, 1000, 0, 100, 0) == d.RTO_PROBE
    # our FIN in flight on a shut window is a retransmission, not a probe
    ev = ESTABLISHED | SOCK_EOF | FIN_SENT
    assert d.rto_action(ev, 2001, 2001, 0, 0, 2000) == d.RTO_NOTHING
    assert d.rto_action(ev, 2000, 2001, 0, 0, 2000) == d.RTO_REWIND


def test_rto_handshakes_and_giving_up():
    assert d.rto_action(SYN_SENT, 500, 501, 0, 0, 0) == d.RTO_SYN
    assert d.rto_action(SYNACK_SENT, 500, 501, 0, 0, 0) == d.RTO_SYNACK
    assert d.rto_action(GUEST_SYN, 0, 0, 0, 0, 0) == d.RTO_NOTHING   # connect() pending
    assert d.rto_action(ESTABLISHED, 1000, 2000, 65535, d.MAX_RETRIES - 1, 0) == d.RTO_REWIND
    assert d.rto_action(ESTABLISHED, 1000, 2000, 65535, d.MAX_RETRIES, 0) == d.RTO_GIVE_UP
    assert d.rto_action(SYN_SENT, 500, 501, 0, d.MAX_RETRIES, 0) == d.RTO_GIVE_UP


def test_backoff_doubles_up_to_the_maximum():
    rto, seen = d.RTO_INITIAL, []
    for _ in range(10):
        rto = d.backoff(rto)
        seen.append(rto)
    assert seen[0] == 2 * d.RTO_INITIAL
    assert seen[-1] == d.RTO_MAX and max(seen) == d.RTO_MAX


def test_handshake_and_idle_timeouts():
    assert d.timed_out(10.0, 10.0, 5.0, 7200.0) == d.HANDSHAKE
    assert d.timed_out(9.9, 10.0, 5.0, 7200.0) is None
    assert d.timed_out(7205.0, 0.0, 5.0, 7200.0) == d.IDLE
    assert d.timed_out(7204.9, 0.0, 5.0, 7200.0) is None
    assert d.timed_out(20.0, 0.0, 19.0, 7200.0) is None      # established: no deadline


def test_window_polls_back_off():
    seen = [d.next_poll(0.0)]
    for _ in range(8):
        seen.append(d.next_poll(seen[-1]))
    assert seen[0] == d.WND_POLL_FIRST and seen[1] == 2 * d.WND_POLL_FIRST
    assert seen[-1] == d.WND_POLL_MAX


def test_next_wake_is_the_earliest_set_deadline():
    assert d.next_wake(0.0, 0.0, 0.0, 7200.0) == 7200.0       # idle only
    assert d.next_wake(10.0, 0.0, 0.0, 7200.0) == 10.0
    assert d.next_wake(10.0, 3.0, 5.0, 7200.0) == 3.0
    assert d.next_wake(0.0, 0.0, 5.0, 7200.0) == 5.0


def test_simultaneous_close_both_fins_at_once():
    """Both sides' FINs cross: the guest's FIN arrives with ours in flight.  Its FIN is
    new (trim 0), and its ACK of ours ends our side: nothing special is decided."""
    ev = ESTABLISHED | PEER_FIN | SOCK_EOF | FIN_SENT
    rcv_nxt, fin_seq = 7000, 3000
    assert d.trim(rcv_nxt, rcv_nxt, 0, True) == 0
    assert d.fin_acked(ev | GUEST_FIN, fin_seq + 1, fin_seq)
    # a repeat of its FIN after we took it is a duplicate: ACK again
    assert d.trim(rcv_nxt, rcv_nxt + 1, 0, True) == d.DUPLICATE


def test_seq_after():
    assert d.seq_after(1, 0) and not d.seq_after(0, 1) and not d.seq_after(5, 5)
    assert d.seq_after(0, M) and not d.seq_after(M, 0)
