"""pasta's namespace handling, process behaviour and --config-net, with the real program.

Each test runs our pasta inside the test-made "host" namespace (see
conftest), serving a namespace it creates (command mode) or one the test made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from integration.conftest import (
    GW4,
    GW6,
    HOST4,
    HOST6,
    PREFIX4,
    PREFIX6,
    as_user,
    pid_alive,
    run,
    wait_for,
)

XFER = str(Path(__file__).with_name("xfer.py"))


def addrs_of(ns_cmd: list[str], ifname: str) -> dict:
    out = run(ns_cmd + ["ip", "-j", "addr", "show", "dev", ifname]).stdout
    return json.loads(out)[0]


def test_command_exit_status(topo, pasta):
    r = topo.host.run(*pasta, "--config-net", "--", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, r.stderr


def test_command_killed_by_signal(topo, pasta):
    r = topo.host.run(*pasta, "--config-net", "--", "sh", "-c", "kill -TERM $$", check=False)
    assert r.returncode == 128 + 15, r.stderr


def test_command_not_found(topo, pasta):
    r = topo.host.run(*pasta, "--config-net", "--", "/nonexistent/cmd", check=False)
    assert r.returncode == 127
    assert "cannot run /nonexistent/cmd" in r.stderr


def test_config_net_copies_host_setup(topo, pasta):
    script = ("ip -j addr show; echo @@; ip -j route show; echo @@; ip -j -6 route show; "
              "echo @@; ip -j link show")
    r = topo.host.run(*pasta, "--config-net", "--", "sh", "-c", script)
    addrs, routes4, routes6, links = (json.loads(part) for part in r.stdout.split("@@"))
    eth0 = next(a for a in addrs if a["ifname"] == "eth0")
    lo = next(a for a in addrs if a["ifname"] == "lo")
    assert "UP" in eth0["flags"] and "UP" in lo["flags"]
    assert eth0["mtu"] == 65520
    got = {(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["scope"] == "global"}
    assert got == {(HOST4, PREFIX4), (HOST6, PREFIX6)}
    assert {"dst": "default", "gateway": GW4} in [
        {k: r[k] for k in ("dst", "gateway") if k in r} for r in routes4]
    assert any(r["dst"] == "default" and r.get("gateway") == GW6 for r in routes6)
    assert any(r["dst"] == "10.77.0.0/24" for r in routes4)
    assert [link["ifname"] for link in links] == ["lo", "eth0"]


def test_options_mtu_mac_ifname(topo, pasta):
    r = topo.host.run(*pasta, "--config-net", "-m", "9000", "-I", "veth7",
                      "--ns-mac-addr", "02:11:22:33:44:55", "--",
                      "ip", "-j", "link", "show", "veth7")
    link = json.loads(r.stdout)[0]
    assert link["mtu"] == 9000
    assert link["address"] == "02:11:22:33:44:55"


def test_without_config_net_link_is_left_alone(topo, pasta):
    r = topo.host.run(*pasta, "--", "ip", "-j", "addr", "show")
    links = {a["ifname"]: a for a in json.loads(r.stdout)}
    assert "UP" in links["lo"]["flags"]
    assert "UP" not in links["eth0"]["flags"]
    assert not [a for a in links["eth0"]["addr_info"] if a["family"] == "inet"]


def start_daemon(topo, pasta, tmp_path, procs, *extra):
    target = topo.target()
    pidfile = tmp_path / "pasta.pid"
    t0 = time.monotonic()
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), *extra,
                      "--netns", target.name, timeout=30)
    elapsed = time.monotonic() - t0
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    return target, pid, r, elapsed


def test_daemon_ready_when_configured(topo, pasta, tmp_path, procs):
    target, pid, r, _ = start_daemon(topo, pasta, tmp_path, procs)
    assert r.returncode == 0
    # the parent returned only after the namespace was configured
    eth0 = addrs_of(target.cmd(), "eth0")
    assert {a["local"] for a in eth0["addr_info"]} >= {HOST4, HOST6}
    assert pid_alive(pid)
    # detached: no terminal, stdio on /dev/null
    for fd in (0, 1, 2):
        # by device number: inside the sandbox the path reads differently
        assert os.stat(f"/proc/{pid}/fd/{fd}").st_rdev == os.stat("/dev/null").st_rdev
    # started as root without --runas: runs as nobody
    status = open(f"/proc/{pid}/status").read()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65534"] * 4
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(cap_eff.split()[1], 16) == 0


def test_quits_when_netns_removed(topo, pasta, tmp_path, procs):
    target, pid, _, _ = start_daemon(topo, pasta, tmp_path, procs)
    assert pid_alive(pid)
    t0 = time.monotonic()
    run(["ip", "netns", "del", target.name])
    wait_for(lambda: not pid_alive(pid), timeout=2.0, what="pasta to exit")
    assert time.monotonic() - t0 < 2.0


def test_quits_when_netns_unmounted_only(topo, pasta, tmp_path, procs):
    target, pid, _, _ = start_daemon(topo, pasta, tmp_path, procs)
    run(["umount", "--lazy", target.path])   # as ip-netns and podman do (MNT_DETACH)
    wait_for(lambda: not pid_alive(pid), timeout=2.0, what="pasta to exit")


def test_no_netns_quit_keeps_running(topo, pasta, tmp_path, procs):
    target, pid, _, _ = start_daemon(topo, pasta, tmp_path, procs, "--no-netns-quit")
    run(["ip", "netns", "del", target.name])
    time.sleep(2.5)
    assert pid_alive(pid)


def test_sigterm_cleans_up(topo, pasta, tmp_path, procs):
    target, pid, _, _ = start_daemon(topo, pasta, tmp_path, procs)
    os.kill(pid, 15)
    wait_for(lambda: not pid_alive(pid), timeout=3.0, what="pasta to exit")
    # closing the tap removed the interface from the namespace
    r = target.run("ip", "link", "show", "eth0", check=False)
    assert r.returncode != 0


def test_foreground_and_pid_target(topo, pasta, procs, tmp_path):
    sleeper = procs.start(topo.host.cmd("unshare", "-n", "--", "sleep", "60"))
    wait_for(lambda: _ns_of(sleeper.pid, "net") not in (None, _ns_of(os.getpid(), "net"),
                                                         _host_netns(topo)),
             what="sleeper in its namespace")
    p = procs.start(topo.host.cmd(*pasta, "-f", "--config-net", str(sleeper.pid)))
    ns = ["nsenter", "-t", str(sleeper.pid), "-n"]
    wait_for(lambda: _configured(ns), what="configured ns")
    assert p.poll() is None
    sleeper.terminate()
    sleeper.wait(5)
    # the target process is gone: so are we
    assert p.wait(3) == 0, p.stderr.read()


def _ns_of(pid: int, kind: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None


def _configured(ns_cmd: list[str]) -> bool:
    """pasta's tap (MTU 65520) is up with the host's address: not the host's veth."""
    r = run(ns_cmd + ["ip", "-j", "addr", "show", "eth0"], check=False)
    if r.returncode != 0:
        return False
    link = json.loads(r.stdout)[0]
    return link["mtu"] == 65520 and HOST4 in {a["local"] for a in link["addr_info"]}


