"""The sandbox: what pasta and passt give up, at start and once set-up is done.

Design rule 10: after set-up, only descriptors.  The steps, in order:

1. `at_start()` (`common.sandbox_start`: cheap to import), first thing in the
   process: no longer dumpable (the command pasta spawns, or anything else
   running as our user, cannot ptrace us or read our memory and environment),
   every inherited descriptor above 2 closed except `-F/--fd`, and 0-2 pointed
   at /dev/null if the caller left them closed (else a socket could become our
   "stderr").
2. Set-up runs as today: it opens everything it will ever need.  `preload()`
   then imports every module the data plane may import lazily, and primes the
   few lazy things of the standard library (time zone, encodings).
3. `enter()`, once nothing is left that needs the file system:
   - new mount, IPC and UTS namespaces, and a new PID namespace for whatever we
     might fork (nothing, under the filter: defence in depth); passt also a user
     namespace of its own, as C passt does;
   - the root becomes an empty read-only tmpfs (`pivot_root`, or with
     `--chroot-fallback` a move and `chroot` where pivot_root is refused, as on
     an initramfs root);
   - capabilities: none in the initial user namespace, bounding set included;
     in a user namespace that is ours, only those named in `_keep_caps`;
     nothing inheritable (so nothing ambient either: the kernel keeps ambient
     a subset of inheritable);
   - no_new_privs, then the seccomp allow-list of `common.syscalls`, on every
     thread at once (TSYNC).
   After this, an import raises (see `_NoImports`) instead of failing somewhere
   deep in the import machinery.

Threads (pasta): the namespace thread (`pasta.nsthread`) lives in the target
network namespace and creates sockets there for the whole run.  Of the steps
above, the kernel refuses two in a multi-threaded process: joining or creating
a user namespace, and joining a mount namespace.  pasta needs neither after
set-up: it joins the target's user namespace before the thread starts (as
today) and creates none of its own; `unshare(CLONE_NEWNS)` is allowed but acts
on the calling thread only, as do the other namespaces, `pivot_root`, the
capability sets and no_new_privs.  So the thread stays a thread, and
`enter()` runs the per-thread part (`_confine_thread`) in each thread: each gets
its own empty root.  We chose this over turning the thread into a helper
process (sockets passed back with SCM_RIGHTS) because a thread costs no second
interpreter's memory and no extra round trip per spliced connection, and the
only thing it does after set-up is `socket()`, which the filter allows anyway.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

from common import isolation, sandbox_start, seccomp, syscalls
from common.record import record

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from common.conf import Config

try:
    import prctl  # python-prctl: capability sets, bounding set, dumpable, no_new_privs
except ImportError:  # pragma: no cover - a declared dependency
    prctl = None

log = logging.getLogger("sandbox")

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# Where the empty tmpfs is mounted before it becomes the root: any directory
# that exists everywhere; nothing is visible there outside our mount namespace.
EMPTY_MOUNTPOINT = "/tmp"

# Modules the data plane imports lazily (inside functions) or that the standard
# library imports on first use.  `tests/test_sandbox_imports.py` finds every
# function-level import in our code and fails when one is missing here (or is
# not declared set-up only there).
PRELOAD: tuple[str, ...] = (
    "ipaddress",                 # common.udp.handler, common.fwd
    "common.loop",               # common.tap
    "common.guest",
    "encodings.idna",            # str.encode("idna") in hostname handling
)

# common.packet.checksum sums large frames with numpy, whose import costs about
# 0.1 s: loaded only where checksums are ours to compute (passt, or a tap without
# checksum offload); elsewhere the lazy import is refused and the plain-int path
# (same result) would serve the rare large frame.
PRELOAD_CHECKSUMS: tuple[str, ...] = ("numpy",)

_libc = ctypes.CDLL(None, use_errno=True)

_entered = False
_kept: list[int] = []       # descriptors held for the life of the process, see enter()


class SandboxError(Exception):
    """A sandboxing step failed; the message is one line."""


def entered() -> bool:
    """True once the process lives in its empty root: paths no longer mean anything."""
    return _entered


# ---------------------------------------------------------------- 1. at start
# (common.sandbox_start: this module's imports cost 25-50 ms, which would delay
# the start of everything else; these names stay here too)
at_start, close_inherited, fd_from_argv, set_dumpable = (
    sandbox_start.at_start, sandbox_start.close_inherited, sandbox_start.fd_from_argv,
    sandbox_start.set_dumpable)


# ---------------------------------------------------------------- 2. before the sandbox

def preload(checksums: bool = True) -> None:
    """Import what the data plane would import lazily; prime lazy stdlib state."""
    # numpy's BLAS would start a pool of threads at import: a second thread makes
    # unshare(CLONE_NEWUSER) fail, and each thread would keep the old root
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    for name in (*PRELOAD, *(PRELOAD_CHECKSUMS if checksums else ())):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SandboxError(f"cannot import {name} before the sandbox: {exc}") from None
    time.localtime()              # glibc reads /etc/localtime on first use
    time.strftime("%Y")
    # codecs are imported on first lookup: json.loads(bytes) picks one of these by the
    # first bytes of what a control client sent, idna comes with host names
    for codec in ("idna", "utf-8-sig", "utf-16", "utf-16-be", "utf-16-le", "utf-32",
                  "utf-32-be", "utf-32-le", "latin-1", "ascii"):
        codecs.lookup(codec)


class _NoImports:
    """A meta path finder that refuses every import once the root is empty, by name."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        raise ImportError(f"import of {name} after the sandbox was entered (preload it: "
                          "common.sandbox.PRELOAD)")


