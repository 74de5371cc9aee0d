"""A thread that lives in the target network namespace and makes things there.

Sockets belong to the network namespace of the thread that creates them, and
a thread's namespace is its own (setns affects only the caller).  So one
helper thread enters the target namespace once, at start-up while we still
may, and from then on creates sockets, opens the tap and reads
/proc/thread-self/net files on request.  The main thread never leaves the
host namespace, and no capability is needed after set-up.

Two ways to ask, and the loop never waits on the thread without a bound:

- `call(fn, *args)` runs fn there and returns its result (or raises its
  exception) here, waiting at most `timeout` seconds (TimeoutError after
  that; whatever fn made later is closed).  For set-up, and for what the
  loop needs at once but rarely (a listening socket for an `auto` port).
- `submit(fn, *args, done=cb)` returns at once; cb(ok, value) runs later
  in the loop (`attach`), woken through a pipe.  For what the data path
  needs: the splice paths' socket pools are refilled this way.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

from common.loop import IN, Loop
from pasta.ns import CLONE_NEWNET, NamespaceError, setns

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Any

    Done = Callable[[bool, Any], None]

CALL_TIMEOUT = 5.0             # seconds the loop may wait for the thread, at most


class _Reply:
    """Where one synchronous call's result goes; abandoned once its caller gave up."""
    __slots__ = ("queue", "abandoned")

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.abandoned = False


class NsThread:
    def __init__(self, netns_fd: int, name: str = "pasta-ns") -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop: Loop | None = None
        started = _Reply()
        self._thread = threading.Thread(target=self._run, args=(netns_fd, started), name=name,
                                        daemon=True)
        self._thread.start()
        ok, err = started.queue.get()
        if not ok:
            self._close_pipe()
            raise NamespaceError(f"cannot enter the network namespace: {err}")

    def _run(self, netns_fd: int, started: _Reply) -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
        except OSError as exc:
            started.queue.put((False, exc.strerror))
            return
        started.queue.put((True, None))
        while True:
            item = self._requests.get()
            if item is None:
                return
            fn, args, reply = item
            try:
                result = (True, fn(*args))
            except BaseException as exc:  # handed to the caller
                result = (False, exc)
            if isinstance(reply, _Reply):
                reply.queue.put(result)
                if reply.abandoned:
                    _discard(reply)
            else:
                self._done.put((reply, result))
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:
                    pass        # full: the loop has a wake-up pending already

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = CALL_TIMEOUT) -> Any:
        """Run fn(*args) inside the namespace and return its result, waiting at most
        `timeout` seconds (TimeoutError)."""
        reply = _Reply()
        self._requests.put((fn, args, reply))
        try:
            ok, value = reply.queue.get(timeout=timeout)
        except queue.Empty:
            reply.abandoned = True
            _discard(reply)       # in case it came in between
            raise TimeoutError(f"the namespace thread did not answer in {timeout} s") from None
        if not ok:
            raise value
        return value

    def attach(self, loop: Loop) -> None:
        """Run `submit`'s callbacks in this loop."""
        if self._loop is None:
            self._loop = loop
            loop.add(self._wake_r, IN, self._completed)

    def submit(self, fn: Callable[..., Any], *args: Any, done: Done) -> None:
        """Run fn(*args) inside the namespace; done(ok, result or exception) runs in the
        loop once it has (never from here)."""
        assert self._loop is not None, "submit() before attach()"
        self._requests.put((fn, args, done))

    def _completed(self, _events: int) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        while True:
            try:
                done, (ok, value) = self._done.get_nowait()
            except queue.Empty:
                return
            done(ok, value)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(1.0)
        if self._loop is not None:
            self._loop.remove(self._wake_r)
            self._loop = None
        while True:                         # made for callers that will not ask any more
            try:
                _done, (ok, value) = self._done.get_nowait()
            except queue.Empty:
                break
            if ok:
                _close(value)
        self._close_pipe()

    def _close_pipe(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _discard(reply: _Reply) -> None:
    """Close what an abandoned call made."""
    try:
        ok, value = reply.queue.get_nowait()
    except queue.Empty:
        return
    if ok:
        _close(value)


def _close(value: Any) -> None:
    for v in value if isinstance(value, list | tuple) else (value,):
        close = getattr(v, "close", None)
        if close is not None:
            close()
