"""ICMP echo through pasta: ping and ping6 from the namespace, through ping sockets.

pasta opens unprivileged ping sockets in the namespace it runs in (the
test-made "host"), where net.ipv4.ping_group_range decides who may; it is
per network namespace, so the tests that expect answers allow every group
there, and one test leaves the default ("1 0": nobody) to check that pasta
says so once and keeps serving UDP and TCP.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

from integration.conftest import GW4, GW6, add_side_link, pid_alive, run, wait_for

PY = sys.executable
PORT = 5901


def allow_ping_sockets(ns) -> None:
    ns.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")


NO_FORWARDS = ("-t", "none", "-u", "none", "-T", "none", "-U", "none")


def start_pasta(topo, procs, pasta, tmp_path, *opts, fwd=NO_FORWARDS):
    target = topo.target()
    pidfile = tmp_path / f"pasta-{target.name}.pid"
    log = tmp_path / f"pasta-{target.name}.log"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "-l", str(log), *fwd,
                      *opts, "--netns", target.name, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    return target, pid, log


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), timeout=5, what="pasta to exit")


def ping(target, addr: str, *extra: str, count: int = 3) -> tuple[int, str]:
    cmd = "ping6" if ":" in addr else "ping"
    r = run(target.cmd(cmd, "-n", "-c", str(count), "-i", "0.2", "-W", "2", *extra, addr),
            check=False, timeout=30)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("addr", [GW4, GW6])
def test_ping_gateway(topo, procs, pasta, tmp_path, addr):
    """The gateway address is the host (its loopback), as for TCP and UDP."""
    allow_ping_sockets(topo.host)
    target, _, _ = start_pasta(topo, procs, pasta, tmp_path)
    code, out = ping(target, addr)
    assert code == 0 and "3 received" in out, out


@pytest.mark.parametrize("addr", ["169.254.1.2", "fd00:2::2"])
def test_ping_host_address(topo, procs, pasta, tmp_path, addr):
    """--map-guest-addr: the address that stands for the host's own address."""
    allow_ping_sockets(topo.host)
    target, _, _ = start_pasta(topo, procs, pasta, tmp_path, "--map-guest-addr", addr)
    code, out = ping(target, addr)
    assert code == 0 and "3 received" in out, out


@pytest.mark.parametrize("addr", [GW4, GW6])
def test_ping_beyond_the_host(topo, procs, pasta, tmp_path, addr):
    """Without the gateway mapping, the gateway is the router namespace itself."""
    allow_ping_sockets(topo.host)
    target, _, _ = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw")
    code, out = ping(target, addr)
    assert code == 0 and "3 received" in out, out


@pytest.mark.parametrize(("device", "answered"), [("eth0", True), ("side0", False)])
def test_outbound_if_carries_pings(topo, procs, pasta, tmp_path, device, answered):
    """--outbound-if4: echo requests leave through that device only, as TCP and UDP do."""
    allow_ping_sockets(topo.host)
    add_side_link(topo.host)
    target, _, _ = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw", "-i", "eth0",
                               "--outbound-if4", device)
    code, out = ping(target, GW4, count=2)
    assert (code == 0 and "2 received" in out) == answered, out


@pytest.mark.parametrize("addr", [GW4, GW6])
def test_large_echo_and_many_pings(topo, procs, pasta, tmp_path, addr):
    allow_ping_sockets(topo.host)
    target, _, _ = start_pasta(topo, procs, pasta, tmp_path)
    code, out = ping(target, addr, "-s", "30000")
    assert code == 0 and "3 received" in out and "30008 bytes from" in out, out
    # two pings at once: separate identifiers, separate flows
    cmd = "ping6" if ":" in addr else "ping"
    ps = [procs.start(target.cmd(cmd, "-n", "-c", "5", "-i", "0.2", "-W", "2", addr),
                      text=True) for _ in range(2)]
    for p in ps:
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0 and "5 received" in out, out + err


def test_forbidden_ping_sockets_noted_once_rest_works(topo, procs, pasta, tmp_path):
    assert "1\t0" in topo.host.run("sysctl", "-n", "net.ipv4.ping_group_range").stdout
    target, pid, log = start_pasta(topo, procs, pasta, tmp_path,
                                   fwd=("-t", "5902", "-u", "5901", "-T", "none", "-U", "none"))
    for addr in (GW4, GW6, GW4):
        code, out = ping(target, addr, count=2)
        assert code != 0, out
    # UDP and TCP still work, both ways
    server = (
        "import socket, sys\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 5901))\n"
        "t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "t.bind(('0.0.0.0', 5902)); t.listen(); print('ready', flush=True)\n"
        "d, a = u.recvfrom(100); u.sendto(d.upper(), a)\n"
        "c, _ = t.accept(); c.sendall(c.recv(100).upper()); c.close()\n")
    p = procs.start(target.cmd(PY, "-c", server), text=True)
    assert p.stdout.readline().strip() == "ready"
    client = (
        "import socket\n"
        "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)\n"
        "u.sendto(b'udp', ('127.0.0.1', 5901)); print(u.recv(100).decode())\n"
        "t = socket.create_connection(('127.0.0.1', 5902), timeout=3); t.sendall(b'tcp')\n"
        "print(t.recv(100).decode())\n")
    r = topo.host.run(PY, "-c", client)
    assert r.stdout.split() == ["UDP", "TCP"], r.stdout + r.stderr
    stop(pid)
    text = log.read_text()
    assert text.count("ping_group_range") == 1, text
    line = next(ln for ln in text.splitlines() if "ping_group_range" in ln)
    assert "not allowed" in line and '"1 0"' in line, line


def test_no_icmp(topo, procs, pasta, tmp_path):
    allow_ping_sockets(topo.host)
    target, pid, log = start_pasta(topo, procs, pasta, tmp_path, "--no-icmp")
    code, out = ping(target, GW4, count=2)
    assert code != 0, out
    stop(pid)
    assert "ping_group_range" not in log.read_text()


def test_no_udp(topo, procs, pasta, tmp_path):
    target, pid, _ = start_pasta(topo, procs, pasta, tmp_path, "--no-udp")
    p = procs.start(topo.host.cmd(PY, "-c", (
        "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "u.bind(('127.0.0.1', 5903)); print('ready', flush=True); "
        "d, a = u.recvfrom(100); u.sendto(d, a)")), text=True)
    assert p.stdout.readline().strip() == "ready"
    r = target.run(PY, "-c", (
        "import socket; u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"u.settimeout(1); u.sendto(b'x', ('{GW4}', 5903))\n"
        "try:\n    print(u.recv(10))\nexcept OSError as e:\n    print('no answer')"))
    assert r.stdout.strip() == "no answer"
