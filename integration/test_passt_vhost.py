"""passt --vhost-user across guests: power-off, a QEMU killed mid-transfer, the next guest.

One passt (no --one-off) serves three guests in turn, in the same test
namespaces as integration/test_passt_guest.py (which checks one vhost-user
guest in depth: DHCP, SLAAC, ping, TCP and UDP both ways, -t):

1. a guest takes a lease, downloads a file (SHA-256 checked) and powers off;
2. a guest starts an upload, and its QEMU is killed (SIGKILL) after 1 MB
   with the connection open;
3. a guest takes a lease and downloads the file again.

After each, passt still runs, holds exactly the descriptors it held before
the first guest (no flow, socket or mapping left behind: the host's server
sees its connection end), and serves the next.  With --one-off, a killed
QEMU ends passt with status 0.  And libvirt's command line for a vhostuser
interface with the passt backend, verbatim, serves a guest at MTU 1500, so
that TCP segmentation offload carries the transfers both ways.  Finally the
other way round: passt is killed under a running guest and a new one takes
its socket; QEMU's chardev reconnects (as libvirt configures it) and the
guest's network works again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from integration.conftest import our_command, pid_alive, stop_pid, wait_for, wait_sandboxed
from integration.guest import GuestImage, build_guest, default_cache_dir, run_guest
from integration.guest.hostnet import daemon, socket_dir
from integration.test_passt_guest import (
    BOOT_TIMEOUT,
    EXPECTED_SHA,
    GUEST_MAC,
    GUEST_MEMORY_MB,
    QEMU,
    SEED,
    SERVICES,
    SIZE,
    VHOST_DEVICE_OPTS,
    host_world,
    in_ns,
    require,
    services,
    values,
    vhost_netdev,
)
from integration.test_passt_lifecycle import SERVE_SCRIPT, SMALL_SCRIPT
from integration.test_passt_services import read_results

DOWNLOAD = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
echo "LEASE-ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "TCP-DOWN=$(timeout 120 nc @GW4@ 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
"""

# uploads 1 MB, says so on the console, and keeps the connection open for more
STALL = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
{ head -c 1000000 /dev/zero; echo XFER-STARTED > /dev/ttyS0; sleep 600; } |
    timeout 120 nc @GW4@ 5001
"""


# the lifecycle test's guest, with a download too: large segments go both ways
LIBVIRT_SCRIPT = SERVE_SCRIPT.replace(SMALL_SCRIPT, SMALL_SCRIPT + r"""
echo "TCP-DOWN=$(timeout 60 nc @GW4@ 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
""")


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    require(QEMU, "ip")
    return build_guest(default_cache_dir())


def fds_of(pid: int) -> list[str]:
    out = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return sorted(out)


def settle(pid: int, baseline: list[str], timeout: float = 10.0) -> list[str]:
    """passt's descriptors once they are back to `baseline` (or what they are at timeout)."""
    end = time.monotonic() + timeout
    while True:
        now = fds_of(pid)
        if now == baseline or time.monotonic() > end:
            return now
        time.sleep(0.1)


def kill_when(marker: str, proc: subprocess.Popen, seen: dict) -> None:
    """Watch QEMU's serial console file; SIGKILL QEMU once `marker` appears there."""
    console = next(a[5:] for a in proc.args if str(a).startswith("file:"))

    def watch() -> None:
        end = time.monotonic() + BOOT_TIMEOUT
        while proc.poll() is None and time.monotonic() < end:
            try:
                text = Path(console).read_text(errors="replace")
            except OSError:
                text = ""
            if marker in text:
                seen["killed_at"] = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def boot(image: GuestImage, sock: Path, script: str, gw4: str, **kw):
    return run_guest(image, vhost_netdev(sock), script.replace("@GW4@", gw4), BOOT_TIMEOUT,
                     memory_mb=GUEST_MEMORY_MB, device_opts=VHOST_DEVICE_OPTS, **kw)


