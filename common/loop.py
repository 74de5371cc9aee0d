"""The one event loop: epoll, timers and signals, one thread.

Every registered file descriptor carries its handler, called as
`handler(events)` with the epoll event mask; dispatch is one dict lookup.
Handlers must not block and should drain their fd.  Timers are a deadline
heap (`call_later`, `call_every`); signals arrive through a wakeup pipe and
are dispatched like any other event, so a handler never runs inside a signal
frame.

A handler that raises is a bug, not a reason to stop serving every other
flow: the loop counts it per handler (`errors`), logs the first one of each
handler with its traceback and later ones at a bounded rate (a guest may be
able to trigger it again and again), and carries on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from functools import partial

from common.ratelimit import HandlerErrors

log = logging.getLogger("loop")

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ERR = select.EPOLLERR
HUP = select.EPOLLHUP
RDHUP = select.EPOLLRDHUP
ET = select.EPOLLET

Handler = Callable[[int], None]


class Timer:
    """A scheduled call; `cancel()` makes it a no-op."""
    __slots__ = ("deadline", "fn", "interval", "cancelled")

    def __init__(self, deadline: float, fn: Callable[[], None], interval: float | None) -> None:
        self.deadline = deadline
        self.fn = fn
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._wakeup: tuple[int, int] | None = None
        self._exit_code: int | None = None
        self.errors = HandlerErrors(log)
        # the time of this turn of the loop: handlers stamp flows with it rather than
        # each reading the clock (it lags the clock by one turn's work at most)
        self.now = time.monotonic()
        self.turn = 0              # turns of the loop so far (one epoll_wait each)

    @property
    def handler_errors(self) -> int:
        """Exceptions handlers and timers raised, in all."""
        return self.errors.total

    # ------------------------------------------------------------ fds

    def add(self, fd: int, events: int, handler: Handler) -> None:
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Forget fd (call before closing it)."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def forget(self, fd: int) -> None:
        """Forget fd that is about to be closed, without telling epoll: closing a
        descriptor that was never duplicated takes it out of the epoll set anyway, and
        that saves a system call per descriptor."""
        self._handlers.pop(fd, None)

    def watching(self, fd: int) -> bool:
        return fd in self._handlers

    def burst(self, holder) -> bool:
        """Whether a level-triggered descriptor read now was also read on the previous
        turn (a burst), recording this turn's read in `holder.read_turn`.  Outside a
        burst a reader may stop early (only a read that fails says a queue is empty: a
        system call and an exception built); what it leaves, epoll reports on the next
        turn, which makes that a burst."""
        turn = self.turn
        burst = holder.read_turn == turn - 1
        holder.read_turn = turn
        return burst

    def reads(self, holder, most: int) -> int:
        """How many datagrams an event of a level-triggered socket should read: one (an
        answer comes alone), or up to `most` in a burst (`burst`)."""
        return most if self.burst(holder) else 1

    # ------------------------------------------------------------ timers

    def call_at(self, deadline: float, fn: Callable[[], None],
                interval: float | None = None) -> Timer:
        timer = Timer(deadline, fn, interval)
        heapq.heappush(self._timers, (deadline, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, fn)

    def call_every(self, interval: float, fn: Callable[[], None],
                   first: float | None = None) -> Timer:
        return self.call_at(time.monotonic() + (interval if first is None else first), fn,
                            interval)

    def _run_timers(self, now: float) -> float:
        """Run due timers; return seconds until the next one (-1: none)."""
        timers = self._timers
        while timers:
            deadline, _, timer = timers[0]
            if timer.cancelled:
                heapq.heappop(timers)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(timers)
            if timer.interval is not None:
                timer.deadline = max(deadline + timer.interval, now)
                heapq.heappush(timers, (timer.deadline, next(self._seq), timer))
            try:
                timer.fn()
            except Exception as exc:  # see module docstring
                self.errors.failed(f"timer {_name(timer.fn)}", exc)
        return -1.0

    # ------------------------------------------------------------ signals

    def on_signal(self, signum: int, fn: Callable[[int], None]) -> None:
        """Run fn(signum) from the loop (not from the signal frame) when signum arrives."""
        if self._wakeup is None:
            rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wakeup = (rfd, wfd)
            signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
            self.add(rfd, IN, self._read_signals)
        self._signal_handlers[signum] = fn
        signal.signal(signum, _noop_signal_handler)

    def _read_signals(self, _events: int) -> None:
        assert self._wakeup is not None
        try:
            data = os.read(self._wakeup[0], 64)
        except BlockingIOError:
            return
        for signum in data:
            fn = self._signal_handlers.get(signum)
            if fn is not None:
                fn(signum)

    # ------------------------------------------------------------ running

    def stop(self, code: int = 0) -> None:
        """Leave run() with this exit code once the current event is handled."""
        if self._exit_code is None:
            self._exit_code = code

    def run(self) -> int:
        handlers = self._handlers
        timers = self._timers
        poll = self._epoll.poll
        monotonic = time.monotonic
        while self._exit_code is None:
            self.now = now = monotonic()
            if not timers:
                timeout = -1.0
            else:
                deadline, _, top = timers[0]
                if deadline > now and not top.cancelled:
                    timeout = deadline - now        # nothing due, the usual turn: no call
                else:
                    timeout = self._run_timers(now)
            if self._exit_code is not None:
                break
            ready = poll(timeout, 256)
            self.now = monotonic()
            self.turn += 1
            for fd, events in ready:
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception as exc:  # see module docstring
                    self.errors.failed(_name(handler), exc)
        return self._exit_code

    def close(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        self._epoll.close()


def _name(fn: Callable) -> str:
    """A handler's name for counting its failures: a code location, never data."""
    while isinstance(fn, partial):
        fn = fn.func
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _noop_signal_handler(_signum: int, _frame: object) -> None:
    """The wakeup fd carries the signal to the loop; nothing to do here."""
