"""The passt UNIX socket: choosing its path, binding it, and the QEMU options to use it.

Without `-s`, the socket is the first free `/tmp/passt_N.socket` from N = 1
(the names C qrap probes, in the same order).  A path is free when nothing
is there, or when a socket is there that nobody listens on any more (a
connect() is refused): that leftover is removed.  A path where a server
answers belongs to another passt and is skipped; with `-s PATH` it is an
error, naming the PID that listens there, as is a PATH that exists and is
not a socket.

This runs within milliseconds of exec (passt binds before anything slow is
imported: QEMU may connect at once), so it uses the C `_socket` module, not
`socket`; the caller wraps the listener in a `socket.socket` later.
"""

from __future__ import annotations

import _socket
import errno
import os
import stat
import sys

SOCKET_TEMPLATE = "/tmp/passt_{}.socket"
SOCKET_MAX = 99
SUN_PATH_MAX = 107                # sockaddr_un.sun_path, without the terminating NUL
BACKLOG = 8


class SocketPathError(Exception):
    """No socket could be made; the message is one line."""


SO_PEERCRED = getattr(_socket, "SO_PEERCRED", 17)


def _unix_socket() -> _socket.socket:
    return _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)


def probe(path: str) -> tuple[str, int | None]:
    """What is at `path`: "free", "stale" (socket, no listener), "busy" or "other";
    for "busy", the PID of the process listening there when we can tell.

    A listener in our network namespace is found in /proc/net/unix, without
    connecting: a --one-off passt still waiting for its guest would take our
    connection for its guest, and exit when we hang up.  Only a socket with no
    listener there (stale, or bound in another network namespace) is probed
    with connect()."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "free", None
    if not stat.S_ISSOCK(st.st_mode):
        return "other", None
    inode = _listening_inode(path)
    if inode is not None:
        return "busy", _socket_owner(inode)
    s = _unix_socket()
    try:
        s.settimeout(1.0)
        s.connect(path)
        cred = s.getsockopt(_socket.SOL_SOCKET, SO_PEERCRED, 12)
        return "busy", int.from_bytes(cred[:4], sys.byteorder) or None
    except ConnectionRefusedError:
        return "stale", None
    except FileNotFoundError:
        return "free", None
    except OSError:
        return "busy", None        # EAGAIN (backlog full), EACCES: someone's socket
    finally:
        s.close()


SO_ACCEPTCON = 0x10000          # /proc/net/unix "Flags" of a listening socket


def _listening_inode(path: str) -> int | None:
    """The inode of a socket listening at `path` (bound there, or bound under the
    temporary name `_bind` gives it and linked there), from /proc/net/unix."""
    head, tail = os.path.split(path)
    names = (os.fsencode(path), os.fsencode(os.path.abspath(path)))
    temp = os.fsencode(os.path.join(os.path.abspath(head), f".{tail}."))
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                fields = line.split(None, 7)
                if len(fields) < 8 or not int(fields[3], 16) & SO_ACCEPTCON:
                    continue
                bound = fields[7].rstrip(b"\n")
                if bound in names or (bound.startswith(temp) and bound[len(temp):].isdigit()):
                    return int(fields[6])
    except (OSError, ValueError):
        pass
    return None


def _socket_owner(inode: int) -> int | None:
    """A process holding socket `inode` (the first we may look at)."""
    target = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    return int(entry)
        except OSError:
            continue
    return None


def holder(pid: int | None) -> str:
    """' by PID 1234 (passt)', or '' when we could not tell."""
    if not pid:
        return ""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f" by PID {pid} ({f.read().strip()})"
    except OSError:
        return f" by PID {pid}"


def _bind(path: str) -> _socket.socket:
    """Listening at `path`, appearing there already listening: bound and listening
    under a temporary name first, then linked into place (link fails if the path
    exists: EADDRINUSE, as bind would), so that a client that connects the
    moment the path exists, as QEMU does, is never refused."""
    s = _unix_socket()
    head, tail = os.path.split(path)
    temp = os.path.join(head, f".{tail}.{os.getpid()}")
    try:
        if len(os.fsencode(temp)) > SUN_PATH_MAX:
            s.bind(path)
            s.listen(BACKLOG)
        else:
            try:
                os.unlink(temp)        # a crashed passt's, that had our PID
            except FileNotFoundError:
                pass
            s.bind(temp)
            try:
                s.listen(BACKLOG)
                os.link(temp, path)
            except FileExistsError:
                raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path) from None
            finally:
                os.unlink(temp)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bind_explicit(path: str) -> _socket.socket:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise SocketPathError(f"socket path too long (at most {SUN_PATH_MAX} bytes): {path}")
    state, pid = probe(path)
    if state == "other":
        raise SocketPathError(f"{path} exists and is not a socket")
    if state == "busy":
        raise SocketPathError(f"socket {path} is in use{holder(pid)}")
    if state == "stale":
        try:
            os.unlink(path)
        except OSError as exc:
            raise SocketPathError(f"cannot remove stale socket {path}: {exc.strerror}") from None
    try:
        return _bind(path)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:      # another passt bound it since we looked
            raise SocketPathError(f"socket {path} is in use{holder(probe(path)[1])}") from None
        raise SocketPathError(f"cannot bind UNIX socket {path}: {exc.strerror}") from None


def bind_default(template: str = SOCKET_TEMPLATE,
                 count: int = SOCKET_MAX) -> tuple[_socket.socket, str]:
    for n in range(1, count + 1):
        path = template.format(n)
        state, _ = probe(path)
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


def bind_socket(path: str | None) -> tuple[_socket.socket, str]:
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
