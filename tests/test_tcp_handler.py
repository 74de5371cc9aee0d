"""The TCP translation as a state machine: guest segments in, frames out, real host sockets.

Each test drives `TcpHandler` through the data plane with frames built by
the codecs (the guest's side), a fake tap that keeps what we send (and, with
offload, completes checksums as the kernel would), and real loopback
sockets for the host side (the gateway address maps to 127.0.0.1).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import struct

import pytest

from common.dataplane import DataPlane
from common.guest import GuestState
from common.loop import Loop
from common.packet.checksum import l4_checksum4
from common.packet.frames import build_ipv4_frame
from common.packet.ipv4 import IPPROTO_TCP
from common.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, build_tcp4, parse_tcp
from common.tcp.handler import KEEP_MAX
from tests.support import (
    GUEST_MAC,
    GW4,
    HOST4,
    OUR_MAC,
    BatchTap,
    FakeTap,
    make_conf,
    parse_frame,
    run_until,
    spin,
)

G = socket.inet_aton(HOST4)          # the guest's address (the host's, by default)
GW = socket.inet_aton(GW4)
GPORT = 40000
ISN = 1000


class Guest:
    """The guest's end of one connection: builds its segments, reads ours."""

    def __init__(self, offload: bool | str = False) -> None:
        """`offload`: the tap's checksum offload, or "batch": a tap that takes runs of
        frames in one call (passt's stream socket)."""
        self.conf = make_conf("pasta", tcp_ns=["none"], udp_ns=["none"], tcp_ports=["none"],
                              udp_ports=["none"])
        self.loop = Loop()
        self.tap = BatchTap() if offload == "batch" else FakeTap(offload)
        self.dp = DataPlane(self.conf, self.loop, self.tap, GuestState(self.conf, GUEST_MAC))
        self.tcp = self.dp.tcp
        self.seen = 0

    def send(self, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
             window: int = 65535, options: TcpOptions | None = None, sport: int = GPORT) -> None:
        l4 = build_tcp4(G, GW, sport, dport, seq, ack, flags, window, payload, options)
        frame = build_ipv4_frame(OUR_MAC, GUEST_MAC, G, GW, IPPROTO_TCP, l4)
        self.dp.demux(memoryview(frame))
        self.tcp.flush()

    def frames(self):
        """Our segments since the last call, parsed and checksum-checked."""
        out = []
        for frame in self.tap.frames[self.seen:]:
            ip, l4 = parse_frame(frame)
            if ip.proto != IPPROTO_TCP:
                continue
            assert (ip.src, ip.dst) == (GW, G)
            assert l4_checksum4(GW, G, IPPROTO_TCP, l4) == 0
            tcp, payload = parse_tcp(l4)
            out.append((tcp, bytes(payload)))
        self.seen = len(self.tap.frames)
        return out

    def run(self, seconds: float = 0.05) -> None:
        spin(self.loop, seconds)

    def until(self, pred, timeout: float = 5.0, what: str = "frames"):
        """Run the loop until pred(our segments since the last call) holds; those segments."""
        got: list = []
        run_until(self.loop, lambda: got.extend(self.frames()) or pred(got), timeout, what=what)
        return got

    def close(self) -> None:
        self.dp.stop()
        self.loop.close()


@pytest.fixture
def guest():
    made: list[Guest] = []

    def make(offload: bool | str = False) -> Guest:
        g = Guest(offload)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


@pytest.fixture
def server():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(2)
    yield s
    s.close()


def establish(g: Guest, port: int) -> int:
    """Three-way handshake from the guest; returns our ISN."""
    g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1460, wscale=7))
    g.run()
    (synack, _), = g.frames()
    assert synack.flags == SYN | ACK and synack.ack == ISN + 1
    assert synack.options.mss == g.conf.mtu - 40 and synack.options.wscale is not None
    g.send(port, ISN + 1, synack.seq + 1, ACK)
    return synack.seq


def connected(g: Guest, server: socket.socket) -> tuple[Guest, int, int, socket.socket]:
    """A connection the guest opened to `server`, handshake done: the guest, the
    server's port, our ISN and the host side's accepted socket."""
    port = server.getsockname()[1]
    isn = establish(g, port)
    peer, _ = server.accept()
    return g, port, isn, peer


