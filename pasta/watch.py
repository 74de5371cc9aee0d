"""Knowing when the namespace we serve is gone, so that we quit by ourselves.

Podman never kills pasta: it unmounts and removes the netns file and
expects pasta to go.  For a `--netns PATH` target we watch PATH's directory
with inotify (any event about that name triggers a check) and, as a safety
net for an unmount without removal, re-check once a second; the namespace is
gone when PATH no longer exists or no longer is the nsfs inode we opened.
For a PID target (or a spawned command) a pidfd tells us when the process
exits.  So does a `--netns /proc/PID/ns/net` path (rootlesskit and scripts pass
those): such a file lives exactly as long as its process, procfs sends no
inotify events, and once we have joined the process's user namespace and
given up our capabilities the kernel may refuse us a stat() of it anyway.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable

from common.loop import IN, Loop

log = logging.getLogger("watch")

_PROC_NS = re.compile(r"/proc/(\d+)(?:/task/\d+)?/ns/[^/]+")


def proc_ns_owner(path: str) -> int | None:
    """The PID whose namespace file `path` is (/proc/PID/ns/NAME), else None."""
    match = _PROC_NS.fullmatch(os.path.normpath(path))
    return int(match.group(1)) if match else None


class NetnsFileWatch:
    def __init__(self, loop: Loop, path: str, netns_fd: int,
                 on_gone: Callable[[], None]) -> None:
        self.path = path
        self.name = os.path.basename(path)
        # the check looks the name up from a descriptor of its directory, opened now:
        # inside the sandbox no path leads anywhere, but this descriptor still sees
        # the directory as the caller's mount namespace has it
        self.dir_fd = os.open(os.path.dirname(path) or ".",
                              os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(netns_fd)
        self.ident = (st.st_dev, st.st_ino)
        self.on_gone = on_gone
        # only a --netns PATH target needs it: the import (ctypes.util, subprocess) would
        # cost every other start-up 5-10 ms
        from inotify_simple import INotify, flags

        self.inotify = INotify()
        self.inotify.add_watch(os.path.dirname(path) or ".",
                               flags.DELETE | flags.MOVED_FROM | flags.CREATE | flags.ATTRIB
                               | flags.DELETE_SELF | flags.UNMOUNT)
        loop.add(self.inotify.fileno(), IN, self._event)
        # due on the monotonic clock's whole seconds, as the `auto` port scans
        # (common/listeners.py): an idle pasta wakes once a second for all of them
        self.timer = loop.call_every(1.0, self.check, first=1.0 - time.monotonic() % 1.0)

    def _event(self, _events: int) -> None:
        for ev in self.inotify.read(timeout=0):
            if not ev.name or ev.name == self.name:
                self.check()
                return

    def verify(self) -> None:
        """The set-up check, made as the user we run as: the periodic check can see
        the file, and it still is the namespace we opened.  Raises OSError with a
        one-line reason."""
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd)     # as gone() looks it up
        except OSError as exc:
            raise OSError(exc.errno, f"cannot watch namespace file {self.path} as uid "
                          f"{os.geteuid()}: {exc.strerror} (see --runas, --no-netns-quit)",
                          self.path) from None
        if (st.st_dev, st.st_ino) != self.ident:
            raise OSError(0, f"namespace file {self.path} changed while we set up")

    def gone(self) -> bool:
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            log.info("namespace file %s is gone, exiting", self.path)
            return True
        except OSError as exc:
            log.warning("cannot check namespace file %s: %s, exiting", self.path, exc.strerror)
            return True
        if (st.st_dev, st.st_ino) != self.ident:
            log.info("namespace file %s no longer is our namespace, exiting", self.path)
            return True
        return False

    def check(self) -> None:
        if self.gone():
            self.timer.cancel()
            self.on_gone()


class ProcessWatch:
    """Calls on_exit() once the process `pid` has exited (via a pidfd)."""

    def __init__(self, loop: Loop, pid: int, on_exit: Callable[[], None]) -> None:
        self.loop = loop
        self.pid = pid
        self.on_exit = on_exit
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:          # it exited (and was reaped) while we set up
            self.fd = None
            loop.call_later(0, on_exit)
            return
        loop.add(self.fd, IN, self._event)

    def _event(self, _events: int) -> None:
        assert self.fd is not None
        self.loop.remove(self.fd)
        os.close(self.fd)
        self.on_exit()
