"""The control socket of the real pasta and passt, driven by the real pesto.

Forwards added at run time carry sha256-checked transfers, keep the client's
source address, and an established connection outlives the deletion of its
forward.  Errors are one line and change nothing; another user cannot
connect to the socket.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, as_user, our_command, run, wait_for
from integration.guest.hostnet import socket_dir
from integration.test_tcp import MIB, server, server_results, ss_ports, start_pasta

PESTO = our_command("pesto")

# a client that sends half, waits for a line on stdin, sends the rest, and checks the
# sink's sha256 of the whole
HALVES = r"""
import hashlib, random, socket, sys
data = random.Random(31).randbytes(2 << 20)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(data[:1 << 20]); print("half", flush=True)
sys.stdin.readline()
s.sendall(data[1 << 20:]); s.shutdown(socket.SHUT_WR)
reply = b""
while chunk := s.recv(4096):
    reply += chunk
print("ok" if reply.decode().strip() == hashlib.sha256(data).hexdigest() else "BAD", flush=True)
"""


def pesto(*args: str, ns=None, user=None, check: bool = True):
    cmd = [*PESTO, *args]
    if user is not None:
        cmd = as_user(*user, cmd)
    if ns is not None:
        cmd = ns.cmd(*cmd)
    r = run(cmd, check=False, timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def ctl_dir():
    with socket_dir() as d:
        yield d


def test_pasta_add_show_delete(topo, procs, pasta, tmp_path, ctl_dir):
    ctl = str(ctl_dir / "pasta.ctl")
    target = start_pasta(topo, procs, pasta, tmp_path, "-t", "none", "-T", "none",
                         "-c", ctl)
    st = os.lstat(ctl)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert pesto(ctl).stdout == ("HOST (-t/-u):\n    (none)\nSPLICE (-T/-U):\n    (none)\n")

    # podman's form: host address/port : container address/port (pesto_linux.go)
    target.run("ip", "addr", "add", "10.88.0.2/32", "dev", "lo")
    pesto("--add", "-t", "0.0.0.0/6300:10.88.0.2/6301", ctl)
    assert "6300" in ss_ports(topo.host)
    srv = server(procs, target, "10.88.0.2", "sink", MIB, seed=41, port=6301)
    r = run(topo.router.cmd(sys.executable, str(Path(__file__).with_name("xfer.py")), "client",
                            "--connect", HOST4, "--port", "6300", "--mode", "send",
                            "--size", str(MIB), "--seed", "41"), check=False)
    assert json.loads(r.stdout.splitlines()[-1])["ok"], r.stdout + r.stderr
    assert server_results(srv)[0]["peer"] == GW4          # the client's own address
    show = pesto("-s", "-A", "-u", "0.0.0.0/6302", ctl).stdout
    assert show.splitlines()[0] == "before:" and "UDP [0.0.0.0]:6302 => 6302" in show

    # an established connection outlives the deletion of its forward
    srv = server(procs, target, "10.88.0.2", "sink", 2 * MIB, seed=42, port=6301)
    cli = procs.start(topo.router.cmd(sys.executable, "-c", HALVES, HOST4, "6300"),
                      text=True, stdin=-1)
    assert cli.stdout.readline().strip() == "half"
    flows = json.loads(pesto("--flows", "--json", ctl).stdout)["flows"]
    live = [f for f in flows if f["proto"] == "tcp" and f["host"].startswith(GW4 + ":")]
    assert len(live) == 1 and live[0]["path"] == "tap" and live[0]["inbound"], flows
    assert live[0]["guest"] == "10.88.0.2:6301" and live[0]["from_guest"] is not None
    rows = [line.split() for line in pesto("--flows", ctl).stdout.splitlines()[1:]]
    assert any(r[:3] == ["tcp", "tap", "in"] and r[4].startswith(GW4 + ":") for r in rows)
    pesto("-D", "-t", "0.0.0.0/6300:10.88.0.2/6301", ctl)
    assert "6300" not in ss_ports(topo.host)
    cli.stdin.write("go\n")
    cli.stdin.flush()
    assert cli.stdout.readline().strip() == "ok"
    server_results(srv)
    r = run(topo.router.cmd("python3", "-c", f"import socket; socket.create_connection("
                            f"('{HOST4}', 6300), timeout=5)"), check=False)
    assert "Connection refused" in r.stderr

    pesto("-C", "HOST", ctl)
    assert pesto(ctl).stdout.startswith("HOST (-t/-u):\n    (none)\n")


def test_pasta_errors_change_nothing(topo, procs, pasta, tmp_path, ctl_dir):
    ctl = str(ctl_dir / "pasta.ctl")
    start_pasta(topo, procs, pasta, tmp_path, "-t", "6310", "-T", "none", "-c", ctl)
    before = pesto(ctl).stdout
    blocker = procs.start(topo.host.cmd("python3", "-c",
                          "import socket,time; s=socket.socket(); s.bind(('0.0.0.0', 6312)); "
                          "s.listen(); print('up', flush=True); time.sleep(60)"), text=True)
    assert blocker.stdout.readline().strip() == "up"
    r = pesto("-A", "-t", "6311", "-t", "6312", ctl, check=False)
    assert r.returncode == 1
    assert r.stderr == "pesto: cannot bind -t port 6312: Address already in use\n"
    assert "6311" not in ss_ports(topo.host)
    r = pesto("-A", "-t", "99999", ctl, check=False)
    assert r.returncode == 1
    assert r.stderr == "pesto: -t 99999: port 99999 out of range (1-65535)\n"
    r = pesto("-D", "-t", "6313", ctl, check=False)
    assert r.returncode == 1 and "no rule [*]:6313 => 6313 to delete" in r.stderr
    assert pesto(ctl).stdout == before

    # garbage, and a client that connects and says nothing: answered or dropped,
    # while others are served
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(ctl)
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(ctl)
        bad.sendall(b"\x00\xffgarbage\n")
        replies = bad.makefile("rb").read().splitlines()
    assert json.loads(replies[-1]) == {"ok": False, "error": "malformed request: not JSON"}
    assert pesto(ctl).stdout == before
    stalled.settimeout(10)
    lines = stalled.makefile("rb").read().splitlines()
    stalled.close()
    assert json.loads(lines[-1]) == {"ok": False, "error": "timed out waiting for a request"}


def test_passt_add_and_delete(topo, procs, ctl_dir):
    ctl = str(ctl_dir / "passt.ctl")
    passt = our_command("passt")
    p = procs.start(topo.host.cmd(*passt, "-f", "-s", str(ctl_dir / "passt.sock"), "-c", ctl),
                    text=True)
    wait_for(lambda: os.path.exists(ctl), timeout=10, what="control socket")
    assert pesto(ctl).stdout == "HOST (-t/-u):\n    (none)\n"
    pesto("--add", "-t", "6320:22", ctl)
    assert "6320" in ss_ports(topo.host)
    pesto("--delete", "-t", "6320:22", ctl)
    assert "6320" not in ss_ports(topo.host)
    r = pesto("-A", "-T", "6321", ctl, check=False)
    assert r.returncode == 1 and "no table for option '-T' here" in r.stderr
    assert pesto("--flows", ctl).stdout.split() == [
        "PROTO", "PATH", "DIR", "GUEST", "HOST", "TO", "GUEST", "FROM", "GUEST", "AGE", "ID",
        "RULE"]
    assert p.poll() is None


def test_another_user_cannot_connect(topo, procs, pasta, tmp_path, ctl_dir, test_user):
    ctl = str(ctl_dir / "pasta.ctl")
    start_pasta(topo, procs, pasta, tmp_path, "--runas", f"{test_user[0]}:{test_user[1]}",
                "-t", "none", "-c", ctl)
    st = os.lstat(ctl)
    assert (st.st_uid, st.st_gid) == test_user and stat.S_IMODE(st.st_mode) == 0o600
    r = pesto(ctl, user=(65534, 65534), check=False)
    assert r.returncode == 1
    assert r.stderr == f"pesto: cannot connect to {ctl}: Permission denied\n"
    assert pesto(ctl, user=test_user).stdout.startswith("HOST (-t/-u):")
