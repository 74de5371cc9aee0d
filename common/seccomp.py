"""Seccomp filters: a classic BPF allow-list built from system call names, and installing it.

This module owns the mechanics; the lists themselves live in `common.syscalls`.

Why a BPF program of our own rather than libseccomp: the filter we need is an
allow-list of about a hundred names plus one argument check, which is a
straight run of comparisons.  Built here it costs a few hundred microseconds
in pure Python with no library to load, and the whole program can be printed
instruction by instruction (`python -m common.seccomp pasta`), so what the
kernel enforces is exactly what the source says.  libseccomp would bring name
resolution for every architecture and an optimised tree, but through ctypes
or a binding we would also carry a second description of the rules, a shared
library loaded at every start and a filter we can only read back as its
pseudo-code.  The price of doing it ourselves is the syscall number tables
below (x86_64 and aarch64), checked against the kernel's UAPI headers by
`tests/test_seccomp.py`; on any other architecture the sandbox refuses to
start rather than run unfiltered.

The program: a foreign architecture (or the x32 ABI) is killed outright; an
allowed number returns ALLOW; a rule with an argument check compares that
argument's low 32 bits; everything else gets the default action.  The kernel
caches the verdict of every system call whose result does not depend on its
arguments, so a long run of comparisons costs nothing on the hot path.

Default action: kill the whole process (SIGSYS, no core dump).  In debug mode
it is a trap instead: a SIGSYS handler names the forbidden call on stderr and
in the log file, then exits with status 128 + SIGSYS.  The filter is installed
with TSYNC, so every thread of the process (pasta's namespace thread) gets it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
from collections.abc import Iterable, Sequence

from common.record import record

# ---------------------------------------------------------------- system call numbers

# Names in number order, from the kernel's UAPI headers (asm/unistd_64.h and
# asm-generic/unistd.h); "-N" skips N unused numbers.
_X86_64 = """
    read write open close stat fstat lstat poll lseek mmap mprotect munmap brk
    rt_sigaction rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access
    pipe select sched_yield mremap msync mincore madvise shmget shmat shmctl dup dup2
    pause nanosleep getitimer alarm setitimer getpid sendfile socket connect accept
    sendto recvfrom sendmsg recvmsg shutdown bind listen getsockname getpeername
    socketpair setsockopt getsockopt clone fork vfork execve exit wait4 kill uname
    semget semop semctl shmdt msgget msgsnd msgrcv msgctl fcntl flock fsync fdatasync
    truncate ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink
    symlink readlink chmod fchmod chown fchown lchown umask gettimeofday getrlimit
    getrusage sysinfo times ptrace getuid syslog getgid setuid setgid geteuid getegid
    setpgid getppid getpgrp setsid setreuid setregid getgroups setgroups setresuid
    getresuid setresgid getresgid getpgid setfsuid setfsgid getsid capget capset
    rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigsuspend sigaltstack utime mknod
    uselib personality ustat statfs fstatfs sysfs getpriority setpriority sched_setparam
    sched_getparam sched_setscheduler sched_getscheduler sched_get_priority_max
    sched_get_priority_min sched_rr_get_interval mlock munlock mlockall munlockall
    vhangup modify_ldt pivot_root _sysctl prctl arch_prctl adjtimex setrlimit chroot
    sync acct settimeofday mount umount2 swapon swapoff reboot sethostname setdomainname
    iopl ioperm create_module init_module delete_module get_kernel_syms query_module
    quotactl nfsservctl getpmsg putpmsg afs_syscall tuxcall security gettid readahead
    setxattr lsetxattr fsetxattr getxattr lgetxattr fgetxattr listxattr llistxattr
    flistxattr removexattr lremovexattr fremovexattr tkill time futex sched_setaffinity
    sched_getaffinity set_thread_area io_setup io_destroy io_getevents io_submit
    io_cancel get_thread_area lookup_dcookie epoll_create epoll_ctl_old epoll_wait_old
    remap_file_pages getdents64 set_tid_address restart_syscall semtimedop fadvise64
    timer_create timer_settime timer_gettime timer_getoverrun timer_delete clock_settime
    clock_gettime clock_getres clock_nanosleep exit_group epoll_wait epoll_ctl tgkill
    utimes vserver mbind set_mempolicy get_mempolicy mq_open mq_unlink mq_timedsend
    mq_timedreceive mq_notify mq_getsetattr kexec_load waitid add_key request_key keyctl
    ioprio_set ioprio_get inotify_init inotify_add_watch inotify_rm_watch migrate_pages
    openat mkdirat mknodat fchownat futimesat newfstatat unlinkat renameat linkat
    symlinkat readlinkat fchmodat faccessat pselect6 ppoll unshare set_robust_list
    get_robust_list splice tee sync_file_range vmsplice move_pages utimensat epoll_pwait
    signalfd timerfd_create eventfd fallocate timerfd_settime timerfd_gettime accept4
    signalfd4 eventfd2 epoll_create1 dup3 pipe2 inotify_init1 preadv pwritev
    rt_tgsigqueueinfo perf_event_open recvmmsg fanotify_init fanotify_mark prlimit64
    name_to_handle_at open_by_handle_at clock_adjtime syncfs sendmmsg setns getcpu
    process_vm_readv process_vm_writev kcmp finit_module sched_setattr sched_getattr
    renameat2 seccomp getrandom memfd_create kexec_file_load bpf execveat userfaultfd
    membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc
    pkey_free statx io_pgetevents rseq -89 pidfd_send_signal io_uring_setup
    io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig fsmount fspick
    pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2 process_madvise
    epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset landlock_add_rule
    landlock_restrict_self memfd_secret process_mrelease futex_waitv
    set_mempolicy_home_node
