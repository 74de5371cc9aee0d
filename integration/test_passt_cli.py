"""Our passt as a program, without QEMU: socket, process behaviour, options.

passt runs in the test-made "host" namespace (conftest `topo`); a small
client speaking the stream protocol stands in for QEMU and checks that an
ARP request gets its reply.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, our_command, pid_alive, wait_for
from integration.guest.hostnet import socket_dir

GUEST_MAC = bytes.fromhex("525400123456")


@pytest.fixture
def passt() -> list[str]:
    return our_command("passt")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory passt can still remove its socket from after dropping to nobody."""
    with socket_dir() as d:
        yield d


def arp_request(target: str = GW4) -> bytes:
    body = (struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC
            + socket.inet_aton(HOST4) + bytes(6) + socket.inet_aton(target))
    frame = b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + body
    return struct.pack("!I", len(frame)) + frame


def arp_roundtrip(sock: socket.socket, target: str = GW4, timeout: float = 5.0) -> bytes:
    """Send an ARP request, return the sender MAC of the ARP reply."""
    sock.settimeout(timeout)
    sock.sendall(arp_request(target))
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        while len(data) >= 4 and len(data) >= 4 + struct.unpack_from("!I", data)[0]:
            n = struct.unpack_from("!I", data)[0]
            frame, data = data[4:4 + n], data[4 + n:]
            if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                assert frame[38:42] == socket.inet_aton(HOST4)
                assert frame[28:32] == socket.inet_aton(target)
                return frame[22:28]
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("passt closed the connection")
        data += chunk
    raise AssertionError("no ARP reply")


def connect(path: Path | str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def start_foreground(topo, procs, passt, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """passt -f ...; returns once it printed the QEMU options (or exited)."""
    p = procs.start(topo.host.cmd(*passt, "-f", *args), text=True)
    lines = []
    while True:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if "or qrap, for earlier qemu versions" in line or "connected socket from" in line:
            p.stderr.readline()
            break
    return p, lines


def test_foreground_serves_and_prints_qemu_options(topo, procs, passt, nobody_dir):
    sock = nobody_dir / "passt.socket"
    p, lines = start_foreground(topo, procs, passt, "-s", str(sock))
    text = "\n".join(lines)
    assert f"UNIX domain socket bound at {sock}" in text, text
    assert f"addr.path={sock}" in text
    assert f"DHCP: assign {HOST4}/24, router {GW4}" in text
    st = sock.stat()
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid      # handed to the user we run as
    with connect(sock) as c:
        assert arp_roundtrip(c) == arp_roundtrip(c)
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0
    assert not sock.exists()


def test_default_socket_path_is_the_first_free(topo, procs, passt, nobody_dir):
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(nobody_dir / "passt_1.socket"))
    busy.listen(1)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(nobody_dir / "passt_2.socket"))
    stale.close()
    (nobody_dir / "passt_3.socket").write_text("")
    try:
        # a private /tmp that is our directory: nothing else on the machine is touched
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind "$0" /tmp && exec "$@"', str(nobody_dir), *passt, "-f"]
        p = procs.start(topo.host.cmd(*cmd), text=True)
        wait_for(lambda: (nobody_dir / "passt_2.socket").exists()
                 and (nobody_dir / "passt_2.socket").stat().st_uid != 0, timeout=10,
                 what="passt_2.socket")
        with connect(nobody_dir / "passt_2.socket") as c:
            arp_roundtrip(c)
        p.send_signal(signal.SIGTERM)
        assert p.wait(5) == 0
        assert "bound at /tmp/passt_2.socket" in p.stderr.read()
    finally:
        busy.close()


