"""passt started as libvirt 9.0 and scripts start it: a socket that listens at once,
start-up errors that always reach someone, and a socket path that is never left
unusable by a first passt.

libvirt 9.0 runs passt with stdin and stdout on /dev/null and stderr a pipe
whose read end it has already closed, and starts QEMU a few milliseconds later
without waiting; QEMU 7.2 connects once.  (The whole libvirt-like run with a
guest is in test_passt_lifecycle.py.)
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

from integration.conftest import our_command, pid_alive, stop_pid, wait_for
from integration.guest.hostnet import socket_dir

GUEST_MAC = bytes.fromhex("525400123456")


def dhcp_discover() -> bytes:
    """An Ethernet frame with a DHCPDISCOVER, length-prefixed for passt's socket."""
    bootp = (struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, 0x2A2A2A2A, 0, 0x8000, bytes(4),
                         bytes(4), bytes(4), bytes(4), GUEST_MAC + bytes(10))
             + bytes(192) + b"\x63\x82\x53\x63" + bytes((53, 1, 1, 255)))
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4),
                     b"\xff" * 4)
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF) + ip[12:]
    frame = b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + ip + udp
    return struct.pack("!I", len(frame)) + frame


def dhcp_offer(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """The yiaddr of the first DHCP reply on `sock`."""
    sock.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        while len(data) >= 4 and len(data) >= 4 + struct.unpack_from("!I", data)[0]:
            n = struct.unpack_from("!I", data)[0]
            frame, data = data[4:4 + n], data[4 + n:]
            if frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == b"\x00\x44":
                return frame[42 + 16:42 + 20]
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("passt closed the connection")
        data += chunk
    raise AssertionError("no DHCP reply")


def broken_stderr() -> int:
    """The write end of a pipe whose read end is closed, as libvirt 9.0 gives passt."""
    r, w = os.pipe()
    os.close(r)
    return w


def passt_pids(marker: str) -> list[int]:
    """Our passt processes whose command line holds `marker` (a unique path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and any(a.endswith(b"passt") for a in argv[:2]):
            found.append(int(entry))
    return found


def _connected(path: Path) -> socket.socket | None:
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(str(path))
        return c
    except OSError:
        c.close()
        return None


def test_a_client_connecting_at_once_waits_and_is_served(topo, procs):
    """As QEMU 7.2 under libvirt 9.0: connect once, the moment the socket exists. The
    socket listens long before set-up is done (host discovery, imports): the client
    waits in the backlog and gets its DHCP answer."""
    with socket_dir() as sdir:
        path = sdir / "passt.socket"
        started = time.monotonic()
        p = procs.start(topo.host.cmd(*our_command("passt"), "-f", "-q", "-s", str(path)))
        while not path.exists():
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() - started < 20, "no socket"
            time.sleep(0.0002)
        appeared = time.monotonic() - started
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))                    # once, as QEMU does: no retry
            c.sendall(dhcp_discover())
            assert socket.inet_ntoa(dhcp_offer(c)) == "10.77.0.2"
            served = time.monotonic() - started
    print(f"socket after {appeared * 1000:.0f} ms, DHCP answer after {served * 1000:.0f} ms")
    # before anything slow: well before set-up is over (a ratio, so that load cancels)
    assert appeared < 0.5 * served, (appeared, served)


def test_broken_stderr_start_up_error_reaches_the_log_file(topo, procs, tmp_path):
    """libvirt 9.0's stderr, a port that is taken: exit 1, the reason in --log-file."""
    taker = procs.start(topo.host.cmd("socat", "TCP6-LISTEN:18800,ipv6only=0", "STDOUT"))
    wait_for(lambda: ":18800 " in topo.host.run("ss", "-Hltn").stdout, what="port taker")
    log = tmp_path / "passt.log"
    err = broken_stderr()
    with socket_dir() as sdir:
        sock = sdir / "passt.socket"
        try:
            r = subprocess.run(topo.host.cmd(*our_command("passt"), "--one-off", "--socket",
                                             str(sock), "--log-file", str(log),
                                             "--tcp-ports", "18800:80"),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                               timeout=30)
        finally:
            os.close(err)
        assert r.returncode == 1
        text = log.read_text()
        assert "18800" in text and "passt" in text, text
        wait_for(lambda: not passt_pids(str(sock)), what="passt to be gone")
        assert not sock.exists()
    assert taker.poll() is None


def test_broken_stderr_never_kills_us(topo, procs):
    """Debug output to a stderr nobody reads: passt keeps serving."""
    err = broken_stderr()
    with socket_dir() as sdir:
        path = sdir / "passt.socket"
        try:
            p = procs.start(topo.host.cmd(*our_command("passt"), "-f", "-d", "-s", str(path)),
                            stderr=err)
        finally:
            os.close(err)
        wait_for(lambda: path.exists(), timeout=20, what="the socket")
        for _ in range(2):
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(path))
                c.sendall(dhcp_discover())
                assert socket.inet_ntoa(dhcp_offer(c)) == "10.77.0.2"
        assert p.poll() is None


