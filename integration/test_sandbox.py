"""The sandbox of real pasta and passt processes, seen from outside (and from the command).

Once set up, each must be: under seccomp (Seccomp: 2) with no_new_privs, in an
empty root, in mount/IPC/UTS namespaces of its own, with no capability in the
initial user namespace (bounding set included) and, in a user namespace of
its own, only CAP_NET_BIND_SERVICE in pasta's namespace thread; holding only
descriptors we can name (never one inherited from the caller); not dumpable,
so the command pasta spawns can neither trace it nor read its environment.
`--chroot-fallback` is exercised by making pivot_root fail with a seccomp
filter of the test's own, installed before pasta starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import seccomp
from integration.conftest import (
    HOST4,
    as_user,
    our_command,
    pid_alive,
    run,
    stop_pid,
    wait_for,
)
from integration.test_passt_cli import arp_roundtrip, connect, socket_dir

CAP_NET_BIND_SERVICE = 1 << 10
ROOT = Path(__file__).resolve().parent.parent


def task_status(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        lines = Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
        out[int(tid)] = dict(line.split(":\t", 1) for line in lines if ":\t" in line)
    return out


def assert_confined(tasks: dict[int, dict[str, str]], pid: int, thread_caps: int = 0) -> None:
    """Every task: filtered, no_new_privs, nothing inheritable, ambient or bounding;
    the main thread no capability at all, others at most `thread_caps`."""
    assert tasks, "no tasks"
    for tid, st in tasks.items():
        assert st["Seccomp"].strip() == "2", (tid, st["Seccomp"])
        assert st["NoNewPrivs"].strip() == "1", tid
        for field in ("CapInh", "CapAmb", "CapBnd"):
            assert int(st[field], 16) == 0, (tid, field, st[field])
        allowed = 0 if tid == pid else thread_caps
        for field in ("CapEff", "CapPrm"):
            assert int(st[field], 16) & ~allowed == 0, (tid, field, st[field])


def assert_own_namespaces(pid: int, kinds=("mnt", "ipc", "uts")) -> None:
    for kind in kinds:
        assert os.readlink(f"/proc/{pid}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
    # a PID namespace for children that has no process yet cannot be named (ENOENT)
    with pytest.raises(FileNotFoundError):
        os.readlink(f"/proc/{pid}/ns/pid_for_children")


# character devices by number: inside the sandbox their paths read differently
DEVICES = {os.stat("/dev/null").st_rdev: "null", os.stat("/dev/net/tun").st_rdev: "tap"}
FD_KINDS = (
    # paths as seen from outside a root that is gone: relative to their mount
    ("proc-net table", re.compile(r"^(/proc)?/\d+/(task/\d+/)?net/(tcp|udp)6?$")),
    ("socket", re.compile(r"^socket:\[\d+\]$")),
    ("pipe", re.compile(r"^pipe:\[\d+\]$")),
    ("epoll", re.compile(r"^anon_inode:\[eventpoll\]$")),
    ("inotify", re.compile(r"^anon_inode:inotify$")),
    ("timerfd", re.compile(r"^anon_inode:\[timerfd\]$")),
    ("pidfd", re.compile(r"^anon_inode:\[pidfd\]$")),
    ("namespace", re.compile(r"^(net|user|mnt):\[\d+\]$")),
)


def classify_fds(pid: int, named: dict[str, str]) -> dict[int, str]:
    """Each descriptor's kind; `named` maps paths we gave (log file, netns) to a kind.
    Anything else fails the test."""
    by_inode = {}
    for path, kind in named.items():
        st = os.stat(path)
        by_inode[(st.st_dev, st.st_ino)] = kind
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        kind = (DEVICES.get(st.st_rdev) if stat.S_ISCHR(st.st_mode) else None) \
            or by_inode.get((st.st_dev, st.st_ino)) \
            or next((k for k, rx in FD_KINDS if rx.match(target)), None)
        assert kind is not None, f"fd {fd} -> {target}: not a descriptor we should hold"
        out[int(fd)] = kind
    return out


def inherited_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "inherited-from-caller", os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(fd, True)
    return fd


# ---------------------------------------------------------------- pasta as root, daemon

def test_pasta_root_daemon(topo, procs, pasta, tmp_path):
    target = topo.target()
    pidfile, log = tmp_path / "pasta.pid", tmp_path / "pasta.log"
    leak = inherited_file(tmp_path)
    try:
        r = run(topo.host.cmd(*pasta, "--config-net", "-P", str(pidfile), "-l", str(log),
                              "-t", "auto", "-u", "auto", "--netns", target.path),
                pass_fds=(leak,), check=False)
    finally:
        os.close(leak)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    tasks = task_status(pid)
    assert len(tasks) == 2                        # main and the namespace thread
    assert all(st["Uid"].split() == ["65534"] * 4 for st in tasks.values())
    assert_confined(tasks, pid)
    assert_own_namespaces(pid)
    assert os.listdir(f"/proc/{pid}/root") == []
    for tid in tasks:
        assert os.listdir(f"/proc/{pid}/task/{tid}/root") == []
    kinds = classify_fds(pid, {str(log): "log", target.path: "netns file",
                               os.path.dirname(target.path): "netns directory"})
    assert sorted(kinds[fd] for fd in (0, 1, 2)) == ["null"] * 3
    assert "tap" in kinds.values() and "epoll" in kinds.values()
    assert HOST4 in target.run("ip", "-4", "addr").stdout
    # the netns watch still sees the file after its periodic check (1 s), although
    # `ip netns exec`, whose mount namespace it was found in, is long gone
    time.sleep(1.3)
    assert pid_alive(pid), log.read_text()[-500:]
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=5, what="pasta to exit")


# ---------------------------------------------------------------- passt as root, daemon

def test_passt_root_daemon(topo, procs, tmp_path):
    passt = our_command("passt")
    pidfile = tmp_path / "passt.pid"
    leak = inherited_file(tmp_path)
    with socket_dir() as d:
        sock = d / "passt.socket"
        try:
            r = run(topo.host.cmd(*passt, "-s", str(sock), "-P", str(pidfile)),
                    pass_fds=(leak,), check=False)
        finally:
            os.close(leak)
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        procs.adopt(pid)
        with connect(sock) as c:               # a guest is served inside the sandbox
            assert arp_roundtrip(c)
            tasks = task_status(pid)
            assert list(tasks) == [pid]
            assert tasks[pid]["Uid"].split() == ["65534"] * 4
            assert_confined(tasks, pid)
            assert_own_namespaces(pid, ("mnt", "ipc", "uts", "user"))
            assert os.listdir(f"/proc/{pid}/root") == []
            kinds = classify_fds(pid, {str(d): "socket directory"})
            assert sorted(kinds[fd] for fd in (0, 1, 2)) == ["null"] * 3
            assert list(kinds.values()).count("socket") == 2   # listener, guest
            # the socket's directory (O_PATH), to remove the socket from at exit
            assert list(kinds.values()).count("socket directory") == 1
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), timeout=5, what="passt to exit")
        assert not sock.exists()


def test_passt_keeps_fd_and_closes_the_rest(topo, procs, tmp_path):
    passt = our_command("passt")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    leak = inherited_file(tmp_path)
    try:
        p = procs.start(topo.host.cmd(*passt, "-f", "-F", str(theirs.fileno())),
                        pass_fds=(theirs.fileno(), leak))
    finally:
        theirs.close()
        os.close(leak)
    assert arp_roundtrip(ours)
    assert_confined(task_status(p.pid), p.pid)
    kinds = classify_fds(p.pid, {})
    assert list(kinds.values()).count("socket") == 1    # the -F socket, nothing inherited
    ours.close()
    assert p.wait(5) == 0


# ---------------------------------------------------------------- pasta rootless, a command

PROBE = r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
pasta = os.getppid()
out = {"pid": pasta}
out["ptrace"] = libc.ptrace(0x4206, pasta, 0, 0)            # PTRACE_SEIZE
out["ptrace_errno"] = ctypes.get_errno()
try:
    open(f"/proc/{pasta}/environ", "rb").read()
    out["environ"] = "read"
except OSError as e:
    out["environ"] = e.errno
out["tasks"] = {}
for tid in os.listdir(f"/proc/{pasta}/task"):
    lines = open(f"/proc/{pasta}/task/{tid}/status").read().splitlines()
    out["tasks"][tid] = dict(l.split(":\t", 1) for l in lines if ":\t" in l)
print(json.dumps(out))
"""