def _host_netns(topo) -> str:
    st = os.stat(topo.host.path)
    return f"net:[{st.st_ino}]"


def test_rootless_command(topo, pasta, test_user):
    uid, gid = test_user
    r = topo.host.run(*as_user(uid, gid, [*pasta, "--config-net", "--", "sh", "-c",
                                          "id -u; ip -j addr show eth0; exit 5"]), check=False)
    assert r.returncode == 5, r.stderr
    first, rest = r.stdout.split("\n", 1)
    assert first == "0"
    eth0 = json.loads(rest)[0]
    assert {a["local"] for a in eth0["addr_info"]} >= {HOST4, HOST6}


def test_rootless_pid_target(topo, pasta, procs, test_user):
    uid, gid = test_user
    sleeper = procs.start(topo.host.cmd(*as_user(uid, gid, ["unshare", "-rn", "sleep", "60"])))
    wait_for(lambda: _ns_of(sleeper.pid, "user") not in (None, _ns_of(os.getpid(), "user")),
             what="user namespace")
    p = procs.start(topo.host.cmd(*as_user(uid, gid, [*pasta, "-f", "--config-net",
                                                      str(sleeper.pid)])))
    ns = ["nsenter", "-t", str(sleeper.pid), "-n"]
    wait_for(lambda: _configured(ns), what="configured ns")
    assert p.poll() is None
    sleeper.terminate()
    assert p.wait(5) == 0, p.stderr.read()