@pytest.mark.parametrize("offload", [False, True, "batch"])
def test_handshake_data_both_ways_and_close(guest, server, offload):
    g, port, isn, peer = connected(guest(offload), server)
    peer.settimeout(2)
    # guest -> host: delivered, and acknowledged once the socket took it
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"hello host")
    assert peer.recv(100) == b"hello host"
    # a small segment's ACK waits a moment for an answer, then goes alone
    acks = g.until(lambda f: any(t.ack == ISN + 1 + 10 for t, _ in f), what="the ACK")
    assert acks[-1][0].ack == ISN + 1 + 10 and acks[-1][0].window > 0
    # host -> guest: a big write arrives in order, checksums valid (large sums fold right)
    data = os.urandom(200_000)
    peer.sendall(data)
    got = b""
    nxt = isn + 1
    for tcp, payload in g.until(lambda f: any(p for _, p in f), what="data"):
        if payload:
            assert tcp.seq == nxt
            got += payload
            nxt += len(payload)
    g.send(port, ISN + 11, nxt, ACK, window=65535)
    g.run(0.1)
    for tcp, payload in g.frames():
        if payload:
            assert tcp.seq == nxt
            got += payload
            nxt += len(payload)
    assert got == data[:len(got)] and len(got) > 0
    if offload == "batch":
        assert max(g.tap.batches) > 1           # a run of segments went in one call
    # close from the host: FIN once all data went out; guest acks everything and closes too
    peer.shutdown(socket.SHUT_WR)
    while len(got) < len(data):
        g.send(port, ISN + 11, nxt, ACK, window=65535)
        g.run(0.05)
        for tcp, payload in g.frames():
            if payload:
                assert tcp.seq == nxt
                got += payload
                nxt += len(payload)
    assert got == data
    g.send(port, ISN + 11, nxt, ACK, window=65535)
    fins = [t for t, _ in g.until(lambda f: any(t.flags & FIN for t, _ in f), what="our FIN")
            if t.flags & FIN]
    assert fins and fins[-1].seq == nxt
    g.send(port, ISN + 11, nxt + 1, ACK | FIN)
    assert peer.recv(10) == b""                 # the guest's FIN became shutdown(SHUT_WR)
    g.run()
    assert not g.tcp.conns
    peer.close()


def test_refused_gets_rst(guest):
    g = guest()
    with socket.socket() as s:                   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1460))
    g.run()
    (rst, _), = g.frames()
    assert rst.flags & RST and rst.ack == ISN + 1
    assert not g.tcp.conns


def test_a_local_peers_answer_leaves_in_the_syns_own_turn(guest, server):
    """A loopback handshake runs inside connect(): the SYN-ACK (or the RST of a refused
    connect) goes to the guest while its SYN is handled, with no turn of the loop."""
    g = guest()
    port = server.getsockname()[1]
    g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1460, wscale=7))
    (synack, _), = g.frames()                                 # no g.run() in between
    assert synack.flags == SYN | ACK and synack.ack == ISN + 1
    with socket.socket() as s:                                # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    g.send(closed, ISN, 0, SYN, options=TcpOptions(mss=1460), sport=GPORT + 1)
    (rst, _), = g.frames()
    assert rst.flags & RST and rst.ack == ISN + 1
    assert len(g.tcp.conns) == 1


def exchange(g: Guest, port: int, isn: int, peer: socket.socket, size: int) -> None:
    """`size` random bytes each way through an established connection, compared by
    sha256: the guest's in 1000-byte segments, the host's as the guest acknowledges."""
    up, down = os.urandom(size), os.urandom(size)
    for off in range(0, size, 1000):
        g.send(port, ISN + 1 + off, isn + 1, ACK | PSH, up[off:off + 1000])
    peer.settimeout(5)
    got_up = b""
    while len(got_up) < size:
        got_up += peer.recv(size)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    peer.sendall(down)
    got_down = b""
    nxt = isn + 1
    while len(got_down) < size:
        for tcp, payload in g.until(lambda f: any(p for _, p in f), what="data"):
            if payload and tcp.seq == nxt:
                got_down += payload
                nxt += len(payload)
        g.send(port, ISN + 1 + size, nxt, ACK)
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()


