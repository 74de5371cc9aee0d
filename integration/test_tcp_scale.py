"""Thousands of concurrent connections, bounded memory, and running out of descriptors.

pasta uses one descriptor per connection.  When it has none left, a new
connection must be refused (reset), and every existing one must go on
working: nothing crashes, nothing stalls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from integration.conftest import GW4

FLOOD = str(Path(__file__).with_name("connflood.py"))
COUNT = 3000
EXTRA = 400                     # then more connections than that room


def _fd_limit() -> int:
    """pasta's descriptor limit: room for COUNT connections from the guest and a little
    more (its share of the budget, common.budget, after the reserves)."""
    from common.budget import FdBudget
    n = COUNT
    while FdBudget(n).guest_limit < COUNT + 100:
        n += 50
    return n


FD_LIMIT = _fd_limit()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousands_of_connections_then_out_of_fds(topo, procs, pasta, tmp_path):
    target = topo.target()
    pidfile = tmp_path / "pasta.pid"
    r = topo.host.run("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", *pasta, "--config-net",
                      "-P", str(pidfile), "-t", "none", "-u", "none", "-T", "none", "-U", "none",
                      "--netns", target.name, check=False)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    srv = procs.start(topo.host.cmd(sys.executable, FLOOD, "server", "--bind", "127.0.0.1",
                                    "--port", "5901"), text=True)
    assert srv.stdout.readline().strip() == "LISTENING"
    rss_before = rss_kib(pid)
    cli = procs.start(target.cmd("sh", "-c", f"ulimit -n 20000; exec {sys.executable} {FLOOD} "
                                 f"client --connect {GW4} --port 5901 --count {COUNT} "
                                 f"--extra {EXTRA}"), text=True, stdin=subprocess.PIPE)
    ready = cli.stdout.readline().split()
    assert ready == ["READY", str(COUNT)], ready + [cli.stderr.read()]
    rss_loaded = rss_kib(pid)
    # bounded: well under 2 KiB per connection on top of the idle process
    assert rss_loaded - rss_before < COUNT * 2, (rss_before, rss_loaded)
    cli.stdin.write("\n")
    cli.stdin.flush()
    result = json.loads(cli.stdout.readline())
    assert result["first_ok"] == COUNT
    assert result["extra_accepted"] > 0, result           # up to the limit, still served
    assert result["extra_refused"] >= EXTRA - 200, result  # then refused, not hung
    assert result["still_ok"] == COUNT, result            # nobody else suffered
    assert Path(f"/proc/{pid}").exists()