SYSLOG_JAIL = r"""
set -e
old=$(mktemp -d)
mount --rbind /dev "$old"
mount -t tmpfs -o mode=0755 none /dev
for d in null zero random urandom; do touch /dev/$d; mount --bind "$old/$d" /dev/$d; done
touch /dev/log
mount --bind "$0" /dev/log
umount -l "$old"
rmdir "$old"
exec "$@"
"""


def test_no_log_file_and_nobody_on_stderr_means_syslog(topo, tmp_path):
    """The last resort: syslog. passt runs in a mount namespace whose /dev/log is a
    socket of the test's, so the machine's syslog (if any) sees nothing."""
    sink = tmp_path / "syslog.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as logsock:
        logsock.bind(str(sink))
        logsock.settimeout(20)
        err = broken_stderr()
        try:
            r = subprocess.run(
                topo.host.cmd("unshare", "--mount", "--propagation", "private", "sh", "-c",
                              SYSLOG_JAIL, str(sink), *our_command("passt"), "-f",
                              "-s", "/nonexistent/dir/passt.socket"),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=30)
        finally:
            os.close(err)
        assert r.returncode == 1
        msg = logsock.recv(4096).decode(errors="replace")
    assert "passt" in msg and "/nonexistent/dir/passt.socket" in msg, msg


def test_a_held_socket_names_its_holder_and_a_stale_one_is_taken_over(topo, procs, tmp_path):
    with socket_dir() as sdir:
        path = sdir / "passt.socket"
        pid_file = tmp_path / "first.pid"
        topo.host.run(*our_command("passt"), "-s", str(path), "-P", str(pid_file), timeout=30)
        first = int(pid_file.read_text())
        procs.adopt(first)
        # the parent returned once the socket listened; the PID that stays is the pid file's
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            cred = c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        assert struct.unpack("3i", cred)[0] == first
        wait_for(lambda: pid_alive(first) and passt_pids(str(path)) == [first],
                 what="only the first passt, serving")
        # a second one for the same path: refused, naming the first
        r = topo.host.run(*our_command("passt"), "-f", "-s", str(path), check=False,
                          timeout=30)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by PID {first} (passt)" in lines[0], r.stderr
        # the first one dies without cleaning up: the next one takes the path over
        os.kill(first, 9)
        wait_for(lambda: not pid_alive(first), what="the first passt gone")
        second = procs.start(topo.host.cmd(*our_command("passt"), "-f", "-s", str(path)))
        c = wait_for(lambda: _connected(path), timeout=20, what="the second passt's socket")
        with c:
            c.sendall(dhcp_discover())
            assert socket.inet_ntoa(dhcp_offer(c)) == "10.77.0.2"
        stop_pid(second.pid)