# ---------------------------------------------------------------- 3. the sandbox

@record(frozen=True)
class Plan:
    mode: str                        # "pasta" or "passt"
    run_as: tuple[int, int] | None   # switch to this uid/gid (root in the initial userns)
    chroot_fallback: bool = False
    debug: bool = False              # trap instead of kill, and name the call
    debug_fds: tuple[int, ...] = (2,)
    checksums: bool = True           # we compute full checksums: preload numpy
    extra: tuple[seccomp.Rule, ...] = ()   # calls on descriptors known only at run time


def plan(mode: str, conf: Config, run_as: tuple[int, int] | None,
         checksums: bool = True, extra: tuple[seccomp.Rule, ...] = ()) -> Plan:
    """The sandbox of `mode` as the configuration asks for it."""
    fds = [2]
    for handler in logging.getLogger().handlers:
        fd = getattr(handler, "fd", None)         # common.log.CappedFileHandler
        if isinstance(fd, int):
            fds.append(fd)
    return Plan(mode, run_as, chroot_fallback=conf.process.chroot_fallback,
                debug=conf.log.debug or conf.log.trace, debug_fds=tuple(fds),
                checksums=checksums, extra=extra)


def in_initial_userns() -> bool:
    """Whether we run in the initial user namespace (its uid_map is the identity)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(src: str, target: str, fstype: str | None, flags: int, data: str | None,
           what: str) -> None:
    _check(_libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None,
                       ctypes.c_ulong(flags), data.encode() if data else None), what)


def pivot_root(new: str, old: str) -> int:
    nr = seccomp.native_arch().nr("pivot_root")
    return _libc.syscall(ctypes.c_long(nr), new.encode(), old.encode())


def _empty_root(chroot_fallback: bool) -> str:
    """Make the calling thread's root an empty read-only tmpfs; how it was done."""
    _mount("", "/", None, MS_REC | MS_PRIVATE, None, "cannot make our mounts private")
    _mount("", EMPTY_MOUNTPOINT, "tmpfs", MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_RDONLY,
           "nr_inodes=2,nr_blocks=0", "cannot mount an empty tmpfs")
    os.chdir(EMPTY_MOUNTPOINT)
    if pivot_root(".", ".") == 0:
        # the old root is stacked under the new one at "."; detach it
        _check(_libc.umount2(b".", MNT_DETACH | UMOUNT_NOFOLLOW),
               "cannot detach the old root")
        os.chdir("/")
        return "pivot_root"
    err = ctypes.get_errno()
    if not chroot_fallback:
        # undo what hides the file system, so that the failed set-up can still clean
        # up after itself (its pid file may live under the mount point)
        os.chdir("/")
        _libc.umount2(EMPTY_MOUNTPOINT.encode(), MNT_DETACH)
        raise SandboxError(f"pivot_root into an empty tmpfs: {os.strerror(err)} "
                           "(--chroot-fallback uses chroot instead)")
    log.info("pivot_root: %s, falling back to chroot", os.strerror(err))
    _mount(EMPTY_MOUNTPOINT, "/", None, MS_MOVE, None, "cannot move the empty tmpfs to /")
    os.chroot(".")
    os.chdir("/")
    return "chroot"


