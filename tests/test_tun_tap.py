"""TunTap's reads: each frame handed on once, and no read only to hear the queue is empty
after a frame that ends a request, unless the tap is read on back-to-back turns.

A SOCK_SEQPACKET pair stands in for /dev/net/tun: one read, one frame, and a
read of an empty queue fails with EAGAIN, as on the tap.
"""

from __future__ import annotations

import socket

import pytest

from common.loop import Loop
from common.tap import TunTap


@pytest.fixture
def pair():
    ours, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    loop = Loop()
    loop.turn = 10                  # the turns are set by hand: the loop never runs
    tap = TunTap(ours.detach(), vnet_hdr=False, loop=loop)
    yield tap, guest, loop
    tap.close()
    guest.close()
    loop.close()


def frames(n: int) -> list[bytes]:
    return [bytes([i]) * 60 for i in range(n)]


def test_a_request_end_stops_the_read_and_the_rest_waits_for_the_next(pair):
    tap, guest, loop = pair
    for f in frames(3):
        guest.send(f)
    got: list[bytes] = []
    assert tap.read(lambda f: got.append(bytes(f)) or True)
    assert got == frames(1)                   # one frame, no read of what follows
    loop.turn += 2                            # the tap was not read on the turn before
    assert tap.read(lambda f: got.append(bytes(f)) or True)
    assert got == frames(2)


def test_back_to_back_turns_drain_the_queue(pair):
    tap, guest, loop = pair
    guest.send(b"a" * 60)
    got: list[bytes] = []
    tap.read(lambda f: got.append(bytes(f)) or True)
    for f in frames(5):
        guest.send(f)
    loop.turn += 1                            # readable again on the very next turn
    tap.read(lambda f: got.append(bytes(f)) or True)
    assert got == [b"a" * 60] + frames(5)


def test_frames_that_end_nothing_are_all_read(pair):
    tap, guest, _loop = pair
    for f in frames(4):
        guest.send(f)
    got: list[bytes] = []
    tap.read(lambda f: got.append(bytes(f)))
    assert got == frames(4)
