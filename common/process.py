"""Process life: what starts once the Config stands, daemonising with a readiness
handshake, the pid file, and serving after readiness (`serve`).

`daemonize()` forks.  The parent stays until the child reports, then exits:
0 once the child says it is ready (namespace configured, sockets listening),
or the child's exit code when set-up failed (the child has already printed
why on the shared stderr).  Podman relies on this: exit 0 means the network
is configured, and it waits for our stdout/stderr to close, which `ready()`
does by pointing them at /dev/null.
"""

from __future__ import annotations

import logging
import os
import sys

from common import sandbox
from common.report import SetupError

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Protocol

    from common.conf import Config
else:
    Protocol = object

__all__ = ["PidFile", "Readiness", "SetupError", "begin", "daemonize", "serve"]


class Served(Protocol):
    def run(self) -> int: ...
    def close(self) -> None: ...


class Readiness:
    """The child's end of the handshake."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        # opened now: ready() comes after the sandbox, where no path can be opened
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) if fd is not None else -1

    def ready(self) -> None:
        """Tell the parent we are up and detach from its terminal and pipes."""
        devnull = self.devnull
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        self.devnull = -1
        if self.fd is not None:
            try:
                os.write(self.fd, b"OK")
            finally:
                os.close(self.fd)
                self.fd = None

    def failed(self, code: int) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, b"E%d" % code)
            finally:
                os.close(self.fd)
                self.fd = None


def daemonize() -> Readiness:
    """Fork; the parent waits for the child's verdict and exits with it."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(wfd)
        data = b""
        while True:
            chunk = os.read(rfd, 64)
            if not chunk:
                break
            data += chunk
        if data == b"OK":
            os._exit(0)
        code = 1
        if data.startswith(b"E") and data[1:].isdigit():
            code = int(data[1:]) or 1
        else:
            # the child died before it could say: reap it for its status
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status) or 1
            code = code if code > 0 else 128 - code
        os._exit(code)
    os.close(rfd)
    os.setsid()
    return Readiness(wfd)


class PidFile:
    """The -P file: opened (created, mode 0600, never through a symbolic link as
    root) at start-up, so a bad path is refused before anything exists and a
    privileged directory still works after we drop privileges; written once we
    are ready; removed on failure, and on exit when we may."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        if path:
            from common.files import open_for_write

            self.fd = open_for_write(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "pid file")

    def write(self) -> None:
        if self.fd is not None:
            os.write(self.fd, f"{os.getpid()}\n".encode())
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        """Remove the file if it is still ours (unwritten, or holding our PID).

        Not once the sandbox is entered: paths lead nowhere then, and the file
        stays, as C passt's does."""
        if not self.path or sandbox.entered():
            return
        try:
            if self.fd is None:
                with open(self.path) as f:
                    if f.read().strip() != str(os.getpid()):
                        return
            else:
                os.close(self.fd)
                self.fd = None
            os.unlink(self.path)
        except OSError:
            pass


def begin(conf: Config, prog: str) -> tuple[PidFile, tuple[int, int] | None]:
    """What pasta and passt do first once the Config stands: set up logging and say its
    notes, open the pid file (a bad path fails now, before anything exists), and decide
    who we run as (from who started us: before we join any user namespace)."""
    from common import isolation
    from common import log as logsetup

    try:
        logsetup.setup(conf.log, prog)
        pid_file = PidFile(conf.process.pid_file)
    except OSError as exc:
        raise SetupError(exc.strerror) from None
    for note in conf.notes:
        logging.getLogger(prog).warning(note)
    return pid_file, isolation.target_ids(conf.process.runas)


def serve(session: Served, pid_file: PidFile, prog: str) -> int:
    """After readiness: run until the loop stops, then undo everything.

    Whatever ends us now is said on the log (stderr is gone once the parent
    exited: the log file or syslog): the clean ends by those who decide them
    (signal, namespace gone, command exited), anything unexpected here.
    """
    log = logging.getLogger(prog)
    code = 1
    try:
        code = session.run()
    except Exception as exc:  # said on the log, then we exit
        log.critical("exiting on an unexpected error: %s", exc, exc_info=True)
    finally:
        try:
            session.close()
        except Exception as exc:
            log.error("while exiting: %s", exc, exc_info=True)
        pid_file.remove()
    return code
