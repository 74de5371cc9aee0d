"""`passt`: networking for QEMU guests over a UNIX stream socket.

    passt [OPTIONS]

The order of start-up matters and is spelled out in `listen_early`, `run`
and `start_up`: the guest socket listens first of all, within milliseconds
of exec and before anything slow is imported (QEMU may connect at once; it
waits in the backlog); then what can be refused because of bad input is
refused; we fork into the background (unless -f), so that the parent can
report set-up failures with the child's exit status; the forwarded ports
are bound while we may still be root; the pid file is written and
privileges are dropped before the first guest is served; the parent exits
0 only once everything is set up (libvirt starts QEMU as soon as passt
returns), and the PID that stays is the one in the pid file.  Start-up
errors go to stderr, the log file and, if nobody reads stderr, syslog
(common.report).
"""

from __future__ import annotations

import sys

from common.options import program_main
from common.report import SetupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from common.conf import Config
    from common.helper import Helper
    from common.process import PidFile
    from passt.session import Session


def main(argv: list[str] | None = None) -> int:
    return program_main("passt", argv, run, early=listen_early)


def listen_early(opts: dict[str, Any]) -> tuple[int, ...]:
    """Bind and listen on the guest socket first of all, within milliseconds of exec.

    libvirt 9.0, and scripts that run `passt &` then QEMU, start QEMU a few
    milliseconds after us without waiting, and QEMU 7.2 connects once: the
    socket must listen before anything slow (imports, host discovery).  A
    guest that connects now waits in the backlog until we serve it.
    """
    if opts.get("fd") is not None or opts.get("print_capabilities"):
        return ()
    from passt.sockpath import SocketPathError, bind_socket

    try:
        opts["bound_socket"] = bind_socket(opts.get("socket"))
    except SocketPathError as exc:
        raise SetupError(str(exc)) from None
    return (opts["bound_socket"][0].fileno(),)


def parse_fd(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) > 0x7FFFFFFF:
        raise SetupError(f"invalid --fd: {text}")
    return int(text)


def run(opts: dict[str, Any], helper: Helper) -> int:
    bound = opts.pop("bound_socket", None)
    try:
        return _run(opts, helper, bound)
    finally:
        if bound is not None:          # not taken over by a session: close and remove it
            _discard(*bound)


def _discard(raw: Any, path: str) -> None:
    import os
    import stat

    if raw.fileno() < 0:
        return
    raw.close()
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _run(opts: dict[str, Any], helper: Helper, bound: tuple[Any, str] | None) -> int:
    from common import report
    from common.conf import host_config
    from common.process import Readiness, begin, daemonize, serve

    if opts.get("print_capabilities"):
        from passt.vhost.protocol import capabilities_json

        print(capabilities_json())
        return 0
    if opts.get("vhost_user") and sys.byteorder != "little":
        raise SetupError("--vhost-user needs a little-endian host (the rings are little-endian)")
    fd = parse_fd(opts.get("fd"))
    if fd is not None and opts.get("socket"):
        raise SetupError("--fd and --socket can't be given together")
    try:
        conf = host_config("passt", opts, helper)
    finally:
        helper.close()               # passt needs nothing more from netlink
    pid_file, run_as = begin(conf, "passt")
    readiness = Readiness(None)
    if not conf.process.foreground:
        readiness = daemonize()

    try:
        session = start_up(conf, opts, fd, bound, pid_file, run_as)
    except (SetupError, OSError) as exc:
        pid_file.remove()
        report.error("passt", exc.strerror if isinstance(exc, OSError) and exc.strerror
                     else str(exc), conf.log.file)
        readiness.failed(1)
        return 1

    # Readiness: from here on nothing may fail for a reason known at set-up.
    if not conf.process.foreground:
        readiness.ready()
    return serve(session, pid_file, "passt")


def start_up(conf: Config, opts: dict[str, Any], fd: int | None,
             bound: tuple[Any, str] | None, pid_file: PidFile,
             run_as: tuple[int, int] | None) -> Session:
    """The whole start-up: set-up, then checks, in order.

    Everything that can fail for a reason known now fails here, before the
    parent is told we are ready; on failure what exists is undone and the
    error (one line) propagates.
    """
    import logging

    from common import log as logsetup
    from common.conf import describe
    from passt.session import Session

    log = logging.getLogger("passt")
    session_class = Session
    if opts.get("vhost_user"):
        # the vhost-user modules load only in that mode (still before the sandbox)
        from passt.vhost.session import VhostUserSession

        session_class = VhostUserSession
    session = session_class(conf, socket_path=opts.get("socket"), bound=bound, fd=fd,
                            one_off=bool(opts.get("one_off")), owner=run_as)
    try:
        # set-up: capture file, the guest socket, listeners, signals
        session.setup()
        session.handle_signals()
        for line in describe(conf):
            log.info(line)
        for line in session.instructions():
            log.info(line)
        pid_file.write()
        if run_as is not None and conf.process.runas is None:
            log.info("started as root: running as uid %d, gid %d from now on", *run_as)
        session.start()
        if not conf.process.foreground:
            logsetup.detach(conf.log, "passt")   # syslog's socket: before the sandbox
        # the last step: the user we run as, our own user namespace, the empty root, the filter
        session.enter_sandbox(run_as)
    except BaseException:
        session.close()
        raise
    return session


if __name__ == "__main__":
    sys.exit(main())
