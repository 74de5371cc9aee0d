"""StreamTap, passt's backend: length-prefixed frames on a UNIX stream socket.

The peer end of a socketpair plays QEMU: bytes in, frames out (split,
merged, truncated, oversized), frames in, bytes out, and a peer that stops
reading gets a bounded queue and dropped frames, never a closed socket.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.loop import Loop
from common.pcap import Pcap
from common.tap import FRAME_MAX, HEADROOM, STREAM_RBUF, StreamTap


def prefixed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


def make_frame(i: int, size: int) -> bytes:
    body = (i.to_bytes(4, "big") * (size // 4 + 1))[:size - 14]
    return b"\x52\x54\x00\x12\x34\x56" + b"\x02" * 6 + b"\x08\x00" + body


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tap = StreamTap(ours)
    yield tap, peer
    peer.close()
    tap.close()


class Collect:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def __call__(self, frame: memoryview) -> None:
        self.frames.append(bytes(frame))


def read_all(tap: StreamTap, sink: Collect) -> bool:
    return tap.read(sink)


def test_merged_frames_in_one_write(pair):
    tap, peer = pair
    frames = [make_frame(i, 60 + i * 37) for i in range(20)]
    peer.sendall(b"".join(prefixed(f) for f in frames))
    sink = Collect()
    assert tap.read(sink)
    assert sink.frames == frames
    assert tap.frames_in == 20


def test_frame_split_across_reads_byte_by_byte(pair):
    tap, peer = pair
    frames = [make_frame(1, 100), make_frame(2, 1514)]
    data = b"".join(prefixed(f) for f in frames)
    sink = Collect()
    for i in range(len(data)):
        peer.send(data[i:i + 1])
        assert tap.read(sink)
        if i < 4 + 100 - 1:
            assert sink.frames == []
    assert sink.frames == frames


def test_largest_frames_and_buffer_wraparound(pair):
    tap, peer = pair
    # more than the receive buffer, in awkward pieces, forces the tail to move
    frames = [make_frame(i, FRAME_MAX - (i % 3)) for i in range(3 * STREAM_RBUF // FRAME_MAX)]
    data = b"".join(prefixed(f) for f in frames)
    sink = Collect()
    writer = threading.Thread(target=peer.sendall, args=(data,))
    writer.start()
    while len(sink.frames) < len(frames):
        assert tap.read(sink)
    writer.join()
    assert sink.frames == frames


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(14, 3000), min_size=1, max_size=12),
       cuts=st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_any_split_gives_the_same_frames(sizes, cuts):
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tap = StreamTap(ours)
        frames = [make_frame(i, s) for i, s in enumerate(sizes)]
        data = b"".join(prefixed(f) for f in frames)
        sink = Collect()
        pos = 0
        for cut in cuts * (len(data) // sum(cuts) + 1):
            if pos >= len(data):
                break
            peer.sendall(data[pos:pos + cut])
            pos += cut
            assert tap.read(sink)
        assert sink.frames == frames
    finally:
        peer.close()
        ours.close()


def test_eof_and_truncated_frame_end_the_link(pair):
    tap, peer = pair
    peer.sendall(prefixed(make_frame(1, 80)) + prefixed(make_frame(2, 80))[:30])
    sink = Collect()
    assert tap.read(sink)
    peer.shutdown(socket.SHUT_WR)
    assert not tap.read(sink)
    assert sink.frames == [make_frame(1, 80)]


def test_oversized_length_ends_the_link(pair):
    tap, peer = pair
    peer.sendall(prefixed(make_frame(1, 80)) + struct.pack("!I", FRAME_MAX + 1) + b"x" * 100)
    sink = Collect()
    assert not tap.read(sink)
    assert sink.frames == [make_frame(1, 80)]
    assert tap.bad_frames == 1


def test_runt_frames_are_passed_on_for_the_demux_to_count(pair):
    tap, peer = pair
    peer.sendall(prefixed(b"") + prefixed(b"abc") + prefixed(make_frame(3, 64)))
    sink = Collect()
    assert tap.read(sink)
    assert sink.frames == [b"", b"abc", make_frame(3, 64)]


def recv_frames(peer: socket.socket, n: int) -> list[bytes]:
    out, data = [], b""
    peer.settimeout(5)
    while len(out) < n:
        while len(data) >= 4 and len(data) - 4 >= struct.unpack_from("!I", data)[0]:
            length = struct.unpack_from("!I", data)[0]
            out.append(data[4:4 + length])
            data = data[4 + length:]
        if len(out) < n:
            data += peer.recv(1 << 20)
    assert data == b""
    return out


def test_send_uses_headroom_and_send_frame(pair):
    tap, peer = pair
    assert tap.headroom >= 4 and tap.headroom == HEADROOM
    assert tap.csum_offload is False
    frame = make_frame(7, 200)
    buf = bytearray(HEADROOM) + frame + b"trailing junk"
    assert tap.send(buf, HEADROOM, HEADROOM + len(frame))
    assert tap.send_frame(make_frame(8, 60))
    assert tap.send_frame(memoryview(make_frame(9, 61)))
    assert recv_frames(peer, 3) == [frame, make_frame(8, 60), make_frame(9, 61)]
    assert tap.frames_out == 3


def fill(tap: StreamTap, count: int, size: int) -> tuple[list[bytes], int]:
    """Send `count` frames; the ones accepted, in order, and how many were refused."""
    accepted, refused = [], 0
    for i in range(count):
        frame = make_frame(i, size)
        buf = bytearray(HEADROOM) + frame
        if tap.send(buf, HEADROOM, len(buf)):
            accepted.append(frame)
        else:
            refused += 1
    return accepted, refused


def drain_queue(tap: StreamTap, peer: socket.socket, n: int) -> list[bytes]:
    """The peer reads `n` frames while the tap's queue drains (each time the socket has
    room, EPOLLOUT would call on_writable); the frames, in the order they came."""
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(recv_frames(peer, n)))
    reader.start()
    while tap.blocked:
        tap.on_writable()
    reader.join(10)
    return got


def test_slow_reader_gets_bounded_queue_then_everything_in_order():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    limit = 256 << 10
    tap = StreamTap(ours, pending_max=limit, sndbuf=0)
    try:
        accepted, refused = fill(tap, 400, 9000)
        assert refused > 0, "the socket and the queue should have filled up"
        assert tap.blocked and 0 < tap.queued <= limit
        assert tap.dropped_out == refused
        assert drain_queue(tap, peer, len(accepted)) == accepted
        # the link is intact: new frames go straight through again
        assert fill(tap, 3, 500) == ([make_frame(i, 500) for i in range(3)], 0)
        assert recv_frames(peer, 3) == [make_frame(i, 500) for i in range(3)]
    finally:
        peer.close()
        tap.close()


def test_epollout_drives_the_queue_through_the_loop():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    loop = Loop()
    tap = StreamTap(ours, loop, pending_max=1 << 20, sndbuf=0)
    from common.loop import IN, OUT

    def on_event(events: int) -> None:
        if events & OUT:
            tap.on_writable()

    loop.add(tap.fileno(), IN, on_event)
    try:
        accepted, refused = fill(tap, 60, 16000)
        assert refused == 0 and tap.blocked
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(recv_frames(peer, len(accepted))))
        reader.start()

        def check() -> None:
            if not tap.blocked:
                loop.stop(0)

        loop.call_every(0.01, check)
        loop.call_later(10, lambda: loop.stop(1))
        assert loop.run() == 0
        reader.join(10)
        assert got == accepted and not tap.blocked
    finally:
        peer.close()
        tap.close()
        loop.close()


def test_peer_gone_is_a_drop_not_an_exception(pair):
    tap, peer = pair
    peer.close()
    assert not tap.send_frame(make_frame(1, 60))
    assert not tap.send_frame(make_frame(2, 60))
    assert tap.dropped_out == 2
    assert not tap.read(Collect())


def test_pcap_records_both_directions(tmp_path, pair):
    tap, peer = pair
    tap.pcap = Pcap(str(tmp_path / "cap.pcap"))
    peer.sendall(prefixed(make_frame(1, 70)))
    tap.read(Collect())
    tap.send_frame(make_frame(2, 80))
    tap.pcap.close()
    data = (tmp_path / "cap.pcap").read_bytes()
    assert len(data) == 24 + 16 + 70 + 16 + 80
    assert make_frame(1, 70) in data and make_frame(2, 80) in data
    os.unlink(tmp_path / "cap.pcap")


def test_each_frame_once_even_when_the_sink_raises(pair):
    """A frame whose handler raises is not handed on again, nor are those before it."""
    tap, peer = pair
    frames = [make_frame(i, 80) for i in range(5)]
    peer.sendall(b"".join(prefixed(f) for f in frames))
    seen: list[bytes] = []

    def sink(frame: memoryview) -> None:
        seen.append(bytes(frame))
        if bytes(frame) == frames[2]:
            raise ValueError("a handler's bug")

    with pytest.raises(ValueError):
        tap.read(sink)
    assert tap.backlog                  # frames 3 and 4 wait in the buffer, not the socket
    assert tap.read(sink)
    assert seen == frames


def test_one_read_hands_on_a_batch_then_the_backlog(pair):
    from common.tap import READ_BATCH

    tap, peer = pair
    frames = [make_frame(i, 60) for i in range(READ_BATCH * 3 + 7)]
    peer.sendall(b"".join(prefixed(f) for f in frames))
    sink = Collect()
    assert tap.read(sink)
    assert len(sink.frames) == READ_BATCH and tap.backlog
    while tap.backlog:
        tap.read(sink)
    assert sink.frames == frames


def test_send_many_is_one_write_of_every_frame_in_order(pair):
    tap, peer = pair
    frames = [make_frame(i, 100 + 300 * i) for i in range(5)]
    bufs = [bytearray(HEADROOM) + f + b"junk" for f in frames]
    run = [(b, HEADROOM, HEADROOM + len(f)) for b, f in zip(bufs, frames, strict=True)]
    assert tap.send_many(run) == 0
    assert recv_frames(peer, 5) == frames
    assert tap.frames_out == 5 and not tap.blocked


def test_send_many_queues_what_the_socket_does_not_take_then_keeps_order():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tap = StreamTap(ours, pending_max=1 << 20, sndbuf=0)
    try:
        accepted = []
        for run in range(8):            # until the socket is full and a run is cut short
            frames = [make_frame(run * 4 + i, 60000) for i in range(4)]
            bufs = [bytearray(HEADROOM) + f for f in frames]
            dropped = tap.send_many([(b, HEADROOM, len(b)) for b in bufs])
            accepted += frames[:len(frames) - dropped]
            assert dropped == 0 or tap.blocked
        assert tap.blocked, "the socket should have filled up"
        # later frames wait behind the queue, never ahead of it
        last = make_frame(99, 70)
        assert tap.send(bytearray(HEADROOM) + last, HEADROOM, HEADROOM + len(last))
        accepted.append(last)
        assert drain_queue(tap, peer, len(accepted)) == accepted
    finally:
        peer.close()
        tap.close()


def test_send_many_after_the_peer_left_drops_every_frame(pair):
    tap, peer = pair
    peer.close()
    frames = [bytearray(HEADROOM) + make_frame(i, 80) for i in range(3)]
    assert tap.send_many([(b, HEADROOM, len(b)) for b in frames]) == 3
    assert tap.dropped_out == 3
