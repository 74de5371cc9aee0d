"""The flow log (`--flow-log PATH|-`): JSON lines, buffered, size-capped, never blocking.

Rules of this module: it owns the file descriptor of the flow log, the
buffer in front of it and the size cap; it knows nothing of flows beyond the
dictionaries it is given (`common.gate` makes them from the records
`common.flowinfo` builds, so they are those `pesto --flows` shows).

- The descriptor is opened at start-up, before the sandbox, and everything
  later goes through it: the file is never opened again, and shrinking it
  re-reads its tail with pread (as `common.log` does for -l).
- Records are appended to a buffer; the buffer is written when it holds
  FLUSH_AT bytes, by the owner's timer at least once a second, and at exit.
  One write carries many records, so the loop pays little per flow.
- PATH is capped like --log-size: when a write would take the file past
  the cap, the oldest records go, so that the newest half is kept (whole
  lines only: a reader never sees a record cut in two).
- `-` is standard error, written through a descriptor of its own that does
  not block (a pipe or terminal is opened again, O_NONBLOCK, through
  /proc/self/fd/2; a file is written as it is): if the reader is slow the
  buffer keeps at most BUFFER_MAX bytes and further records are dropped
  and counted, so the loop never waits on it.
"""

from __future__ import annotations

import errno
import json
import os
import stat

from common.files import open_for_write

FLUSH_AT = 64 * 1024
BUFFER_MAX = 1 << 20
SIZE_MIN = 4096

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class FlowLog:
    def __init__(self, fd: int, *, cap: int | None, name: str) -> None:
        """`fd`: ours to write and close; `cap`: bytes the file may hold (None: no cap,
        for standard error)."""
        self.fd = fd
        self.cap = cap
        self.name = name
        self.buf = bytearray()
        self.size = os.fstat(fd).st_size if cap is not None else 0
        self.records = 0
        self.dropped = 0
        self.shrunk = 0
        self.write_errors = 0
        _encode({"primed": 1.5, "ok": True, "none": None})  # the encoder's lazy parts

    @classmethod
    def open(cls, path: str, cap: int) -> FlowLog:
        """The flow log at PATH (created 0600, appended to), or `-`: standard error."""
        if path == "-":
            return cls(_stderr_fd(), cap=None, name="standard error")
        fd = open_for_write(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, "flow log")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"flow log {path}: not a regular file "
                              "(use - for standard error)")
        except OSError:
            os.close(fd)
            raise
        return cls(fd, cap=cap, name=path)

    def add(self, record: dict) -> None:
        """Queue one record (one line)."""
        self.add_line(_encode(record).encode() + b"\n")

    def add_line(self, line: bytes) -> None:
        """Queue one record already written as a JSON line (ending in a newline)."""
        buf = self.buf
        if len(buf) + len(line) > BUFFER_MAX:
            self.flush()
            if len(buf) + len(line) > BUFFER_MAX:
                self.dropped += 1
                return
        buf += line
        self.records += 1
        if len(buf) >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered, as far as the descriptor takes it without waiting."""
        buf = self.buf
        if not buf or self.fd < 0:
            return
        if self.cap is not None:
            self._write_capped(buf)
            buf.clear()
            return
        try:
            n = os.write(self.fd, buf)
        except BlockingIOError:
            return
        except OSError:
            self.write_errors += 1
            buf.clear()
            return
        del buf[:n]

    def _write_capped(self, data: bytearray) -> None:
        cap = self.cap
        assert cap is not None
        if len(data) > cap // 2:
            # more than half the cap at once: only its newest whole lines
            cut = data.find(b"\n", len(data) - cap // 2 - 1) + 1
            self.dropped += data.count(b"\n", 0, cut)
            data = data[cut:]
            self._shrink(keep=0)
        elif self.size + len(data) > cap:
            self._shrink(keep=cap // 2 - len(data))
        try:
            os.write(self.fd, data)
            self.size += len(data)
        except OSError:
            self.write_errors += 1

    def _shrink(self, keep: int) -> None:
        """Keep the newest `keep` bytes of the file, from a line's start."""
        self.shrunk += 1
        try:
            size = os.fstat(self.fd).st_size
            keep = max(0, min(size, keep))
            start = size - keep
            tail = os.pread(self.fd, keep, start) if keep else b""
            if start > 0 and tail:
                tail = tail[tail.find(b"\n") + 1:]
            os.ftruncate(self.fd, 0)
            if tail:
                os.write(self.fd, tail)             # O_APPEND: at the new end
            self.size = len(tail)
        except OSError:
            self.write_errors += 1

    def close(self) -> None:
        """Write what is left (as far as possible without waiting) and close."""
        if self.fd < 0:
            return
        self.flush()
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


def _stderr_fd() -> int:
    """A descriptor for standard error that never blocks, not shared with our caller's
    file description (setting O_NONBLOCK on that one would change it for them too)."""
    try:
        mode = os.fstat(2).st_mode
    except OSError as exc:
        raise OSError(exc.errno, "flow log: no standard error") from None
    if stat.S_ISREG(mode):
        return os.dup(2)
    try:
        return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
                       | os.O_NOCTTY)
    except OSError as exc:
        raise OSError(exc.errno, "flow log: cannot open standard error without "
                      f"blocking: {exc.strerror}") from None
