"""Giving up what we no longer need once set-up is done.

Started as root, we switch to `--runas UID[:GID]` or, by default, to nobody
(as C passt does).  Whatever our user, we then drop every capability and set
no_new_privs: the data path needs none (sockets, the tap fd and namespace
entries were all made before).  Capabilities are per thread in Linux, so any
helper thread calls `drop_capabilities()` itself.
"""

from __future__ import annotations

import logging
import os
import pwd

try:    # imported now: after switch_user() our own install may be unreadable
    import prctl  # python-prctl
except ImportError:  # pragma: no cover - a declared dependency
    prctl = None

log = logging.getLogger("isolation")

NOBODY = "nobody"


def target_ids(runas: tuple[int, int] | None) -> tuple[int, int] | None:
    """The uid/gid to switch to, or None to stay who we are."""
    if runas is not None:
        return runas
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(NOBODY)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def switch_user(ids: tuple[int, int] | None) -> None:
    if ids is None:
        return
    uid, gid = ids
    if (os.geteuid(), os.getegid()) == (uid, gid):
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    log.debug("running as uid %d, gid %d", uid, gid)


def drop_capabilities() -> None:
    """Drop all capabilities of the calling thread and forbid regaining any."""
    if prctl is None:
        log.warning("python-prctl is missing: capabilities not dropped")
        return
    try:
        prctl.set_no_new_privs(1)
        for cap in prctl.ALL_CAPS:
            try:
                prctl.capbset.drop(cap)
            except (OSError, ValueError):
                pass
        prctl.cap_inheritable.limit()
        prctl.cap_effective.limit()
        prctl.cap_permitted.limit()
    except OSError as exc:
        log.debug("dropping capabilities: %s", exc)