"""

_AARCH64 = """
    io_setup io_destroy io_submit io_cancel io_getevents setxattr lsetxattr fsetxattr
    getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr removexattr
    lremovexattr fremovexattr getcwd lookup_dcookie eventfd2 epoll_create1 epoll_ctl
    epoll_pwait dup dup3 fcntl inotify_init1 inotify_add_watch inotify_rm_watch ioctl
    ioprio_set ioprio_get flock mknodat mkdirat unlinkat symlinkat linkat renameat
    umount2 mount pivot_root nfsservctl statfs fstatfs truncate ftruncate fallocate
    faccessat chdir fchdir chroot fchmod fchmodat fchownat fchown openat close vhangup
    pipe2 quotactl getdents64 lseek read write readv writev pread64 pwrite64 preadv
    pwritev sendfile pselect6 ppoll signalfd4 vmsplice splice tee readlinkat newfstatat
    fstat sync fsync fdatasync sync_file_range timerfd_create timerfd_settime
    timerfd_gettime utimensat acct capget capset personality exit exit_group waitid
    set_tid_address unshare futex set_robust_list get_robust_list nanosleep getitimer
    setitimer kexec_load init_module delete_module timer_create timer_gettime
    timer_getoverrun timer_settime timer_delete clock_settime clock_gettime clock_getres
    clock_nanosleep syslog ptrace sched_setparam sched_setscheduler sched_getscheduler
    sched_getparam sched_setaffinity sched_getaffinity sched_yield
    sched_get_priority_max sched_get_priority_min sched_rr_get_interval restart_syscall
    kill tkill tgkill sigaltstack rt_sigsuspend rt_sigaction rt_sigprocmask
    rt_sigpending rt_sigtimedwait rt_sigqueueinfo rt_sigreturn setpriority getpriority
    reboot setregid setgid setreuid setuid setresuid getresuid setresgid getresgid
    setfsuid setfsgid times setpgid getpgid getsid setsid getgroups setgroups uname
    sethostname setdomainname getrlimit setrlimit getrusage umask prctl getcpu
    gettimeofday settimeofday adjtimex getpid getppid getuid geteuid getgid getegid
    gettid sysinfo mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify
    mq_getsetattr msgget msgctl msgrcv msgsnd semget semctl semtimedop semop shmget
    shmctl shmat shmdt socket socketpair bind listen accept connect getsockname
    getpeername sendto recvfrom setsockopt getsockopt shutdown sendmsg recvmsg readahead
    brk munmap mremap add_key request_key keyctl clone execve mmap fadvise64 swapon
    swapoff mprotect msync mlock munlock mlockall munlockall mincore madvise
    remap_file_pages mbind get_mempolicy set_mempolicy migrate_pages move_pages
    rt_tgsigqueueinfo perf_event_open accept4 recvmmsg -16 wait4 prlimit64 fanotify_init
    fanotify_mark name_to_handle_at open_by_handle_at clock_adjtime syncfs setns
    sendmmsg process_vm_readv process_vm_writev kcmp finit_module sched_setattr
    sched_getattr renameat2 seccomp getrandom memfd_create bpf execveat userfaultfd
    membarrier mlock2 copy_file_range preadv2 pwritev2 pkey_mprotect pkey_alloc
    pkey_free statx io_pgetevents rseq kexec_file_load -129 pidfd_send_signal
    io_uring_setup io_uring_enter io_uring_register open_tree move_mount fsopen fsconfig
    fsmount fspick pidfd_open clone3 close_range openat2 pidfd_getfd faccessat2
    process_madvise epoll_pwait2 mount_setattr quotactl_fd landlock_create_ruleset
    landlock_add_rule landlock_restrict_self memfd_secret process_mrelease futex_waitv
    set_mempolicy_home_node
