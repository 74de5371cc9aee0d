"""pasta: the host's loopback does not expose the namespace's loopback.

A host client on 127.0.0.1 or ::1 connecting (TCP) or sending (UDP) to a
forwarded port is spliced into the namespace to the namespace's own address,
and the service there sees it come from that address: a service bound only
to the namespace's loopback is not reachable, one bound to all addresses is.
`--host-lo-to-ns-lo` restores delivery to the namespace's loopback (and the
service sees a loopback peer); with `--no-splice` it is refused.

That the traffic still takes the splice path shows twice: the namespace's
kernel would drop a frame from its own address arriving on its tap (a
martian source), and the tap's byte counters barely move while a few
hundred KiB cross.
"""

from __future__ import annotations

import json
import sys

import pytest

from integration.conftest import HOST4, HOST6, run
from integration.test_tcp import start_pasta

TCP_PORTS = {"lo4": 7201, "lo6": 7202, "all4": 7203, "all6": 7204}
UDP_PORTS = {"lo4": 7211, "lo6": 7212, "all4": 7213, "all6": 7214}
BIND = {"lo4": "127.0.0.1", "lo6": "::1", "all4": "0.0.0.0", "all6": "::"}
BULK = 200_000          # bytes each TCP answer carries after the peer's address

SERVER = """
import json, select, socket, sys
bind, bulk = json.loads(sys.argv[1]), int(sys.argv[2])
socks = []
for kind, where, port in bind:
    fam = socket.AF_INET6 if ':' in where else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind == 'tcp' else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((where, port))
    if kind == 'tcp':
        s.listen(8)
    socks.append(s)
print('listening', flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        if s.type == socket.SOCK_STREAM:
            c, peer = s.accept()
            c.sendall(peer[0].encode() + b'\\n' + bytes(bulk))
            c.close()
        else:
            data, peer = s.recvfrom(100)
            s.sendto(peer[0].encode(), peer)
"""

CLIENT = """
import socket, sys
proto, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET,
                  socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.connect((addr, port))
    if proto == 'udp':
        s.send(b'hello')
        print(s.recv(100).decode())
    else:
        data = b''
        while chunk := s.recv(65536):
            data += chunk
        line, _, rest = data.partition(b'\\n')
        print(line.decode() if len(rest) == int(sys.argv[4]) else f'short {len(data)}')
except OSError as e:
    print(type(e).__name__)
"""


def _tap_bytes(ns) -> int:
    stats = json.loads(ns.run("ip", "-j", "-s", "link", "show", "dev", "eth0").stdout)[0]
    return stats["stats64"]["rx"]["bytes"] + stats["stats64"]["tx"]["bytes"]


def _ask(topo, proto: str, case: str) -> str:
    port = (TCP_PORTS if proto == "tcp" else UDP_PORTS)[case]
    addr = "::1" if case.endswith("6") else "127.0.0.1"
    return topo.host.run(sys.executable, "-c", CLIENT, proto, addr, str(port), str(BULK),
                         timeout=20).stdout.strip()


@pytest.mark.parametrize("option", [False, True], ids=["default", "host-lo-to-ns-lo"])
def test_host_loopback_reaches_namespace_address(topo, procs, pasta, tmp_path, option):
    opts = ["-t", "7201-7204", "-u", "7211-7214"] + (["--host-lo-to-ns-lo"] if option else [])
    target = start_pasta(topo, procs, pasta, tmp_path, *opts)
    bind = [["tcp", BIND[c], p] for c, p in TCP_PORTS.items()]
    bind += [["udp", BIND[c], p] for c, p in UDP_PORTS.items()]
    srv = procs.start(target.cmd(sys.executable, "-c", SERVER, json.dumps(bind), str(BULK)),
                      text=True)
    assert srv.stdout.readline().strip() == "listening", srv.stderr.read()
    before = _tap_bytes(target)
    got = {(proto, case): _ask(topo, proto, case)
           for proto in ("tcp", "udp") for case in ("lo4", "lo6", "all4", "all6")}
    tap_moved = _tap_bytes(target) - before
    if option:
        want = {"lo4": "127.0.0.1", "lo6": "::1", "all4": "127.0.0.1", "all6": "::1"}
    else:
        # a loopback-only service is unreachable: reset (TCP), no answer (UDP)
        want = {"lo4": None, "lo6": None, "all4": HOST4, "all6": HOST6}
    for (proto, case), answer in got.items():
        if want[case] is None:
            assert answer in (("ConnectionResetError", "short 0") if proto == "tcp"
                              else ("TimeoutError",)), (proto, case, answer)
        else:
            assert answer == want[case], (proto, case, answer, got)
    # four TCP answers of BULK bytes crossed: spliced, not through the tap
    assert tap_moved < BULK, tap_moved


def test_host_lo_to_ns_lo_refused_with_no_splice(topo, pasta, tmp_path):
    target = topo.target()
    pidfile = tmp_path / "pasta.pid"
    r = topo.host.run(*pasta, "--config-net", "-P", str(pidfile), "--no-splice",
                      "--host-lo-to-ns-lo", "--netns", target.name, check=False, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "--host-lo-to-ns-lo" in lines[0] and "--no-splice" in lines[0], lines
    assert not pidfile.exists()
    assert "eth0" not in run(target.cmd("ip", "link")).stdout