def _drop_bounding_set() -> None:
    for cap in prctl.ALL_CAPS:
        try:
            prctl.capbset.drop(cap)
        except (OSError, ValueError):
            pass


def _limit_caps(keep: Sequence[int]) -> None:
    """Effective and permitted: only `keep`; inheritable: nothing, and so no ambient
    either (the kernel keeps ambient a subset of inheritable).  One capset call:
    effective must never exceed permitted in between."""
    drop = [c for c in prctl.ALL_CAPS if c not in keep]
    prctl.set_caps((drop, (prctl.CAP_EFFECTIVE, prctl.CAP_PERMITTED), False),
                   (prctl.ALL_CAPS, prctl.CAP_INHERITABLE, False))


def _confine_thread(flags: int, chroot_fallback: bool) -> str:
    """The per-thread half: namespaces, empty root, bounding set."""
    _check(_libc.unshare(ctypes.c_int(flags)), "cannot detach into new namespaces")
    how = _empty_root(chroot_fallback)
    _drop_bounding_set()
    return how


def _finish_thread(keep: Sequence[int]) -> None:
    _limit_caps(keep)
    if _libc.prctl(38, 1, 0, 0, 0) != 0:     # PR_SET_NO_NEW_PRIVS
        raise SandboxError(f"no_new_privs: {os.strerror(ctypes.get_errno())}")


def enter(plan: Plan, other_thread: Callable[[Callable[..., object], object], object]
          | None = None) -> None:
    """Enter the sandbox.  `other_thread(fn, *args)` runs fn in pasta's namespace thread."""
    global _entered
    if prctl is None:
        raise SandboxError("python-prctl is missing: cannot drop capabilities")
    arch = seccomp.native_arch()         # an unknown architecture fails before any change
    start = time.monotonic()
    preload(plan.checksums)
    keep = keep_userns_caps(plan.mode)   # reads /proc: before the root is gone
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    if plan.mode == "passt":
        # C passt's order: our final uid first, then a user namespace of our own,
        # in which the rest needs no capability of the initial namespace
        assert other_thread is None and threading.active_count() == 1
        isolation.switch_user(plan.run_as)
        flags |= CLONE_NEWUSER
    if plan.mode == "pasta" and not _kept:
        # pasta's netns watch looks its file up from a descriptor of the file's directory,
        # which belongs to the mount namespace we were started in.  Once we leave it, the
        # last process there (ip-netns-exec, podman's) may exit, and the kernel would then
        # take its mounts down, the netns file's bind mount included: the watch would see
        # the namespace gone.  Holding the namespace keeps its mounts up.
        _kept.append(os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
    how = _confine_thread(flags, plan.chroot_fallback)
    if other_thread is not None:
        other_thread(_confine_thread, flags, plan.chroot_fallback)
    if plan.mode == "pasta":
        isolation.switch_user(plan.run_as)   # every thread (glibc's setxid broadcast)
    _finish_thread(())
    if other_thread is not None:
        other_thread(_finish_thread, keep)
    rules = syscalls.allowed(plan.mode) + plan.extra
    if plan.debug:
        seccomp.trap_handler(plan.debug_fds, plan.mode, arch)
    prog = seccomp.build(rules, seccomp.RET_TRAP if plan.debug else seccomp.RET_KILL_PROCESS,
                         arch)
    sys.meta_path.insert(0, _NoImports())
    _entered = True
    seccomp.install(prog, arch)
    log.debug("sandbox: %s into an empty root, %d system calls allowed, %.1f ms",
              how, len(rules), (time.monotonic() - start) * 1000)


def keep_userns_caps(mode: str) -> tuple[int, ...]:
    """Capabilities the namespace thread keeps, in a user namespace that is ours.

    None in the initial user namespace.  pasta's namespace thread keeps:
    - CAP_NET_BIND_SERVICE: `-T`/`-U` (and their `auto` rescans) bind ports
      below 1024 in the namespace, which our user namespace owns.
    Nothing else: the namespace is already joined, the tap and netlink set-up
    are done, and the main thread's sockets live in the host's namespace, where
    capabilities of our user namespace grant nothing.
    """
    if mode != "pasta" or in_initial_userns() or prctl is None:
        return ()
    return (prctl.CAP_NET_BIND_SERVICE,)