@pytest.mark.parametrize("hint", ["version"])
def test_version(pasta, hint):
    r = run([*pasta, "--version"])
    assert r.stdout.startswith("pasta ")


def _echo_through(topo, procs, server_ns, bind: str, client_cmd: list[str], connect: str,
                  port: int) -> None:
    """A sha256-checked 256 KiB transfer from the pasta namespace to a listener of the test."""
    p = procs.start(server_ns.cmd(sys.executable, XFER, "server", "--bind", bind, "--port",
                                  str(port), "--mode", "sink", "--size", str(256 << 10)),
                    text=True)
    assert json.loads(p.stdout.readline()) == {"listening": port}
    r = run(client_cmd + [sys.executable, XFER, "client", "--connect", connect, "--port",
                          str(port), "--mode", "send", "--size", str(256 << 10)],
            check=False, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr


def _ns_view(topo, pasta, procs, tmp_path, *opts: str):
    """pasta --config-net on the host as the test left it: (addresses, routes, stderr, target)."""
    target = topo.target()
    pidfile = tmp_path / "pasta.pid"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), *opts,
                      "--netns", target.name, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    procs.adopt(int(pidfile.read_text()))
    pidfile.unlink()
    links = json.loads(target.run("ip", "-j", "addr", "show").stdout)
    routes = json.loads(target.run("ip", "-j", "route", "show").stdout) + json.loads(
        target.run("ip", "-j", "-6", "route", "show").stdout)
    return {a["ifname"]: a for a in links}, routes, r.stderr, target


def test_host_with_prefix_routes_only(topo, pasta, procs, tmp_path):
    """No default route: the first interface with any route is the template (passt 2026)."""
    topo.host.run("ip", "route", "del", "default")
    topo.host.run("ip", "-6", "route", "del", "default")
    links, routes, err, target = _ns_view(topo, pasta, procs, tmp_path)
    got = {(a["local"], a["prefixlen"]) for a in links["eth0"]["addr_info"]
           if a["scope"] == "global"}
    assert got == {(HOST4, PREFIX4), (HOST6, PREFIX6)}
    assert not [r for r in routes if r["dst"] == "default"], routes
    assert "no default gateway on the host" in err
    # the on-link neighbours of the host are reached through pasta
    _echo_through(topo, procs, topo.router, GW4, target.cmd(), GW4, 5731)
    _echo_through(topo, procs, topo.router, GW6, target.cmd(), GW6, 5732)


