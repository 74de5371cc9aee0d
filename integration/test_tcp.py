"""TCP through pasta: checked transfers on every path, concurrency, closing and resets.

Paths, as the namespace ("ns") and the host namespace pasta runs in ("host") see them:
- tap, ns-initiated: ns client -> gateway address (mapped to the host's loopback);
- tap, host-initiated: a client on the router -> the host's address, port forwarded (-t);
- splice, ns-initiated: ns client -> its own loopback, port forwarded out (-T);
- splice, host-initiated: host client -> host loopback, port forwarded in (-t).
Each moves 64 MiB one way or the other and compares SHA-256 end to end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from integration.conftest import GW4, GW6, HOST4, HOST6, run, wait_for

XFER = str(Path(__file__).with_name("xfer.py"))
PY = sys.executable
MIB = 1 << 20
PORT = 5701


def start_pasta(topo, procs, pasta, tmp_path, *opts):
    """pasta as podman runs it (daemon, --config-net, --netns); ready when it returns."""
    target = topo.target()
    pidfile = tmp_path / f"pasta-{target.name}.pid"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "-u", "none", "-U", "none",
                      *opts, "--netns", target.name, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    procs.adopt(int(pidfile.read_text()))
    return target


def server(procs, ns, bind: str, mode: str, size: int, seed: int, conns: int = 1,
           port: int = PORT):
    p = procs.start(ns.cmd(PY, XFER, "server", "--bind", bind, "--port", str(port),
                           "--mode", mode, "--size", str(size), "--seed", str(seed),
                           "--conns", str(conns)), text=True)
    line = p.stdout.readline()
    assert json.loads(line) == {"listening": port}, line + p.stderr.read()
    return p


def client(ns, connect: str, mode: str, size: int, seed: int, parallel: int = 1,
           port: int = PORT, timeout: float = 120) -> dict:
    r = run(ns.cmd(PY, XFER, "client", "--connect", connect, "--port", str(port),
                   "--mode", mode, "--size", str(size), "--seed", str(seed),
                   "--parallel", str(parallel)), check=False, timeout=timeout)
    assert r.stdout, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def server_results(p) -> list[dict]:
    out, err = p.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


PATHS = {
    # name: (pasta options, who runs the client, address it connects to per family,
    #        who runs the server, address the server binds per family)
    "tap-ns": ((), "target", {4: GW4, 6: GW6}, "host", {4: "127.0.0.1", 6: "::1"}),
    "tap-host": (("-t", str(PORT)), "router", {4: HOST4, 6: HOST6}, "target",
                 {4: "0.0.0.0", 6: "::"}),
    "splice-ns": (("-T", str(PORT)), "target", {4: "127.0.0.1", 6: "::1"}, "host",
                  {4: "127.0.0.1", 6: "::1"}),
    "splice-host": (("-t", str(PORT)), "host", {4: "127.0.0.1", 6: "::1"}, "target",
                    {4: "0.0.0.0", 6: "::"}),
}


def _ns(topo, target, who):
    return {"target": target, "host": topo.host, "router": topo.router}[who]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["send", "recv"])
@pytest.mark.parametrize("path", list(PATHS))
def test_transfer_64mib(topo, procs, pasta, tmp_path, path, mode, family):
    opts, cwho, caddr, swho, saddr = PATHS[path]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    srv = server(procs, _ns(topo, target, swho), saddr[family],
                 "sink" if mode == "send" else "source", 64 * MIB, seed=family * 10)
    res = client(_ns(topo, target, cwho), caddr[family], mode, 64 * MIB, seed=family * 10)
    assert res["ok"], res
    assert res["bytes"] == 64 * MIB
    done = server_results(srv)
    assert done and "error" not in done[0], done
    if mode == "recv":
        assert done[0]["confirmed"], done      # the half-closed side still received


@pytest.mark.parametrize("path", ["tap-ns", "splice-host"])
def test_200_concurrent_connections(topo, procs, pasta, tmp_path, path):
    opts, cwho, caddr, swho, saddr = PATHS[path]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    srv = server(procs, _ns(topo, target, swho), saddr[4], "sink", MIB, seed=7, conns=200)
    res = client(_ns(topo, target, cwho), caddr[4], "send", MIB, seed=7, parallel=200)
    assert res["ok"] and res["connections"] == 200, res
    assert res["bytes"] == 200 * MIB
    results = server_results(srv)
    assert len(results) == 200 and all(r["received"] == MIB for r in results)


# ---------------------------------------------------------------- loss on the tap

# classic BPF, direct action: A = random u32; A >= 1% of 2^32 ? TC_ACT_OK (0) : TC_ACT_SHOT (2)
DROP_1PCT = "4,32 0 0 4294963256,53 0 1 42949673,6 0 0 0,6 0 0 2"


def add_loss(ns, ifname: str = "eth0") -> None:
    """1 % random loss both ways on the namespace's tap (this kernel has no netem)."""
    ns.run("tc", "qdisc", "add", "dev", ifname, "clsact")
    for hook in ("ingress", "egress"):
        ns.run("tc", "filter", "add", "dev", ifname, hook, "bpf", "da", "bytecode", DROP_1PCT)


