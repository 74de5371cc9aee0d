"""Host side of guest tests: throwaway namespaces, a socket directory, a daemon process.

`uplink_namespaces()` makes a "host" network namespace whose only link is a veth to a
"router" namespace (10.77.0.2/24 via 10.77.0.1, fd77::2/64 via fd77::1 by default), so
the network passt copies for its guest is entirely on this machine. `socket_dir()` makes
a directory the passt socket can be created in after passt drops root to nobody.
`daemon()` runs a command in the background until the block ends. All three clean up
whatever they created, also when the block raises; names include the PID and a counter
so parallel test runs do not collide. Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_counter = itertools.count()


@dataclass(frozen=True)
class Uplink:
    host_ns: str
    router_ns: str
    ifname: str = "uplink"  # in host_ns; its peer in router_ns is "downlink"
    addr4: str = "10.77.0.2"
    gw4: str = "10.77.0.1"
    prefix4: int = 24
    addr6: str = "fd77::2"
    gw6: str = "fd77::1"
    prefix6: int = 64

    def exec_prefix(self) -> list[str]:
        """Prefix that runs a command inside the host namespace."""
        return ["ip", "netns", "exec", self.host_ns]


def unique_tag() -> str:
    return f"{os.getpid()}-{next(_counter)}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def uplink_namespaces(tag: str | None = None, **addresses: str | int) -> Iterator[Uplink]:
    tag = tag or unique_tag()
    up = Uplink(f"passt-guest-{tag}-host", f"passt-guest-{tag}-rtr", **addresses)
    created: list[str] = []
    try:
        for ns in (up.host_ns, up.router_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", up.ifname, "netns", up.host_ns, "type", "veth",
            "peer", "name", "downlink", "netns", up.router_ns)
        for ns, dev, addr4, addr6 in ((up.host_ns, up.ifname, up.addr4, up.addr6),
                                      (up.router_ns, "downlink", up.gw4, up.gw6)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr4}/{up.prefix4}", "dev", dev)
            _ip("-n", ns, "-6", "addr", "add", f"{addr6}/{up.prefix6}", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", up.host_ns, "route", "add", "default", "via", up.gw4)
        _ip("-n", up.host_ns, "-6", "route", "add", "default", "via", up.gw6)
        yield up
    finally:
        for ns in reversed(created):  # deleting a namespace also deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextmanager
def socket_dir(parent: str | Path | None = None) -> Iterator[Path]:
    """A fresh directory owned by nobody: C passt started as root switches to nobody
    before it binds its UNIX socket (and does not report the failure if it cannot)."""
    path = Path(tempfile.mkdtemp(prefix="passt-guest-sock-", dir=parent))
    try:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def daemon(cmd: Sequence[str], log: Path, ready: Path | None = None,
           ready_timeout: float = 10.0,
           ready_text: str | None = None) -> Iterator[subprocess.Popen]:
    """Run cmd with stdout and stderr to `log`; if `ready` is given, wait until that path
    exists, and if `ready_text` is, until the log says it too (our passt's socket
    listens long before it serves: a client with a short timeout, as qrap's probe,
    must wait for "UNIX domain socket bound at").  On exit, SIGTERM then SIGKILL the
    process by PID if it still runs."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        if ready is not None:
            deadline = time.monotonic() + ready_timeout
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}) before "
                                       f"{ready} appeared:\n{log.read_text(errors='replace')}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready} did not appear within {ready_timeout} s")
                time.sleep(0.05)
        if ready_text is not None:
            deadline = time.monotonic() + ready_timeout
            while ready_text not in log.read_text(errors="replace"):
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited ({proc.returncode}) before saying "
                                       f"{ready_text!r}:\n{log.read_text(errors='replace')}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{cmd[0]} did not say {ready_text!r} within "
                                       f"{ready_timeout} s")
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