@pytest.mark.qemu
def test_guests_come_and_go_and_nothing_leaks(guest_image: GuestImage, tmp_path: Path) -> None:
    with ExitStack() as stack:
        up = stack.enter_context(host_world())
        sdir = stack.enter_context(socket_dir())
        results = tmp_path / "results.jsonl"
        stack.enter_context(services(up, results, tmp_path / "services.log"))
        sock = sdir / "vhost.socket"
        log = tmp_path / "passt.log"
        passt = stack.enter_context(daemon(
            [*up.exec_prefix(), *our_command("passt"), "-f", "-d", "--vhost-user",
             "-s", str(sock)], log, ready=sock))
        wait_sandboxed(passt.pid)
        baseline = fds_of(passt.pid)

        def why(result=None) -> str:
            out = f"\n--- passt log ---\n{log.read_text(errors='replace')[-3000:]}"
            if result is not None:
                out += (f"\n--- console ---\n{result.console[-2000:]}\n--- qemu ---\n"
                        f"{result.qemu_stderr[-1000:]}")
            return out

        # 1. a guest downloads and powers off
        first = boot(guest_image, sock, DOWNLOAD, up.gw4)
        v = values(first.console)
        assert first.exit_code == 0, why(first)
        assert v.get("LEASE-ADDR") == f"{up.addr4}/{up.prefix4}", why(first)
        assert v.get("TCP-DOWN") == EXPECTED_SHA, why(first)
        assert passt.poll() is None, why(first)
        assert settle(passt.pid, baseline) == baseline, why(first)

        # 2. a guest's QEMU dies with a download in flight
        seen: dict = {}
        second = boot(guest_image, sock, STALL, up.gw4,
                      on_start=lambda proc: kill_when("XFER-STARTED", proc, seen))
        assert "killed_at" in seen and second.qemu_returncode == -signal.SIGKILL, why(second)
        assert passt.poll() is None, why(second)
        assert settle(passt.pid, baseline) == baseline, why(second)
        # the host's end of the flow was reset, not left hanging
        deadline = time.monotonic() + 10
        while not [e for e in read_results(results)
                   if e.get("svc") == "tcp-sink" and "error" in e]:
            assert time.monotonic() < deadline, f"{read_results(results)}{why(second)}"
            time.sleep(0.1)

        # 3. the next guest is served as the first was
        third = boot(guest_image, sock, DOWNLOAD, up.gw4)
        v = values(third.console)
        assert third.exit_code == 0 and v.get("TCP-DOWN") == EXPECTED_SHA, why(third)
        assert passt.poll() is None, why(third)
        assert settle(passt.pid, baseline) == baseline, why(third)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, why()
        assert len(re.findall(r"vhost-user front-end connected", text)) == 3, why()


@pytest.mark.qemu
def test_one_off_ends_when_qemu_is_killed(guest_image: GuestImage, tmp_path: Path) -> None:
    with ExitStack() as stack:
        up = stack.enter_context(host_world())
        sdir = stack.enter_context(socket_dir())
        stack.enter_context(services(up, tmp_path / "results.jsonl",
                                     tmp_path / "services.log"))
        sock = sdir / "vhost.socket"
        log = tmp_path / "passt.log"
        passt = stack.enter_context(daemon(
            [*up.exec_prefix(), *our_command("passt"), "-f", "-d", "--vhost-user",
             "--one-off", "-s", str(sock)], log, ready=sock))
        seen: dict = {}
        result = boot(guest_image, sock, STALL, up.gw4,
                      on_start=lambda proc: kill_when("XFER-STARTED", proc, seen))
        assert "killed_at" in seen, result.console[-2000:]
        try:
            rc = passt.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, log.read_text(errors="replace")[-3000:]
        assert not sock.exists()


