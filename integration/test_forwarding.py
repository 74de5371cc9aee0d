"""Port forwarding as today's callers ask for it, with the real pasta and passt.

Port specs that combine (`-t auto -t PORT`), a target address
(`-t 0.0.0.0/P:ADDR/Q`), --freebind, --splice-only, --stats, and the one
line a forward that cannot be bound fails with.  Transfers are sha256-checked
(integration/xfer.py); the server reports the source address it saw.
"""

from __future__ import annotations

import subprocess

import pytest

from integration.conftest import GW4, HOST4, wait_for
from integration.test_tcp import MIB, client, server, server_results, ss_ports, start_pasta


def test_auto_and_an_exact_port(topo, procs, pasta, tmp_path):
    """podman's pasta_options `-t auto` plus `-p 6201:6201`: both work."""
    target = start_pasta(topo, procs, pasta, tmp_path, "-t", "auto",
                         "-t", "6201-6201:6201-6201", "-T", "none")
    assert "6201" in ss_ports(topo.host)              # exact: bound from the start
    assert "6202" not in ss_ports(topo.host)
    srv = server(procs, target, "0.0.0.0", "sink", MIB, seed=21, port=6201)
    res = client(topo.router, HOST4, "send", MIB, seed=21, port=6201)
    assert res["ok"], res
    assert server_results(srv)[0]["peer"] == GW4      # the client's own address
    srv = server(procs, target, "0.0.0.0", "sink", MIB, seed=22, port=6202)
    wait_for(lambda: "6202" in ss_ports(topo.host), timeout=5, what="auto-forwarded port")
    res = client(topo.router, HOST4, "send", MIB, seed=22, port=6202)
    assert res["ok"], res
    server_results(srv)


def test_target_address(topo, procs, pasta, tmp_path):
    """-t 0.0.0.0/6210:192.0.2.5/6211: the namespace's 192.0.2.5 port 6211 answers."""
    target = start_pasta(topo, procs, pasta, tmp_path, "-t", "0.0.0.0/6210:192.0.2.5/6211",
                         "-T", "none")
    target.run("ip", "addr", "add", "192.0.2.5/32", "dev", "lo")
    srv = server(procs, target, "192.0.2.5", "sink", MIB, seed=23, port=6211)
    res = client(topo.router, HOST4, "send", MIB, seed=23, port=6210)
    assert res["ok"], res
    assert server_results(srv)[0]["peer"] == GW4
    # from the host's loopback too: a target address is never spliced
    srv = server(procs, target, "192.0.2.5", "sink", MIB, seed=24, port=6211)
    res = client(topo.host, "127.0.0.1", "send", MIB, seed=24, port=6210)
    assert res["ok"], res
    server_results(srv)


def test_exact_port_in_use_is_one_line(topo, procs, pasta, tmp_path):
    blocker = procs.start(topo.host.cmd("python3", "-c",
                          "import socket,time; s=socket.socket(); "
                          "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                          "s.bind(('0.0.0.0', 6220)); s.listen(); print('up', flush=True); "
                          "time.sleep(60)"), text=True)
    assert blocker.stdout.readline().strip() == "up"
    r = topo.host.run(*pasta, "--config-net", "-t", "6220", "--", "true", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "pasta: cannot bind -t port 6220: Address already in use"], r.stderr


def test_freebind(topo, procs, pasta, tmp_path):
    r = topo.host.run(*pasta, "--config-net", "-t", "10.77.0.99/6230", "--", "true",
                      check=False)
    assert r.returncode == 1
    assert "cannot bind -t port 6230 on 10.77.0.99: Cannot assign requested address" \
        in r.stderr
    target = start_pasta(topo, procs, pasta, tmp_path, "--freebind",
                         "-t", "10.77.0.99/6230", "-T", "none")
    topo.host.run("ip", "addr", "add", "10.77.0.99/24", "dev", "eth0")   # configured later
    srv = server(procs, target, "0.0.0.0", "sink", MIB, seed=25, port=6230)
    res = client(topo.router, "10.77.0.99", "send", MIB, seed=25, port=6230)
    assert res["ok"], res
    server_results(srv)


def test_splice_only(topo, procs, pasta, tmp_path):
    """--splice-only: no tap in the namespace; host loopback clients still reach it."""
    target = start_pasta(topo, procs, pasta, tmp_path, "--splice-only", "-t", "6240",
                         "-T", "none")
    links = target.run("ip", "-o", "link", "show").stdout
    assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]
    srv = server(procs, target, "127.0.0.1", "sink", MIB, seed=26, port=6240)
    res = client(topo.host, "127.0.0.1", "send", MIB, seed=26, port=6240)
    assert res["ok"], res
    server_results(srv)
    # a client from outside has no tap to go through: refused, not hung
    res = client(topo.router, HOST4, "send", 1000, seed=27, port=6240, timeout=20)
    assert not res["ok"], res


def test_stats_need_foreground_and_print(topo, procs, pasta, tmp_path):
    r = topo.host.run(*pasta, "--stats", "1", "--config-net", "--netns", "nowhere",
                      check=False)
    assert r.returncode == 1 and "--stats needs --foreground" in r.stderr
    r = topo.host.run(*pasta, "--stats", "1", "--config-net", "--",
                      "sh", "-c", "ping -c 2 -i 0.6 -W 1 " + GW4 + " >/dev/null; sleep 1.2",
                      check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("stats: ")]
    assert lines and "tap.frames_in=" in lines[0], r.stderr


@pytest.mark.parametrize("option", ["--splice-only", "-T 22"])
def test_pasta_only_options_refused_by_passt(topo, option):
    from integration.conftest import our_command
    r = subprocess.run(topo.host.cmd(*our_command("passt"), "-f", *option.split()),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr == f"passt: {option.split()[0]} is for pasta mode only\n"