def test_a_peer_slow_to_answer_completes_on_its_writable_event(guest):
    """The server's accept queue is full: our SYN goes unanswered and connect() stays
    in progress (asking again says so), so the socket is watched for writable; the
    handshake completes once the server makes room (the kernel resends the SYN after a
    second), and every byte crosses both ways."""
    g = guest()
    srv = socket.socket()
    fillers: list[socket.socket] = []
    served: list[socket.socket] = []
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        for _ in range(4):                                    # fill the accept queue
            f = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            fillers.append(f)
            f.connect_ex(("127.0.0.1", port))
        g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1460, wscale=7))
        g.run(0.2)
        assert g.frames() == []                               # still connecting
        srv.setblocking(False)

        def drained_then_synack(frames) -> bool:
            try:
                while True:
                    served.append(srv.accept()[0])
            except BlockingIOError:
                pass
            return bool(frames)
        (synack, _), = g.until(drained_then_synack, timeout=10, what="the SYN-ACK")
        assert synack.flags == SYN | ACK and synack.ack == ISN + 1
        g.send(port, ISN + 1, synack.seq + 1, ACK)
        srv.setblocking(True)
        srv.settimeout(5)
        ours = [s for s in served if s.getpeername()[1] not in
                {f.getsockname()[1] for f in fillers}]
        peer = ours[0] if ours else srv.accept()[0]
        served.append(peer)
        exchange(g, port, synack.seq, peer, 200_000)
    finally:
        for s in fillers + served:
            s.close()
        srv.close()


def test_unknown_segment_gets_rst(guest):
    g = guest()
    g.send(9, 5000, 777, ACK, b"x")
    (rst, _), = g.frames()
    assert rst.flags == RST and rst.seq == 777


def test_out_of_order_and_retransmitted_segments_get_immediate_acks(guest, server):
    g, port, isn, peer = connected(guest(), server)
    g.frames()
    g.send(port, ISN + 1 + 100, isn + 1, ACK, b"later")        # a gap before it
    (dup, _), = g.frames()
    assert dup.ack == ISN + 1
    g.send(port, ISN + 1, isn + 1, ACK, b"a" * 100)
    g.frames()
    # our ACK of that was lost: the guest resends old data; we must say again where we are
    g.send(port, ISN + 1, isn + 1, ACK, b"a" * 100)
    (again, _), = g.frames()
    assert again.ack == ISN + 101
    peer.close()


@pytest.mark.parametrize("tap", [False, "batch"])
def test_three_duplicate_acks_resend_only_the_hole(guest, server, tap):
    g, port, isn, peer = connected(guest(tap), server)
    peer.sendall(os.urandom(300_000))
    g.run(0.1)                                                 # the whole window goes out
    sent = [(t.seq, p) for t, p in g.frames() if p]
    assert len(sent) >= 2
    first_seq, first = sent[0]
    for _ in range(3):                                         # the first segment was lost
        g.send(port, ISN + 1, first_seq, ACK)
    g.run()
    resent = [(t.seq, p) for t, p in g.frames() if p]
    assert resent and resent[0] == (first_seq, first)
    assert len(resent) == 1                                    # not the whole window again
    peer.close()


def test_guest_rst_resets_the_host_side(guest, server):
    g, port, isn, peer = connected(guest(), server)
    peer.settimeout(2)
    g.send(port, ISN + 1, isn + 1, RST | ACK)
    with pytest.raises(ConnectionResetError):
        peer.recv(10)
    assert not g.tcp.conns


def test_host_reset_resets_the_guest(guest, server):
    g, port, isn, peer = connected(guest(), server)
    g.frames()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    g.run()
    assert any(t.flags & RST for t, _ in g.frames())
    assert not g.tcp.conns


def shut_our_window(g: Guest, port: int, isn: int, peer: socket.socket) -> int:
    """The host-side reader has stopped: send until our window is 0; the guest's next seq."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    seq = ISN + 1
    for _ in range(400):
        g.send(port, seq, isn + 1, ACK, b"z" * 60000)
        last = [t for t, _ in g.frames() if t.flags & ACK][-1]
        seq = last.ack
        if last.window == 0:
            return seq
    raise AssertionError("our window never closed")


def read_exactly(peer: socket.socket, expected: int) -> None:
    """Every byte we acknowledged reaches the reader."""
    total = 0
    while total < expected:
        got = peer.recv(1 << 20)
        assert got
        total += len(got)
    assert total == expected


def test_zero_window_then_update_when_the_socket_drains(guest, server):
    """The host side stops reading: our window shrinks to nothing, and reopens with an
    update once the reader catches up (no guest retransmission needed to learn it)."""
    g, port, isn, peer = connected(guest(), server)
    seq = shut_our_window(g, port, isn, peer)
    read_exactly(peer, seq - (ISN + 1))
    got = g.until(lambda f: any(t.window > 0 for t, _ in f), what="the window update")
    updates = [t for t, _ in got if t.flags & ACK]
    assert updates and updates[-1].window > 0 and updates[-1].ack == seq
    peer.close()


def test_a_keepalive_probe_gets_an_ack(guest, server):
    """Keep-alives carry rcv_nxt - 1 and no data; unanswered, the guest gives up."""
    g, port, isn, peer = connected(guest(), server)
    g.send(port, ISN + 1, isn + 1, ACK, b"hello")
    g.run()
    g.frames()
    g.send(port, ISN + 5, isn + 1, ACK)                         # seq = rcv_nxt - 1
    (ack, payload), = g.frames()
    assert ack.flags == ACK and ack.ack == ISN + 6 and not payload
    g.send(port, ISN + 6, isn + 1, ACK)                         # a plain ACK: no answer
    assert g.frames() == []
    peer.close()


def test_a_lost_window_update_is_repeated_for_the_zero_window_probe(guest, server):
    g, port, isn, peer = connected(guest(), server)
    seq = shut_our_window(g, port, isn, peer)
    read_exactly(peer, seq - (ISN + 1))
    g.until(lambda f: any(t.window > 0 for t, _ in f))  # the window update: lost on the way
    g.send(port, seq - 1, isn + 1, ACK)             # the guest's zero-window probe
    (answer, _), = g.frames()
    assert answer.ack == seq and answer.window > 0
    peer.close()


def test_we_probe_a_shut_guest_window_until_it_reopens(guest, server):
    """The guest's window update can be lost too: we persist with zero-window probes."""
    g, port, isn, peer = connected(guest(), server)
    g.send(port, ISN + 1, isn + 1, ACK, window=0)              # the guest's buffer is full
    peer.sendall(b"x" * 5000)
    g.run(0.05)
    assert [p for _, p in g.frames() if p] == []               # nothing sent into a shut window
    probes = g.until(bool, what="a window probe")
    assert probes and all(t.seq == isn and not p for t, p in probes)   # snd_una - 1, no data
    g.send(port, ISN + 1, isn + 1, ACK, window=65535)         # the answer: open again
    data = b"".join(p for _, p in g.until(lambda f: sum(len(p) for _, p in f) >= 5000,
                                          what="the data"))
    assert data == b"x" * 5000
    peer.close()


def test_a_small_or_full_segments_ack_is_delayed_until_the_fourth(guest, server):
    g, port, isn, peer = connected(guest(), server)
    g.frames()
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"hi")          # small: the ACK may wait
    assert g.frames() == []
    (ack, _), = g.until(bool, what="the delayed ACK")
    assert ack.ack == ISN + 3
    seq = ISN + 3
    for i in range(3):                                        # full-sized: wait for more
        g.send(port, seq, isn + 1, ACK, bytes([65 + i]) * 1460)
        seq += 1460
        assert g.frames() == []
    g.send(port, seq, isn + 1, ACK, b"w" * 1460)              # the fourth: at the batch's end
    seq += 1460
    (ack, _), = g.frames()
    assert ack.ack == seq
    # which covered the ones that waited: no wake-up left to find nothing due
    assert g.tcp._delack_timer is None and not g.tcp.delayed_acks
    g.send(port, seq, isn + 1, ACK, b"z" * 1460)
    (ack, _), = g.until(bool, what="the delayed ACK of a lone full-sized segment")
    assert ack.ack == seq + 1460
    read_exactly(peer, 2 + 5 * 1460)
    peer.close()


