"""Address mapping and forwarding details: who reaches whom, seen from which address."""

from __future__ import annotations

import sys

import pytest

from integration.conftest import GW4, HOST4, add_side_link, run, wait_for
from integration.test_tcp import ss_ports, start_pasta

PEER_SERVER = """
import socket, sys
ls = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2]))); ls.listen(8)
print('listening', flush=True)
c, peer = ls.accept()
c.sendall(sys.argv[3].encode() + b' ' + peer[0].encode() + b'\\n')
c.close()
"""

CLIENT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.settimeout(5)
t0 = time.monotonic()
try:
    addr = (sys.argv[1], int(sys.argv[2]))
    if len(sys.argv) > 3:                  # a link-local address: on this interface
        addr += (0, socket.if_nametoindex(sys.argv[3]))
    s.connect(addr)
    print(s.recv(200).decode().strip() or 'closed')
except OSError as e:
    print(type(e).__name__, round(time.monotonic() - t0, 3))
"""


def serve(procs, ns, bind: str, port: int, name: str):
    p = procs.start(ns.cmd(sys.executable, "-c", PEER_SERVER, bind, str(port), name), text=True)
    assert p.stdout.readline().strip() == "listening", p.stderr.read()
    return p


def connect(ns, addr: str, port: int, *ifname: str) -> str:
    return ns.run(sys.executable, "-c", CLIENT, addr, str(port), *ifname).stdout.strip()


def test_gateway_reaches_host_loopback_by_default(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path)
    serve(procs, topo.host, "127.0.0.1", 7001, "host-lo")
    # the host sees the namespace's connection coming from its own loopback
    assert connect(target, GW4, 7001) == "host-lo 127.0.0.1"


def test_no_map_gw_reaches_the_real_gateway(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw")
    serve(procs, topo.router, GW4, 7002, "router")
    serve(procs, topo.host, "127.0.0.1", 7002, "host-lo")
    name, peer = connect(target, GW4, 7002).split()
    assert name == "router" and peer == HOST4


def test_no_map_gw_reaches_a_link_local_gateway(topo, procs, pasta, tmp_path):
    """The usual IPv6 router is link-local: our connect() must name the interface."""
    topo.router.run("ip", "addr", "add", "fe80::1/64", "dev", "veth-r", "nodad")
    target = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw", "-g", "fe80::1")
    serve(procs, topo.router, "::", 7008, "router")
    wait_for(lambda: "tentative" not in target.run("ip", "-6", "addr").stdout,
             what="the namespace's link-local address")
    name, peer = connect(target, "fe80::1", 7008, "eth0").split()
    assert name == "router" and peer.startswith("fe80:"), (name, peer)


@pytest.mark.parametrize(("device", "reached"), [("eth0", True), ("side0", False)])
def test_outbound_if_carries_connections(topo, procs, pasta, tmp_path, device, reached):
    """--outbound-if4: host sockets leave through that device only (side0 leads nowhere)."""
    add_side_link(topo.host)
    target = start_pasta(topo, procs, pasta, tmp_path, "--no-map-gw", "-i", "eth0",
                         "--outbound-if4", device)
    serve(procs, topo.router, GW4, 7007, "router")
    out = connect(target, GW4, 7007)
    assert (out == f"router {HOST4}") == reached, out


def test_map_host_loopback_address(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path, "--map-host-loopback", "10.77.0.222")
    serve(procs, topo.host, "127.0.0.1", 7003, "host-lo")
    assert connect(target, "10.77.0.222", 7003).split()[0] == "host-lo"


def test_outbound_source_address(topo, procs, pasta, tmp_path):
    topo.host.run("ip", "addr", "add", "10.77.0.3/24", "dev", "eth0")
    target = start_pasta(topo, procs, pasta, tmp_path, "-o", "10.77.0.3")
    topo.router.run("ip", "addr", "add", "10.77.0.100/24", "dev", "veth-r")
    serve(procs, topo.router, "10.77.0.100", 7004, "router")
    assert connect(target, "10.77.0.100", 7004) == "router 10.77.0.3"


def test_refused_guest_port_resets_host_client(topo, procs, pasta, tmp_path):
    start_pasta(topo, procs, pasta, tmp_path, "-t", "7005")
    out = connect(topo.router, HOST4, 7005).split()
    # the host kernel accepted, then the guest refused: the client sees a reset, fast
    assert out[0] in ("ConnectionResetError", "closed"), out
    if len(out) > 1:
        assert float(out[1]) < 2.0


def test_splice_and_no_splice_sources(topo, procs, pasta, tmp_path):
    spliced = start_pasta(topo, procs, pasta, tmp_path, "-t", "7006")
    serve(procs, spliced, "0.0.0.0", 7006, "ns")
    # spliced to the namespace's own address, which the connection comes from
    # (test_host_lo.py has the rest: loopback-only services, --host-lo-to-ns-lo)
    assert connect(topo.host, "127.0.0.1", 7006) == f"ns {HOST4}"

    tapped = start_pasta(topo, procs, pasta, tmp_path, "-t", "7007", "--no-splice")
    serve(procs, tapped, "0.0.0.0", 7007, "ns")
    # through the tap a host loopback client appears as the gateway address
    assert connect(topo.host, "127.0.0.1", 7007) == f"ns {GW4}"


def test_tcp_ns_auto_follows_host_listener(topo, procs, pasta, tmp_path):
    target = start_pasta(topo, procs, pasta, tmp_path, "-T", "auto", "-t", "none")
    assert "7008" not in ss_ports(target)
    serve(procs, topo.host, "127.0.0.1", 7008, "host")
    wait_for(lambda: "7008" in ss_ports(target), timeout=5, what="-T auto listener")
    assert connect(target, "127.0.0.1", 7008) == "host 127.0.0.1"


def test_address_bound_forward(topo, procs, pasta, tmp_path):
    """-t ADDR/PORT listens on that address only."""
    topo.host.run("ip", "addr", "add", "10.77.0.4/24", "dev", "eth0")
    target = start_pasta(topo, procs, pasta, tmp_path, "-t", "10.77.0.4/7009")
    listening = run(topo.host.cmd("ss", "-Hltn", "sport", "= :7009")).stdout
    assert "10.77.0.4:7009" in listening and "0.0.0.0:7009" not in listening
    serve(procs, target, "0.0.0.0", 7009, "ns")
    assert connect(topo.router, "10.77.0.4", 7009).split()[0] == "ns"
