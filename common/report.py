"""Start-up errors where someone will read them, and a stderr that cannot hurt us.

Callers do not all read our stderr.  libvirt 9.0 starts passt with stderr a
pipe whose read end it has already closed; a daemon's stderr is /dev/null
once it detached.  So:

- `protect_stderr()` (first thing in main) makes writes to a stderr nobody
  reads harmless: Python ignores SIGPIPE, and a write that fails is dropped
  instead of raising (and `broken()` says so from then on);
- `error()` says a one-line start-up error on stderr and in the log file (-l)
  when one was given, written before we exit; when neither reached anyone,
  syslog gets it.

This module is on passt's start-up path before its socket listens: it
imports nothing beyond os and sys until an error is actually reported.
"""

from __future__ import annotations

import os
import sys


class SetupError(Exception):
    """Set-up failed; the message is one line."""


class _QuietStream:
    """A text stream over another that never raises on write or flush."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = stream is None

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def fileno(self) -> int:
        if self.stream is None:
            raise OSError("no stderr")
        return self.stream.fileno()

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def std_fds() -> None:
    """Standard descriptors a caller left closed are /dev/null, not the next file we open."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)     # lands on the lowest free number
            if null != fd:
                os.dup2(null, fd, inheritable=True)
                os.close(null)


def protect_stderr() -> None:
    if not isinstance(sys.stderr, _QuietStream):
        sys.stderr = _QuietStream(sys.stderr)


def broken() -> bool:
    """Whether nobody reads our stderr (as far as we could tell from writing to it)."""
    err = sys.stderr
    return err is None or bool(getattr(err, "broken", False))


def log_line(prog: str, message: str) -> str:
    """A line as the log file has them (see common.log)."""
    import time

    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{stamp},{int(now % 1 * 1000):03d} {prog}[{os.getpid()}]: {message}\n"


def _to_log_file(prog: str, message: str, path: str) -> bool:
    # once logging is set up, its file handler owns the file (size cap, descriptor)
    logging = sys.modules.get("logging")
    if logging is not None:
        for handler in logging.getLogger().handlers:
            if getattr(handler, "path", None) == path:
                handler.handle(logging.LogRecord(prog, logging.ERROR, __file__, 0, message,
                                                 None, None))
                return True
    from common.files import open_for_write

    try:
        fd = open_for_write(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "log file")
    except OSError:
        return False
    try:
        os.write(fd, log_line(prog, message).encode("utf-8", "replace"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def to_syslog(prog: str, message: str) -> None:
    try:
        import syslog

        syslog.openlog(prog, syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, message)
    except (ImportError, OSError):
        pass


def error(prog: str, message: str, log_file: str | None = None) -> None:
    """Say a start-up error: stderr, the log file if given, else syslog if stderr
    reached nobody."""
    protect_stderr()
    sys.stderr.write(f"{prog}: {message}\n")
    logged = _to_log_file(prog, message, log_file) if log_file else False
    if not logged and broken():
        to_syslog(prog, message)