@pytest.mark.qemu
def test_libvirt_vhostuser_command_line_serves_a_guest(guest_image: GuestImage,
                                                       tmp_path: Path) -> None:
    """<interface type='vhostuser'><backend type='passt'/>: libvirt's argv, QEMU's chardev."""
    address, netmask, mtu = "10.77.0.50", "24", "1500"
    with host_world() as up, socket_dir() as sdir, \
            services(up, tmp_path / "results.jsonl", tmp_path / "services.log"):
        sock = sdir / "guest-net0.socket"
        pidfile = tmp_path / "guest-net0-passt.pid"
        logfile = tmp_path / "passt-net0.log"
        # qemuPasstBuildCommand() for a vhostuser interface, option for option
        argv = [*our_command("passt"), "--vhost-user", "--one-off", "--socket", str(sock),
                "--pid", str(pidfile), "--mtu", mtu, "--interface", up.ifname,
                "--log-file", str(logfile), "--address", address, "--netmask", netmask,
                "--tcp-ports", "10080:8080", "--udp-ports", "10053:53"]
        r = subprocess.run([*up.exec_prefix(), *argv], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        try:
            assert pid_alive(pid) and sock.exists()
            client = subprocess.Popen(
                in_ns(up.host_ns, sys.executable, str(SERVICES), "get", "--connect",
                      "127.0.0.1,10080", "--results", str(tmp_path / "results.jsonl"),
                      "--tag", "libvirt", "--size", str(SIZE), "--seed", str(SEED),
                      "--deadline", "200"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                # libvirt's chardev for passt always reconnects, every 5 s
                netdev = vhost_netdev(sock)
                netdev[1] += ",reconnect=5"
                result = run_guest(guest_image, netdev, LIBVIRT_SCRIPT.replace("@GW4@", up.gw4),
                                   BOOT_TIMEOUT, mac=GUEST_MAC, memory_mb=GUEST_MEMORY_MB,
                                   device_opts=VHOST_DEVICE_OPTS)
                client.wait(timeout=30)
            finally:
                if client.poll() is None:
                    client.kill()
                    client.wait()
            v = values(result.console)
            log = logfile.read_text()
            why = f"{result.console[-3000:]}\n--- passt log ---\n{log[-3000:]}"
            assert result.exit_code == 0, why
            assert v["LEASE-ADDR"] == f"{address}/{netmask}", why
            assert v["MTU"] == mtu, why
            assert v["TCP-UP"] == v["UP-SHA"], why          # TSO from the guest at MTU 1500
            assert v["TCP-DOWN"] == EXPECTED_SHA, why           # and ours to it
            got = [e for e in read_results(tmp_path / "results.jsonl")
                   if e.get("svc") == "fwd-get"]
            assert got and got[0]["sha"] == v["UP-SHA"], why     # our 64 KiB GSO frames
            assert "checksum and segmentation offloads" in log, why
            wait_for(lambda: "guest link:" in logfile.read_text(), what="the link summary")
            m = re.search(r"\((\d+) large segments\), \d+ out \((\d+) large segments\)",
                          logfile.read_text())
            assert m and int(m[1]) > 0 and int(m[2]) > 0, why
            wait_for(lambda: not pid_alive(pid), timeout=10, what="passt to exit")
        finally:
            stop_pid(pid)


# the network before and after passt is replaced under a running guest
RECONNECT = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
ping -c 1 -W 5 @GW4@ >/dev/null 2>&1; echo "PING-BEFORE=$?"
echo PASST-CAN-GO > /dev/ttyS0
# QEMU takes the link down when its back-end goes, and up when it is back
n=0
while [ "$(cat /sys/class/net/eth0/carrier)" = 1 ]; do
    n=$((n+1)); [ $n -gt 300 ] && break
    usleep 100000
done
echo "CARRIER-DOWN-AFTER=$n"
n=0
until [ "$(cat /sys/class/net/eth0/carrier)" = 1 ]; do
    n=$((n+1)); [ $n -gt 300 ] && break
    usleep 100000
done
echo "CARRIER-UP-AFTER=$n"
n=0
until ping -c 1 -W 1 @GW4@ >/dev/null 2>&1; do
    n=$((n+1)); [ $n -gt 60 ] && break
done
echo "PING-AFTER-TRIES=$n"
echo "TCP-DOWN=$(timeout 60 nc @GW4@ 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
"""


@pytest.mark.qemu
def test_qemu_reconnects_to_a_new_passt(guest_image: GuestImage, tmp_path: Path) -> None:
    """passt dies under a running guest; QEMU's chardev reconnects to the next one."""
    with ExitStack() as stack:
        up = stack.enter_context(host_world())
        sdir = stack.enter_context(socket_dir())
        stack.enter_context(services(up, tmp_path / "results.jsonl",
                                     tmp_path / "services.log"))
        sock = sdir / "vhost.socket"
        cmd = [*up.exec_prefix(), *our_command("passt"), "-f", "-d", "--vhost-user",
               "-s", str(sock)]
        first = stack.enter_context(daemon(cmd, tmp_path / "passt1.log", ready=sock))
        replaced: dict = {}

        def replace_passt(proc: subprocess.Popen) -> None:
            console = next(a[5:] for a in proc.args if str(a).startswith("file:"))

            def watch() -> None:
                end = time.monotonic() + BOOT_TIMEOUT
                while proc.poll() is None and time.monotonic() < end:
                    if "PASST-CAN-GO" in Path(console).read_text(errors="replace"):
                        os.kill(first.pid, signal.SIGKILL)
                        first.wait()
                        replaced["second"] = stack.enter_context(
                            daemon(cmd, tmp_path / "passt2.log", ready=sock))
                        return
                    time.sleep(0.05)

            threading.Thread(target=watch, daemon=True).start()

        netdev = vhost_netdev(sock)
        netdev[1] += ",reconnect=1"
        result = run_guest(guest_image, netdev, RECONNECT.replace("@GW4@", up.gw4),
                           BOOT_TIMEOUT, memory_mb=GUEST_MEMORY_MB,
                           device_opts=VHOST_DEVICE_OPTS, on_start=replace_passt)
        v = values(result.console)
        logs = "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-2000:]}"
                       for p in sorted(tmp_path.glob("passt*.log")))
        why = f"{result.console[-3000:]}{logs}\n--- qemu ---\n{result.qemu_stderr[-1000:]}"
        assert "second" in replaced, why
        assert result.exit_code == 0 and v.get("PING-BEFORE") == "0", why
        assert int(v.get("CARRIER-DOWN-AFTER", "999")) <= 300, why
        assert int(v.get("CARRIER-UP-AFTER", "999")) <= 300, why
        assert int(v.get("PING-AFTER-TRIES", "99")) <= 60, why
        assert v.get("TCP-DOWN") == EXPECTED_SHA, why
        assert "vhost-user front-end connected" in (tmp_path / "passt2.log").read_text(), why