"""


def _numbers(table: str) -> dict[str, int]:
    out: dict[str, int] = {}
    nr = 0
    for tok in table.split():
        if tok.startswith("-"):
            nr += int(tok[1:])
            continue
        out[tok] = nr
        nr += 1
    return out


@record(frozen=True)
class Arch:
    name: str
    audit: int                 # AUDIT_ARCH_* as the kernel reports it in seccomp_data
    numbers: dict[str, int]
    seccomp_nr: int            # the seccomp(2) system call itself
    x32_bit: int = 0           # numbers with this bit are another ABI: killed

    def nr(self, name: str) -> int:
        try:
            return self.numbers[name]
        except KeyError:
            raise ValueError(f"no system call {name!r} on {self.name}") from None

    def name_of(self, nr: int) -> str:
        for name, n in self.numbers.items():
            if n == nr:
                return name
        return f"syscall {nr}"


ARCHES = {
    "x86_64": Arch("x86_64", 0xC000003E, _numbers(_X86_64), 317, x32_bit=0x40000000),
    "aarch64": Arch("aarch64", 0xC00000B7, _numbers(_AARCH64), 277),
}


class SeccompError(Exception):
    """The filter cannot be built or installed; the message is one line."""


def native_arch() -> Arch:
    machine = os.uname().machine      # platform.machine(), without importing platform
    arch = ARCHES.get(machine)
    if arch is None:
        raise SeccompError(f"no seccomp system call table for {machine}: cannot sandbox")
    return arch


# ---------------------------------------------------------------- the program

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06

RET_KILL_PROCESS = 0x80000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_OFF_NR = 0
_OFF_ARCH = 4


def _off_arg(index: int) -> int:
    # the low 32 bits of args[index] (little-endian on both supported arches)
    return 16 + 8 * index


@record(frozen=True)
class Rule:
    """Allow `name`; if `arg` is set, only when args[arg] (low 32 bits) is one of `values`."""
    name: str
    why: str = ""
    arg: int | None = None
    values: tuple[int, ...] = ()


@record(frozen=True)
class Insn:
    code: int
    jt: int
    jf: int
    k: int


def build(rules: Sequence[Rule], default: int = RET_KILL_PROCESS,
          arch: Arch | None = None) -> list[Insn]:
    """The filter program for `rules`: allowed calls return ALLOW, others `default`."""
    arch = arch or native_arch()
    # a name this architecture lacks (epoll_wait on aarch64) cannot be called here
    rules = [r for r in rules if r.name in arch.numbers]
    plain = sorted({arch.nr(r.name) for r in rules if r.arg is None})
    checked = [r for r in rules if r.arg is not None]
    # symbolic program: jumps name a label ("allow", "deny") or a count to skip
    prog: list[tuple[int, object, object, int]] = [
        (BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (BPF_JEQ_K, 1, 0, arch.audit),
        (BPF_RET_K, 0, 0, RET_KILL_PROCESS),
        (BPF_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if arch.x32_bit:
        prog.append((BPF_JGE_K, "kill", 0, arch.x32_bit))
    for nr in plain:
        prog.append((BPF_JEQ_K, "allow", 0, nr))
    for rule in checked:
        assert rule.arg is not None and rule.values, rule
        block = [(BPF_LD_W_ABS, 0, 0, _off_arg(rule.arg))]
        block += [(BPF_JEQ_K, "allow", 0, v) for v in rule.values]
        block.append((BPF_RET_K, 0, 0, default))
        prog.append((BPF_JEQ_K, 0, len(block), arch.nr(rule.name)))
        prog += block
    labels = {"deny": len(prog)}
    prog.append((BPF_RET_K, 0, 0, default))
    labels["allow"] = len(prog)
    prog.append((BPF_RET_K, 0, 0, RET_ALLOW))
    labels["kill"] = len(prog)
    prog.append((BPF_RET_K, 0, 0, RET_KILL_PROCESS))

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise SeccompError("filter too long for classic BPF jumps: split the list")
        out.append(Insn(code, jt, jf, k))
    return out


def pack(prog: Sequence[Insn]) -> bytes:
    return b"".join(struct.pack("=HBBI", i.code, i.jt, i.jf, i.k) for i in prog)


def disassemble(prog: Sequence[Insn], arch: Arch | None = None) -> list[str]:
    """One readable line per instruction, system calls named."""
    arch = arch or native_arch()
    rets = {RET_KILL_PROCESS: "KILL_PROCESS", RET_TRAP: "TRAP", RET_ALLOW: "ALLOW",
            RET_LOG: "LOG"}
    lines = []
    loaded = "nr"
    for n, i in enumerate(prog):
        if i.code == BPF_LD_W_ABS:
            loaded = {0: "nr", 4: "arch"}.get(i.k, f"args[{(i.k - 16) // 8}]")
            text = f"ld {loaded}"
        elif i.code in (BPF_JEQ_K, BPF_JGE_K):
            what = arch.name_of(i.k) if loaded == "nr" and i.code == BPF_JEQ_K else hex(i.k)
            op = "jeq" if i.code == BPF_JEQ_K else "jge"
            text = f"{op} {what}, +{i.jt}, +{i.jf}"
        elif i.code == BPF_RET_K:
            if i.k & 0xFFFF0000 == RET_ERRNO:
                text = f"ret ERRNO({i.k & 0xFFFF})"
            else:
                text = f"ret {rets.get(i.k, hex(i.k))}"
        else:
            text = f"op {i.code:#x} {i.jt} {i.jf} {i.k:#x}"
        lines.append(f"{n:4d}  {text}")
    return lines


# ---------------------------------------------------------------- installing it

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(prog: Sequence[Insn], arch: Arch | None = None) -> None:
    """Set no_new_privs and load `prog` for every thread of the process (TSYNC)."""
    arch = arch or native_arch()
    code = ctypes.create_string_buffer(pack(prog))
    fprog = _SockFprog(len(prog), ctypes.addressof(code))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"cannot set no_new_privs: {os.strerror(err)}")
    ret = _libc.syscall(ctypes.c_long(arch.seccomp_nr), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
                        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if ret < 0:
        err = ctypes.get_errno()
        raise SeccompError(f"cannot install the seccomp filter: {os.strerror(err)}")
    if ret > 0:
        raise SeccompError(f"cannot install the seccomp filter: thread {ret} refused it")


# ---------------------------------------------------------------- debug: name the call

SA_SIGINFO = 4
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _Sigaction(ctypes.Structure):
    # glibc's struct sigaction on x86_64 and aarch64
    _fields_ = [("handler", _HANDLER), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_keep: list[object] = []     # the callback and struct must outlive the handler


def trap_handler(fds: Iterable[int], prog: str, arch: Arch | None = None) -> None:
    """On SIGSYS from the filter, write which call it was to each of `fds` and exit.

    For debug mode (default action RET_TRAP).  The message for every number is
    prepared now: the handler runs inside a signal and must not allocate much.
    siginfo_t for SIGSYS: si_signo, si_errno, si_code, padding, then
    _call_addr (8 bytes) and _syscall (int) at offset 24.
    """
    arch = arch or native_arch()
    targets = tuple(fds)
    messages = {nr: f"{prog}: seccomp: forbidden system call {name} ({nr}), exiting\n".encode()
                for name, nr in arch.numbers.items()}

    def on_sigsys(_signum: int, info: int | None, _ctx: int | None) -> None:
        nr = ctypes.c_int.from_address(info + 24).value if info else -1
        msg = messages.get(nr) or f"{prog}: seccomp: forbidden system call {nr}\n".encode()
        # where in our code: names and line numbers only (source lines would need files)
        frame = sys._getframe(1)
        where = []
        while frame is not None and len(where) < 12:
            code = frame.f_code
            where.append(f"    {code.co_filename}:{frame.f_lineno} {code.co_name}\n")
            frame = frame.f_back
        msg += "".join(where).encode(errors="replace")
        for fd in targets:
            try:
                os.write(fd, msg)
            except OSError:
                pass
        os._exit(128 + signal.SIGSYS)

    handler = _HANDLER(on_sigsys)
    act = _Sigaction()
    act.handler = handler
    act.flags = SA_SIGINFO
    _keep[:] = [handler, act, messages]
    if _libc.sigaction(signal.SIGSYS, ctypes.byref(act), None) != 0:
        raise SeccompError(f"cannot handle SIGSYS: {os.strerror(ctypes.get_errno())}")


if __name__ == "__main__":   # print a mode's filter: python -m common.seccomp pasta|passt
    from common import syscalls

    for line in disassemble(build(syscalls.allowed(sys.argv[1] if len(sys.argv) > 1
                                                   else "pasta"))):
        print(line)