def _drops(text: str) -> int:
    total = 0
    for line in text.splitlines():
        if "dropped" in line:
            parts = line.replace(",", " ").replace("(", " ").replace(")", " ").split()
            total += int(parts[parts.index("dropped") + 1])
    return total


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("mode", ["send", "recv"])
def test_transfer_with_loss(topo, procs, pasta, tmp_path, mode, family):
    opts, cwho, caddr, swho, saddr = PATHS["tap-ns"]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    add_loss(target)
    srv = server(procs, topo.host, saddr[family], "sink" if mode == "send" else "source",
                 64 * MIB, seed=3)
    res = client(target, caddr[family], mode, 64 * MIB, seed=3, timeout=240)
    assert res["ok"], res
    done = server_results(srv)
    assert done and "error" not in done[0], done
    # frames were really lost both ways
    assert _drops(target.run("tc", "-s", "qdisc", "show", "dev", "eth0").stdout) > 0


# ---------------------------------------------------------------- closing, refusing, resetting


SNIPPET_CONNECT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.settimeout(5)
t0 = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print('connected')
except OSError as e:
    print(type(e).__name__, round(time.monotonic() - t0, 3))
"""


@pytest.mark.parametrize("family", [4, 6])
def test_refused_connection(topo, procs, pasta, tmp_path, family):
    target = start_pasta(topo, procs, pasta, tmp_path)
    r = target.run(PY, "-c", SNIPPET_CONNECT, GW4 if family == 4 else GW6, "5799")
    name, seconds = r.stdout.split()
    assert name == "ConnectionRefusedError" and float(seconds) < 2.0, r.stdout


# a server for one connection: listens on argv[1]:argv[2], says so, accepts
SNIPPET_ACCEPT_ONE = """
import socket, struct, sys
ls = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(1)
print('listening', flush=True)
c, _ = ls.accept()
"""

SNIPPET_RESET_SERVER = SNIPPET_ACCEPT_ONE + """c.settimeout(10)
if sys.argv[3] == 'reset':
    c.recv(1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    c.close()
    print('reset sent', flush=True)
else:
    try:
        while c.recv(65536):
            pass
        print('eof')
    except OSError as e:
        print(type(e).__name__)
"""

SNIPPET_RESET_CLIENT = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
if sys.argv[3] == 'reset':
    s.sendall(b'x' * 1000)
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    s.close()
    print('reset sent')
else:
    s.sendall(b'x')
    try:
        while s.recv(65536):
            pass
        print('eof')
    except OSError as e:
        print(type(e).__name__)
"""


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("who_resets", ["host", "ns"])
def test_reset_propagates(topo, procs, pasta, tmp_path, family, who_resets):
    target = start_pasta(topo, procs, pasta, tmp_path)
    bind = "127.0.0.1" if family == 4 else "::1"
    srv = procs.start(topo.host.cmd(PY, "-c", SNIPPET_RESET_SERVER, bind, "5711",
                                    "reset" if who_resets == "host" else "wait"), text=True)
    assert srv.stdout.readline().strip() == "listening"
    r = target.run(PY, "-c", SNIPPET_RESET_CLIENT, GW4 if family == 4 else GW6, "5711",
                   "reset" if who_resets == "ns" else "wait", check=False)
    out, _ = srv.communicate(timeout=15)
    if who_resets == "host":
        assert r.stdout.strip() == "ConnectionResetError", r.stdout + r.stderr
    else:
        assert out.split()[-1] == "ConnectionResetError", out


SNIPPET_KEEPALIVE_CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
time.sleep(6)              # five probes' worth: unanswered, the kernel resets after three
s.sendall(b'still here')
s.shutdown(socket.SHUT_WR)
print(s.recv(100).decode())
"""

SNIPPET_ECHO_ONCE = SNIPPET_ACCEPT_ONE + """c.settimeout(15)
data = b''
while chunk := c.recv(100):
    data += chunk
c.sendall(data.upper())
c.close()
"""


@pytest.mark.parametrize("family", [4, 6])
def test_keepalive_probes_are_answered(topo, procs, pasta, tmp_path, family):
    """The namespace's keep-alives (old sequence number, no data) get our ACK back."""
    target = start_pasta(topo, procs, pasta, tmp_path)
    bind = "127.0.0.1" if family == 4 else "::1"
    srv = procs.start(topo.host.cmd(PY, "-c", SNIPPET_ECHO_ONCE, bind, "5712"), text=True)
    assert srv.stdout.readline().strip() == "listening"
    r = target.run(PY, "-c", SNIPPET_KEEPALIVE_CLIENT, GW4 if family == 4 else GW6, "5712",
                   check=False)
    assert r.stdout.strip() == "STILL HERE", r.stdout + r.stderr


def test_remap_and_auto(topo, procs, pasta, tmp_path):
    """-t 6001:6002 reaches port 6002 in the namespace; -t auto follows a late listener."""
    target = start_pasta(topo, procs, pasta, tmp_path, "-t", "6001:6002")
    srv = server(procs, target, "0.0.0.0", "sink", MIB, seed=5, port=6002)
    res = client(topo.router, HOST4, "send", MIB, seed=5, port=6001)
    assert res["ok"], res
    server_results(srv)

    auto = start_pasta(topo, procs, pasta, tmp_path, "-t", "auto", "-T", "none")
    # host port 6100 is not forwarded until something listens on it in the namespace
    assert "6100" not in ss_ports(topo.host)
    srv = server(procs, auto, "0.0.0.0", "sink", MIB, seed=6, port=6100)
    wait_for(lambda: "6100" in ss_ports(topo.host), timeout=5, what="auto-forwarded port")
    res = client(topo.host, "127.0.0.1", "send", MIB, seed=6, port=6100)
    assert res["ok"], res
    server_results(srv)
    # and it goes away again once the namespace's listener is gone
    wait_for(lambda: "6100" not in ss_ports(topo.host), timeout=5, what="auto port closed")


def ss_ports(ns) -> set[str]:
    out = ns.run("ss", "-Hltn").stdout
    return {line.split()[3].rsplit(":", 1)[1] for line in out.splitlines() if line.strip()}


def test_map_guest_addr(topo, procs, pasta, tmp_path):
    """--map-guest-addr: the namespace reaches a service on the host's own address."""
    target = start_pasta(topo, procs, pasta, tmp_path, "--map-guest-addr", "169.254.1.2")
    srv = server(procs, topo.host, HOST4, "sink", MIB, seed=9)
    res = client(target, "169.254.1.2", "send", MIB, seed=9)
    assert res["ok"], res
    server_results(srv)


def test_many_short_connections_leave_no_flows(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path)
    srv = server(procs, topo.host, "127.0.0.1", "sink", 1000, seed=11, conns=300)
    for i in range(3):
        res = client(target, GW4, "send", 1000, seed=11 + 100 * i, parallel=100)
        assert res["ok"], res
    server_results(srv)
    pid = int(next(tmp_path.glob("pasta-*.pid")).read_text())
    # only the epoll/tap/listener descriptors remain: no socket per finished connection
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) < 40, timeout=5, what="sockets closed")



