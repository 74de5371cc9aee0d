"""Log lines a guest can cause, at a bounded rate: a flood never floods the log.

Two tools, both keyed by what happened (a fixed string or a code location,
never by something the guest chose, so the keys stay few):

- `RateLimited.log(key, level, msg, *args)`: the first line of a key is
  said at once; after it, at most one per `interval` seconds, telling how
  many were held back meanwhile.
- `HandlerErrors.failed(name, exc)`: a handler raised.  It is counted per
  handler; the first failure of each handler is logged with its traceback,
  later ones as a count, rate-limited as above.  The frame or event that
  caused it is lost, nothing else: the caller carries on with the next one.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

INTERVAL = 1.0


class RateLimited:
    def __init__(self, logger: logging.Logger, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._next: dict[str, float] = {}      # key -> earliest time of its next line
        self._held: Counter[str] = Counter()   # key -> lines held back since its last

    def allow(self, key: str) -> int | None:
        """None: hold this one back; else how many were held back before it."""
        now = self.clock()
        if now < self._next.get(key, 0.0):
            self._held[key] += 1
            return None
        self._next[key] = now + self.interval
        return self._held.pop(key, 0)

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        held = self.allow(key)
        if held is None or not self.logger.isEnabledFor(level):
            return
        if held:
            msg += " (%d more like it not shown)"
            args += (held,)
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(key, logging.WARNING, msg, *args)


class HandlerErrors:
    """Exceptions raised by handlers, counted per handler and logged rate-limited."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.counts: Counter[str] = Counter()
        self._limit = RateLimited(logger, interval, clock)

    def failed(self, name: str, exc: BaseException) -> None:
        n = self.counts[name] = self.counts[name] + 1
        held = self._limit.allow(name)
        if held is None:
            return
        if n == 1:
            self.logger.error("%s failed: %r; dropped what it was handling, carrying on",
                              name, exc, exc_info=exc)
        else:
            self.logger.error("%s failed again: %r (%d times in all)", name, exc, n)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def handler_name(exc: BaseException, skip: str) -> str:
    """Where `exc` left the code in file `skip`: the module and function it was raised
    through first (`common.dhcpv6.handle`), or `skip`'s own name if it started there."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == skip:
        tb = tb.tb_next
    if tb is None:
        return skip.rsplit("/", 1)[-1].removesuffix(".py")
    frame = tb.tb_frame
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}"
