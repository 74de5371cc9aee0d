"""The passt UNIX socket: choosing its path, binding it, and the QEMU options to use it.

Without `-s`, the socket is the first free `/tmp/passt_N.socket` from N = 1
(the names C qrap probes, in the same order).  A path is free when nothing
is there, or when a socket is there that nobody listens on any more (a
connect() is refused): that leftover is removed.  A path where a server
answers belongs to another passt and is skipped; with `-s PATH` it is an
error, as is a PATH that exists and is not a socket.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

SOCKET_TEMPLATE = "/tmp/passt_{}.socket"
SOCKET_MAX = 99
SUN_PATH_MAX = 107                # sockaddr_un.sun_path, without the terminating NUL
BACKLOG = 8


class SocketPathError(Exception):
    """No socket could be made; the message is one line."""


def probe(path: str) -> str:
    """What is at `path`: "free", "stale" (socket, no listener), "busy" or "other"."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "free"
    if not stat.S_ISSOCK(st.st_mode):
        return "other"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(1.0)
        s.connect(path)
    except ConnectionRefusedError:
        return "stale"
    except FileNotFoundError:
        return "free"
    except OSError:
        return "busy"              # EAGAIN (backlog full), EACCES: someone's socket
    finally:
        s.close()
    return "busy"


def _bind(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        s.listen(BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bind_explicit(path: str) -> socket.socket:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SocketPathError(f"socket path too long (at most {SUN_PATH_MAX} bytes): {path}")
    state = probe(path)
    if state == "other":
        raise SocketPathError(f"{path} exists and is not a socket")
    if state == "busy":
        raise SocketPathError(f"socket {path} is in use by another process")
    if state == "stale":
        try:
            os.unlink(path)
        except OSError as exc:
            raise SocketPathError(f"cannot remove stale socket {path}: {exc.strerror}") from None
    try:
        return _bind(path)
    except OSError as exc:
        raise SocketPathError(f"cannot bind UNIX socket {path}: {exc.strerror}") from None


def bind_default(template: str = SOCKET_TEMPLATE,
                 count: int = SOCKET_MAX) -> tuple[socket.socket, str]:
    for n in range(1, count + 1):
        path = template.format(n)
        state = probe(path)
        if state in ("busy", "other"):
            continue
        if state == "stale":
            try:
                os.unlink(path)
            except OSError:
                continue           # someone else's leftover in sticky /tmp
        try:
            return _bind(path), path
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EPERM):
                continue           # lost a race with another passt, or not ours
            raise SocketPathError(f"cannot bind UNIX socket {path}: {exc.strerror}") from None
    raise SocketPathError(f"no free socket path among {template.format(1)} to "
                          f"{template.format(count)}")


def bind_socket(path: str | None) -> tuple[socket.socket, str]:
    """A listening, non-blocking socket at `path` (or the first free default path)."""
    if path:
        return bind_explicit(path), path
    return bind_default()


def qemu_hint(path: str) -> list[str]:
    """How to connect QEMU, printed once the socket exists (as C passt does)."""
    return [
        f"UNIX domain socket bound at {path}",
        "",
        "You can now start qemu (>= 7.2, with commit 13c6be96618c):",
        "    kvm ... -device virtio-net-pci,netdev=s "
        f"-netdev stream,id=s,server=off,addr.type=unix,addr.path={path}",
        "or qrap, for earlier qemu versions:",
        "    ./qrap 5 kvm ... -net socket,fd=5 -net nic,model=virtio",
    ]


def give_socket(path: str, ino: tuple[int, int], owner: tuple[int, int]) -> None:
    """Make `owner` (uid, gid) own the socket we bound at `path`: that inode, never
    what a symbolic link put in its place would point to.  Raises SocketPathError
    if the path no longer is our socket, OSError if chown fails."""
    if not same_socket(path, ino):
        raise SocketPathError(f"socket {path} was replaced while we set up")
    os.chown(path, *owner, follow_symlinks=False)


def same_socket(path: str, ino: tuple[int, int] | None) -> bool:
    """Whether `path` is still the socket we bound (device and inode)."""
    if ino is None:
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ino and stat.S_ISSOCK(st.st_mode)