def test_pasta_rootless_command_cannot_trace_or_read_it(topo, pasta, test_user, tmp_path):
    uid, gid = test_user
    r = run(topo.host.cmd(*as_user(uid, gid, [*pasta, "--config-net", "--",
                                              "python3", "-c", PROBE])), check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ptrace"] == -1 and out["ptrace_errno"] == 1          # EPERM
    assert out["environ"] == 13                                      # EACCES
    tasks = {int(t): st for t, st in out["tasks"].items()}
    # seen from the command's user namespace, where our uid is root
    assert all(st["Uid"].split() == ["0"] * 4 for st in tasks.values())
    assert_confined(tasks, out["pid"], thread_caps=CAP_NET_BIND_SERVICE)
    thread = [st for t, st in tasks.items() if t != out["pid"]]
    assert [int(st["CapEff"], 16) for st in thread] == [CAP_NET_BIND_SERVICE]


# ---------------------------------------------------------------- as rootless podman runs it

PODMAN_LIKE = r"""
set -e
d=$(mktemp -d)
touch "$d/netns"
unshare --net="$d/netns" true
"$@" --config-net --quiet -t auto --netns "$d/netns" -P "$d/pid"
cat "$d/pid"
read _ || true
rm -rf "$d" 2>/dev/null || true
"""


def test_pasta_as_root_of_its_own_user_namespace(topo, procs, pasta, test_user):
    """uid 0 in a user namespace of its own, as rootless podman starts pasta."""
    uid, gid = test_user
    cmd = topo.host.cmd(*as_user(uid, gid, ["unshare", "--user", "--map-root-user", "--mount",
                                            "sh", "-c", PODMAN_LIKE, "sh", *pasta]))
    p = procs.start(cmd, stdin=subprocess.PIPE, text=True)
    pid = int(p.stdout.readline())
    procs.adopt(pid)
    tasks = task_status(pid)
    assert all(st["Uid"].split()[0] == str(uid) for st in tasks.values())
    assert_confined(tasks, pid, thread_caps=CAP_NET_BIND_SERVICE)
    assert os.listdir(f"/proc/{pid}/root") == []
    p.stdin.close()
    p.wait(10)
    stop_pid(pid)


# ---------------------------------------------------------------- --chroot-fallback

# A filter of the test's own: pivot_root fails with EINVAL (as on an initramfs
# root), everything else is allowed; then pasta runs with it in place.
NO_PIVOT = r"""
import os, sys
from common import seccomp
arch = seccomp.native_arch()
S = seccomp
prog = [S.Insn(S.BPF_LD_W_ABS, 0, 0, 0),
        S.Insn(S.BPF_JEQ_K, 0, 1, arch.nr("pivot_root")),
        S.Insn(S.BPF_RET_K, 0, 0, S.RET_ERRNO | 22),
        S.Insn(S.BPF_RET_K, 0, 0, S.RET_ALLOW)]
S.install(prog, arch)
os.execv(sys.argv[1], sys.argv[1:])
"""


def no_pivot(cmd: list[str]) -> list[str]:
    return [sys.executable, "-c", NO_PIVOT, *cmd]


@pytest.mark.parametrize("fallback", [True, False])
def test_chroot_fallback_where_pivot_root_fails(topo, procs, pasta, tmp_path, fallback):
    target = topo.target()
    pidfile, log = tmp_path / "pasta.pid", tmp_path / "pasta.log"
    extra = ["--chroot-fallback"] if fallback else []
    r = run(topo.host.cmd(*no_pivot([*pasta, "--config-net", "-P", str(pidfile), "-l",
                                     str(log), *extra, "--netns", target.path])),
            check=False, cwd=ROOT)
    if not fallback:
        assert r.returncode == 1
        assert "pivot_root" in r.stderr and "--chroot-fallback" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not pidfile.exists()
        assert "tap" not in target.run("ip", "link").stdout
        return
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    assert "falling back to chroot" in log.read_text()
    assert_confined(task_status(pid), pid)
    assert os.listdir(f"/proc/{pid}/root") == []
    assert HOST4 in target.run("ip", "-4", "addr").stdout
    assert seccomp.native_arch()            # the filter above was built for this machine
