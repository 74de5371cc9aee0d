"""Initial sequence numbers per RFC 6528: a 4-microsecond clock plus a keyed hash.

ISN = M + F(local address, local port, remote address, remote port, key):
M ticks every 4 us, F is BLAKE2s keyed with a random secret drawn once per
process, so sequence numbers are unpredictable to anyone who does not know
the key, yet increase for the same 4-tuple over time.
"""

from __future__ import annotations

import os
import time

# hashlib.blake2s is this very function; importing hashlib loads OpenSSL's library as
# well (5-15 ms of every start-up) for hashes we never use
from _blake2 import blake2s

_KEY = os.urandom(16)


def initial_seq(local: bytes, remote: bytes) -> int:
    """local/remote: packed address + 2-byte port of each end."""
    h = blake2s(local + remote, digest_size=4, key=_KEY).digest()
    clock = time.monotonic_ns() >> 12          # ~4.1 us ticks
    return (int.from_bytes(h, "big") + clock) & 0xFFFFFFFF