def test_an_answer_and_close_take_one_segment(guest, server):
    """A request, an answer, the far end closes (connect/request/close): the answer
    carries the ACK of the request (also the first request after the handshake) and our
    FIN, so the guest gets one segment; its FIN is answered, and the flow is gone."""
    g, port, isn, peer = connected(guest(), server)
    peer.settimeout(2)
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"x")
    assert peer.recv(10) == b"x"
    assert g.frames() == []                                   # the ACK waits for the answer
    peer.sendall(b"y")
    peer.close()
    (seg, payload), = g.until(bool, what="the answer")
    assert payload == b"y" and seg.flags == ACK | PSH | FIN
    assert seg.seq == isn + 1 and seg.ack == ISN + 2
    g.run(0.1)
    assert g.frames() == []                                   # no separate FIN, no lone ACK
    g.send(port, ISN + 2, isn + 3, ACK | FIN)
    (ack, _), = g.frames()
    assert ack.flags == ACK and ack.ack == ISN + 3 and ack.seq == isn + 3
    g.run()
    assert not g.tcp.conns


def test_a_greeting_and_close_before_the_handshake_ends(guest, server):
    """The far end speaks first and closes while the guest's ACK of our SYN-ACK is still
    on its way (a banner and goodbye): both arrive when the handshake ends, FIN too."""
    g = guest()
    port = server.getsockname()[1]
    g.send(port, ISN, 0, SYN, options=TcpOptions(mss=1460, wscale=7))
    (synack, _), = g.until(bool, what="the SYN-ACK")
    peer, _ = server.accept()
    peer.sendall(b"hello")
    peer.close()
    g.run(0.1)                            # the socket's events come while still opening
    assert g.frames() == []
    g.send(port, ISN + 1, synack.seq + 1, ACK)
    got = g.until(lambda segs: any(s.flags & FIN for s, _ in segs), what="greeting and FIN")
    assert b"".join(p for _, p in got) == b"hello"
    assert got[-1][0].seq + len(got[-1][1]) == synack.seq + 1 + 5        # FIN after it


@pytest.mark.parametrize("tap", [False, "batch"])
def test_rto_rewinds_to_the_oldest_unacknowledged_byte(guest, server, monkeypatch, tap):
    g, port, isn, peer = connected(guest(tap), server)
    data = os.urandom(3000)
    peer.sendall(data)
    first = g.until(lambda f: sum(len(p) for _, p in f) >= len(data))
    assert b"".join(p for _, p in first) == data
    g.send(port, ISN + 1, isn + 1 + 1000, ACK)                # the rest was lost
    again = [(t.seq, p) for t, p in g.until(lambda f: any(p for _, p in f), what="the RTO")
             if p]
    assert again and again[0][0] == isn + 1 + 1000
    assert b"".join(p for _, p in again).startswith(data[1000:])
    assert g.tcp.counters["rto_retransmit"] >= 1
    peer.close()


def test_our_fin_is_retransmitted_until_acknowledged(guest, server):
    g, port, isn, peer = connected(guest(), server)
    peer.shutdown(socket.SHUT_WR)
    has_fin = lambda f: any(t.flags & FIN for t, _ in f)      # noqa: E731
    fins = [t for t, _ in g.until(has_fin, what="our FIN") if t.flags & FIN]
    assert len(fins) == 1 and fins[0].seq == isn + 1
    fins = [t for t, _ in g.until(has_fin, what="our FIN again") if t.flags & FIN]  # lost
    assert fins and all(t.seq == isn + 1 for t in fins)
    g.send(port, ISN + 1, isn + 2, ACK)                       # acknowledged: no more
    g.frames()
    g.run(0.5)
    assert [t for t, _ in g.frames() if t.flags & FIN] == []
    assert g.tcp.conns                                        # the guest's side is open
    peer.close()


def test_simultaneous_close(guest, server):
    """Both FINs cross on the way: each side acknowledges the other's, and the
    connection is gone with nothing reset."""
    g, port, isn, peer = connected(guest(), server)
    peer.settimeout(2)
    peer.shutdown(socket.SHUT_WR)
    (fin, _), = [f for f in g.until(lambda f: any(t.flags & FIN for t, _ in f)) if f[0].flags & FIN]
    g.send(port, ISN + 1, isn + 1, ACK | FIN)                 # ours not acknowledged yet
    assert peer.recv(10) == b""
    acks = g.frames()
    assert acks and acks[-1][0].ack == ISN + 2 and not acks[-1][0].flags & RST
    assert g.tcp.conns
    g.send(port, ISN + 2, fin.seq + 1, ACK)                   # now it is
    g.run()
    assert not g.tcp.conns
    assert not any(t.flags & RST for t, _ in g.frames())
    peer.close()


