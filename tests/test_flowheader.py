"""The per-flow header sums and the one's complement fold that finishes them."""

from __future__ import annotations

import socket

from hypothesis import example, given
from hypothesis import strategies as st

from common.flowheader import PROTO_ICMP, PROTO_TCP, PROTO_UDP, FlowHeader, fold
from common.packet.checksum import checksum, pseudo4, pseudo6


@given(st.integers(min_value=0, max_value=(1 << 80) - 1))
def test_fold_is_16_bits_and_keeps_the_sum(s):
    f = fold(s)
    assert 0 <= f <= 0xFFFF
    assert f % 0xFFFF == s % 0xFFFF          # one's complement: 0 and 0xffff are one value
    assert (f == 0) == (s == 0)


def test_fold_of_a_large_accumulator():
    # a 64 KiB frame's sum reaches 2**54; a fixed three-step fold left 0x1003a here
    s = 0xCDF8440729FFFF
    assert fold(s) == s % 0xFFFF == 0x3B
    assert fold(0xFFFF_FFFF_FFFF) == 0xFFFF
    assert fold(0x1FFFF) == 0x1


def test_ipv4_header_sum_matches_a_real_header():
    src, dst = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.10")
    hdr = FlowHeader(False, PROTO_UDP, src, dst, 53, 4000)
    total = 60
    header = (bytes([0x45, 0, 0, total, 0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0]) + src + dst)
    assert fold(hdr.ip_sum + total) ^ 0xFFFF == checksum(header)


def test_pseudo_sums():
    a4, b4 = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
    assert fold(FlowHeader(False, PROTO_TCP, a4, b4).pseudo_sum + 40) == fold(
        pseudo4(a4, b4, PROTO_TCP, 40))
    a6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    b6 = socket.inet_pton(socket.AF_INET6, "fe80::2")
    assert fold(FlowHeader(True, PROTO_UDP, a6, b6).pseudo_sum + 1000) == fold(
        pseudo6(a6, b6, PROTO_UDP, 1000))
    assert FlowHeader(False, PROTO_ICMP, a4, b4).pseudo_sum == 0     # ICMPv4: none


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.binary(min_size=16, max_size=16), st.integers(0, 0xFFFF))
@example(b"\xff" * 4, b"\xff" * 4, b"\xff" * 16, 0xFFFF)
def test_sums_are_folded_so_one_length_needs_one_step(s4, d4, a6, length):
    """The TCP writer adds a 16-bit length and folds once: the sums must be 16 bits."""
    for hdr in (FlowHeader(False, PROTO_TCP, s4, d4), FlowHeader(True, PROTO_TCP, a6, a6)):
        for s in (hdr.ip_sum + length, hdr.pseudo_sum + length):
            assert (s & 0xFFFF) + (s >> 16) == fold(s)
