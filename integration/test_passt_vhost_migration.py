"""A vhost-user guest migrates live from one QEMU and passt to another, and keeps working.

QEMU copies guest memory while the guest runs, then copies again every page
written since.  The pages passt writes (receive buffers, used rings) QEMU
only knows of through the dirty log passt keeps for it (LOG_ALL with
LOG_SHMFD); without it QEMU 7.2 refuses to migrate a vhost-user guest at
all.  So: a guest on QEMU A served by passt A takes a lease and downloads a
file, then pings the gateway without pause (receive buffers written all
through the migration) and says it is ready; the test starts QEMU B
(`-incoming`) with passt B, migrates A to B over a UNIX socket, ends A, and
opens a port the guest was polling for.  On B, the guest downloads the file
again (SHA-256 checked) and powers off.  The guest's receive ring came over
in memory QEMU copied: had passt's writes during the copy not been logged,
the ring on B would be inconsistent with what QEMU saved of it, and the
guest would see stale or torn frames or none at all.

QEMU 7.2 has no device-state transfer for vhost-user net: what passt knows
of the guest (MAC, addresses) is relearned on B from the guest's frames
(the transfer itself is tested with a scripted front-end in
tests/test_vhost_user.py).  TCP connections do not survive: none is open
across the migration here.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from integration.conftest import our_command, wait_for
from integration.guest import GuestImage, build_guest, default_cache_dir, run_guest
from integration.guest.hostnet import daemon, socket_dir
from integration.guest.run import qemu_command
from integration.test_passt_guest import (
    BOOT_TIMEOUT,
    EXPECTED_SHA,
    GUEST_MEMORY_MB,
    QEMU,
    VHOST_DEVICE_OPTS,
    host_world,
    in_ns,
    require,
    services,
    values,
    vhost_netdev,
)

MIGRATED_PORT = 5003      # opened on the host once the guest runs on B

SCRIPT = rf"""
udhcpc -i eth0 -n -q >/dev/null 2>&1 || exit 10
echo "LEASE-ADDR=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')"
echo "TCP-DOWN=$(timeout 120 nc @GW4@ 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
ping -q -i 0.05 @GW4@ >/dev/null 2>&1 &
echo MIGRATE-NOW > /dev/ttyS0
n=0
until echo | timeout 2 nc @GW4@ {MIGRATED_PORT} >/dev/null 2>&1; do
    n=$((n + 1)); [ $n -lt 600 ] || exit 11; sleep 0.2
    [ $((n % 25)) -ne 0 ] || echo "POLLING $n"      # alive, whatever the network does