def test_spliced_connections_one_after_another(topo, procs, pasta, tmp_path):
    """Pipes of spliced connections that closed cleanly serve the next ones: every
    connection still gets its own bytes only, both ways, and none is left open."""
    target = start_pasta(topo, procs, pasta, tmp_path, "-T", str(PORT))
    pid = int(next(tmp_path.glob("pasta-*.pid")).read_text())
    for size in (100_000, 3 * MIB + 5):
        srv = server(procs, topo.host, "127.0.0.1", "sink", size, seed=21, conns=30)
        for j in range(3):
            res = client(target, "127.0.0.1", "send", size, seed=21 + 10 * j, parallel=10)
            assert res["ok"] and res["connections"] == 10, res
        results = server_results(srv)
        assert len(results) == 30 and all(r["received"] == size for r in results), results
        # one at a time, so that the server's n-th payload is the client's n-th seed
        srv = server(procs, topo.host, "127.0.0.1", "source", size + 1, seed=41, conns=5)
        for j in range(5):
            res = client(target, "127.0.0.1", "recv", size + 1, seed=41 + j)
            assert res["ok"] and res["bytes"] == size + 1, res
        results = server_results(srv)
        assert len(results) == 5 and all(r["confirmed"] for r in results), results
    # the listener, tap, epoll... and at most 8 connections' worth of empty pipes
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/fd")) < 40 + 32, timeout=5,
             what="connections closed")


