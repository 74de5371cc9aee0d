"""UDP through pasta: checked echo on every path, forwarding, errors, expiry and limits.

Paths, as the namespace ("ns") and the host namespace pasta runs in ("host") see them:
- tap, ns-initiated: ns client -> gateway address (mapped to the host's loopback);
- tap, host-initiated: a client on the router -> the host's address, port forwarded (-u);
- loopback, ns-initiated: ns client -> its own loopback, port forwarded out (-U);
- loopback, host-initiated: host client -> host loopback, port forwarded in (-u).
Each echoes 10 000 datagrams of mixed sizes up to the MTU and checks every byte.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

from integration.conftest import GW4, GW6, HOST4, HOST6, as_user, pid_alive, run, wait_for

PY = sys.executable
PORT = 5801
MTU = 65520
COUNT = 10_000

# The test's own peers, run with `python3 -c PEER MODE ...` in whichever namespace.
PEER = r'''
import json, random, socket, sys, time

def family(v):
    return socket.AF_INET6 if v == "6" else socket.AF_INET

def echo_server(fam, bind, port):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((bind, int(port)))
    print(json.dumps({"listening": s.getsockname()[1]}), flush=True)
    buf = bytearray(65536)
    view = memoryview(buf)
    while True:
        n, addr = s.recvfrom_into(buf)
        s.sendto(view[:n], addr)

def sizes(rng, count, maxlen):
    out = [n for n in (4, 5, 1472, 1473, maxlen - 1, maxlen) if 4 <= n <= maxlen]
    bands = ((0.4, 4, 512), (0.7, 513, 1500), (0.9, 1501, maxlen // 2), (1.0, maxlen // 2, maxlen))
    while len(out) < count:
        r = rng.random()
        _, a, b = next(band for band in bands if r < band[0])
        b = min(b, maxlen)
        out.append(rng.randint(min(a, b), b))
    rng.shuffle(out)
    return out[:count]

def echo_client(fam, addr, port, count, maxlen, seed, bind_port="0"):
    count, maxlen = int(count), int(maxlen)
    rng = random.Random(int(seed))
    blob = rng.randbytes(maxlen + 8192)
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::" if fam == "6" else "0.0.0.0", int(bind_port)))
    s.connect((addr, int(port)))
    s.settimeout(0.5)
    buf = bytearray(65536)
    ok = bad = retries = stale = total = 0
    biggest = 0
    t0 = time.monotonic()
    for i, size in enumerate(sizes(rng, count, maxlen)):
        off = (i * 7919) % 8192
        payload = i.to_bytes(4, "big") + blob[off:off + size - 4]
        for attempt in range(6):
            s.send(payload)
            try:
                while True:
                    n = s.recv_into(buf)
                    if buf[:4] == payload[:4] or n < 4:
                        break
                    stale += 1          # a late answer to an earlier retry
            except socket.timeout:
                retries += 1
                continue
            if buf[:n] == payload:
                ok += 1
                total += n
                biggest = max(biggest, n)
            else:
                bad += 1
            break
    print(json.dumps({"ok": ok, "bad": bad, "retries": retries, "stale": stale,
                      "bytes": total, "max": biggest, "seconds": time.monotonic() - t0}))

def refused(fam, addr, port):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.connect((addr, int(port)))
    s.settimeout(3)
    out = []
    for _ in range(3):
        s.send(b"anyone there?")
        try:
            s.recv(100)
            out.append("answer")
        except ConnectionRefusedError:
            out.append("refused")
        except socket.timeout:
            out.append("timeout")
    print(json.dumps(out))

def send_once(fam, addr, port, bind_port, wait="3"):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.bind(("::" if fam == "6" else "0.0.0.0", int(bind_port)))
    s.sendto(b"hello", (addr, int(port)))
    s.settimeout(float(wait))
    try:
        data, src = s.recvfrom(100)
        print(json.dumps({"reply": data.decode(), "from": list(src[:2])}))
    except socket.timeout:
        print(json.dumps({"reply": None}))

def whoami(fam, bind, port):
    """Answers each datagram with the address and port it came from."""
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.bind((bind, int(port)))
    print(json.dumps({"listening": s.getsockname()[1]}), flush=True)
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(f"{addr[0]} {addr[1]}".encode(), addr)

def flood(fam, addr, port, n, first_port):
    sent = 0
    for i in range(int(n)):
        s = socket.socket(family(fam), socket.SOCK_DGRAM)
        try:
            s.bind(("0.0.0.0", int(first_port) + i))
            s.sendto(b"x", (addr, int(port)))
            sent += 1
        except OSError:
            pass
        s.close()
        if i % 200 == 199:
            time.sleep(0.01)    # let the tap queue drain: the point is many ports
    print(json.dumps({"sent": sent}))

def sink(fam, bind, port):
    """Counts datagrams and source ports; reports on SIGTERM."""
    import signal
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((bind, int(port)))
    seen = {}
    def report(*_):
        print(json.dumps({"datagrams": sum(seen.values()), "ports": len(seen),
                          "addrs": sorted({a for a, _ in seen})}), flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, report)
    print(json.dumps({"listening": s.getsockname()[1]}), flush=True)
    while True:
        data, addr = s.recvfrom(65536)
        key = (addr[0], addr[1])
        seen[key] = seen.get(key, 0) + 1

def reply_size(fam, bind, port):
    """Answers each datagram with one as long as the number it carries."""
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.bind((bind, int(port)))
    print(json.dumps({"listening": s.getsockname()[1]}), flush=True)
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(b"r" * int(data), addr)

def ask_sizes(fam, addr, port, *lens):
    s = socket.socket(family(fam), socket.SOCK_DGRAM)
    s.connect((addr, int(port)))
    s.settimeout(1)
    got = []
    for n in lens:
        s.send(n.encode())
        try:
            got.append(len(s.recv(65536)))
        except socket.timeout:
            got.append(None)
    print(json.dumps(got))

globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
'''


def peer(ns, *args: str) -> list[str]:
    return ns.cmd(PY, "-c", PEER, *args)


def start_server(procs, ns, *args: str):
    p = procs.start(peer(ns, *args), text=True)
    line = p.stdout.readline()
    assert line and "listening" in json.loads(line), line + p.stderr.read()
    return p


def run_peer(ns, *args: str, timeout: float = 120):
    r = run(peer(ns, *args), check=False, timeout=timeout)
    assert r.returncode == 0 and r.stdout, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def start_pasta(topo, procs, pasta, tmp_path, *opts, tcp="none"):
    """pasta as podman runs it (daemon, --config-net, --netns); ready when it returns."""
    target = topo.target()
    pidfile = tmp_path / f"pasta-{target.name}.pid"
    log = tmp_path / f"pasta-{target.name}.log"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "-l", str(log), "-d",
                      "-t", tcp, "-T", tcp, *opts, "--netns", target.name,
                      check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    target.pasta_pid = pid
    target.pasta_log = log
    return target


def stop_pasta(target) -> str:
    """SIGTERM pasta, wait for it, return its log (counters are logged at exit)."""
    os.kill(target.pasta_pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(target.pasta_pid), timeout=5, what="pasta to exit")
    return target.pasta_log.read_text()


def udp_counters(log: str) -> dict[str, int]:
    m = re.findall(r"udp: (.*)", log)
    assert m, log[-2000:]
    return {k: int(v) for k, v in (item.rsplit(" ", 1) for item in m[-1].split(", "))}


def wait_bound(ns, port: int, family: int) -> None:
    flag = "-6" if family == 6 else "-4"
    wait_for(lambda: f":{port} " in run(ns.cmd("ss", "-Hlun", flag)).stdout,
             timeout=10, what=f"UDP port {port} bound")


def _ns(topo, target, who):
    return {"target": target, "host": topo.host, "router": topo.router}[who]


PATHS = {
    # name: (pasta options, client's namespace, address it sends to per family,
    #        server's namespace, address the server binds per family)
    "tap-ns": (("-u", "none", "-U", "none"), "target", {4: GW4, 6: GW6},
               "host", {4: "127.0.0.1", 6: "::1"}),
    "tap-host": (("-u", str(PORT), "-U", "none"), "router", {4: HOST4, 6: HOST6},
                 "target", {4: "0.0.0.0", 6: "::"}),
    "lo-ns": (("-u", "none", "-U", str(PORT)), "target", {4: "127.0.0.1", 6: "::1"},
              "host", {4: "127.0.0.1", 6: "::1"}),
    "lo-host": (("-u", str(PORT), "-U", "none"), "host", {4: "127.0.0.1", 6: "::1"},
                "target", {4: "0.0.0.0", 6: "::"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("path", list(PATHS))
def test_udp_echo_mixed_sizes(topo, procs, pasta, tmp_path, path, family):
    opts, client_ns, dst, server_ns, bind = PATHS[path]
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    start_server(procs, _ns(topo, target, server_ns), "echo-server", str(family),
                 bind[family], str(PORT))
    maxlen = MTU - (28 if family == 4 else 48)
    res = run_peer(_ns(topo, target, client_ns), "echo-client", str(family), dst[family],
                   str(PORT), str(COUNT), str(maxlen), "7", timeout=300)
    assert res["ok"] == COUNT and res["bad"] == 0, res
    assert res["max"] == maxlen
    assert res["retries"] <= COUNT // 1000, res        # UDP may lose a few, not many
    counters = udp_counters(stop_pasta(target))
    if path.startswith("tap"):
        assert counters.get("opened", 0) + counters.get("opened_inbound", 0) >= 1, counters
    else:
        # the loopback path never made a tap flow
        assert counters.get("opened", 0) == counters.get("opened_inbound", 0) == 0, counters


@pytest.mark.parametrize("family", [4, 6])
def test_closed_port_gives_econnrefused(topo, procs, pasta, tmp_path, family):
    target = start_pasta(topo, procs, pasta, tmp_path, "-u", "none", "-U", "none")
    res = run_peer(target, "refused", str(family), GW4 if family == 4 else GW6, "5899")
    assert res == ["refused"] * 3, res
    counters = udp_counters(stop_pasta(target))
    assert counters["icmp_error"] >= 3, counters


@pytest.mark.parametrize("family", [4, 6])
def test_source_port_kept_and_reply_from_destination(topo, procs, pasta, tmp_path, family):
    target = start_pasta(topo, procs, pasta, tmp_path, "-u", "none", "-U", "none")
    lo, gw = ("127.0.0.1", GW4) if family == 4 else ("::1", GW6)
    start_server(procs, topo.host, "whoami", str(family), lo, str(PORT))
    # an unconnected client: recvfrom says where the answer came from
    res = run_peer(target, "send-once", str(family), gw, str(PORT), "40123")
    assert res["reply"] == f"{lo} 40123"              # the host saw the guest's port
    assert res["from"] == [gw, PORT]                  # the answer came from where it went


def test_rootless(topo, procs, pasta, test_user):
    """As an unprivileged user (pasta in its own user namespace): same flows, same ports."""
    uid, gid = test_user
    start_server(procs, topo.host, "whoami", "4", "127.0.0.1", str(PORT))
    r = topo.host.run(*as_user(uid, gid, [*pasta, "--config-net", "-t", "none", "-u", "none",
                                          "-T", "none", "-U", "none", "--", "/usr/bin/python3",
                                          "-c", PEER, "send-once", "4", GW4, str(PORT),
                                          "40555"]), check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"reply": "127.0.0.1 40555", "from": [GW4, PORT]}


@pytest.mark.parametrize("family", [4, 6])
def test_host_clients_through_the_tap(topo, procs, pasta, tmp_path, family):
    """-u clients that are not on the host's loopback reach the namespace through the
    tap: one on the router keeps its address, one on the host's own address appears as
    the gateway (the namespace has the host's address itself)."""
    target = start_pasta(topo, procs, pasta, tmp_path, "-u", str(PORT), "-U", "none")
    start_server(procs, target, "whoami", str(family), "0.0.0.0" if family == 4 else "::",
                 str(PORT))
    host, gw = (HOST4, GW4) if family == 4 else (HOST6, GW6)
    res = run_peer(topo.router, "send-once", str(family), host, str(PORT), "40124")
    assert res["reply"] == f"{gw} 40124" and res["from"] == [host, PORT], res
    res = run_peer(topo.host, "send-once", str(family), host, str(PORT), "40125")
    assert res["reply"] == f"{gw} 40125" and res["from"] == [host, PORT], res


def test_oversize_datagrams_dropped_and_counted(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path, "-m", "1500", "-u", "none",
                         "-U", "none")
    start_server(procs, topo.host, "reply-size", "4", "127.0.0.1", str(PORT))
    got = run_peer(target, "ask-sizes", "4", GW4, str(PORT), "1472", "1473", "9000", "100")
    assert got == [1472, None, None, 100], got
    counters = udp_counters(stop_pasta(target))
    assert counters["oversize"] == 2, counters


@pytest.mark.parametrize("family", [4, 6])
def test_udp_follows_tcp_ports(topo, procs, pasta, tmp_path, family):
    """-t given, -u not: UDP forwards the same ports, as in C pasta."""
    target = topo.target()
    pidfile = tmp_path / "pasta.pid"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "-t", str(PORT),
                      "-T", "none", "--netns", target.name, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    procs.adopt(int(pidfile.read_text()))
    start_server(procs, target, "echo-server", str(family), "0.0.0.0" if family == 4 else "::",
                 str(PORT))
    res = run_peer(topo.router, "echo-client", str(family), HOST4 if family == 4 else HOST6,
                   str(PORT), "100", "1400", "5")
    assert res["ok"] == 100, res


@pytest.mark.parametrize("direction", ["in", "out"])
def test_auto_follows_bound_udp_ports(topo, procs, pasta, tmp_path, direction):
    target = start_pasta(topo, procs, pasta, tmp_path, "-u", "auto" if direction == "in"
                         else "none", "-U", "auto" if direction == "out" else "none")
    if direction == "in":      # a server appears in the namespace: the host gets its port
        start_server(procs, target, "echo-server", "4", "0.0.0.0", str(PORT))
        wait_bound(topo.host, PORT, 4)
        res = run_peer(topo.host, "echo-client", "4", "127.0.0.1", str(PORT), "100", "1400",
                       "5")
    else:                      # a server appears on the host: the namespace gets its port
        start_server(procs, topo.host, "echo-server", "4", "127.0.0.1", str(PORT))
        wait_bound(target, PORT, 4)
        res = run_peer(target, "echo-client", "4", "127.0.0.1", str(PORT), "100", "1400", "5")
    assert res["ok"] == 100, res


@pytest.mark.slow
def test_idle_flows_expire(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path, "-u", "none", "-U", "none")
    start_server(procs, topo.host, "sink", "4", "127.0.0.1", str(PORT))

    def flow_socket() -> bool:
        return ":40321 " in topo.host.run("ss", "-Huan", "-4").stdout

    t0 = time.monotonic()
    run_peer(target, "send-once", "4", GW4, str(PORT), "40321")   # one way: 30 s
    assert flow_socket()
    wait_for(lambda: not flow_socket(), timeout=45, interval=0.5, what="flow to expire")
    elapsed = time.monotonic() - t0
    assert 29 <= elapsed <= 40, elapsed


def test_flow_limit_holds_under_flood(topo, procs, pasta, tmp_path):
    from common.udp.handler import MAX_FLOWS

    target = start_pasta(topo, procs, pasta, tmp_path, "-u", "none", "-U", "none")
    sink = start_server(procs, topo.host, "sink", "4", "127.0.0.1", str(PORT))
    flood = MAX_FLOWS + 4000
    res = run_peer(target, "flood", "4", GW4, str(PORT), str(flood), "10000", timeout=300)
    assert res["sent"] == flood

    def pasta_udp_sockets() -> int:
        out = topo.host.run("ss", "-Huanp").stdout
        return sum(1 for line in out.splitlines() if f"pid={target.pasta_pid}," in line)

    assert pasta_udp_sockets() <= MAX_FLOWS
    # the table is still usable: a new flow gets through and is answered
    start_server(procs, topo.host, "echo-server", "4", "127.0.0.1", str(PORT + 1))
    res = run_peer(target, "echo-client", "4", GW4, str(PORT + 1), "20", "1000", "1")
    assert res["ok"] == 20, res
    sink.send_signal(signal.SIGTERM)
    seen = json.loads(sink.communicate(timeout=10)[0].splitlines()[-1])
    counters = udp_counters(stop_pasta(target))
    assert seen["ports"] > MAX_FLOWS, seen        # the flood did reach the host
    assert counters["evicted"] >= seen["ports"] - MAX_FLOWS, (counters, seen)