def test_daemon_is_ready_when_the_parent_returns(topo, procs, passt, nobody_dir, tmp_path):
    sock = nobody_dir / "passt.socket"
    pidfile = tmp_path / "passt.pid"
    r = topo.host.run(*passt, "-s", str(sock), "-P", str(pidfile), timeout=30)
    assert r.returncode == 0
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    assert pid_alive(pid)
    with connect(sock) as c:            # listening as soon as the parent is gone
        arp_roundtrip(c)
    for fd in (0, 1, 2):
        # by device number: inside the sandbox the path reads differently
        assert os.stat(f"/proc/{pid}/fd/{fd}").st_rdev == os.stat("/dev/null").st_rdev
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    assert uids == ["65534"] * 4
    cap_eff = next(line for line in status if line.startswith("CapEff:"))
    assert int(cap_eff.split()[1], 16) == 0
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=5, what="passt to exit")


def test_next_guest_after_disconnect_and_one_off(topo, procs, passt, nobody_dir):
    sock = nobody_dir / "a.socket"
    p, _ = start_foreground(topo, procs, passt, "-s", str(sock))
    for _ in range(3):
        with connect(sock) as c:
            arp_roundtrip(c)
        time.sleep(0.1)
    assert p.poll() is None
    with connect(sock) as c, connect(sock) as second:
        arp_roundtrip(c)
        second.settimeout(3)
        assert second.recv(100) == b""        # one guest at a time
    sock1 = nobody_dir / "b.socket"
    p1, _ = start_foreground(topo, procs, passt, "--one-off", "-s", str(sock1))
    with connect(sock1) as c:
        arp_roundtrip(c)
    assert p1.wait(5) == 0
    assert not sock1.exists()


def test_fd_takes_a_connected_socket(topo, procs, passt):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    p = procs.start(topo.host.cmd(*passt, "-f", "-F", str(fd)), pass_fds=(fd,), text=True)
    theirs.close()
    with ours:
        arp_roundtrip(ours)
    assert p.wait(5) == 0                    # -F: nothing to accept after this guest


@pytest.mark.parametrize("args, message", [
    (["-s", "/nonexistent/dir/passt.socket"], "cannot bind UNIX socket"),
    (["-F", "99"], "--fd 99"),
    (["-F", "x"], "invalid --fd"),
    (["-F", "5", "-s", "/tmp/x"], "can't be given together"),
    (["-t", "auto"], "only for pasta"),
    (["-T", "22"], "-T is for pasta mode only"),
])
def test_bad_input_fails_before_anything_starts(topo, passt, args, message):
    for fg in (["-f"], []):
        r = topo.host.run(*passt, *fg, *args, check=False, timeout=30)
        assert r.returncode == 1, r
        assert message.lower() in r.stderr.lower(), r.stderr


def test_socket_in_use_is_refused(topo, procs, passt, nobody_dir):
    sock = nobody_dir / "passt.socket"
    start_foreground(topo, procs, passt, "-s", str(sock))
    r = topo.host.run(*passt, "-f", "-s", str(sock), check=False, timeout=30)
    assert r.returncode == 1 and "in use" in r.stderr


def test_pcap_has_both_directions(topo, procs, passt, nobody_dir, tmp_path):
    sock = nobody_dir / "passt.socket"
    cap = tmp_path / "cap.pcap"
    p, _ = start_foreground(topo, procs, passt, "-s", str(sock), "-p", str(cap))
    with connect(sock) as c:
        arp_roundtrip(c)
    p.send_signal(signal.SIGTERM)
    p.wait(5)
    data = cap.read_bytes()
    assert data[:4] == struct.pack("=I", 0xA1B2C3D4)
    assert arp_request()[4:] in data
    assert data.count(b"\x08\x06\x00\x01\x08\x00\x06\x04") == 2   # request and reply


def test_runas_owns_the_socket(topo, procs, passt, nobody_dir, test_user):
    uid, gid = test_user
    sock = nobody_dir / "passt.socket"
    p, _ = start_foreground(topo, procs, passt, "--runas", f"{uid}:{gid}", "-s", str(sock))
    st = sock.stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    # `ip netns exec` execs passt: the PID is passt's own
    wait_for(lambda: f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
             in Path(f"/proc/{p.pid}/status").read_text(), timeout=5, what="passt to switch")
