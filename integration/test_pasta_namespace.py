"""pasta's namespace handling, process behaviour and --config-net, with the real program.

Each test runs our pasta inside the test-made "host" namespace (see
conftest), serving a namespace it creates (command mode) or one the test made.
"""

from __future__ import annotations

import json
import os
import time

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
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
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


def test_host_without_ipv6(topo, pasta):
    """Only what exists: no IPv6 default route -> IPv4 only, and pasta says so."""
    topo.host.run("ip", "-6", "route", "del", "default")
    r = topo.host.run(*pasta, "--config-net", "--", "ip", "-j", "addr", "show", "eth0")
    eth0 = json.loads(r.stdout)[0]
    assert {a["local"] for a in eth0["addr_info"] if a["scope"] == "global"} == {HOST4}
    assert "IPv6: no default route on the host, IPv6 disabled" in r.stderr


def test_host_without_any_default_route(topo, pasta):
    topo.host.run("ip", "route", "del", "default")
    topo.host.run("ip", "-6", "route", "del", "default")
    r = topo.host.run(*pasta, "--config-net", "--", "sh", "-c", "ip -j addr show; exit 3",
                      check=False)
    assert r.returncode == 3, r.stderr
    # no outbound interface to name it after: the tap is tap0, up, with no global address
    tap = next(a for a in json.loads(r.stdout) if a["ifname"] == "tap0")
    assert "UP" in tap["flags"]
    assert not [a for a in tap["addr_info"] if a.get("scope") == "global"]
    assert "no default route on the host" in r.stderr
    # asking for a family that does not exist is an error, though
    r = topo.host.run(*pasta, "-4", "--config-net", "--", "true", check=False)
    assert r.returncode == 1 and "IPv4 only" in r.stderr


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