def test_host_without_routes_is_local_mode(topo, pasta, procs, tmp_path):
    """passt(1), "Local mode for disconnected setups": 169.254.2.1 via 169.254.2.2, and
    IPv6 through fe80::1 with no address; the gateways still lead to the host's loopback."""
    topo.host.run("ip", "-6", "route", "del", "default")
    topo.host.run("ip", "addr", "flush", "dev", "eth0", "scope", "global")
    assert topo.host.run("ip", "route", "show").stdout.strip() == ""
    assert [r["dst"] for r in json.loads(topo.host.run("ip", "-j", "-6", "route").stdout)] \
        == ["fe80::/64"]
    links, routes, err, target = _ns_view(topo, pasta, procs, tmp_path)
    tap = links["tap0"]                       # no template interface to name it after
    assert "UP" in tap["flags"]
    assert [(a["local"], a["prefixlen"]) for a in tap["addr_info"] if a["scope"] == "global"] \
        == [("169.254.2.1", 16)]
    defaults = {r.get("gateway") for r in routes if r["dst"] == "default"}
    assert defaults == {"169.254.2.2", "fe80::1"}
    assert "IPv4: no host interface with a route, local mode" in err
    assert "IPv6: no host interface with a route, local mode" in err
    _echo_through(topo, procs, topo.host, "127.0.0.1", target.cmd(), "169.254.2.2", 5733)
    _echo_through(topo, procs, topo.host, "::1", target.cmd(), "fe80::1%tap0", 5734)
    # one family asked for, and none on the host: local mode too, not an error
    r = topo.host.run(*pasta, "-4", "--config-net", "--", "ip", "-j", "-4", "addr", "show",
                      "tap0")
    assert json.loads(r.stdout)[0]["addr_info"][0]["local"] == "169.254.2.1"


def test_runas_and_log_file(topo, pasta, tmp_path, procs, test_user):
    uid, gid = test_user
    target, pid, _, _ = start_daemon(topo, pasta, tmp_path, procs, "--runas", f"{uid}:{gid}",
                                     "-d", "-l", str(tmp_path / "pasta.log"))
    status = open(f"/proc/{pid}/status").read()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == [str(uid)] * 4
    log_text = (tmp_path / "pasta.log").read_text()
    assert f"running as uid {uid}" in log_text and "namespace interface eth0" in log_text


def test_userns_and_netns_paths(topo, pasta, procs, test_user):
    """Rootless, naming the namespaces by path: --userns PATH --netns PATH."""
    uid, gid = test_user
    sleeper = procs.start(topo.host.cmd(*as_user(uid, gid, ["unshare", "-rn", "sleep", "60"])))
    wait_for(lambda: _ns_of(sleeper.pid, "user") not in (None, _ns_of(os.getpid(), "user")),
             what="user namespace")
    p = procs.start(topo.host.cmd(*as_user(uid, gid, [
        *pasta, "-f", "--config-net", "--userns", f"/proc/{sleeper.pid}/ns/user",
        "--netns", f"/proc/{sleeper.pid}/ns/net"])))
    wait_for(lambda: _configured(["nsenter", "-t", str(sleeper.pid), "-n"]), what="configured")
    assert p.poll() is None


def _ignore_and_block_everything() -> None:
    """A caller that ignores and blocks every signal it can (not SIGCHLD: pasta
    must be able to reap), so that whatever the command gets comes from pasta."""
    every = set(signal.valid_signals())
    for sig in every - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD}:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, every)


def _signal_masks(status: str) -> dict[str, int]:
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines()
                                       if line.startswith(("SigBlk", "SigIgn")))}


@pytest.mark.parametrize("how", ["command", "default shell"])
def test_command_starts_with_every_signal_default(topo, pasta, tmp_path, how):
    """As a shell starts a command: no signal ignored or blocked, checked over every
    signal number (the whole masks), whatever the caller left to pasta.  (Caught
    ones are reset by exec; grep catches SIGSEGV itself.)"""
    env = dict(os.environ)
    if how == "command":
        argv = [*pasta, "--config-net", "--", "grep", "-h", "^Sig", "/proc/self/status"]
    else:
        shell = tmp_path / "shell"
        shell.write_text("#!/usr/bin/env -S grep -h ^Sig /proc/self/status\n")
        shell.chmod(0o755)
        env["SHELL"] = str(shell)
        argv = [*pasta, "--config-net"]
    r = subprocess.run(topo.host.cmd(*argv), capture_output=True, text=True, timeout=30,
                       env=env, preexec_fn=_ignore_and_block_everything)
    assert r.returncode == 0, r.stderr
    masks = _signal_masks(r.stdout)
    assert masks == {"SigBlk": 0, "SigIgn": 0}, r.stdout
