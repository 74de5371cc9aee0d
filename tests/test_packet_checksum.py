"""Internet checksum: known vectors, and the fast paths against the plain RFC 1071 loop."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.packet import checksum as ck
from common.packet.checksum import (
    NUMPY_MIN,
    checksum,
    csum_add,
    csum_finish,
    l4_checksum4,
    l4_checksum6,
    pseudo4,
    pseudo6,
    reference_checksum,
)


def randbytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum(data) == reference_checksum(data) == 0xffff - 0xddf2


def test_ipv4_header_vector():
    # a textbook header whose checksum field holds b861
    header = bytes.fromhex("45000073000040004011b861c0a80001c0a800c7")
    assert checksum(header) == 0
    zeroed = header[:10] + b"\0\0" + header[12:]
    assert checksum(zeroed) == 0xb861


@pytest.mark.parametrize("data, expected", [
    (b"", 0xffff),
    (b"\0", 0xffff),
    (b"\0" * 70000, 0xffff),                   # all zero: one's complement sum is +0
    (b"\xff\xff", 0),                          # sum 0xffff (-0) complements to 0
    (b"\xff" * 4096, 0),                       # numpy path, sum a multiple of 0xffff
    (b"\xff" * 4097, 0xff),
    (b"\x01", 0xfeff),                         # odd length: zero-padded on the right
    (b"\x12\x34\x56", 0xffff - 0x1234 - 0x5600),
])
def test_edge_values(data, expected):
    assert reference_checksum(data) == expected
    assert checksum(data) == expected
    assert checksum(memoryview(data)) == expected
    assert checksum(bytearray(data)) == expected


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, NUMPY_MIN - 1, NUMPY_MIN, NUMPY_MIN + 1,
                                  NUMPY_MIN + 2, NUMPY_MIN + 3, 1500, 9001, 65535, 65536])
def test_sizes_around_the_numpy_threshold(size):
    for seed in range(3):
        data = randbytes(seed * 100000 + size, size)
        assert checksum(data) == reference_checksum(data)
        view = memoryview(bytearray(b"\xaa" + data))[1:]        # unaligned view
        assert checksum(view) == reference_checksum(data)


def test_int_path_without_numpy(monkeypatch):
    monkeypatch.setattr(ck, "_np_tried", True)
    monkeypatch.setattr(ck, "_np_sum", None)
    data = randbytes(7, 65521)
    assert checksum(data) == reference_checksum(data)


def test_non_contiguous_view():
    data = randbytes(11, 8000)
    view = memoryview(data)[::2]
    assert checksum(view) == reference_checksum(bytes(view))


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_matches_reference(data):
    assert checksum(data) == reference_checksum(data)
    # a correct checksum appended makes the whole sum check to zero
    padded = data + b"\0" * (len(data) & 1)
    assert checksum(padded + struct.pack("!H", checksum(padded))) == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 1 << 30), st.integers(NUMPY_MIN, 66000))
def test_large_buffers_match_reference(seed, size):
    data = randbytes(seed, size)
    assert checksum(data) == reference_checksum(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 1 << 30), st.integers(0, 6000), st.data())
def test_pieces_at_even_offsets_add_up(seed, size, draw):
    data = randbytes(seed, size)
    cuts = sorted(draw.draw(st.lists(st.integers(0, size // 2), max_size=5)))
    acc, start = 0, 0
    for cut in cuts + [None]:
        end = size if cut is None else cut * 2
        acc = csum_add(memoryview(data)[start:end], acc)
        start = end
    assert csum_finish(acc) == reference_checksum(data)


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 255), st.binary(max_size=200))
def test_pseudo4_matches_explicit_header(src, dst, proto, segment):
    explicit = src + dst + bytes((0, proto)) + struct.pack("!H", len(segment))
    expected = reference_checksum(explicit + segment + b"\0" * (len(segment) & 1))
    # the segment follows a 12-byte (even) pseudo-header, so odd lengths pad the same
    assert csum_finish(csum_add(segment, pseudo4(src, dst, proto, len(segment)))) == expected
    assert l4_checksum4(src, dst, proto, segment) == expected


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.integers(0, 255), st.binary(max_size=200), st.integers(0, 0xffffffff))
def test_pseudo6_matches_explicit_header(src, dst, proto, segment, length):
    explicit = src + dst + struct.pack("!I3xB", length, proto)
    assert csum_finish(pseudo6(src, dst, proto, length)) == reference_checksum(explicit)
    explicit = src + dst + struct.pack("!I3xB", len(segment), proto)
    assert l4_checksum6(src, dst, proto, segment) == reference_checksum(explicit + segment)


def test_pseudo_all_zero_is_zero_accumulator():
    # zero in, zero out: an all-zero pseudo-header must not become 0xffff
    assert pseudo4(b"\0" * 4, b"\0" * 4, 0, 0) == 0
    assert checksum(b"\0\0", pseudo6(b"\0" * 16, b"\0" * 16, 0, 0)) == 0xffff
