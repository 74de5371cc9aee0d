"""Namespaces: create them for a command, or find and join the ones of a target.

Three ways to name the target (as C pasta):
- a command: a child process unshares a new user and network namespace,
  maps the caller's uid/gid to root inside, waits until we have configured
  the network, then execs the command (`SpawnedCommand`);
- a PID: its network namespace, and its user namespace unless
  `--netns-only` (or `--userns PATH` names another);
- `--netns PATH|NAME` (NAME under /run/netns), with `--userns PATH` if given.

Joining the user namespace (`setns`, main thread, before any other thread
exists) is what gives an unprivileged pasta the right to enter the network
namespace; root has that right already and never joins one implicitly.
Python 3.11 has no os.setns/os.unshare, hence the small ctypes wrappers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import prctl

from common.record import record

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(Exception):
    """A target namespace that cannot be used; the message is one line."""


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def same_ns(fd: int, path: str) -> bool:
    a = os.fstat(fd)
    b = os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@record
class Target:
    """Open namespace file descriptors of what we serve, and how to watch it."""
    netns_fd: int
    userns_fd: int | None          # None: do not join a user namespace
    netns_path: str | None         # bound netns file to watch (--netns), if any
    pid: int | None                # process whose exit ends us (PID target or command)

    def close(self) -> None:
        for fd in (self.netns_fd, self.userns_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _open_ns(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise NamespaceError(f"no permission to open {what} {path}") from None
    except OSError as exc:
        raise NamespaceError(f"cannot open {what} {path}: {exc.strerror}") from None


def netns_path(spec: str) -> str:
    """--netns PATH|NAME: a bare name lives under /run/netns, as with ip-netns(8)."""
    return spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)


def open_target(*, pid: int | None, netns: str | None, userns: str | None,
                netns_only: bool) -> Target:
    """Open the namespaces of a PID or a --netns/--userns pair (not of a command)."""
    user_fd = None
    try:
        if pid is not None:
            if not os.path.exists(f"/proc/{pid}"):
                raise NamespaceError(f"no process with PID {pid}")
            net_fd = _open_ns(f"/proc/{pid}/ns/net", "network namespace of PID")
            if userns is not None:
                user_fd = _open_ns(userns, "user namespace")
            elif not netns_only and os.geteuid() != 0:
                # root may enter any network namespace without joining its userns
                user_fd = _open_ns(f"/proc/{pid}/ns/user", "user namespace of PID")
            path = None
        else:
            assert netns is not None
            path = netns_path(netns)
            net_fd = _open_ns(path, "network namespace")
            if userns is not None and not netns_only:
                user_fd = _open_ns(userns, "user namespace")
        if user_fd is not None and same_ns(user_fd, "/proc/self/ns/user"):
            os.close(user_fd)
            user_fd = None
        _check_type(net_fd, CLONE_NEWNET, "network namespace")
        if user_fd is not None:
            _check_type(user_fd, CLONE_NEWUSER, "user namespace")
    except BaseException:
        if user_fd is not None:
            os.close(user_fd)
        raise
    return Target(net_fd, user_fd, path, pid)


NS_GET_NSTYPE = 0xB703


def _check_type(fd: int, nstype: int, what: str) -> None:
    import fcntl

    try:
        got = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        raise NamespaceError(f"not a {what}") from None
    if got != nstype:
        raise NamespaceError(f"not a {what}")


def join_userns(target: Target) -> None:
    """Enter the target's user namespace (single-threaded callers only)."""
    if target.userns_fd is None:
        return
    try:
        setns(target.userns_fd, CLONE_NEWUSER)
    except OSError as exc:
        raise NamespaceError(f"cannot join the user namespace: {exc.strerror}") from None


def default_signals() -> None:
    """Every signal at its default disposition and none blocked, as a shell starts a
    command: exec keeps what is ignored and blocked (Python ignores SIGPIPE and
    SIGXFSZ, a caller may ignore or block more), and the command must not inherit it."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):     # reserved by the C library
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


class SpawnedCommand:
    """A child in new user and network namespaces, held back until `go()`."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        uid, gid = os.geteuid(), os.getegid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            os.close(go_w)
            self._child(argv, uid, gid, ready_w, go_r)
        os.close(ready_w)
        os.close(go_r)
        self.pid = pid
        self._go_fd: int | None = go_w
        status = os.read(ready_r, 512)
        os.close(ready_r)
        if status != b"OK":
            os.waitpid(pid, 0)
            self._go_fd = None
            os.close(go_w)
            raise NamespaceError(status.decode(errors="replace") or
                                 "cannot create namespaces for the command")

    @staticmethod
    def _child(argv: list[str], uid: int, gid: int, ready_w: int, go_r: int) -> None:
        try:
            # we are not dumpable (common.sandbox.at_start), and a fork inherits that:
            # the command is, so that pasta may open its /proc namespace files and
            # it may write its own uid_map
            prctl.set_dumpable(True)
            try:
                unshare(CLONE_NEWUSER | CLONE_NEWNET)
                with open("/proc/self/setgroups", "w") as f:
                    f.write("deny")
                with open("/proc/self/uid_map", "w") as f:
                    f.write(f"0 {uid} 1")
                with open("/proc/self/gid_map", "w") as f:
                    f.write(f"0 {gid} 1")
            except OSError as exc:
                os.write(ready_w, f"cannot create namespaces: {exc.strerror}".encode())
                os._exit(1)
            os.write(ready_w, b"OK")
            os.close(ready_w)
            if os.read(go_r, 1) != b"1":     # pasta failed: never run the command
                os._exit(1)
            os.close(go_r)
            default_signals()
            try:
                os.execvp(argv[0], argv)
            except OSError as exc:
                print(f"pasta: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
                os._exit(127)
        except BaseException:  # never return into the parent's code
            os._exit(1)

    def target(self) -> Target:
        net_fd = _open_ns(f"/proc/{self.pid}/ns/net", "network namespace of the command")
        user_fd = _open_ns(f"/proc/{self.pid}/ns/user", "user namespace of the command")
        if os.geteuid() == 0:       # root enters any namespace without joining its userns
            os.close(user_fd)
            user_fd = None
        return Target(net_fd, user_fd, None, self.pid)

    def go(self) -> None:
        if self._go_fd is not None:
            os.write(self._go_fd, b"1")
            os.close(self._go_fd)
            self._go_fd = None

    def abort(self) -> None:
        """Set-up failed: the child exits without running the command."""
        if self._go_fd is not None:
            os.close(self._go_fd)
            self._go_fd = None
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
