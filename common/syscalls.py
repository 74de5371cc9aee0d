"""The system calls pasta and passt may make once set-up is over: the seccomp allow-list.

This is the one place to look for what the sandboxed process can do, and the
one place to change it.  Anything not listed here kills the process (in debug
mode: names the call, then exits).  The lists were derived by measurement:
`tools/syscall-census.sh` runs the integration suite with every pasta and
passt under `strace -ff` and counts the calls each made after it installed
its filter; the whole suite then runs with the filter on (see
/work/team/notes/sandbox.md for the last census).

Adding a call: put it in the list of the mode that needs it (COMMON if both),
with a comment when the reason is not obvious from the name, and run the
integration tests of that path.  What the process needs beyond system calls
(modules, files, devices) must be imported or opened before the sandbox:
see `common.sandbox`.
"""

from __future__ import annotations

import socket

from common.seccomp import Rule

# Calls of the data plane and of the Python runtime under it, both modes.
COMMON: tuple[Rule, ...] = (
    # the event loop (aarch64 has only epoll_pwait)
    Rule("epoll_wait"), Rule("epoll_pwait"), Rule("epoll_ctl"),
    # descriptors: tap, sockets, pipes, inotify, the log file
    Rule("read"), Rule("write"), Rule("writev", "the tap: vnet header and frame in one call"),
    Rule("close"),
    Rule("dup2", "the daemon points 0-2 at /dev/null when it reports ready"),
    Rule("pread64", "the log file re-reads its tail when it shrinks (common.log)"),
    Rule("ftruncate", "... and truncates itself"),
    Rule("lseek", "re-reading the /proc/net tables kept open for `auto` scans"),
    Rule("fcntl", "os.set_blocking; Python's mmap duplicates the descriptor it maps"),
    Rule("ioctl", "FIONBIO (socket.setblocking), FIONREAD on inotify and sockets"),
    Rule("newfstatat", "glibc's fstat(); pasta's netns watch looks its file up "
         "from a descriptor of the directory"),
    Rule("pipe2", "splice pipes, made per spliced connection"),
    Rule("splice", "loopback TCP, socket to pipe to socket"),
    # sockets, made and used at run time (flows, listeners re-bound by `auto`)
    Rule("socket", "only the families we ever use", arg=0,
         values=(socket.AF_INET, socket.AF_INET6)),
    Rule("bind"), Rule("listen"), Rule("connect"), Rule("accept4"), Rule("shutdown"),
    Rule("getsockname"), Rule("getpeername", "pesto --flows: each flow's addresses"),
    Rule("setsockopt"), Rule("getsockopt", "TCP_INFO, SO_ERROR"),
    Rule("recvfrom"), Rule("recvmsg", "ICMP errors from the error queue; vhost-user "
                                      "messages with descriptors"),
    Rule("sendto"),
    # the interpreter: memory, the GIL and the namespace thread's queues, signals, time
    Rule("mmap"), Rule("munmap"), Rule("madvise"), Rule("brk"),
    Rule("mremap", "realloc of large blocks"), Rule("mprotect", "glibc malloc arenas"),
    Rule("futex"),
    Rule("rt_sigaction"), Rule("rt_sigprocmask"), Rule("rt_sigreturn"),
    Rule("restart_syscall", "the kernel's own restart after a signal"),
    Rule("clock_gettime", "the vDSO's fallback"), Rule("gettimeofday", "the vDSO's fallback"),
    Rule("getpid", "logging records the PID in every message"),
    Rule("getuid"), Rule("geteuid"), Rule("getgid", "named in the ping_group_range warning"),
    Rule("getegid"),
    Rule("exit", "the namespace thread ends"), Rule("exit_group"),
)

# pasta only
PASTA: tuple[Rule, ...] = (
    Rule("wait4", "reaping the spawned command (os.waitpid)"),
)

# passt only
PASST: tuple[Rule, ...] = (
    # --vhost-user: each front-end connection gets a device of its own
    Rule("epoll_create1", "the vhost-user device's epoll of kick eventfds"),
    Rule("sendmsg", "vhost-user: a guest TCP payload sent from guest memory, its buffers "
                    "in one call"),
)


def unlink_in(dir_fd: int) -> Rule:
    """passt removes its own socket file at exit, as it found the path free: unlinkat()
    in that one directory (held open from before the sandbox), nowhere else."""
    return Rule("unlinkat", "our socket file, in its own directory only", arg=0,
                values=(dir_fd,))


def allowed(mode: str) -> tuple[Rule, ...]:
    """The allow-list of `mode` ("pasta" or "passt")."""
    extra = {"pasta": PASTA, "passt": PASST}[mode]
    return COMMON + extra
