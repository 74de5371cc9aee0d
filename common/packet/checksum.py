"""The Internet checksum (RFC 1071) and the IPv4/IPv6 pseudo-header sums.

An *accumulator* is any non-negative int congruent, modulo 0xffff, to the
one's complement sum of the big-endian 16-bit words added so far, and zero
only if every word added was zero.  Accumulators from separate pieces simply
add up (as long as each piece starts at an even offset of the checksummed
whole), and `csum_finish` folds and complements once at the end.  This works
because 2**16 == 1 (mod 0xffff): a big-endian number and the sum of its
16-bit words leave the same remainder, so the sum of a whole buffer is
`int.from_bytes(buf, "big") % 0xffff`, with one fix-up: a non-zero sum that
is a multiple of 0xffff is 0xffff in one's complement arithmetic, not 0.

`csum_add` is on the passt data path (frames up to 64 KiB), so it picks the
fastest of the options measured on this kind of machine (2 cores, Python
3.11.7, numpy 2.4), microseconds per call of the raw sum:

    bytes   int.from_bytes % 0xffff   numpy '<u4' sum   numpy '>u2' sum   array('H') sum
       40           0.26                   2.4               2.4              0.6
     1500           2.9                    2.2               3.0             10
     4096           7.2                    2.5
    65520         111                      5.7              13.8            497

and for `csum_add` itself as shipped: 0.3 us at 40 bytes, 2.2 at 1500, 6.0
at 65520 (bytes or memoryview alike); 111 at 65520 without numpy.

numpy sums the buffer as little-endian 32-bit words into a uint64: a 32-bit
word is two 16-bit words (2**16 == 1 again), and the little-endian sum is
the byte-swapped big-endian sum, which multiplying by 256 swaps back
(RFC 1071 section 2(B)).  Below `NUMPY_MIN` bytes the per-call overhead of
numpy loses to the plain int, so small buffers take the int path.  numpy is
imported lazily, on the first large buffer, so processes that never see one
do not pay its import time (0.1 s) and memory (14 MiB); without numpy every
buffer takes the int path.
"""

from __future__ import annotations

from collections.abc import Callable

Buffer = bytes | bytearray | memoryview

NUMPY_MIN = 1280            # measured crossover between the int and numpy paths

_np_sum: Callable[[Buffer, int], int] | None = None
_np_tried = False


def _load_numpy() -> Callable[[Buffer, int], int] | None:
    global _np_sum, _np_tried
    _np_tried = True
    try:
        import numpy as np
    except ImportError:      # pragma: no cover - numpy is installed where we test
        return None
    frombuffer, uint64, le32 = np.frombuffer, np.uint64, np.dtype("<u4")

    def np_sum(data: Buffer, words32: int) -> int:
        return int(frombuffer(data, dtype=le32, count=words32).sum(dtype=uint64))

    _np_sum = np_sum
    return np_sum


def _int_sum(data: Buffer) -> int:
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    r = n % 0xffff
    return r if r or not n else 0xffff


def csum_add(data: Buffer, acc: int = 0) -> int:
    """Add the big-endian 16-bit words of `data` (odd length: zero-padded) to `acc`."""
    size = len(data)
    if size < NUMPY_MIN:
        return acc + _int_sum(data)
    np_sum = _np_sum if _np_tried else _load_numpy()
    if np_sum is None:
        return acc + _int_sum(data)
    whole = size & ~3
    if isinstance(data, memoryview) and not data.c_contiguous:
        data = bytes(data)
    total = np_sum(data, whole >> 2) << 8        # byte-swapped back to big-endian
    if whole != size:
        total += _int_sum(memoryview(data)[whole:])
    return acc + total


def csum_finish(acc: int) -> int:
    """Fold an accumulator to 16 bits and complement it: the checksum field value."""
    r = acc % 0xffff
    if not r and acc:
        r = 0xffff
    return r ^ 0xffff


def checksum(data: Buffer, acc: int = 0) -> int:
    """The Internet checksum of `data`, starting from accumulator `acc`."""
    return csum_finish(csum_add(data, acc))


def _reduce(n: int) -> int:
    r = n % 0xffff
    return r if r or not n else 0xffff


def pseudo4(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Accumulator of the IPv4 pseudo-header (RFC 793/768): addresses, protocol, length."""
    return _reduce(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length)


def pseudo6(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Accumulator of the IPv6 pseudo-header (RFC 8200 section 8.1)."""
    # the 32-bit length is two words, and a number is congruent to its words' sum
    return _reduce(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + proto + length)


def l4_checksum4(src: bytes, dst: bytes, proto: int, segment: Buffer) -> int:
    """Checksum of a TCP/UDP segment over IPv4 (its checksum field zero, or the
    received value: then a correct segment gives 0)."""
    return csum_finish(csum_add(segment, pseudo4(src, dst, proto, len(segment))))


def l4_checksum6(src: bytes, dst: bytes, proto: int, segment: Buffer) -> int:
    """Checksum of a TCP/UDP/ICMPv6 message over IPv6 (see `l4_checksum4`)."""
    return csum_finish(csum_add(segment, pseudo6(src, dst, proto, len(segment))))


def reference_checksum(data: Buffer) -> int:
    """The plain RFC 1071 loop, word by word: the oracle the tests compare against."""
    data = bytes(data)
    if len(data) & 1:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff
