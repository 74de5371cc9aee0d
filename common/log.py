"""Logging set-up: stderr in the foreground, a size-capped file, or syslog as a daemon.

Levels follow C passt: `-q` shows warnings and errors only, the default adds
informational messages, `-d` debug messages, and `--trace` one line per
packet (level TRACE, below DEBUG).  Hot paths guard trace calls with
`TRACE_ON` so per-packet logging costs nothing when it is off.
"""

from __future__ import annotations

import logging
import os
import sys

from common import report
from common.conf import LogConfig
from common.files import open_for_write

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
TRACE_ON = False


class CappedFileHandler(logging.Handler):
    """Append to a file; past `limit` bytes, drop the oldest half of it.

    Everything goes through the descriptor opened at start-up, the shrinking
    too: by then we may be nobody, who could not open the file again."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__()
        self.path = path
        self.limit = limit
        self.fd = open_for_write(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "log file")
        self.size = os.fstat(self.fd).st_size

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            if self.size + len(data) > self.limit:
                self._shrink(len(data))
            os.write(self.fd, data)
            self.size += len(data)
        except Exception:  # logging must never take the process down
            self.handleError(record)

    def _shrink(self, incoming: int) -> None:
        size = os.fstat(self.fd).st_size
        keep = max(0, min(size, self.limit // 2 - incoming))
        start = size - keep
        tail = os.pread(self.fd, keep, start) if keep else b""
        if start > 0:                  # starts mid-line: drop that partial line
            tail = tail[tail.find(b"\n") + 1:]
        os.ftruncate(self.fd, 0)
        os.write(self.fd, tail)        # O_APPEND: at the new end, offset 0
        self.size = len(tail)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        super().close()


def setup(conf: LogConfig, prog: str) -> None:
    """Configure the root logger for the foreground phase (stderr, and file if asked)."""
    global TRACE_ON
    TRACE_ON = conf.trace
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    level = TRACE if conf.trace else logging.DEBUG if conf.debug else (
        logging.WARNING if conf.quiet else logging.INFO)
    root.setLevel(level)
    if conf.file:
        fh = CappedFileHandler(conf.file, conf.size)
        fh.setFormatter(logging.Formatter(f"%(asctime)s {prog}[%(process)d]: %(message)s"))
        root.addHandler(fh)
    if not conf.file or conf.stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(sh)
    if not conf.file:
        root.addHandler(_SyslogWhenNobodyReads(prog))


class _SyslogWhenNobodyReads(logging.Handler):
    """Errors go to syslog when they have no log file and our stderr reached nobody
    (libvirt 9.0 gives us a pipe whose reader is gone)."""

    def __init__(self, prog: str) -> None:
        super().__init__(logging.ERROR)
        self.prog = prog

    def emit(self, record: logging.LogRecord) -> None:
        if report.broken():
            report.to_syslog(self.prog, record.getMessage())


def detach(conf: LogConfig, prog: str) -> None:
    """Once stderr is gone (daemon): keep the file, else fall back to syslog if present."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    if conf.file:
        return
    if os.path.exists("/dev/log"):
        # imported here: 5-10 ms of start-up that only a daemon logging to syslog pays
        from logging.handlers import SysLogHandler

        try:
            sh = SysLogHandler(address="/dev/log")
            sh.setFormatter(logging.Formatter(f"{prog}[%(process)d]: %(message)s"))
            root.addHandler(sh)
            return
        except OSError:
            pass
    root.addHandler(logging.NullHandler())
