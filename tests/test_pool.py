"""The namespace thread's bounded and asynchronous calls, and the socket pool they refill."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from common.loop import Loop
from pasta import pool as poolmod
from pasta.nsthread import NsThread
from pasta.pool import SocketPool
from tests.support import run_until


class Maker:
    """A make() that answers only when told to, as the namespace thread does later."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int, object]] = []

    def __call__(self, family, n, done) -> None:
        self.asked.append((family, n, done))

    def answer(self, ok: bool = True) -> list[socket.socket]:
        family, n, done = self.asked.pop(0)
        socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(n)] if ok else []
        done(ok, socks if ok else OSError("no"))
        return socks


def test_take_never_waits_and_refills_below_half():
    m = Maker()
    p = SocketPool(m, 4)
    assert p.take(socket.AF_INET) is None and len(m.asked) == 1   # empty: asked, not waited
    made = m.answer()
    assert len(made) == 4
    got = [p.take(socket.AF_INET) for _ in range(2)]
    assert all(got) and not m.asked                                 # 2 left: not low yet
    got.append(p.take(socket.AF_INET))                               # 1 left: ask for more
    assert got[-1] is not None and len(m.asked) == 1
    assert p.take(socket.AF_INET) is not None                        # one ask at a time
    assert len(m.asked) == 1
    p.close()
    for s in got:
        s.close()


def test_waiters_are_served_in_order_and_closing_answers_none():
    m = Maker()
    p = SocketPool(m, 2)
    seen: list = []
    assert p.wait(socket.AF_INET6, seen.append) and p.wait(socket.AF_INET6, seen.append)
    assert len(m.asked) == 1 and m.asked[0][1] == 3                  # target + first waiter
    m.answer()
    assert len(seen) == 2 and all(s is not None for s in seen)
    assert len(m.asked) == 1                                         # one left: low, refill
    assert p.wait(socket.AF_INET, seen.append)
    p.close()
    assert seen[-1] is None                                          # will never come
    late = m.answer()                                                # made after close
    assert all(s.fileno() == -1 for s in late)
    assert not p.wait(socket.AF_INET, seen.append)
    for s in seen[:2]:
        s.close()


def test_a_failed_refill_tells_every_waiter(monkeypatch):
    monkeypatch.setattr(poolmod, "WAITERS_MAX", 2)
    m = Maker()
    p = SocketPool(m, 2)
    seen: list = []
    assert p.wait(socket.AF_INET, seen.append) and p.wait(socket.AF_INET, seen.append)
    assert not p.wait(socket.AF_INET, seen.append)                  # bounded
    m.answer(ok=False)
    assert seen == [None, None]
    p.close()


@pytest.fixture
def nsthread():
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    t = NsThread(fd)
    yield t
    t.stop()
    os.close(fd)


def test_call_is_bounded_and_what_comes_late_is_closed(nsthread):
    assert nsthread.call(lambda a, b: a + b, 2, 3) == 5
    go = threading.Event()
    made: list[socket.socket] = []

    def slow():
        go.wait(5)
        s = socket.socket()
        made.append(s)
        return s

    with pytest.raises(TimeoutError):
        nsthread.call(slow, timeout=0.05)
    go.set()
    assert nsthread.call(lambda: 1) == 1                             # after slow() ended
    assert made and made[0].fileno() == -1                           # nobody took it


def test_submit_answers_in_the_loop(nsthread):
    loop = Loop()
    try:
        nsthread.attach(loop)
        got: list = []
        nsthread.submit(lambda: threading.current_thread().name,
                        done=lambda ok, v: got.append((ok, v, threading.current_thread().name)))
        nsthread.submit(lambda: 1 / 0, done=lambda ok, v: got.append((ok, type(v))))
        run_until(loop, lambda: len(got) == 2, 5.0)
        assert got[0] == (True, "pasta-ns", threading.current_thread().name)
        assert got[1] == (False, ZeroDivisionError)
    finally:
        nsthread.stop()
        loop.close()
