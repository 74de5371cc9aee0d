"""Rootless podman 5 as it really runs pasta, without podman.

Podman 5 (rootless, `--network pasta`) runs pasta as uid 0 inside its own
user namespace (uid 0 -> the user, 1..65536 -> the user's subordinate ids),
in its own mount namespace, on a network namespace bind-mounted on a file in
the user's 0700 runtime directory, with the argv that
`common/libnetwork/pasta/pasta_linux.go` (containers/container-libs) builds:

    pasta --config-net [pasta_options] [-t H-H:C-C] --dns-forward 169.254.1.1
          [-t none] -u none -T none -U none --no-map-gw --quiet --netns PATH
          --map-guest-addr 169.254.1.2

It takes exit 0 as "the namespace is configured" and never kills pasta: it
unmounts and removes the netns file.  For bridge networks (the "rootless
netns", `internal/rootlessnetns/netns_linux.go`) it adds `--pid PATH` and
reads that file right after pasta returns.

Here the test user (with a subordinate id range) makes the same namespaces
with `unshare`, all inside a test "host" namespace.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from integration.conftest import (
    GW4,
    HOST4,
    HOST6,
    TEST_USER,
    Netns,
    Procs,
    our_command,
    pid_alive,
    run,
    wait_for,
)

SUBID_COUNT = 65536
GUEST_DNS = "169.254.1.1"
GUEST_MAP = "169.254.1.2"


def podman_argv(netns: str, *, extras: tuple[str, ...] = (),
                ports: tuple[str, ...] = ()) -> list[str]:
    """createPastaArgs() of podman 5: --config-net, pasta_options, -p ports, defaults."""
    argv = ["--config-net", *extras]
    for spec in ports:
        argv += ["-t", spec]
    argv += ["--dns-forward", GUEST_DNS]
    given = set(argv)
    for opt, long in (("-t", "--tcp-ports"), ("-u", "--udp-ports"), ("-T", "--tcp-ns"),
                      ("-U", "--udp-ns")):
        if opt not in given and long not in given:
            argv += [opt, "none"]
    argv += ["--no-map-gw", "--quiet", "--netns", netns, "--map-guest-addr", GUEST_MAP]
    return argv


def _subid_range(path: str, user: str) -> tuple[int, int] | None:
    with open(path) as f:
        for line in f:
            name, start, count = line.strip().split(":")
            if name == user:
                return int(start), int(count)
    return None


@pytest.fixture(scope="session")
def subid_user(test_user) -> tuple[int, int, int]:
    """The test user with a subordinate uid/gid range, as a podman user has.

    The range belongs with the user (userdel removes both when the fixture that
    made the user removes it); a lock keeps concurrent test runs from adding two.
    """
    uid, gid = test_user
    with open("/run/passt-py-subid.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for path in ("/etc/subuid", "/etc/subgid"):
            if not os.path.exists(path):
                open(path, "a").close()
        ranges = [_subid_range(p, TEST_USER) for p in ("/etc/subuid", "/etc/subgid")]
        if None in ranges or ranges[0] != ranges[1]:
            ends = [100000]
            for p in ("/etc/subuid", "/etc/subgid"):
                with open(p) as f:
                    ends += [int(s) + int(c) for _, s, c in
                             (line.strip().split(":") for line in f if line.count(":") == 2)]
            start = max(ends)
            span = f"{start}-{start + SUBID_COUNT - 1}"
            run(["usermod", "--add-subuids", span, "--add-subgids", span, TEST_USER])
            ranges[0] = (start, SUBID_COUNT)
    return uid, gid, ranges[0][0]


@dataclass
class Rootless:
    """A podman-like user: its user+mount namespace (held by a sleeping process),
    a 0700 runtime directory and a network namespace bound on a file in it."""
    host: Netns
    uid: int
    gid: int
    holder: subprocess.Popen
    rundir: str
    netns: str

    def cmd(self, *args: str) -> list[str]:
        """Run as podman does: uid 0 of the user's namespace, in its mount namespace,
        in the host's network namespace."""
        return self.host.cmd("setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                             "--clear-groups", "--reset-env", "--",
                             "nsenter", "-t", str(self.holder.pid), "--user", "--mount",
                             "--", *args)

    def in_netns(self, *args: str) -> list[str]:
        return self.cmd("nsenter", f"--net={self.netns}", "--", *args)

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run(self.cmd(*args), **kw)


