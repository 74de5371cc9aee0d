"""The demux's fast path for IPv4 TCP frames routes exactly as the general path does.

Bytes in, calls out: a recording handler stands in for TCP, and every frame goes
both through the demux (`__call__`, with its fast path) and straight through
the general IPv4 path (`_ipv4`); the handler must see the same arguments, and
a frame dropped must be counted under the same reason.
"""

from __future__ import annotations

import random
import socket
import struct

import pytest

from common.demux import FrameDemux
from common.guest import GuestState
from common.packet.frames import build_ipv4_frame
from common.packet.tcp import ACK, PSH, build_tcp4
from tests.support import GUEST_MAC, GW4, HOST4, OUR_MAC, FakeTap, make_conf

G4, GW = socket.inet_aton(HOST4), socket.inet_aton(GW4)


def segment(payload: bytes = b"request", options: bytes = b"") -> bytes:
    frame = bytearray(build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 6, build_tcp4(
        G4, GW, 40000, 80, 1000, 2000, ACK | PSH, 512, payload)))
    if options:                       # IP options: the header grows, the length with it
        ihl = 5 + len(options) // 4
        frame[34:34] = options
        frame[14] = 0x40 | ihl
        struct.pack_into("!H", frame, 16, (frame[16] << 8 | frame[17]) + len(options))
    return bytes(frame)


def demux_pair(conf=None):
    """Two demuxes: `fast` used whole, `slow` only through its general IPv4 path."""
    conf = conf or make_conf("pasta")
    out = []
    for _ in range(2):
        seen: list[tuple] = []
        d = FrameDemux(conf, GuestState(conf, GUEST_MAC), FakeTap())
        d.tcp4 = lambda frame, l3, l4, end, key, seen=seen: seen.append(
            (l3, l4, end, bytes(key), bytes(frame[l4:end])))
        out.append((d, seen))
    return out


def route(frame: bytes):
    (fast, fast_seen), (slow, slow_seen) = demux_pair()
    fast(memoryview(frame))
    if len(frame) >= 14 and frame[12:14] == b"\x08\x00":
        slow._ipv4(memoryview(frame), len(frame))
    else:
        slow(memoryview(frame))
    return (fast_seen, dict(fast.counters)), (slow_seen, dict(slow.counters))


def test_plain_segment_reaches_tcp_without_trailing_padding():
    frame = segment()
    (seen, counters), _ = route(frame + bytes(18))        # Ethernet padding after it
    assert counters == {}
    assert seen == [(14, 34, len(frame), G4 + GW + struct.pack("!HH", 40000, 80),
                     frame[34:])]


def test_ip_options_take_the_general_path():
    frame = segment(options=bytes((1, 1, 1, 0)))           # NOP, NOP, NOP, end
    (seen, counters), slow = route(frame)
    assert counters == {}
    assert seen[0][:3] == (14, 38, len(frame))
    assert (seen, counters) == slow


@pytest.mark.parametrize("frag", [0x2000, 0x0001, 0x3FFF, 0x6000])  # MF, offsets, DF+MF
def test_fragments_are_dropped(frag):
    frame = bytearray(segment())
    struct.pack_into("!H", frame, 20, frag)
    (seen, counters), slow = route(bytes(frame))
    assert seen == [] and counters == {"fragment": 1}
    assert slow == (seen, counters)


@pytest.mark.parametrize("total", [0, 19, 20, 39, 0xFFFF])
def test_lengths_the_frame_cannot_hold_are_not_taken_on_trust(total):
    frame = bytearray(segment())
    struct.pack_into("!H", frame, 16, total)
    fast, slow = route(bytes(frame))
    assert fast == slow
    seen, counters = fast
    assert all(end <= len(frame) for _, _, end, _, _ in seen)


def test_no_ipv4_on_the_link_means_no_fast_path():
    conf = make_conf("pasta", ipv6_only=True)
    (fast, seen), _ = demux_pair(conf)
    fast(memoryview(segment()))
    assert seen == [] and dict(fast.counters) == {"ipv4": 1}


def test_mangled_segments_route_as_the_general_path_routes_them():
    """Bytes of the headers rewritten, cut short or padded: same call, same counter."""
    rng = random.Random(14)
    seeds = [segment(), segment(b""), segment(b"x" * 1400),
             segment(options=bytes((1, 1, 1, 0)))]
    for _ in range(20000):
        b = bytearray(rng.choice(seeds))
        how = rng.randrange(3)
        if how == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(14, min(len(b), 58))] = rng.randrange(256)
        elif how == 1:
            del b[rng.randrange(14, len(b)):]
        else:
            b += rng.randbytes(rng.randint(1, 64))
        fast, slow = route(bytes(b))
        assert fast == slow, bytes(b).hex()
