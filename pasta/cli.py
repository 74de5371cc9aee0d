"""`pasta`: give a network namespace a tap link configured like the host's.

    pasta [OPTIONS] [PID | [--] COMMAND [ARG...]]
    pasta [OPTIONS] --netns PATH|NAME

The order of set-up matters and is spelled out in `main`: everything that
can fail because of bad input is checked before anything is created; the
user namespace is joined while we are still single-threaded; privileges are
dropped only once the tap, the namespace thread and every socket exist; the
parent (or the held-back command) is released only when the namespace is
configured.
"""

from __future__ import annotations

import logging
import os
import pwd
import signal
import sys
from typing import Any

from common import log as logsetup
from common.conf import ConfigError, describe, host_config
from common.helper import Helper, HelperError
from common.options import program_main
from common.process import Readiness, SetupError, begin, daemonize

log = logging.getLogger("pasta")

def default_shell() -> str:
    shell = os.environ.get("SHELL")
    if shell:
        return shell
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
    return program_main("pasta", argv, run)


def run(opts: dict[str, Any], helper: Helper) -> int:
    # Everything that can be refused is refused here, before anything exists.
    from pasta.ns import NamespaceError, SpawnedCommand, join_userns, open_target  # noqa: PLC0415

    pid, command = split_target(opts)
    conf = host_config("pasta", opts, helper)
    if opts.get("ns_mac_addr"):
        from common.conf import parse_mac  # noqa: PLC0415
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
    except NamespaceError as exc:
        if spawned is not None:
            spawned.abort()
        pid_file.remove()
        raise SetupError(str(exc)) from None

    readiness = Readiness(None)
    if spawned is None and not conf.process.foreground:
        readiness = daemonize()
    try:
        from pasta.session import Session  # noqa: PLC0415

        session = Session(conf, opts, target, helper)
        try:
            session.setup()
        except BaseException:
            session.close()
            raise
    except (SetupError, ConfigError, HelperError, NamespaceError, OSError) as exc:
        print(f"pasta: {exc}", file=sys.stderr)
        if spawned is not None:
            spawned.abort()
        pid_file.remove()
        readiness.failed(1)
        return 1

    for line in describe(conf):
        log.info(line)
    pid_file.write()
    try:
        session.drop_privileges(run_as)
    except OSError as exc:
        print(f"pasta: cannot switch to uid {run_as[0] if run_as else '?'}: {exc.strerror}",
              file=sys.stderr)
        session.close()
        pid_file.remove()
        if spawned is not None:
            spawned.abort()
        readiness.failed(1)
        return 1

    if spawned is not None:
        # the command owns the terminal's signals; we end when it ends
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        session.watch_command(spawned.pid)
        spawned.go()
    else:
        if not conf.process.foreground:
            logsetup.detach(conf.log, "pasta")
            readiness.ready()
        session.watch_target()
    try:
        code = session.run()
    finally:
        session.close()
        pid_file.remove()
    return code


if __name__ == "__main__":
    sys.exit(main())
