"""Fixtures for integration tests: test-made namespaces, our real programs, cleanup.

Every test that runs pasta does so inside a "host" network namespace made
here, linked by a veth pair to a "router" namespace holding the gateway, with
fixed addresses (10.77.0.2/24 via 10.77.0.1, fd77::2/64 via fd77::1) and its
own resolv.conf (through /etc/netns/NAME, which `ip netns exec` mounts).  So
results never depend on this machine's network and no packet can leave it.

Processes are started through `procs`, which stops exactly those (by PID,
SIGTERM then SIGKILL) at teardown, whether the test passed or not.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_until

PREFIX = Path(os.environ.get("PASST_PY_PREFIX", "/opt/passt-py"))
HOST4, GW4, PREFIX4 = "10.77.0.2", "10.77.0.1", 24
HOST6, GW6, PREFIX6 = "fd77::2", "fd77::1", 64
DNS4, DNS6 = "10.77.0.53", "fd77::53"
SEARCH = ("example.test", "lab.example.test")
TEST_USER = "passtpytest"

_counter = itertools.count()


def our_command(name: str) -> list[str]:
    """Our pasta/passt/qrap: the installed script (readable by any user) or -m."""
    exe = PREFIX / "bin" / name
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", name]


def run(cmd: list[str], *, check: bool = True, timeout: float = 30,
        **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run(cmd, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_counter)}"


class Procs:
    """Processes a test started; all stopped by PID at teardown."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen] = []
        self.pids: list[int] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(cmd, **kw)
        self.popens.append(p)
        return p

    def adopt(self, pid: int) -> None:
        """A daemon we caused to start (read from its pid file)."""
        self.pids.append(pid)

    def stop_all(self) -> None:
        for p in self.popens:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.popens:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(3)
            for f in (p.stdout, p.stderr):
                if f:
                    f.close()
        for pid in self.pids:
            stop_pid(pid)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, timeout: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not pid_alive(pid):
                return
            time.sleep(0.02)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """`tests.support.wait_until` with the defaults of processes and namespaces."""
    return wait_until(pred, timeout, interval=interval, what=what)


def wait_sandboxed(pid: int, timeout: float = 15.0) -> None:
    """Wait until pasta/passt PID has finished set-up: its last step installs seccomp."""
    def confined() -> bool:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split() == ["Seccomp:", "2"] for line in f)
    wait_for(confined, timeout=timeout, what=f"process {pid} to enter its sandbox")


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), **kw)


def make_netns(name: str) -> Netns:
    run(["ip", "netns", "add", name])
    return Netns(name)


def delete_netns(ns: Netns) -> None:
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)


@dataclass
class Topology:
    router: Netns
    host: Netns

    def target(self) -> Netns:
        """A fresh, empty network namespace for pasta to serve (deleted at teardown)."""
        ns = make_netns(unique("pt-t"))
        self._targets.append(ns)
        return ns


def add_side_link(ns: Netns) -> None:
    """A second host link, side0 (10.99.0.2/24), leading nowhere (no dummy links here: veth)."""
    ns.run("ip", "link", "add", "side0", "type", "veth", "peer", "name", "side1")
    ns.run("ip", "addr", "add", "10.99.0.2/24", "dev", "side0")
    for dev in ("side0", "side1"):
        ns.run("ip", "link", "set", dev, "up")


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop_all()


@pytest.fixture
def topo() -> Iterator[Topology]:
    router = make_netns(unique("pt-r"))
    host = make_netns(unique("pt-h"))
    etc = Path("/etc/netns") / host.name
    topo = Topology(router, host)
    topo._targets = []  # type: ignore[attr-defined]
    try:
        for ns in (router, host):     # no duplicate address detection: addresses usable at once
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        run(["ip", "link", "add", "veth-r", "netns", router.name, "type", "veth",
             "peer", "name", "eth0", "netns", host.name])
        router.run("ip", "addr", "add", f"{GW4}/{PREFIX4}", "dev", "veth-r")
        router.run("ip", "addr", "add", f"{GW6}/{PREFIX6}", "dev", "veth-r", "nodad")
        router.run("ip", "link", "set", "veth-r", "up")
        router.run("ip", "link", "set", "lo", "up")
        host.run("ip", "addr", "add", f"{HOST4}/{PREFIX4}", "dev", "eth0")
        host.run("ip", "addr", "add", f"{HOST6}/{PREFIX6}", "dev", "eth0", "nodad")
        host.run("ip", "link", "set", "eth0", "up")
        host.run("ip", "link", "set", "lo", "up")
        host.run("ip", "route", "add", "default", "via", GW4)
        host.run("ip", "-6", "route", "add", "default", "via", GW6)
        # like a real host: a usable link-local address before anything starts
        wait_for(lambda: "fe80" in host.run("ip", "-6", "addr", "show", "dev", "eth0",
                                            "scope", "link").stdout
                 and "tentative" not in host.run("ip", "-6", "addr", "show", "dev", "eth0",
                                                 "scope", "link").stdout,
                 what="host link-local address")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {DNS4}\nnameserver {DNS6}\nsearch {' '.join(SEARCH)}\n")
        yield topo
    finally:
        for ns in topo._targets:  # type: ignore[attr-defined]
            delete_netns(ns)
        delete_netns(host)
        delete_netns(router)
        shutil.rmtree(etc, ignore_errors=True)


@pytest.fixture
def pasta() -> list[str]:
    return our_command("pasta")


@contextmanager
def rootless_user() -> Iterator[tuple[int, int]]:
    """TEST_USER's uid and gid (created for the while if missing), with /dev/net/tun
    usable by it (its mode restored afterwards): what a rootless run needs."""
    created = False
    if run(["id", "-u", TEST_USER], check=False).returncode != 0:
        run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", TEST_USER])
        created = True
    uid = int(run(["id", "-u", TEST_USER]).stdout)
    gid = int(run(["id", "-g", TEST_USER]).stdout)
    tun_mode = os.stat("/dev/net/tun").st_mode & 0o7777
    os.chmod("/dev/net/tun", 0o666)
    try:
        yield uid, gid
    finally:
        os.chmod("/dev/net/tun", tun_mode)
        if created:
            run(["userdel", TEST_USER], check=False)


@pytest.fixture(scope="session")
def test_user() -> Iterator[tuple[int, int]]:
    """An unprivileged user for rootless runs, and /dev/net/tun usable by it."""
    with rootless_user() as ids:
        yield ids


def as_user(uid: int, gid: int, cmd: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--reset-env", "--", *cmd]
