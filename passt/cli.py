"""`passt`: networking for QEMU guests over a UNIX stream socket.

    passt [OPTIONS]

The order of start-up matters and is spelled out in `run` and `start_up`: everything that
can be refused because of bad input is refused before anything is created;
we fork into the background (unless -f) before creating anything, so that
the parent can report set-up failures with the child's exit status; the
socket and the forwarded ports are bound while we may still be root; the
pid file is written and privileges are dropped before the first guest is
served; the parent exits 0 only once the socket is listening (libvirt
starts QEMU as soon as passt returns).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from common import log as logsetup
from common.conf import Config, describe, host_config
from common.helper import Helper
from common.options import program_main
from common.process import PidFile, Readiness, SetupError, begin, daemonize, serve
from passt.vhost.protocol import capabilities_json

if TYPE_CHECKING:
    from passt.session import Session

log = logging.getLogger("passt")

def main(argv: list[str] | None = None) -> int:
    return program_main("passt", argv, run)


def parse_fd(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) > 0x7FFFFFFF:
        raise SetupError(f"invalid --fd: {text}")
    return int(text)


def run(opts: dict[str, Any], helper: Helper) -> int:
    if opts.get("print_capabilities"):
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
        session = start_up(conf, opts, fd, pid_file, run_as)
    except (SetupError, OSError) as exc:
        pid_file.remove()
        print(f"passt: {exc}", file=sys.stderr)
        readiness.failed(1)
        return 1

    # Readiness: from here on nothing may fail for a reason known at set-up.
    if not conf.process.foreground:
        logsetup.detach(conf.log, "passt")
        readiness.ready()
    return serve(session, pid_file, "passt")


def start_up(conf: Config, opts: dict[str, Any], fd: int | None, pid_file: PidFile,
             run_as: tuple[int, int] | None) -> Session:
    """The whole start-up: set-up, then checks, in order.

    Everything that can fail for a reason known now fails here, before the
    parent is told we are ready; on failure what exists is undone and the
    error (one line) propagates.
    """
    from passt.session import Session  # noqa: PLC0415

    session_class = Session
    if opts.get("vhost_user"):
        # the vhost-user modules load only in that mode (still before the sandbox)
        from passt.vhost.session import VhostUserSession  # noqa: PLC0415

        session_class = VhostUserSession
    session = session_class(conf, socket_path=opts.get("socket"), fd=fd,
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
        session.drop_privileges(run_as)
        session.start()
        # (the sandbox is entered here)
    except BaseException:
        session.close()
        raise
    return session


if __name__ == "__main__":
    sys.exit(main())