ECHO = """
import socket, sys
ls = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
for _ in range(2):
    c, _ = ls.accept()
    while True:
        msg = c.recv(65536)
        if not msg or msg == b"bye":
            break
        c.sendall(msg)
    c.sendall(b"ok")                       # the last answer, and the end, at once
    c.close()
"""

# the client snippets' way to read one whole answer and compare it with the request
READ_ANSWER = """
def answer(s, msg, i):
    got = b""
    while len(got) < len(msg):
        d = s.recv(65536)
        assert d, f"closed at message {i}"
        got += d
    assert got == msg, f"message {i} differs"
    return got
"""

ASK = READ_ANSWER + """
import os, random, socket, sys, time
rnd = random.Random(5)
for split in (False, True):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(300):
        msg = os.urandom(rnd.choice((1, 2, 17, 255, 256, 1000, 5000)))
        if split:                          # the second half arrives a moment later
            s.sendall(msg[:len(msg) // 2])
            time.sleep(0.0005)
            s.sendall(msg[len(msg) // 2:])
        else:
            s.sendall(msg)
        answer(s, msg, i)
    s.sendall(b"bye")
    assert s.recv(10) == b"ok" and s.recv(10) == b""
    s.close()
print("done")
"""


@pytest.mark.parametrize("path", ["splice-ns", "tap-ns"])
def test_small_requests_and_answers(topo, procs, pasta, tmp_path, path):
    """Request/response with small messages, some written in two pieces: every answer
    arrives whole (none waits for a later event), and the last one with the end."""
    opts, cwho, caddr, swho, saddr = PATHS[path]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    srv = procs.start(_ns(topo, target, swho).cmd(PY, "-c", ECHO, saddr[4], str(PORT)),
                      text=True)
    assert srv.stdout.readline().strip() == "listening"
    r = run(_ns(topo, target, cwho).cmd(PY, "-c", ASK, caddr[4], str(PORT)), check=False,
            timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr


ECHO_SUMS = """
import hashlib, socket, sys
ls = socket.create_server((sys.argv[1], int(sys.argv[2])), family=socket.AF_INET6
                          if ":" in sys.argv[1] else socket.AF_INET)
print("listening", flush=True)
c, _ = ls.accept()
c.settimeout(60)
got = hashlib.sha256()
while True:
    msg = c.recv(65536)
    if not msg:
        break
    got.update(msg)
    c.sendall(msg)
c.close()
print(got.hexdigest(), flush=True)
"""

ASK_SUMS = READ_ANSWER + """
import hashlib, os, random, socket, sys
rnd = random.Random(14)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sent, back = hashlib.sha256(), hashlib.sha256()
for i in range(1500):
    # mostly answers small enough to be kept, some not, a few a bulk transfer's size
    msg = os.urandom(rnd.choice((1, 1, 7, 100, 1400, 2047, 2048, 2049, 3000, 40000)))
    sent.update(msg)
    s.sendall(msg)
    back.update(answer(s, msg, i))
s.shutdown(socket.SHUT_WR)
assert s.recv(10) == b""
print(sent.hexdigest(), back.hexdigest())
"""


@pytest.mark.parametrize("family", [4, 6])
def test_answers_with_loss_arrive_whole(topo, procs, pasta, tmp_path, family):
    """Request/answer exchanges of mixed sizes through the tap with 1 % loss both ways:
    answers read from the socket and kept until acknowledged are resent from that copy,
    the rest as before; every byte arrives both ways (sha256 at each end)."""
    opts, cwho, caddr, swho, saddr = PATHS["tap-ns"]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    add_loss(target)
    srv = procs.start(topo.host.cmd(PY, "-c", ECHO_SUMS, saddr[family], str(PORT)), text=True)
    assert srv.stdout.readline().strip() == "listening"
    r = run(target.cmd(PY, "-c", ASK_SUMS, caddr[family], str(PORT)), check=False,
            timeout=240)
    assert r.returncode == 0, r.stderr
    sent, back = r.stdout.split()
    out, _ = srv.communicate(timeout=60)
    assert out.strip() == sent == back
    assert _drops(target.run("tc", "-s", "qdisc", "show", "dev", "eth0").stdout) > 0
