"""The seccomp filter: its tables, its program, and a child that dies by it.

Each forbidden call runs in a fresh interpreter that installs exactly the filter
pasta or passt installs (built by the same code from the same list), makes one
call and would exit 0 if it survived.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import seccomp, syscalls

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
# asm-generic names a few calls by their 32/64-bit pair; the 64-bit name is ours
GENERIC_3264 = {"fstatat": "newfstatat"}


def header_numbers(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in re.finditer(r"#define __NR(3264)?_(\w+)\s+(\d+)", path.read_text()):
        name, nr = GENERIC_3264.get(m.group(2), m.group(2)), int(m.group(3))
        if 403 <= nr <= 423 and path.name == "unistd.h":
            continue                  # the time64 calls of 32-bit architectures only
        out.setdefault(name, nr)
    out.pop("syscalls", None)
    out.pop("arch_specific_syscall", None)
    return out


@pytest.mark.parametrize("arch", sorted(seccomp.ARCHES))
def test_tables_match_the_kernel_headers(arch):
    ours = seccomp.ARCHES[arch].numbers
    theirs = header_numbers(HEADERS[arch])
    for name, nr in theirs.items():
        if name == "sync_file_range2":
            continue                   # the name for other architectures of aarch64's 84
        assert ours.get(name) == nr, (name, nr, ours.get(name))
    assert set(ours) <= set(theirs)


def test_every_listed_call_exists():
    for mode in ("pasta", "passt"):
        for rule in syscalls.allowed(mode):
            assert any(rule.name in a.numbers for a in seccomp.ARCHES.values()), rule.name


def test_program_shape():
    prog = seccomp.build(syscalls.allowed("pasta"))
    text = "\n".join(seccomp.disassemble(prog))
    assert "ld arch" in text.splitlines()[0]
    assert "jeq read," in text and "jeq execve" not in text
    assert text.rstrip().endswith("ret KILL_PROCESS")
    assert "ld args[0]" in text         # socket families are checked


CHILD = """
import ctypes, os, socket, sys
from common import seccomp, syscalls
debug = sys.argv[2] == "debug"
if debug:
    seccomp.trap_handler([2], "test")
prog = seccomp.build(syscalls.allowed(sys.argv[1]),
                     seccomp.RET_TRAP if debug else seccomp.RET_KILL_PROCESS)
seccomp.install(prog)
libc = ctypes.CDLL(None, use_errno=True)
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()      # allowed: must not die
call = sys.argv[3]
if call == "execve":
    os.execv("/bin/true", ["true"])
elif call == "open":
    os.open("/etc/hostname", os.O_RDONLY)
elif call == "ptrace":
    libc.ptrace(0, 0, 0, 0)                                     # PTRACE_TRACEME
elif call == "unshare":
    libc.unshare(0x20000000)
elif call == "socket_packet":
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
elif call == "socket_netlink":
    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
elif call == "fork":
    os.fork()
elif call == "nothing":
    pass
os._exit(0)
"""


def run_child(mode: str, call: str, debug: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, mode, "debug" if debug else "kill",
                           call], cwd=ROOT, capture_output=True, text=True, timeout=30)


FORBIDDEN = ["execve", "open", "ptrace", "unshare", "socket_packet", "socket_netlink", "fork"]


@pytest.mark.parametrize("mode", ["pasta", "passt"])
def test_allowed_calls_survive(mode):
    r = run_child(mode, "nothing")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("call", FORBIDDEN)
@pytest.mark.parametrize("mode", ["pasta", "passt"])
def test_forbidden_call_kills(mode, call):
    r = run_child(mode, call)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)


@pytest.mark.parametrize("call,name", [("execve", "execve"), ("open", "openat"),
                                       ("socket_packet", "socket")])
def test_debug_mode_names_the_call(call, name):
    r = run_child("pasta", call, debug=True)
    assert r.returncode == 128 + signal.SIGSYS, (r.returncode, r.stderr)
    assert f"forbidden system call {name} (" in r.stderr


UNLINK_CHILD = """
import os, sys
from common import seccomp, syscalls
ours, other = (os.open(d, os.O_PATH | os.O_DIRECTORY) for d in sys.argv[1:3])
seccomp.install(seccomp.build(syscalls.allowed("passt") + (syscalls.unlink_in(ours),)))
os.unlink("sock", dir_fd=ours)                  # allowed: passt's own socket directory
os.write(1, b"removed\\n")
os.unlink("file", dir_fd=other)                 # anywhere else: killed
os._exit(0)
"""


def test_unlink_only_in_the_socket_directory(tmp_path):
    ours, other = tmp_path / "ours", tmp_path / "other"
    for d, name in ((ours, "sock"), (other, "file")):
        d.mkdir()
        (d / name).touch()
    r = subprocess.run([sys.executable, "-c", UNLINK_CHILD, str(ours), str(other)],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == -signal.SIGSYS, (r.returncode, r.stderr)
    assert r.stdout == "removed\n"
    assert not (ours / "sock").exists() and (other / "file").exists()
