"""`pasta`: give a network namespace a tap link configured like the host's.

    pasta [OPTIONS] [PID | [--] COMMAND [ARG...]]
    pasta [OPTIONS] --netns PATH|NAME

The order of set-up matters and is spelled out in `run` and `start_up`:
everything that can fail because of bad input is checked before anything is
created; the user namespace is joined while we are still single-threaded;
what must keep working as the run-as user is checked as that user once the
tap, the namespace thread, every socket and the namespace watch exist;
privileges are dropped after that; only then is the parent (or the held-back
command) released: exit 0 means configured and staying up.
"""

from __future__ import annotations

import os
import sys

from common import phases  # noqa: F401 - first: it notes when our first line ran
from common.options import program_main
from common.report import SetupError

TYPE_CHECKING = False   # typing itself costs 2 ms at start-up
if TYPE_CHECKING:
    from typing import Any

    from common.conf import Config
    from common.helper import Helper
    from common.process import PidFile
    from pasta.ns import SpawnedCommand, Target
    from pasta.session import Session


def default_shell() -> str:
    shell = os.environ.get("SHELL")
    if shell:
        return shell
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_shell or "/bin/sh"
    except KeyError:
        return "/bin/sh"


def split_target(opts: dict[str, Any]) -> tuple[int | None, list[str] | None]:
    """(PID, None), (None, COMMAND) or (None, None) for --netns."""
    rest = opts.get("target") or []
    if opts.get("netns"):
        if rest:
            raise SetupError("--netns can't be given with a PID or a command")
        return None, None
    if len(rest) == 1 and rest[0].isdigit():
        pid = int(rest[0])
        if pid <= 0:
            raise SetupError(f"invalid PID: {rest[0]}")
        return pid, None
    if opts.get("userns"):
        raise SetupError("--userns needs --netns or a PID")
    return None, (list(rest) or [default_shell()])


def main(argv: list[str] | None = None) -> int:
    # the helper configures the namespace (pasta.netcfg): it loads that module meanwhile
    return program_main("pasta", argv, run, helper_modules=("pasta.netcfg",))


def run(opts: dict[str, Any], helper: Helper) -> int:
    # Everything that can be refused is refused here, before anything exists.
    pid, command = split_target(opts)
    from common.conf import ConfigError, host_config, start_host_discovery

    start_host_discovery(opts, helper)
    # What set-up needs is imported now, while the helper still loads pyroute2
    # (on another core) and looks at the host, before we wait for its answer
    import logging
    import signal

    from common import report
    from common.helper import HelperError
    from common.process import Readiness, begin, daemonize, serve
    from pasta import session as _session  # noqa: F401 - the data plane, loaded now
    from pasta.ns import NamespaceError, SpawnedCommand, join_userns, open_target

    phases.mark("imported")
    conf = host_config("pasta", opts, helper)
    phases.mark("host config")
    if opts.get("ns_mac_addr"):
        from common.conf import parse_mac
        parse_mac(opts["ns_mac_addr"])
    pid_file, run_as = begin(conf, "pasta")
    spawned: SpawnedCommand | None = None
    try:
        if command is not None:
            spawned = SpawnedCommand(command)
            target = spawned.target()
        else:
            target = open_target(pid=pid, netns=opts.get("netns"), userns=opts.get("userns"),
                                 netns_only=bool(opts.get("netns_only")))
        join_userns(target)
        phases.mark("namespace")
    except NamespaceError as exc:
        if spawned is not None:
            spawned.abort()
        pid_file.remove()
        raise SetupError(str(exc)) from None

    readiness = Readiness(None)
    if spawned is None and not conf.process.foreground:
        readiness = daemonize()
    try:
        session = start_up(conf, opts, target, helper, pid_file, run_as, spawned)
    except (SetupError, ConfigError, HelperError, NamespaceError, OSError) as exc:
        report.error("pasta", exc.strerror if isinstance(exc, OSError) and exc.strerror
                     else str(exc), conf.log.file)
        if spawned is not None:
            spawned.abort()
        pid_file.remove()
        readiness.failed(1)
        return 1

    # Readiness: from here on nothing may fail for a reason known at set-up.
    if spawned is not None:
        # the command owns the terminal's signals; we end when it ends
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        spawned.go()
    elif not conf.process.foreground:
        readiness.ready()
    code = serve(session, pid_file, "pasta")
    phases.mark("closed")
    logging.getLogger("pasta").debug("start-up and exit: %s", phases.summary())
    return code


def start_up(conf: Config, opts: dict[str, Any], target: Target, helper: Helper,
             pid_file: PidFile, run_as: tuple[int, int] | None,
             spawned: SpawnedCommand | None) -> Session:
    """The whole start-up once the target is open: set-up, then checks, in order.

    Everything that can fail for a reason known now fails here, before the
    parent (or the held-back command) is told we are ready; on failure what
    exists is undone and the error (one line) propagates.
    """
    import logging

    from common import log as logsetup
    from common.conf import describe
    from pasta.session import Session

    log = logging.getLogger("pasta")
    session = Session(conf, opts, target, helper)
    try:
        # set-up: tap, netlink configuration, data plane, listeners, what ends us
        session.setup()
        if spawned is not None:
            session.watch_command(spawned.pid)
        else:
            session.watch_target()
        # checks, as the user we will run as, while we can still undo everything
        session.check(run_as)
        for line in describe(conf):
            log.info(line)
        pid_file.write()
        if spawned is None and not conf.process.foreground:
            # stderr goes away: the phases so far (`ready` below goes to the log file)
            phases.mark("set-up")
            log.debug("start-up: %s", phases.summary())
            logsetup.detach(conf.log, "pasta")   # syslog's socket: before the sandbox
        # the last step: the user we run as, the empty root, the filter
        session.enter_sandbox(run_as)
        phases.mark("ready")
        log.debug("start-up: %s", phases.summary())
    except BaseException:
        session.close()
        raise
    return session


if __name__ == "__main__":
    sys.exit(main())
