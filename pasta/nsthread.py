"""A thread that lives in the target network namespace and makes things there.

Sockets belong to the network namespace of the thread that creates them, and
a thread's namespace is its own (setns affects only the caller).  So one
helper thread enters the target namespace once, at start-up while we still
may, and from then on creates sockets, opens the tap and reads
/proc/thread-self/net files on request: `call(fn, *args)` runs fn in that
thread and returns its result (or raises its exception) in the caller.  The
main thread never leaves the host namespace, and no capability is needed
after set-up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from pasta.ns import CLONE_NEWNET, NamespaceError, setns


class NsThread:
    def __init__(self, netns_fd: int, name: str = "pasta-ns") -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(netns_fd,), name=name,
                                        daemon=True)
        self._thread.start()
        ok, err = self._results.get()
        if not ok:
            raise NamespaceError(f"cannot enter the network namespace: {err}")

    def _run(self, netns_fd: int) -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
        except OSError as exc:
            self._results.put((False, exc.strerror))
            return
        self._results.put((True, None))
        while True:
            item = self._requests.get()
            if item is None:
                return
            fn, args = item
            try:
                self._results.put((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._results.put((False, exc))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) inside the namespace and return its result."""
        self._requests.put((fn, args))
        ok, value = self._results.get()
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(1.0)
