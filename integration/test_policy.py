"""The egress policy with the real pasta (and passt): rules by address, port and DNS name,
refusals as a firewall answers, counters, run-time replacement, inbound, bad input.

Services run on the router namespace at two addresses of its own beside the
gateway: ALLOWED (10.77.0.5, fd77::5) and DENIED (10.77.0.9, fd77::9), each
with an HTTP-ish TCP service on 8080 and a UDP echo on 9000.  Probes run in
pasta's namespace: curl, and a small script with raw ICMP sockets that says
exactly which ICMP error (type, code) answered its datagram or echo request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from integration.conftest import GW4, HOST4, HOST6, our_command, run, stop_pid, wait_for
from integration.guest.hostnet import socket_dir
from integration.rawguest import PasstGuest, tcp_flags_to, tcp_syn, udp
from integration.test_icmp import allow_ping_sockets
from integration.test_pasta_bad_input import left_in_run_netns, leftovers, run_netns

PY = sys.executable
PESTO = our_command("pesto")
ALLOWED4, DENIED4, ALLOWED6, DENIED6 = "10.77.0.5", "10.77.0.9", "fd77::5", "fd77::9"
HTTP, ECHO = 8080, 9000
FWD4 = "169.254.1.1"
NO_FORWARDS = ("-t", "none", "-u", "none", "-T", "none", "-U", "none")

SERVICE = r'''
import socket, sys, threading
def tcp(addr):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, 8080)); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5); c.recv(4096)
            body = ("hello from %s\n" % addr).encode()
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except OSError:
            pass
        finally:
            c.close()
def echo(addr):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 9000))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)
for a in sys.argv[1:]:
    for fn in (tcp, echo):
        threading.Thread(target=fn, args=(a,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
'''

# one probe from the namespace, one JSON line: what answered
PROBE = r'''
import json, os, select, socket, struct, sys, time
kind, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
wait = float(sys.argv[4]) if len(sys.argv) > 4 else 2.0
v6 = ":" in addr
fam = socket.AF_INET6 if v6 else socket.AF_INET
t0 = time.monotonic()
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
def icmp_of(data):
    """(type, code, quoted l4) of an ICMP(v6) message read from a raw socket."""
    if not v6:
        data = data[(data[0] & 15) * 4:]
    quoted = data[8:]
    quoted = quoted[40:] if v6 else quoted[(quoted[0] & 15) * 4:] if quoted else b""
    return data[0], data[1], data, quoted
out = {}
if kind == "tcp":
    s = socket.socket(fam)
    s.settimeout(wait)
    try:
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        out = {"ok": True, "reply": reply.decode().split("\r\n\r\n")[-1]}
    except socket.timeout:
        out = {"error": "timeout"}
    except OSError as exc:
        out = {"error": type(exc).__name__}
else:
    raw = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    if kind == "udp":
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.connect((addr, port))
        sport = u.getsockname()[1]
        u.send(b"probe")
        socks = [u, raw]
    else:
        u = None
        msg = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"policy probe"
        if not v6:
            msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
        raw.sendto(msg, (addr, 0))
        socks = [raw]
    end = t0 + wait
    while not out and time.monotonic() < end:
        ready, _, _ = select.select(socks, [], [], max(0, end - time.monotonic()))
        for r in ready:
            if r is u:
                try:
                    out = {"reply": u.recv(4096).decode()}
                except OSError as exc:
                    out.setdefault("sock_error", exc.errno)
                continue
            t, c, msg, quoted = icmp_of(raw.recv(65535))
            unreach = t == (1 if v6 else 3)
            mine = struct.pack("!H", ident)
            if kind == "ping" and t == (129 if v6 else 0) and msg[4:6] == mine:
                out = {"reply": True}
            elif unreach and kind == "udp" and quoted[:4] == struct.pack("!HH", sport, port):
                out = {"icmp": [t, c]}
            elif unreach and kind == "ping" and quoted[4:6] == mine:
                out = {"icmp": [t, c]}
    if not out or list(out) == ["sock_error"]:
        out["error"] = "timeout"
out["seconds"] = round(time.monotonic() - t0, 3)
print(json.dumps(out))
'''


@pytest.fixture
def services(topo, procs):
    """The router's ALLOWED and DENIED addresses, each with its TCP and UDP service."""
    for a in (f"{ALLOWED4}/24", f"{DENIED4}/24"):
        topo.router.run("ip", "addr", "add", a, "dev", "veth-r")
    for a in (f"{ALLOWED6}/64", f"{DENIED6}/64"):
        topo.router.run("ip", "addr", "add", a, "dev", "veth-r", "nodad")
    p = procs.start(topo.router.cmd(PY, "-c", SERVICE, ALLOWED4, DENIED4, ALLOWED6, DENIED6),
                    text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    allow_ping_sockets(topo.host)
    etc = Path("/etc/netns") / topo.host.name
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{ALLOWED4} svc.test\n"
                               f"{ALLOWED6} svc.test\n")
    return topo


