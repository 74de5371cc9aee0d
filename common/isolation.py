"""Giving up what we no longer need once set-up is done.

Who we run as (as C passt decides it): `--runas UID[:GID]` when given;
otherwise nobody if we are root in the initial user namespace; otherwise we
stay who we are. Root inside any other user namespace (rootless podman runs us
as uid 0 of its namespace) is already confined by that namespace, and
switching to nobody there would only lose access to the caller's files (its
0700 runtime directory, where the namespace file we watch lives).  The switch
itself, capabilities and the rest happen in `common.sandbox.enter()`.
"""

from __future__ import annotations

import logging
import os
import pwd
from collections.abc import Callable

log = logging.getLogger("isolation")

NOBODY = "nobody"


INIT_UID_MAP = ("0", "0", "4294967295")


def in_initial_userns(uid_map: str | None = None) -> bool:
    """Whether we are in the initial user namespace: its uid map is the identity
    over all 2^32 - 1 ids (`uid_map`: that file's text, read when not given)."""
    if uid_map is None:
        try:
            with open("/proc/self/uid_map") as f:
                uid_map = f.read()
        except OSError:         # no /proc: assume the worst (we are root in the real one)
            return True
    return [tuple(line.split()) for line in uid_map.splitlines()] == [INIT_UID_MAP]


def target_ids(runas: tuple[int, int] | None) -> tuple[int, int] | None:
    """The uid/gid to switch to, or None to stay who we are."""
    if runas is not None:
        return runas
    if os.geteuid() != 0 or not in_initial_userns():
        return None
    try:
        entry = pwd.getpwnam(NOBODY)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def _set_ids(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def switch_user(ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    uid, gid = ids
    if (os.geteuid(), os.getegid()) == (uid, gid):
        return
    _set_ids(uid, gid)
    log.debug("running as uid %d, gid %d", uid, gid)


def check_as(ids: tuple[int, int] | None, check: Callable[[], None]) -> None:
    """Run `check()` as the user `ids` we are about to become, while we can still
    undo what we made: in a short-lived child when that is not who we are now.
    An OSError it raises is raised here, with its errno and message."""
    if ids is None or (os.geteuid(), os.getegid()) == ids:
        check()
        return
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:       # no logging here: another thread may hold its lock
        try:
            os.close(r)
            _set_ids(*ids)
            check()
            os._exit(0)
        except OSError as exc:
            os.write(w, f"{exc.errno or 0} {exc.strerror}".encode())
        finally:
            os._exit(1)
    os.close(w)
    try:
        reply = b""
        while chunk := os.read(r, 4096):
            reply += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        errno_text, _, message = reply.decode(errors="replace").partition(" ")
        raise OSError(int(errno_text or 0), message or f"check as uid {ids[0]} failed")