@pytest.fixture
def rootless(topo, subid_user) -> Iterator[Rootless]:
    uid, gid, sub = subid_user
    rundir = tempfile.mkdtemp(prefix="passt-py-run-", dir="/tmp")
    os.chown(rundir, uid, gid)
    os.chmod(rundir, 0o700)
    netns = os.path.join(rundir, "netns", "netns-podman5")
    script = (f"mkdir -m 0700 {rundir}/netns && touch {netns} && unshare --net={netns} true "
              "&& echo ready && exec sleep 600")
    holder = subprocess.Popen(
        topo.host.cmd("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                      "--reset-env", "--", "unshare", "--user", "--map-root-user",
                      f"--map-users={sub},1,{SUBID_COUNT}", f"--map-groups={sub},1,{SUBID_COUNT}",
                      "--mount", "--", "sh", "-c", script),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        line = holder.stdout.readline()
        assert line == "ready\n", holder.stderr.read() if holder.poll() is not None else line
        yield Rootless(topo.host, uid, gid, holder, rundir, netns)
    finally:
        holder.kill()
        holder.wait()
        for f in (holder.stdout, holder.stderr):
            f.close()
        shutil.rmtree(rundir, ignore_errors=True)


def find_pasta(netns: str) -> list[int]:
    """PIDs of the pastas serving `netns` (a path unique to this test)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if netns.encode() in argv and any(b"pasta" in a for a in argv[:2]):
            found.append(int(entry))
    return found


def start_pasta(r: Rootless, procs: Procs, argv: list[str]) -> subprocess.CompletedProcess:
    """Start pasta as podman does (exec, CombinedOutput: wait for exit and EOF)."""
    try:
        res = run(r.cmd(*our_command("pasta"), *argv), check=False, timeout=30,
                  capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    finally:
        for pid in find_pasta(r.netns):
            procs.adopt(pid)
    return res


def host_fetch(host: Netns, addr: str, port: int) -> str:
    """From the host namespace: what a TCP server at addr:port says."""
    r = host.run("socat", "-T", "5", "-u", f"TCP:{addr}:{port}" if ":" not in addr
                 else f"TCP6:[{addr}]:{port}", "STDOUT", check=False, timeout=10)
    return r.stdout


def check_configured(r: Rootless) -> None:
    """The netns has the host's addresses and routes, on the host's interface name."""
    addrs = run(r.in_netns("ip", "-o", "addr", "show", "dev", "eth0")).stdout
    assert f"inet {HOST4}/24" in addrs and f"inet6 {HOST6}/64" in addrs, addrs
    routes = run(r.in_netns("ip", "route", "show", "default")).stdout
    assert f"default via {GW4} dev eth0" in routes, routes


def serve_in_netns(r: Rootless, procs: Procs, port: int, text: str) -> None:
    procs.start(r.in_netns("socat", f"TCP6-LISTEN:{port},ipv6only=0,fork,reuseaddr",
                           f"SYSTEM:echo {text}"))
    wait_for(lambda: f":{port} " in run(r.in_netns("ss", "-Hltn")).stdout,
             what=f"server on port {port} in the netns")


def check_reaches_host(r: Rootless, procs: Procs) -> None:
    """169.254.1.2 (--map-guest-addr) reaches a server on the host's own address."""
    procs.start(r.host.cmd("socat", f"TCP-LISTEN:18090,bind={HOST4},fork,reuseaddr",
                           "SYSTEM:echo from-the-host"))
    wait_for(lambda: ":18090 " in r.host.run("ss", "-Hltn").stdout, what="host server")
    got = run(r.in_netns("socat", "-T", "5", "-u", f"TCP:{GUEST_MAP}:18090", "STDOUT"),
              check=False, timeout=10)
    assert got.stdout.strip() == "from-the-host", got.stderr


def remove_netns_ends_pasta(r: Rootless, pid: int) -> None:
    r.run("sh", "-c", f"umount -l {r.netns} && rm {r.netns}")
    t0 = time.monotonic()
    wait_for(lambda: not pid_alive(pid), timeout=2.5, interval=0.02, what="pasta to exit")
    assert time.monotonic() - t0 < 2.0


def the_pasta(r: Rootless) -> int:
    pids = find_pasta(r.netns)
    assert len(pids) == 1, pids
    return pids[0]


def test_podman5_default_argv(rootless, procs):
    res = start_pasta(rootless, procs, podman_argv(rootless.netns))
    assert res.returncode == 0, res.stdout
    assert res.stdout == "", res.stdout      # podman logs any output as warnings
    pid = the_pasta(rootless)
    check_configured(rootless)
    check_reaches_host(rootless, procs)
    time.sleep(1.2)         # past the first fallback check of the namespace file
    assert pid_alive(pid)
    remove_netns_ends_pasta(rootless, pid)


def test_podman5_published_port(rootless, procs):
    res = start_pasta(rootless, procs,
                      podman_argv(rootless.netns, ports=("18080-18080:8080-8080",)))
    assert res.returncode == 0, res.stdout
    pid = the_pasta(rootless)
    check_configured(rootless)
    serve_in_netns(rootless, procs, 8080, "published")
    for addr in ("127.0.0.1", HOST4, "::1", HOST6):
        assert host_fetch(rootless.host, addr, 18080).strip() == "published", addr
    assert pid_alive(pid)
    remove_netns_ends_pasta(rootless, pid)


def test_podman5_pasta_options_auto(rootless, procs):
    """containers.conf pasta_options = ["-t", "auto"] (then podman adds no -t none)."""
    res = start_pasta(rootless, procs, podman_argv(rootless.netns, extras=("-t", "auto")))
    assert res.returncode == 0, res.stdout
    pid = the_pasta(rootless)
    serve_in_netns(rootless, procs, 8123, "auto-found")
    got = wait_for(lambda: host_fetch(rootless.host, "127.0.0.1", 8123).strip(), timeout=5,
                   what="the auto-detected port")
    assert got == "auto-found"
    remove_netns_ends_pasta(rootless, pid)


def test_podman5_rootless_netns_pid_file(rootless, procs):
    """Bridge networks: podman's argv plus --pid PATH, read as soon as pasta returns."""
    pid_path = os.path.join(rootless.rundir, "rootless-netns-conn.pid")
    res = start_pasta(rootless, procs, podman_argv(rootless.netns, extras=("--pid", pid_path)))
    assert res.returncode == 0, res.stdout
    with open(pid_path) as f:
        pid = int(f.read())
    assert [pid] == find_pasta(rootless.netns)
    check_configured(rootless)
    check_reaches_host(rootless, procs)
    time.sleep(1.2)
    assert pid_alive(pid)
    remove_netns_ends_pasta(rootless, pid)
    # the pid file stays once pasta is sandboxed (no path can be removed from an empty
    # root), as C pasta's does; podman removes its run directory itself
    with open(pid_path) as f:
        assert int(f.read()) == pid


def test_podman5_failure_leaves_nothing(rootless, procs, topo):
    """A port that cannot be bound: exit 1 with one line, no process, tap or pid file."""
    procs.start(topo.host.cmd("socat", "TCP6-LISTEN:18080,ipv6only=0", "STDOUT"))
    wait_for(lambda: ":18080 " in topo.host.run("ss", "-Hltn").stdout, what="port taker")
    pid_path = os.path.join(rootless.rundir, "rootless-netns-conn.pid")
    res = start_pasta(rootless, procs,
                      podman_argv(rootless.netns, extras=("--pid", pid_path),
                                  ports=("18080-18080:8080-8080",)))
    assert res.returncode != 0
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and "18080" in lines[0], res.stdout
    assert find_pasta(rootless.netns) == []
    assert not os.path.exists(pid_path)
    links = run(rootless.in_netns("ip", "-o", "link")).stdout
    assert links.count("\n") == 1 and "lo" in links, links


def test_root_runas_nobody_cannot_watch(topo, procs, subid_user):
    """Root in the initial namespace switches to nobody; if nobody cannot watch the
    namespace file, that is a set-up error (exit 1, one line, nothing left: no
    process, tap or pid file), not a silent death after exit 0."""
    uid, gid, _ = subid_user
    private = tempfile.mkdtemp(prefix="passt-py-run-", dir="/tmp")
    try:
        os.chown(private, uid, gid)
        os.chmod(private, 0o700)
        ns_file = os.path.join(private, "ns")
        pid_path = os.path.join(private, "pasta.pid")
        open(ns_file, "w").close()
        run(["unshare", f"--net={ns_file}", "true"])
        try:
            res = run(topo.host.cmd(*our_command("pasta"), "--config-net", "--quiet",
                                    "--pid", pid_path, "--netns", ns_file),
                      check=False, timeout=30)
            for pid in find_pasta(ns_file):
                procs.adopt(pid)
            assert res.returncode == 1, res.stderr
            assert res.stderr.count("\n") == 1 and ns_file in res.stderr, res.stderr
            assert "--runas" in res.stderr, res.stderr
            assert find_pasta(ns_file) == []
            assert not os.path.exists(pid_path)
            links = run(["nsenter", f"--net={ns_file}", "ip", "-o", "link"]).stdout
            assert links.count("\n") == 1 and "lo" in links, links
        finally:
            run(["umount", "-l", ns_file], check=False)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_podman5_death_after_readiness_is_logged(rootless, procs):
    """Once podman has its exit 0, stderr is gone: how we end goes to the log file."""
    log_path = os.path.join(rootless.rundir, "pasta.log")
    res = start_pasta(rootless, procs, podman_argv(rootless.netns, extras=("-l", log_path)))
    assert res.returncode == 0, res.stdout
    pid = the_pasta(rootless)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=3, what="pasta to exit")
    with open(log_path) as f:
        assert "SIGTERM: exiting" in f.read()
