"""Who we run as: nobody only for root of the initial user namespace (as C passt)."""

from __future__ import annotations

import os
import pwd

import pytest

from common import isolation
from pasta.ns import CLONE_NEWUSER, unshare


@pytest.mark.parametrize("text, initial", [
    ("         0          0 4294967295\n", True),
    ("0 0 4294967295", True),
    ("         0       1001          1\n         1     100000      65536\n", False),
    ("         0          0          1\n", False),
    ("0 0 4294967295\n1 1 1\n", False),
    ("", False),
])
def test_initial_userns_from_uid_map(text, initial):
    assert isolation.in_initial_userns(text) is initial


def _in_child(fn) -> bytes:
    """fn()'s bytes, computed in a forked child (which may change namespaces)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, fn())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root in the initial namespace")
def test_root_of_initial_namespace_becomes_nobody():
    nobody = pwd.getpwnam("nobody")
    assert isolation.target_ids(None) == (nobody.pw_uid, nobody.pw_gid)
    assert isolation.target_ids((123, 456)) == (123, 456)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root in the initial namespace")
def test_root_of_another_namespace_stays_itself():
    """Rootless podman runs pasta as uid 0 of podman's user namespace."""
    def probe() -> bytes:
        unshare(CLONE_NEWUSER)
        with open("/proc/self/uid_map", "w") as f:
            f.write("0 0 1")
        return repr((os.geteuid(), isolation.target_ids(None),
                     isolation.target_ids((0, 0)))).encode()

    assert _in_child(probe) == b"(0, None, (0, 0))"
