"""pasta's loopback TCP path, with both "sides" on this machine's loopback.

The namespace's client is accepted here and the splicer connects to a server
here too, as it does for a -T port: what is checked is the plumbing around
the kernel's splice(): every byte both ways through full sockets (the
"writable" interest is added only when a direction finds its socket full), a
connect() the server's full queue leaves unanswered for a while, a refused
one, and that nothing is left open afterwards.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections.abc import Callable

import pytest

from common.loop import Loop
from pasta.pool import SocketPool
from pasta.splice import Splicer
from tests.support import run_until, wait_until

LO = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def sp(loop):
    def no_namespace(family, n, done):          # the -T path never takes from the pool
        done(False, "no namespace here")
    splicer = Splicer(loop, SocketPool(no_namespace, 0))
    yield splicer
    splicer.close_all()


@pytest.fixture
def sockets():
    """The test's own sockets, closed when it ends, passed or failed (which also ends
    the blocking calls of its threads)."""
    made: list[socket.socket] = []
    yield made
    for s in made:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def client_pair(family: int) -> tuple[socket.socket, socket.socket]:
    """(the namespace's client, the socket our -T listener accepted from it)."""
    lst = socket.socket(family)
    lst.bind((LO[family], 0))
    lst.listen(1)
    client = socket.create_connection(lst.getsockname()[:2])
    accepted, _ = lst.accept()
    lst.close()
    return client, accepted


def listening_server(family: int, backlog: int = 8) -> socket.socket:
    srv = socket.socket(family)
    srv.bind((LO[family], 0))
    srv.listen(backlog)
    return srv


def exchange(sock: socket.socket, payload: bytes, results: dict, name: str,
             read_when: Callable[[], bool]) -> None:
    """Send everything, shut down, and once read_when() says so read to the end: the
    digest of what came back."""
    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    sender = threading.Thread(target=send)
    sender.start()
    wait_until(read_when, 30, what=f"{name} may read")
    digest = hashlib.sha256()
    while chunk := sock.recv(1 << 16):
        digest.update(chunk)
    sender.join()
    results[name] = digest.hexdigest()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_every_byte_both_ways_through_full_sockets(loop, sp, sockets, family):
    """Each side reads only once the splicer found the socket towards it full (more
    than all the buffers on the way hold), so both directions stop and resume."""
    srv = listening_server(family)
    client, accepted = client_pair(family)
    sockets += [srv, client]
    up, down = os.urandom(32 << 20), os.urandom(32 << 20)
    results: dict[str, str] = {}
    sp.accept_host(accepted, b"", 0, srv.getsockname()[1], family == socket.AF_INET6)
    (c,) = sp.conns
    assert not c.connecting and not c.fwd.out and not c.rev.out

    def serve() -> None:
        conn, _ = srv.accept()
        sockets.append(conn)
        exchange(conn, down, results, "server", lambda: c.fwd.out)

    threads = [threading.Thread(target=serve, daemon=True),
               threading.Thread(target=exchange, daemon=True,
                                args=(client, up, results, "client", lambda: c.rev.out))]
    for t in threads:
        t.start()
    run_until(loop, lambda: len(results) == 2, 60, what="both transfers")
    for t in threads:
        t.join()
    assert results["server"] == hashlib.sha256(up).hexdigest()
    assert results["client"] == hashlib.sha256(down).hexdigest()
    run_until(loop, lambda: not sp.conns, what="the connection closed")
    assert sp.counters["opened"] == 1


def test_a_connect_the_server_does_not_answer_yet(loop, sp, sockets):
    """The server's accept queue is full: our SYN goes unanswered, connect() stays in
    progress, and the connection completes when the server makes room (the kernel
    sends the SYN again after a second)."""
    family = socket.AF_INET
    srv = listening_server(family, backlog=0)
    sockets.append(srv)
    port = srv.getsockname()[1]
    for _ in range(4):                          # fill the queue
        s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sockets.append(s)
        s.connect_ex((LO[family], port))
    client, accepted = client_pair(family)
    sockets.append(client)
    client.sendall(b"hello")
    sp.accept_host(accepted, b"", 0, port, False)
    (c,) = sp.conns
    assert c.connecting                         # waiting for the handshake
    srv.setblocking(False)
    served: list[socket.socket] = []

    def hello_arrived() -> bool:
        try:
            while True:
                conn, _ = srv.accept()
                sockets.append(conn)
                conn.setblocking(False)
                served.append(conn)
        except BlockingIOError:
            pass
        return any(_got_hello(s) for s in served)

    run_until(loop, hello_arrived, 10, what="the request at the server")
    assert not c.connecting
    for s in sockets:
        s.close()
    run_until(loop, lambda: not sp.conns, what="the connection closed")


def _got_hello(s: socket.socket) -> bool:
    try:
        return s.recv(16) == b"hello"
    except BlockingIOError:
        return False


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_refused_connect_resets_the_client(loop, sp, sockets, family):
    srv = listening_server(family)
    port = srv.getsockname()[1]
    srv.close()                                 # nobody listens there now
    client, accepted = client_pair(family)
    sockets.append(client)
    sp.accept_host(accepted, b"", 0, port, family == socket.AF_INET6)
    assert sp.counters["connect_fail"] == 1
    assert not sp.conns
    client.settimeout(2)
    with pytest.raises(ConnectionResetError):
        client.recv(1)


def _read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(0)
    chunks = []
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    except BlockingIOError:
        return b"\0" + b"".join(chunks)   # not at the end yet: never equal to a payload
    return b"".join(chunks)


@pytest.mark.parametrize("size", [5, 100_000])
def test_data_and_its_end_in_one_event(loop, sp, sockets, size):
    """Each side's bytes and its FIN are queued before the splicer looks: the event
    announces both, and the read that takes the bytes also reaches the end (small) or
    does not (more than the pipe takes in one read): either way every byte, then the
    end, arrives on the other side, and the connection closes."""
    srv = listening_server(socket.AF_INET)
    client, accepted = client_pair(socket.AF_INET)
    sockets += [srv, client]
    request, answer = os.urandom(size), os.urandom(size)
    client.sendall(request)
    client.shutdown(socket.SHUT_WR)
    sp.accept_host(accepted, b"", 0, srv.getsockname()[1], False)
    (c,) = sp.conns
    server, _ = srv.accept()
    sockets.append(server)
    run_until(loop, lambda: c.fwd.done, what="the request and its end forwarded")
    assert _read_to_end(server) == request
    server.sendall(answer)
    server.shutdown(socket.SHUT_WR)
    run_until(loop, lambda: not sp.conns, what="the answer forwarded, the connection closed")
    assert _read_to_end(client) == answer
    assert c.fwd.moved == c.rev.moved == size
