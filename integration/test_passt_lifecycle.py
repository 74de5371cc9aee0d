"""passt's life across guests, and libvirt's command line, with the QEMU test guest.

- Without --one-off, a guest that powers off leaves passt waiting, and the
  next guest is served from scratch (with --one-off passt exits with the
  guest: see test_passt_guest.py).
- libvirt starts passt with a fixed command line and expects it to
  daemonise, write the pid file and listen before it returns; that command
  line, verbatim, must serve a guest.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from integration.conftest import as_user, our_command, pid_alive, stop_pid, wait_for
from integration.guest import run_guest
from integration.guest.hostnet import daemon, socket_dir
from integration.test_passt_guest import (
    BOOT_TIMEOUT,
    GUEST_MAC,
    SEED,
    SERVICES,
    SIZE,
    guest_image,  # noqa: F401 - the module-scoped fixture
    host_world,
    in_ns,
    services,
    stream_netdev,
    values,
)
from integration.test_passt_services import read_results

SMALL_SCRIPT = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
echo "LEASE-ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "LEASE-ROUTER=$(ip -4 route show default | awk '{print $3}')"
echo "MTU=$(cat /sys/class/net/eth0/mtu)"
dd if=/dev/urandom of=/tmp/up bs=64k count=16 2>/dev/null
echo "UP-SHA=$(sha256sum /tmp/up | cut -d' ' -f1)"
echo "TCP-UP=$(timeout 60 nc @GW4@ 5001 < /tmp/up)"
"""

SERVE_SCRIPT = SMALL_SCRIPT + r"""
nc -l -p 8080 -e cat /tmp/up & SRV=$!
n=0
while kill -0 $SRV 2>/dev/null; do
    n=$((n+1)); [ $n -gt 900 ] && break
    usleep 100000
done
echo "SERVED=$n"
"""


@pytest.mark.qemu
def test_next_guest_after_the_first_powers_off(guest_image, tmp_path):  # noqa: F811
    with host_world() as up, socket_dir() as sdir, \
            services(up, tmp_path / "results.jsonl", tmp_path / "services.log"):
        sock = sdir / "passt.socket"
        cmd = [*up.exec_prefix(), *our_command("passt"), "-f", "-d", "-s", str(sock)]
        with daemon(cmd, tmp_path / "passt.log", ready=sock) as passt:
            script = SMALL_SCRIPT.replace("@GW4@", up.gw4)
            for n in (1, 2):
                result = run_guest(guest_image, stream_netdev(sock), script, BOOT_TIMEOUT)
                v = values(result.console)
                log = (tmp_path / "passt.log").read_text()
                why = f"guest {n}:\n{result.console[-3000:]}\n--- passt ---\n{log[-3000:]}"
                assert result.exit_code == 0, why
                assert v["LEASE-ADDR"] == f"{up.addr4}/{up.prefix4}", why
                assert v["TCP-UP"] == v["UP-SHA"], why
                assert passt.poll() is None, why            # still there for the next one
            wait_for(lambda: (tmp_path / "passt.log").read_text().count("guest disconnected")
                     == 2, what="the second disconnect")
            assert "guest connected (#2)" in (tmp_path / "passt.log").read_text()
            passt.send_signal(signal.SIGTERM)
            assert passt.wait(5) == 0


