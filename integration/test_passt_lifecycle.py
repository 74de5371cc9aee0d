"""passt's life across guests, and libvirt's command line, with the QEMU test guest.

- Without --one-off, a guest that powers off leaves passt waiting, and the
  next guest is served from scratch (with --one-off passt exits with the
  guest: see test_passt_guest.py).
- libvirt starts passt with a fixed command line and expects it to
  daemonise, write the pid file and listen before it returns; that command
  line, verbatim, must serve a guest.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from integration.conftest import our_command, pid_alive, stop_pid, wait_for
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