done
echo "TCP-DOWN2=$(timeout 120 nc @GW4@ 5002 < /dev/null | sha256sum | cut -d' ' -f1)"
"""


class Monitor:
    """QEMU's human monitor on a UNIX socket: a command in, its output back."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        wait_for(lambda: self._connect(path), timeout=30, what="QEMU's monitor")
        self._read_prompt()

    def _connect(self, path: Path) -> bool:
        try:
            self.sock.connect(str(path))
            return True
        except OSError:
            return False

    def _read_prompt(self) -> str:
        data = b""
        while not data.endswith(self.PROMPT):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("QEMU closed its monitor")
            data += chunk
        return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", data.decode(errors="replace"))

    def command(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self._read_prompt()

    def quit(self) -> None:
        """Ask QEMU to exit, and see it close the monitor (a command followed at once by
        our close may never be read)."""
        self.sock.sendall(b"quit\n")
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def cpu_state(path: Path) -> str:
    """What a guest that stopped answering is doing: run state and registers, twice
    (a guest that moves on is alive, one stuck at the same place is not)."""
    try:
        mon = Monitor(path)
    except (OSError, ConnectionError, AssertionError) as exc:
        return f"no monitor: {exc!r}"
    try:
        out = [line for line in mon.command("info status").splitlines() if "VM status" in line]
        for _ in range(2):
            regs = mon.command("info registers")
            out += [line for line in regs.splitlines()
                    if line.startswith(("RIP", "EIP", "RSP", "ESP", "CR0"))]
            time.sleep(1)
        return "\n".join(out)
    except OSError as exc:
        return f"monitor failed: {exc!r}"
    finally:
        mon.close()


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    require(QEMU, "ip")
    return build_guest(default_cache_dir())


@pytest.mark.qemu
def test_guest_migrates_to_another_passt_and_keeps_its_network(guest_image: GuestImage,
                                                               tmp_path: Path) -> None:
    with ExitStack() as stack:
        up = stack.enter_context(host_world())
        sdir = stack.enter_context(socket_dir())
        stack.enter_context(services(up, tmp_path / "results.jsonl", tmp_path / "svc.log"))
        passts = {}
        for name in ("a", "b"):
            sock = sdir / f"{name}.socket"
            log = tmp_path / f"passt-{name}.log"
            passts[name] = (stack.enter_context(daemon(
                [*up.exec_prefix(), *our_command("passt"), "-f", "-d", "--vhost-user",
                 "-s", str(sock)], log, ready=sock)), sock, log)
        monitor_path = tmp_path / "monitor-a.socket"
        monitor_b = tmp_path / "monitor-b.socket"
        migration = tmp_path / "migration.socket"
        console_b = tmp_path / "console-b.log"
        console_b.touch()
        script = SCRIPT.replace("@GW4@", up.gw4)
        state: dict = {}

        def why() -> str:
            out = ""
            for name, (_p, _s, log) in passts.items():
                out += f"\n--- passt {name} ---\n{log.read_text(errors='replace')[-2500:]}"
            out += f"\n--- console B ---\n{console_b.read_text(errors='replace')[-2000:]}"
            return out + f"\n--- orchestration ---\n{state}"

        def migrate(source: subprocess.Popen) -> None:
            """Once the guest on A says so: start B, migrate A to B, end A, open the port."""
            console_a = next(a[5:] for a in source.args if str(a).startswith("file:"))
            initrd = source.args[source.args.index("-initrd") + 1]
            state["t0"] = time.monotonic()
            try:
                wait_for(lambda: "MIGRATE-NOW" in Path(console_a).read_text(errors="replace")
                         or source.poll() is not None, timeout=BOOT_TIMEOUT,
                         what="the guest to be ready to migrate")
                if source.poll() is not None:
                    state["error"] = "QEMU A ended before the migration"
                    return
                cmd = qemu_command(guest_image, Path(initrd), console_b,
                                   vhost_netdev(passts["b"][1]), memory_mb=GUEST_MEMORY_MB,
                                   device_opts=VHOST_DEVICE_OPTS,
                                   extra_args=["-incoming", f"unix:{migration}", "-monitor",
                                               f"unix:{monitor_b},server=on,wait=off"])
                with open(tmp_path / "qemu-b.stderr", "wb") as err:
                    state["b"] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err,
                                                  stderr=err, start_new_session=True)
                state["ready at"] = round(time.monotonic() - state["t0"], 1)
                wait_for(migration.exists, timeout=30, what="QEMU B to listen")
                mon = Monitor(monitor_path)
                try:
                    state["migrate"] = mon.command(f"migrate -d unix:{migration}")
                    deadline = time.monotonic() + 120
                    while time.monotonic() < deadline:
                        info = mon.command("info migrate")
                        m = re.search(r"Migration status: (\S+)", info)
                        state["status"] = m.group(1) if m else info[-300:]
                        if state["status"] in ("completed", "failed", "cancelled"):
                            break
                        time.sleep(0.2)
                    state["migrated at"] = round(time.monotonic() - state["t0"], 1)
                    if state["status"] == "completed":
                        listener = subprocess.Popen(
                            in_ns(up.host_ns, "socat", f"TCP-LISTEN:{MIGRATED_PORT},fork,"
                                  "reuseaddr", "OPEN:/dev/null"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        state["listener"] = listener
                    mon.quit()
                finally:
                    mon.close()
                try:
                    source.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    state["A did not quit"] = True
                    source.kill()
            except Exception as exc:  # noqa: BLE001 - reported by the test body
                state["error"] = repr(exc)
                source.kill()

        def start_thread(proc: subprocess.Popen) -> None:
            t = threading.Thread(target=migrate, args=(proc,), daemon=True)
            state["thread"] = t
            t.start()

        try:
            first = run_guest(guest_image, vhost_netdev(passts["a"][1]), script, BOOT_TIMEOUT,
                              memory_mb=GUEST_MEMORY_MB, device_opts=VHOST_DEVICE_OPTS,
                              extra_args=["-monitor", f"unix:{monitor_path},server=on,wait=off"],
                              on_start=start_thread)
            state["thread"].join(30)
            v = values(first.console)
            assert v.get("LEASE-ADDR") == f"{up.addr4}/{up.prefix4}", first.console + why()
            assert v.get("TCP-DOWN") == EXPECTED_SHA, first.console + why()
            assert "error" not in state and state.get("status") == "completed" \
                and "A did not quit" not in state, \
                first.console + first.qemu_stderr + why()
            b: subprocess.Popen = state["b"]
            try:
                b.wait(timeout=BOOT_TIMEOUT)
            except subprocess.TimeoutExpired:
                state["B at the end"] = cpu_state(monitor_b)
                b.kill()
                b.wait()
                raise AssertionError("the guest on B did not finish" + why()) from None
            after = values(console_b.read_text(errors="replace"))
            assert after.get("TCP-DOWN2") == EXPECTED_SHA, why()
            assert re.search(r"GUEST-EXIT=0\s*$", console_b.read_text(errors="replace"),
                             re.M), why()
            # B served the guest with the rings as they came over; A saw its guest go
            state["done at"] = round(time.monotonic() - state["t0"], 1)
            assert "guest link up" in passts["b"][2].read_text(errors="replace"), why()
            for proc, _sock, _log in passts.values():
                assert proc.poll() is None, why()
        finally:
            for key in ("b", "listener"):
                proc = state.get(key)
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