def start_pasta(topo, procs, tmp_path, *opts, forwards=NO_FORWARDS):
    target = topo.target()
    pidfile = tmp_path / f"pasta-{target.name}.pid"
    r = topo.host.run(*our_command("pasta"), "--config-net", "-P", str(pidfile), *forwards,
                      *opts, "--netns", target.name, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    procs.adopt(pid)
    return target, pid


def probe(ns, kind: str, addr: str, port: int = 0, wait: float = 2.0) -> dict:
    r = run(ns.cmd(PY, "-c", PROBE, kind, addr, str(port), str(wait)), check=False)
    assert r.returncode == 0 and r.stdout, r.stderr
    return json.loads(r.stdout)


def curl(ns, addr: str, port: int = HTTP):
    host = f"[{addr}]" if ":" in addr else addr
    t = time.monotonic()
    r = run(ns.cmd("curl", "-sS", "-g", "--max-time", "5", f"http://{host}:{port}/"),
            check=False)
    return r, time.monotonic() - t


def pesto(*args: str, check: bool = True, ns=None):
    """pesto, in `ns` if given (where the hosts file names svc.test)."""
    r = run(ns.cmd(*PESTO, *args) if ns is not None else [*PESTO, *args], check=False,
            timeout=30)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def shown_policy(ctl: str) -> dict:
    return json.loads(pesto("--show-policy", "--json", ctl).stdout)["policy"]


# ---------------------------------------------------------------- refusals and counters


def test_policy_allows_one_service_and_refuses_the_rest(services, procs, tmp_path):
    topo = services
    with socket_dir() as d:
        ctl = str(d / "pasta.ctl")
        log = tmp_path / "pasta.log"
        target, _ = start_pasta(
            topo, procs, tmp_path, "-c", ctl, "-l", str(log), "--policy-default", "deny",
            "--allow", f"tcp:svc.test:{HTTP}", "--allow", f"udp:{ALLOWED4}/32:{ECHO}",
            "--allow", f"udp:[{ALLOWED6}]:{ECHO}", "--allow", f"icmp:{ALLOWED4}",
            "--allow", f"icmp:[{ALLOWED6}/128]",
            forwards=("-t", "8081", "-u", "none", "-T", "none", "-U", "none"))
        # allowed: curl works, both families (svc.test was resolved at start-up)
        for addr in (ALLOWED4, ALLOWED6):
            r, _ = curl(target, addr)
            assert r.returncode == 0 and r.stdout == f"hello from {addr}\n", r.stderr
        # denied TCP: a reset at once
        for addr in (DENIED4, DENIED6):
            r, took = curl(target, addr)
            assert r.returncode == 7 and took < 2, (r.returncode, r.stderr, took)
        got = probe(target, "tcp", DENIED4, HTTP)
        assert got["error"] == "ConnectionRefusedError" and got["seconds"] < 1, got
        # UDP and ICMP: answered, or "administratively prohibited"
        assert probe(target, "udp", ALLOWED4, ECHO)["reply"] == "probe"
        assert probe(target, "udp", ALLOWED6, ECHO)["reply"] == "probe"
        assert probe(target, "udp", DENIED4, ECHO)["icmp"] == [3, 13]
        assert probe(target, "udp", DENIED6, ECHO)["icmp"] == [1, 1]
        assert probe(target, "udp", ALLOWED4, ECHO + 1)["icmp"] == [3, 13]   # by port
        assert probe(target, "ping", ALLOWED4)["reply"] is True
        assert probe(target, "ping", ALLOWED6)["reply"] is True
        assert probe(target, "ping", DENIED4)["icmp"] == [3, 13]
        assert probe(target, "ping", DENIED6)["icmp"] == [1, 1]
        # inbound is not the policy's business unless --policy-inbound
        srv = procs.start(target.cmd(PY, "-c", "import socket; s = socket.create_server(("
                                     "'0.0.0.0', 8081)); print('up', flush=True); "
                                     "c, _ = s.accept(); c.sendall(b'inbound ok')"), text=True)
        assert srv.stdout.readline().strip() == "up"
        r = run(topo.router.cmd(PY, "-c", f"import socket; s = socket.create_connection(("
                                f"'{HOST4}', 8081), timeout=5); print(s.recv(64).decode())"))
        assert r.stdout.strip() == "inbound ok"

        p = shown_policy(ctl)
        flows = {r["rule"]: r["flows"] for r in p["rules"]}
        assert flows == {f"allow tcp:svc.test:{HTTP}": 2,
                         f"allow udp:{ALLOWED4}/32:{ECHO}": 1,
                         f"allow udp:[{ALLOWED6}]:{ECHO}": 1,
                         f"allow icmp:{ALLOWED4}": 1, f"allow icmp:[{ALLOWED6}/128]": 1}, p
        assert p["default_flows"] == 8 and p["denied"] == 8, p
        text = pesto("--show-policy", ctl).stdout
        assert f"      2  allow tcp:svc.test:{HTTP}" in text and "8  default deny" in text
    # denials logged once per destination per minute: DENIED4 saw curl, a TCP probe, UDP
    # and a ping, and is named once
    lines = [line for line in log.read_text().splitlines() if "policy: denied" in line]
    assert sum(f" {DENIED4}:" in line or f" {DENIED4} " in line for line in lines) == 1, lines
    assert any(f"denied tcp to [{DENIED6}]:{HTTP} (default deny)" in line for line in lines)
    assert len(lines) == 3, lines                 # DENIED4, DENIED6, ALLOWED4 (UDP port)


def test_drop_answers_nothing(services, procs, tmp_path):
    target, _ = start_pasta(services, procs, tmp_path, "--deny-action", "drop",
                            "--deny", f"{DENIED4}", "--deny", f"[{DENIED6}]")
    got = probe(target, "tcp", DENIED4, HTTP, wait=1.5)
    assert got["error"] == "timeout", got
    assert probe(target, "udp", DENIED6, ECHO, wait=1.0) == {"error": "timeout",
                                                               "seconds": pytest.approx(1, 0.5)}
    assert probe(target, "ping", DENIED4, wait=1.0)["error"] == "timeout"
    assert probe(target, "tcp", ALLOWED4, HTTP)["ok"]          # the default: allow


def test_policy_inbound(topo, procs, tmp_path):
    """--policy-inbound: forwarded ports are checked by the peer's address and our port."""
    target, _ = start_pasta(topo, procs, tmp_path, "--policy-inbound",
                            "--policy-default", "deny", "--allow", "tcp:[fd77::1]:8081",
                            forwards=("-t", "8081", "-u", "none", "-T", "none", "-U", "none"))
    srv = procs.start(target.cmd(PY, "-c", "import socket; s = socket.create_server(("
                                 "'::', 8081), family=socket.AF_INET6, dualstack_ipv6=True); "
                                 "print('up', flush=True)\nwhile True:\n c, _ = s.accept(); "
                                 "c.sendall(b'in'); c.close()"), text=True)
    assert srv.stdout.readline().strip() == "up"
    client = ("import socket, sys\ntry:\n s = socket.create_connection((sys.argv[1], 8081), "
              "timeout=5); print(s.recv(8).decode() or 'closed')\nexcept OSError as e: "
              "print(type(e).__name__)")
    assert run(topo_cmd(topo.router, client, HOST6)).stdout.strip() == "in"
    # from GW4 (10.77.0.1): accepted by the host, then reset before the guest sees it
    assert run(topo_cmd(topo.router, client, HOST4)).stdout.strip() in (
        "ConnectionResetError", "closed")


def topo_cmd(ns, code: str, *args: str) -> list[str]:
    return ns.cmd(PY, "-c", code, *args)


# ---------------------------------------------------------------- DNS names


RESPONDER = r'''
import json, select, socket, struct, sys
bind, ttl = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
ZONE = {("allowed.test", 1): "10.77.0.5", ("allowed.test", 28): "fd77::5",
        ("other.test", 1): "10.77.0.9"}
def answer(query):
    qid, flags = struct.unpack_from("!HH", query)
    end, labels = 12, []
    while query[end]:
        labels.append(query[end + 1:end + 1 + query[end]].decode()); end += query[end] + 1
    end += 1
    qtype, _ = struct.unpack_from("!HH", query, end)
    addr = ZONE.get((".".join(labels).lower(), qtype))
    data = addr and socket.inet_pton(socket.AF_INET6 if qtype == 28 else socket.AF_INET, addr)
    head = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1 if data else 0, 0, 0)
    out = head + query[12:end + 4]
    if data:
        out += struct.pack("!HHHIH", 0xC00C, qtype, 1, ttl, len(data)) + data
    return out
u = socket.socket(fam, socket.SOCK_DGRAM); u.bind((bind, 53))
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((bind, 53)); t.listen(16)
print("ready", flush=True)
while True:
    for s in select.select([u, t], [], [])[0]:
        if s is u:
            q, addr = u.recvfrom(4096); u.sendto(answer(q), addr)
        else:
            c, _ = t.accept(); c.settimeout(5)
            n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            a = answer(c.recv(n, socket.MSG_WAITALL))
            c.sendall(struct.pack("!H", len(a)) + a); c.close()
'''

LOOKUP = r'''
import json, socket, struct, sys
proto, server, name, qtype = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
q = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack("!HH", qtype, 1)
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, (server, 53)); reply = s.recv(4096)
else:
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
    reply = s.recv(n, socket.MSG_WAITALL)
n = 4 if qtype == 1 else 16
print(socket.inet_ntop(socket.AF_INET if n == 4 else socket.AF_INET6, reply[-n:]))
'''


def lookup(ns, proto: str, name: str, qtype: int = 1) -> str:
    r = run(ns.cmd(PY, "-c", LOOKUP, proto, FWD4, name, str(qtype)), check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


TTL = 3


def test_rules_by_dns_name_for_the_ttl(services, procs, tmp_path):
    """--allow-dns-name: the test's own resolver on the host side answers; its answers
    (A and AAAA, each over UDP and over TCP) open the name's addresses until their TTL
    ends."""
    topo = services
    (Path("/etc/netns") / topo.host.name / "resolv.conf").write_text("nameserver 127.0.0.53\n")
    p = procs.start(topo.host.cmd(PY, "-c", RESPONDER, "127.0.0.53", str(TTL)), text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    with socket_dir() as d:
        ctl = str(d / "pasta.ctl")
        target, _ = start_pasta(topo, procs, tmp_path, "-c", ctl, "--dns-forward", FWD4,
                                "--policy-default", "deny",
                                "--allow-dns-name", f"tcp:allowed.test:{HTTP}")
        assert probe(target, "tcp", ALLOWED4, HTTP)["error"] == "ConnectionRefusedError"
        assert lookup(target, "udp", "allowed.test") == ALLOWED4     # DNS itself is allowed
        answered = time.monotonic()
        assert probe(target, "tcp", ALLOWED4, HTTP)["ok"]
        assert probe(target, "udp", ALLOWED4, ECHO).get("icmp") == [3, 13]   # tcp:...:8080
        assert lookup(target, "tcp", "allowed.test", 28) == ALLOWED6
        answered = time.monotonic()                 # the later of the two answers
        assert probe(target, "tcp", ALLOWED6, HTTP)["ok"]
        assert lookup(target, "udp", "other.test") == DENIED4       # not an allowed name
        assert probe(target, "tcp", DENIED4, HTTP)["error"] == "ConnectionRefusedError"
        shown = shown_policy(ctl)
        assert {(e["addr"], e["name"]) for e in shown["learned"]} == {
            (ALLOWED4, "allowed.test"), (ALLOWED6, "allowed.test")}, shown
        assert shown["rules"][0]["flows"] == 2 and shown["dns_forward_flows"] == 3, shown
        # the TTL ends: the addresses are denied again, until the next answers (now A
        # over TCP and AAAA over UDP: all four ways are learned from)
        time.sleep(max(0.0, answered + TTL + 0.5 - time.monotonic()))
        assert probe(target, "tcp", ALLOWED4, HTTP)["error"] == "ConnectionRefusedError"
        assert probe(target, "tcp", ALLOWED6, HTTP)["error"] == "ConnectionRefusedError"
        assert lookup(target, "tcp", "allowed.test") == ALLOWED4
        assert probe(target, "tcp", ALLOWED4, HTTP)["ok"]
        assert lookup(target, "udp", "allowed.test", 28) == ALLOWED6
        assert probe(target, "tcp", ALLOWED6, HTTP)["ok"]


# ---------------------------------------------------------------- run time


def test_policy_replaced_at_run_time(services, procs, tmp_path):
    topo = services
    with socket_dir() as d:
        ctl = str(d / "pasta.ctl")
        target, _ = start_pasta(topo, procs, tmp_path, "-c", ctl, "--policy-default", "deny",
                                "--allow", f"tcp:{ALLOWED4}:{HTTP}")
        assert probe(target, "tcp", ALLOWED4, HTTP)["ok"]
        assert probe(target, "tcp", DENIED4, HTTP)["error"] == "ConnectionRefusedError"
        new = tmp_path / "new.policy"
        new.write_text(f"# only the other one now\nallow tcp:{DENIED4}:{HTTP}\n"
                       "allow tcp:svc.test:9999\n")
        text = pesto("--policy", str(new), ctl, ns=topo.host).stdout
        assert text.splitlines()[2:4] == [f"       1      0  allow tcp:{DENIED4}:{HTTP}",
                                          "       2      0  allow tcp:svc.test:9999"], text
        assert probe(target, "tcp", DENIED4, HTTP)["ok"]
        assert probe(target, "tcp", ALLOWED4, HTTP)["error"] == "ConnectionRefusedError"
        # a bad file: one line naming the rule, nothing changes
        bad = tmp_path / "bad.policy"
        bad.write_text(f"allow tcp:{ALLOWED4}:{HTTP}\ndeny udp:10.0.0.0/33\n")
        r = pesto("--policy", str(bad), ctl, check=False)
        assert r.returncode == 1 and r.stderr == (
            f"pesto: policy file {bad} line 2: deny udp:10.0.0.0/33: invalid prefix length "
            "'33' (0-32 for IPv4)\n")
        # ... and sent as it is, the server refuses it the same way
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(ctl)
            f = s.makefile("rwb")
            f.readline()
            f.write(json.dumps({"version": 1, "ops": [{"op": "policy", "text": bad.read_text(),
                                                        "source": "bad"}]}).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
        assert reply == {"ok": False, "error": "bad line 2: deny udp:10.0.0.0/33: invalid "
                                               "prefix length '33' (0-32 for IPv4)"}
        rules = [r["rule"] for r in shown_policy(ctl)["rules"]]
        assert rules == [f"allow tcp:{DENIED4}:{HTTP}", "allow tcp:svc.test:9999"]
        assert probe(target, "tcp", DENIED4, HTTP)["ok"]


# ---------------------------------------------------------------- passt


def test_passt_refuses_like_pasta(services, procs, tmp_path):
    """The same handlers under passt: a raw guest's SYN to a denied address gets a reset,
    an allowed one a SYN-ACK, a denied datagram ICMP administratively prohibited."""
    with socket_dir() as d:
        path = str(d / "passt.socket")
        p = procs.start(services.host.cmd(*our_command("passt"), "-f", "-s", path,
                                          "--policy-default", "deny",
                                          "--allow", f"tcp:{ALLOWED4}:{HTTP}"), text=True)
        guest = PasstGuest(path, timeout=20)
        try:
            mac = bytes.fromhex("525400123456")
            bcast = b"\xff" * 6
            guest.send(tcp_syn(bcast, mac, HOST4, DENIED4, 40001, HTTP))
            guest.send(tcp_syn(bcast, mac, HOST4, ALLOWED4, 40002, HTTP))
            guest.send(udp(bcast, mac, HOST4, DENIED4, 40003, ECHO, b"denied"))
            frames = guest.recv(2.0)
        finally:
            guest.close()
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=15)
    assert any(tcp_flags_to(f, 40001) == 0x14 for f in frames)      # RST|ACK
    assert any(tcp_flags_to(f, 40002) == 0x12 for f in frames)      # SYN|ACK
    icmp = [f for f in frames if f[12:14] == b"\x08\x00" and f[23] == 1]
    assert any(f[34] == 3 and f[35] == 13 and f[26:30] == socket.inet_aton(DENIED4)
               for f in icmp), frames


# ---------------------------------------------------------------- bad input


BAD = [
    ("prefix", ["--allow", "tcp:10.0.0.0/33:443"],
     "pasta: --allow tcp:10.0.0.0/33:443: invalid prefix length '33' (0-32 for IPv4)"),
    ("port", ["--deny", "udp:[2001:db8::]/32:0"],
     "pasta: --deny udp:[2001:db8::]/32:0: port 0 is not allowed"),
    ("brackets", ["--deny", "tcp:2001:db8::1:443"],
     "pasta: --deny tcp:2001:db8::1:443: an IPv6 address goes in brackets"),
    ("dns name", ["--allow-dns-name", "tcp:exa_mple..test"],
     "pasta: --allow-dns-name tcp:exa_mple..test: invalid DNS name"),
    ("default", ["--policy-default", "maybe"],
     "pasta: --policy-default 'maybe': expected allow or deny"),
    ("action", ["--deny-action", "reject"], "pasta: --deny-action 'reject': expected reset"),
    ("no file", ["--policy-file", "/nonexistent/policy"],
     "pasta: --policy-file /nonexistent/policy: No such file or directory"),
    ("flow log stderr", ["--flow-log", "-", "4194303"],
     "pasta: --flow-log - needs --foreground"),
    ("unresolvable", ["--allow", "tcp:nowhere.test:443"],
     "pasta: --allow tcp:nowhere.test:443: cannot resolve host name 'nowhere.test'"),
]


@pytest.mark.parametrize("args,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_policy_input(topo, tmp_path, args, expected):
    etc = Path("/etc/netns") / topo.host.name
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    pidfile = tmp_path / "marker.pid"
    before = run_netns()
    command = () if args[-1].isdigit() else ("--", "true")
    r = topo.host.run(*our_command("pasta"), "-P", str(pidfile), *args, *command,
                      check=False, timeout=30)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr
    assert not pidfile.exists()
    left = left_in_run_netns(before)
    if left:            # others' tests and benchmarks make short-lived ones meanwhile:
        time.sleep(2)   # what we left would still be there
        left &= run_netns()
    assert left == set()
    assert leftovers(str(pidfile)) == []


def test_bad_policy_file_names_the_line(topo, tmp_path):
    f = tmp_path / "egress.policy"
    f.write_text("# sandbox\nallow tcp:10.0.0.0/8:443\n\nallow tcp:10.0.0.0/8:44x3  # typo\n")
    r = topo.host.run(*our_command("pasta"), "--policy-file", str(f), "--", "true",
                      check=False, timeout=30)
    assert r.returncode == 1 and r.stderr == (
        f"pasta: policy file {f} line 4: allow tcp:10.0.0.0/8:44x3: invalid port '44x3'\n")


def test_policy_file_with_default(services, procs, tmp_path):
    f = tmp_path / "egress.policy"
    f.write_text(f"deny tcp:{ALLOWED4}:1-1000\nallow tcp:{ALLOWED4}\ndefault deny\n")
    target, pid = start_pasta(services, procs, tmp_path, "--policy-file", str(f))
    assert probe(target, "tcp", ALLOWED4, HTTP)["ok"]
    assert probe(target, "tcp", DENIED4, HTTP)["error"] == "ConnectionRefusedError"
    stop_pid(pid)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5, what="pasta gone")
    assert GW4                      # (the gateway stays the host's loopback: not a rule's)