@pytest.mark.qemu
def test_libvirt_command_line_serves_a_guest(guest_image, tmp_path):  # noqa: F811
    address, netmask, mtu = "10.77.0.50", "24", "1500"
    with host_world() as up, socket_dir() as sdir, \
            services(up, tmp_path / "results.jsonl", tmp_path / "services.log"):
        sock = sdir / "passt-net0.socket"
        pidfile = tmp_path / "passt-net0.pid"
        logfile = tmp_path / "passt-net0.log"
        # what libvirt's qemuPasstStart() runs, option for option
        argv = [*our_command("passt"), "--one-off", "--socket", str(sock),
                "--mac-addr", GUEST_MAC, "--mtu", mtu, "--interface", up.ifname,
                "--log-file", str(logfile), "--address", address, "--netmask", netmask,
                "--tcp-ports", "10080:8080", "--udp-ports", "10053:53", "--pid", str(pidfile)]
        started = time.monotonic()
        r = subprocess.run([*up.exec_prefix(), *argv], capture_output=True, text=True,
                           timeout=60)
        startup = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        pid = int(pidfile.read_text())
        try:
            assert pid_alive(pid)
            assert sock.exists()                 # listening once the command returned
            print(f"libvirt-style start-up: {startup:.2f} s", file=sys.stderr)
            client = subprocess.Popen(
                in_ns(up.host_ns, sys.executable, str(SERVICES), "get", "--connect",
                      "127.0.0.1,10080", "--results", str(tmp_path / "results.jsonl"),
                      "--tag", "libvirt", "--size", str(SIZE), "--seed", str(SEED),
                      "--deadline", "200"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                result = run_guest(guest_image, stream_netdev(sock),
                                   SERVE_SCRIPT.replace("@GW4@", up.gw4), BOOT_TIMEOUT,
                                   mac=GUEST_MAC)
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
            assert v["LEASE-ROUTER"] == up.gw4, why
            assert v["MTU"] == mtu, why
            assert v["TCP-UP"] == v["UP-SHA"], why
            got = [e for e in read_results(tmp_path / "results.jsonl")
                   if e.get("svc") == "fwd-get"]
            assert got and got[0]["sha"] == v["UP-SHA"], why
            assert re.search(r"UNIX domain socket bound at .*passt-net0\.socket", log), why
            # --one-off: gone with the guest
            wait_for(lambda: not pid_alive(pid), timeout=10, what="passt to exit")
        finally:
            stop_pid(pid)


LIBVIRT_9_SCRIPT = r"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
echo "LEASE-ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
ping -c 3 -W 5 @GW4@ >/dev/null 2>&1; echo "PING4=$?"
dd if=/dev/urandom of=/tmp/up bs=64k count=16 2>/dev/null
echo "UP-SHA=$(sha256sum /tmp/up | cut -d' ' -f1)"
echo "TCP-UP=$(timeout 60 nc @GW4@ 5001 < /tmp/up)"
nc -l -p 80 -e cat /tmp/up & SRV=$!
n=0
while kill -0 $SRV 2>/dev/null; do
    n=$((n+1)); [ $n -gt 900 ] && break
    usleep 100000
done
echo "SERVED=$n"
"""

# QEMU's wrapper: say it is ready, wait for the go on a FIFO, then exec QEMU at once
GO_WRAPPER = 'touch "$0"; read go < "$1"; shift; exec "$@"'


@pytest.mark.qemu
def test_libvirt_9_0_starts_qemu_without_waiting(guest_image, tmp_path, test_user):  # noqa: F811
    """libvirt 9.0's qemuPasstStart(), as it really happens: passt runs as the
    unprivileged QEMU user with libvirt 9.0's argv, stdin and stdout on /dev/null,
    stderr a pipe whose reader is already gone, and nobody waits for it: QEMU is
    exec'd 5 ms after passt and connects once (QEMU 7.2 does so 20-50 ms after its
    exec here).  The guest gets its lease, pings, moves data over TCP both ways (one
    way through --tcp-ports), powers off, and passt ends with it, leaving nothing."""
    uid, gid = test_user
    mac = "52:54:00:77:00:10"              # libvirt passes the guest's own MAC
    results = tmp_path / "results.jsonl"
    rundir = Path(tempfile.mkdtemp(prefix="passt-libvirt-", dir="/var/tmp"))
    sock = rundir / "1-guest-net0.socket"
    try:
        os.chown(rundir, uid, gid)
        rundir.chmod(0o755)
        logfile = rundir / "passt.log"
        argv = [*our_command("passt"), "--one-off", "--socket", str(sock), "--mac-addr", mac,
                "--log-file", str(logfile), "--tcp-ports", "18800:80"]
        with host_world() as up, services(up, results, tmp_path / "services.log"):
            ready = rundir / "qemu-wrapper-ready"
            fifo = rundir / "go"
            os.mkfifo(fifo)
            outcome: dict[str, object] = {}

            def boot() -> None:
                try:
                    outcome["result"] = run_guest(
                        guest_image, stream_netdev(sock),
                        LIBVIRT_9_SCRIPT.replace("@GW4@", up.gw4), BOOT_TIMEOUT, mac=mac,
                        wrapper=["sh", "-c", GO_WRAPPER, str(ready), str(fifo)])
                except BaseException as exc:  # reported by the test
                    outcome["error"] = exc

            qemu = threading.Thread(target=boot, daemon=True)
            qemu.start()
            wait_for(ready.exists, timeout=60, what="QEMU's wrapper")
            client = subprocess.Popen(
                in_ns(up.host_ns, sys.executable, str(SERVICES), "get", "--connect",
                      "127.0.0.1,18800", "--results", str(results), "--tag", "libvirt9",
                      "--size", str(SIZE), "--seed", str(SEED), "--deadline", "200"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            err_r, err_w = os.pipe()
            os.close(err_r)                         # libvirt 9.0 reads nothing
            try:
                # nsenter and setpriv exec at once (ip netns exec takes its time), so that
                # QEMU's 5 ms come after passt's own exec, as under libvirt
                passt = subprocess.Popen(
                    ["nsenter", f"--net=/run/netns/{up.host_ns}", *as_user(uid, gid, argv)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_w)
                time.sleep(0.005)
                with open(fifo, "w") as go:
                    go.write("go\n")                # QEMU is exec'd now
            finally:
                os.close(err_w)
            qemu.join(BOOT_TIMEOUT + 30)
            try:
                client.wait(timeout=30)
            except subprocess.TimeoutExpired:
                client.kill()                       # the checks below say why
                client.wait()
            passt.wait(10)                          # the daemon's parent
            assert "error" not in outcome, outcome.get("error")
            result = outcome["result"]
            v = values(result.console)
            log = logfile.read_text(errors="replace") if logfile.exists() else ""
            why = (f"{result.console[-3000:]}\n--- qemu ---\n{result.qemu_stderr[-1000:]}\n"
                   f"--- passt log ---\n{log[-3000:]}")
            assert result.exit_code == 0, why
            assert v["LEASE-ADDR"] == f"{up.addr4}/{up.prefix4}", why
            assert v["PING4"] == "0", why
            assert v["TCP-UP"] == v["UP-SHA"], why
            got = [e for e in read_results(results) if e.get("svc") == "fwd-get"]
            assert got and got[0]["sha"] == v["UP-SHA"], why
            # powered off: passt went with the guest, and left nothing
            wait_for(lambda: not _passts(str(sock)), timeout=10, what="passt to exit")
            assert not sock.exists(), why
            assert sorted(p.name for p in rundir.iterdir()) == ["go", "passt.log",
                                                               "qemu-wrapper-ready"], why
    finally:
        for pid in _passts(str(sock)):
            stop_pid(pid)
        shutil.rmtree(rundir, ignore_errors=True)


def _passts(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and any(a.endswith(b"passt") for a in argv[:3]):
            found.append(int(entry))
    return found
