"""pasta's loopback UDP path, with both "sides" on this machine's loopback.

The splicer is given ordinary sockets where pasta would make them in the
namespace, so a -U listener, its flows and the server all live here; what
is checked is the plumbing: datagrams both ways, the port the client hears
from, one flow per client, cleanup, and no busy loop on socket errors.
"""

from __future__ import annotations

import socket

import pytest

from common.listeners import host_socket
from common.loop import Loop
from common.udp import udp_listener
from common.udp.handler import bind_udp
from pasta.udp_splice import UdpSplicer
from tests.support import run_until, spin


def plain_sockets(family: int, n: int) -> list[socket.socket]:
    return [socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK) for _ in range(n)]


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def echo_server(family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    return s


def serve(srv: socket.socket) -> list[tuple]:
    got = []
    while True:
        try:
            data, peer = srv.recvfrom(65536)
        except BlockingIOError:
            return got
        got.append((data, peer))
        srv.sendto(data.upper(), peer)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_ns_listener_both_ways(loop, family):
    sp = UdpSplicer(loop, plain_sockets)
    srv = echo_server(family)
    lo = srv.getsockname()[0]
    sock = bind_udp(host_socket, family, lo, 0, None)
    lst = sp.ns_listener(sock, srv.getsockname()[1])
    client = socket.socket(family, socket.SOCK_DGRAM)
    client.settimeout(2)
    for i in range(3):
        client.sendto(b"hello %d" % i + b"x" * 60000, (lo, sock.getsockname()[1]))
    spin(loop)
    got = serve(srv)
    assert [d[:7] for d, _ in got] == [b"hello 0", b"hello 1", b"hello 2"]
    assert len({p for _, p in got}) == 1            # one flow for one client
    spin(loop)
    for i in range(3):
        data, peer = client.recvfrom(65536)
        assert data == (b"hello %d" % i + b"x" * 60000).upper()
        assert peer[1] == sock.getsockname()[1]      # from the port it sent to
    assert len(sp.table) == 1 and next(iter(sp.table)).replied
    lst.close()
    assert len(sp.table) == 0
    sp.close_all()


def test_gone_client_does_not_spin_the_loop(loop, monkeypatch):
    sp = UdpSplicer(loop, plain_sockets)
    srv = echo_server(socket.AF_INET)
    sock = bind_udp(host_socket, socket.AF_INET, "127.0.0.1", 0, None)
    lst = sp.ns_listener(sock, srv.getsockname()[1])
    calls = []
    drain = sp.drain_ns_listener
    monkeypatch.setattr(sp, "drain_ns_listener", lambda x: (calls.append(1), drain(x)))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"q", sock.getsockname())
    spin(loop)
    client.close()                                  # gone before the answer
    serve(srv)
    spin(loop, 0.2)                                 # our sendto fails: an error is queued
    spin(loop, 0.1)
    assert len(calls) < 10, len(calls)
    lst.close()
    sp.close_all()


def test_forwarded_port_loopback_clients_take_the_splice(loop):
    """-u: a loopback client's datagrams are diverted by the listener to the splicer."""
    sp = UdpSplicer(loop, plain_sockets)
    srv = echo_server(socket.AF_INET)
    opener = udp_listener(loop, host_socket, lambda: None, sp.from_host)
    listener = opener(socket.AF_INET, "127.0.0.1", 0, None, srv.getsockname()[1])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    client.sendto(b"spliced", listener.sock.getsockname())
    spin(loop)
    assert [d for d, _ in serve(srv)] == [b"spliced"]
    spin(loop)
    data, peer = client.recvfrom(100)
    assert data == b"SPLICED" and peer == listener.sock.getsockname()
    # the listener goes away (auto unbinds the port): its flows follow on the next event
    listener.close()
    srv.sendto(b"late", ("127.0.0.1", next(iter(sp.table)).out.getsockname()[1]))
    spin(loop)
    assert len(sp.table) == 0
    sp.close_all()


def test_idle_splice_flows_expire(loop):
    sp = UdpSplicer(loop, plain_sockets, idle=0.05, idle_replied=0.05)
    sp.expiry.grid = 0.01
    srv = echo_server(socket.AF_INET)
    sock = bind_udp(host_socket, socket.AF_INET, "127.0.0.1", 0, None)
    lst = sp.ns_listener(sock, srv.getsockname()[1])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.sendto(b"x", sock.getsockname())
    # not a fixed spin: one as long as the idle time can see the flow come and go
    run_until(loop, lambda: len(sp.table) > 0, 2.0, what="the flow")
    out = next(iter(sp.table)).out
    run_until(loop, lambda: len(sp.table) == 0, 2.0, what="the idle flow's expiry")
    assert out.fileno() == -1
    lst.close()
    sp.close_all()
