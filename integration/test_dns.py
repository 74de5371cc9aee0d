"""DNS through pasta's --dns-forward: queries to the forward address reach the host's resolver.

The host namespace's resolv.conf names loopback resolvers (127.0.0.53 and
::1, as with systemd-resolved), where the test runs a tiny DNS responder
(UDP and TCP) that answers every A query with 192.0.2.7 (AAAA: 2001:db8::7).
The namespace asks the forward address with busybox nslookup (UDP) and with
a small TCP client; answers must come back from the forward address.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from integration.conftest import run

PY = sys.executable
FWD4, FWD6 = "169.254.1.1", "fd00:53::1"

RESPONDER = r'''
import json, select, socket, struct, sys

bind, answer4, answer6 = sys.argv[1], sys.argv[2], sys.argv[3]
fam = socket.AF_INET6 if ":" in bind else socket.AF_INET
rdata = {1: socket.inet_pton(socket.AF_INET, answer4),
         28: socket.inet_pton(socket.AF_INET6, answer6)}

def answer(query):
    qid, flags, qd = struct.unpack_from("!HHH", query)
    end = 12
    while query[end]:
        end += query[end] + 1
    end += 1
    qtype, qclass = struct.unpack_from("!HH", query, end)
    question = query[12:end + 4]
    data = rdata.get(qtype)
    head = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1 if data else 0, 0, 0)
    if not data:
        return head + question
    return head + question + struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(data)) + data

u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind((bind, 53))
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((bind, 53))
t.listen(16)
print(json.dumps({"listening": 53}), flush=True)
while True:
    for s in select.select([u, t], [], [])[0]:
        if s is u:
            q, addr = u.recvfrom(4096)
            u.sendto(answer(q), addr)
        else:
            c, _ = t.accept()
            c.settimeout(5)
            n = struct.unpack("!H", c.recv(2, socket.MSG_WAITALL))[0]
            a = answer(c.recv(n, socket.MSG_WAITALL))
            c.sendall(struct.pack("!H", len(a)) + a)
            c.close()
'''

CLIENT = r'''
import json, socket, struct, sys

proto, server, name, qtype = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fam = socket.AF_INET6 if ":" in server else socket.AF_INET
query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    query += bytes([len(label)]) + label.encode()
query += b"\0" + struct.pack("!HH", qtype, 1)
if proto == "udp":
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(query, (server, 53))
    reply, src = s.recvfrom(4096)
else:
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(struct.pack("!H", len(query)) + query)
    n = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
    reply = s.recv(n, socket.MSG_WAITALL)
    src = s.getpeername()
qid, flags, qd, an = struct.unpack_from("!HHHH", reply)
rdlen = struct.unpack_from("!H", reply, len(reply) - (4 if qtype == 1 else 16) - 2)[0]
rdata = reply[-rdlen:]
addr = socket.inet_ntop(socket.AF_INET if rdlen == 4 else socket.AF_INET6, rdata)
print(json.dumps({"id": qid, "answers": an, "addr": addr, "from": src[0],
                  "port": src[1]}))
'''


@pytest.fixture
def resolvers(topo, procs):
    """Loopback resolvers on the host, named by its resolv.conf."""
    etc = Path("/etc/netns") / topo.host.name
    (etc / "resolv.conf").write_text("nameserver 127.0.0.53\nnameserver ::1\n")
    for bind in ("127.0.0.53", "::1"):
        p = procs.start(topo.host.cmd(PY, "-c", RESPONDER, bind, "192.0.2.7", "2001:db8::7"),
                        text=True)
        line = p.stdout.readline()
        assert json.loads(line) == {"listening": 53}, line + p.stderr.read()


def start_pasta(topo, procs, pasta, tmp_path, *opts):
    target = topo.target()
    pidfile = tmp_path / f"pasta-{target.name}.pid"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "-t", "none", "-u", "none",
                      "-T", "none", "-U", "none", *opts, "--netns", target.name,
                      check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    procs.adopt(int(pidfile.read_text()))
    return target


def ask(target, proto: str, server: str, qtype: int = 1, name: str = "probe.test") -> dict:
    r = run(target.cmd(PY, "-c", CLIENT, proto, server, name, str(qtype)), check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_busybox_nslookup_through_dns_forward(topo, procs, pasta, tmp_path, resolvers):
    target = start_pasta(topo, procs, pasta, tmp_path, "--dns-forward", FWD4)
    r = run(target.cmd("busybox", "nslookup", "-type=a", "probe.test", FWD4), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "192.0.2.7" in r.stdout, r.stdout


@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.parametrize("family", [4, 6])
def test_answers_come_from_forward_address(topo, procs, pasta, tmp_path, resolvers, proto,
                                           family):
    target = start_pasta(topo, procs, pasta, tmp_path, "--dns-forward", FWD4,
                         "--dns-forward", FWD6)
    fwd = FWD4 if family == 4 else FWD6
    got = ask(target, proto, fwd, qtype=1 if family == 4 else 28)
    assert got["id"] == 0x4242 and got["answers"] == 1, got
    assert got["addr"] == ("192.0.2.7" if family == 4 else "2001:db8::7")
    assert (got["from"], got["port"]) == (fwd, 53)


def test_podman5_options(topo, procs, pasta, tmp_path, resolvers):
    """As podman 5 starts pasta: --no-map-gw, --dns-forward 169.254.1.1, --map-guest-addr."""
    target = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw", "--dns-forward",
                         "169.254.1.1", "--quiet", "--map-guest-addr", "169.254.1.2")
    for proto in ("udp", "tcp"):
        got = ask(target, proto, "169.254.1.1")
        assert got["addr"] == "192.0.2.7" and got["from"] == "169.254.1.1", (proto, got)


def test_dns_host_chooses_the_resolver(topo, procs, pasta, tmp_path, resolvers):
    p = procs.start(topo.host.cmd(PY, "-c", RESPONDER, "127.0.0.54", "192.0.2.54", "::"),
                    text=True)
    assert "listening" in p.stdout.readline()
    target = start_pasta(topo, procs, pasta, tmp_path, "--dns-forward", FWD4,
                         "--dns-host", "127.0.0.54")
    for proto in ("udp", "tcp"):
        got = ask(target, proto, FWD4)
        assert got["addr"] == "192.0.2.54" and got["from"] == FWD4, (proto, got)


def test_dhcp_offers_the_forward_address(topo, procs, pasta, tmp_path, resolvers):
    from integration.test_pasta_autoconf import start_pasta as start_unconfigured
    from integration.test_pasta_autoconf import udhcpc

    target, _ = start_unconfigured(topo, procs, pasta, "--dhcp-dns", "--dns-forward", FWD4)
    lease = udhcpc(target, tmp_path)
    assert lease["dns"].split() == [FWD4]
