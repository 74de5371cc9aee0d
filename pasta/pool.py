"""Sockets made in the namespace before they are needed, for the splice paths.

A socket in the namespace can only be made by the namespace thread
(`pasta.nsthread`); asking it from the accept path would make every spliced
connection wait for a round trip to that thread.  So each splice path keeps
a few ready (`target` per address family): `take` never waits, and the pool
asks for more (`make`, whose answer comes back later through the loop)
whenever it runs low.  Only when it is empty does a caller have to wait:
`wait(family, fn)` calls fn(sock) once a socket arrived (fn(None) if none
will: the namespace thread failed, or the pool closed).  At most
`WAITERS_MAX` callers wait; past that `wait` says no, and the caller refuses.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Any

    # make(family, n, done): n new non-blocking sockets in the namespace, then
    # done(True, sockets) or done(False, exception), later from the loop (or at once)
    Maker = Callable[[int, int, Callable[[bool, Any], None]], None]

log = logging.getLogger("splice")

WAITERS_MAX = 256

Waiter = Callable[["socket.socket | None"], None]


class SocketPool:
    def __init__(self, make: Maker, target: int) -> None:
        self.make = make
        self.target = target
        self.low = target // 2
        self._socks: dict[int, list[socket.socket]] = {socket.AF_INET: [],
                                                       socket.AF_INET6: []}
        self._waiters: dict[int, list[Waiter]] = {socket.AF_INET: [], socket.AF_INET6: []}
        self._filling: set[int] = set()
        self.closed = False

    def take(self, family: int) -> socket.socket | None:
        """A socket of `family` at once, or None (then `wait`)."""
        socks = self._socks[family]
        if len(socks) <= self.low:
            self._refill(family)
        return socks.pop() if socks else None

    def wait(self, family: int, fn: Waiter) -> bool:
        """fn(sock) as soon as the pool has one (fn(None): it will not); False if too many
        already wait."""
        waiters = self._waiters[family]
        if len(waiters) >= WAITERS_MAX or self.closed:
            return False
        waiters.append(fn)
        self._refill(family)
        return True

    def _refill(self, family: int) -> None:
        if family in self._filling or self.closed:
            return
        self._filling.add(family)
        n = self.target - len(self._socks[family]) + len(self._waiters[family])
        self.make(family, n, partial(self._filled, family))

    def _filled(self, family: int, ok: bool, value: Any) -> None:
        self._filling.discard(family)
        if self.closed:
            if ok:
                for s in value:
                    s.close()
            return
        waiters = self._waiters[family]
        if ok and not value:
            ok, value = False, "none made"
        if not ok:
            log.debug("splice: no sockets in the namespace: %s", value)
            self._waiters[family] = []
            for fn in waiters:
                fn(None)
            return
        socks = self._socks[family]
        socks.extend(value)
        while waiters and socks:
            waiters.pop(0)(socks.pop())
        if waiters or len(socks) <= self.low:
            self._refill(family)

    def close(self) -> None:
        self.closed = True
        for family, socks in self._socks.items():
            for s in socks:
                s.close()
            socks.clear()
            waiters, self._waiters[family] = self._waiters[family], []
            for fn in waiters:
                fn(None)