def test_inbound_accept_handshake_and_data(guest):
    """A host connection on a forwarded port: SYN to the guest, its SYN-ACK
    establishes, data flows both ways."""
    g = guest()
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        client = socket.create_connection(lsn.getsockname(), timeout=2)
        sock, (_, peer_port) = lsn.accept()
    g.tcp.accept(sock, socket.inet_aton("127.0.0.1"), peer_port, 8080, False)
    (syn, _), = g.frames()
    assert syn.flags == SYN and syn.dport == 8080 and syn.options.mss
    g.send(syn.sport, ISN, syn.seq + 1, SYN | ACK, sport=8080,
           options=TcpOptions(mss=1460, wscale=7))
    (ack, _), = g.frames()
    assert ack.flags & ACK and ack.ack == ISN + 1
    client.sendall(b"from host")
    got = g.until(lambda f: sum(len(p) for _, p in f) >= 9)
    assert b"".join(p for _, p in got) == b"from host"
    g.send(syn.sport, ISN + 1, syn.seq + 10, ACK | PSH, b"from guest", sport=8080)
    assert client.recv(100) == b"from guest"
    client.close()


def test_inbound_handshake_times_out(guest, monkeypatch):
    from common.tcp import handler
    monkeypatch.setattr(handler, "HANDSHAKE_TIMEOUT", 0.3)
    monkeypatch.setattr(handler, "RTO_INBOUND_SYN", 0.1)
    g = guest()
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        client = socket.create_connection(lsn.getsockname(), timeout=2)
        sock, (_, peer_port) = lsn.accept()
    g.tcp.accept(sock, socket.inet_aton("127.0.0.1"), peer_port, 8080, False)
    got = g.until(lambda f: not g.tcp.conns, what="the handshake timeout")  # no answer
    syns = [t for t, _ in got if t.flags & SYN]
    assert len(syns) >= 2 and len({t.seq for t in syns}) == 1  # ours, resent
    assert not g.tcp.conns and g.tcp.counters["handshake_timeout"] == 1
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    client.close()


def test_trace_logs_every_event_and_flag_change(guest, server, monkeypatch, caplog):
    """--trace: each lifecycle event and each flag change of a connection, as it happens."""
    from common import log as plog
    monkeypatch.setattr(plog, "TRACE_ON", True)
    caplog.set_level(plog.TRACE, logger="tcp")
    g, port, isn, peer = connected(guest(), server)
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"hi")
    g.until(bool, what="the delayed ACK")
    said = " ".join(r.getMessage() for r in caplog.records if r.name == "tcp")
    for change in ("GUEST_SYN", "SYNACK_SENT", "ESTABLISHED", "ACK_DELAYED", "~ACK_DELAYED"):
        assert f": {change}" in said, (change, said)
    peer.close()


# ---------------------------------------------------------------- answers read, not peeked

FIONREAD = 0x541B


def unread(conn) -> int:
    """Bytes in the host socket's receive queue."""
    return struct.unpack("i", fcntl.ioctl(conn.fd, FIONREAD, b"\0\0\0\0"))[0]


def stream_check(segs, base: int, expected: bytes) -> None:
    """Every data segment carries the bytes of `expected` at its sequence number."""
    for tcp, payload in segs:
        if payload:
            off = (tcp.seq - base) & 0xFFFFFFFF
            assert payload == expected[off:off + len(payload)], f"bytes at offset {off}"


def data_segments(g: Guest, what: str) -> list:
    """Our segments with data, once there are some (a delayed ACK may come first)."""
    return [(t, p) for t, p in g.until(lambda f: any(p for _, p in f), what=what) if p]


@pytest.mark.parametrize("offload", [False, True])
def test_a_small_answer_is_read_and_its_ack_discards_nothing(guest, server, offload):
    """Request, answer, request, answer: each answer leaves the host socket when it is
    sent (its copy kept), and the guest's ACK needs no discard; the next answer follows
    on in sequence."""
    g, port, isn, peer = connected(guest(offload), server)
    conn, = g.tcp.conns.values()
    seq, nxt = ISN + 1, isn + 1
    for size in (1, 300, 1400):
        answer = os.urandom(size)
        g.send(port, seq, nxt, ACK | PSH, b"q")
        seq += 1
        peer.recv(10)
        peer.sendall(answer)
        (seg, payload), = data_segments(g, "the answer")
        assert (seg.seq, payload) == (nxt, answer)
        assert unread(conn) == 0 and conn.kept == answer
        nxt += size
        g.send(port, seq, nxt, ACK)
        assert conn.kept == b"" and unread(conn) == 0 and conn.snd_una == nxt
    assert g.tcp.counters.get("sock_error", 0) == 0
    peer.close()


def test_a_kept_answer_lost_is_sent_again_from_the_copy(guest, server):
    """The guest loses an answer we no longer have in the socket: the RTO sends it again,
    then a partial ACK and three duplicates send the rest; more data the far end wrote
    meanwhile follows it in sequence, every byte the one the far end sent."""
    g, port, isn, peer = connected(guest(), server)
    conn, = g.tcp.conns.values()
    answer, more = os.urandom(1400), os.urandom(5000)
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"q")
    peer.recv(10)
    peer.sendall(answer)
    (seg, payload), = data_segments(g, "the answer")
    assert payload == answer and conn.kept == answer and unread(conn) == 0
    # lost: no ACK comes, the retransmission timer sends it again, from our copy
    again = g.until(lambda f: any(p for _, p in f), what="the RTO")
    assert [(t.seq, p) for t, p in again if p][0] == (isn + 1, answer)
    peer.sendall(more)                              # in the socket, after the kept bytes
    segs = g.until(lambda f: sum(len(p) for _, p in f) >= len(more), what="more data")
    stream_check(segs, isn + 1, answer + more)
    # 1000 bytes arrived; then three duplicate ACKs: the rest of the kept answer again
    g.send(port, ISN + 2, isn + 1 + 1000, ACK)
    assert conn.kept == answer[1000:]
    for _ in range(3):
        g.send(port, ISN + 2, isn + 1 + 1000, ACK)
    resent = [(t.seq, p) for t, p in g.frames() if p]
    assert resent[0] == (isn + 1 + 1000, answer[1000:])
    # all acknowledged: nothing kept, nothing left unread, nothing sent twice wrongly
    end = isn + 1 + len(answer) + len(more)
    g.send(port, ISN + 2, end, ACK)
    assert conn.kept == b"" and unread(conn) == 0 and conn.snd_una == end
    peer.close()


def test_after_small_answers_a_bulk_transfer_is_peeked_and_arrives_whole(guest, server):
    """A small answer, then 400 kB with one timeout on the way: the first read after the
    answer takes at most KEEP_MAX bytes, the rest is peeked; the rewind
    resends the kept bytes from the copy and peeks on after them. sha256 of all."""
    g, port, isn, peer = connected(guest(), server)
    conn, = g.tcp.conns.values()
    g.send(port, ISN + 1, isn + 1, ACK | PSH, b"q")
    peer.recv(10)
    peer.sendall(b"a")
    g.until(bool, what="the answer")
    g.send(port, ISN + 2, isn + 2, ACK)
    data = os.urandom(400_000)
    peer.sendall(data[:100_000])
    segs = g.until(lambda f: sum(len(p) for _, p in f) >= 100_000, what="the first part")
    stream_check(segs, isn + 2, data)
    assert 0 < len(conn.kept) <= KEEP_MAX and unread(conn) == 100_000 - len(conn.kept)
    # the guest got only 700 bytes: the timeout rewinds to them
    g.send(port, ISN + 2, isn + 2 + 700, ACK)
    assert conn.kept == data[700:len(conn.kept) + 700]
    segs = g.until(lambda f: any(p for _, p in f), what="the RTO")
    stream_check(segs, isn + 2, data)
    assert [t.seq for t, p in segs if p][0] == isn + 2 + 700
    peer.sendall(data[100_000:])
    got, nxt = data[:700], isn + 2 + 700
    deadline = 200
    while len(got) < len(data) and deadline:
        deadline -= 1
        g.send(port, ISN + 2, nxt, ACK, window=65535)
        g.run(0.02)
        for tcp, payload in g.frames():
            if payload and tcp.seq == nxt:
                got += payload
                nxt += len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    g.send(port, ISN + 2, nxt, ACK)
    assert conn.kept == b"" and unread(conn) == 0
    peer.close()
