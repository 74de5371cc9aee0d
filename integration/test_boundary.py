"""The guest may never reach the host's loopback except through the mapped address.

A raw-frame guest (passt: its UNIX socket; pasta: an AF_PACKET socket on the
tap in the namespace) sends TCP SYNs, UDP datagrams and ICMP echo requests
with every address an attacker would try: loopback and unspecified
destinations and sources, IPv4-mapped IPv6 forms, port 0, and for TCP
multicast and broadcast destinations.  Listeners on the host's 127.0.0.1 and
::1 (in the test "host" namespace) record what arrives: nothing may, and the
drop counters (logged with -d when the data plane stops) must rise by
exactly the number of probes.  The positive control: with the default
mapping, the same traffic to the gateway address reaches those listeners.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time

import pytest

from integration.conftest import GW4, GW6, HOST4, HOST6, our_command, wait_for
from integration.guest.hostnet import socket_dir
from integration.rawguest import (
    PasstGuest,
    TapGuest,
    echo_request,
    is_echo_reply,
    tcp_flags_to,
    tcp_syn,
    udp,
)
from integration.test_icmp import allow_ping_sockets

PORT = 7101
BCAST_MAC = b"\xff" * 6
GUEST_MAC = bytes.fromhex("525400123456")

LISTEN = """
import json, select, socket, sys
port = int(sys.argv[1])
socks = []
for fam, addr in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(fam, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((addr, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        socks.append(s)
print('listening', flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        if s.type == socket.SOCK_STREAM:
            c, peer = s.accept()
            c.settimeout(0.5)
            try:
                data = c.recv(100)
            except OSError:
                data = b''
            c.close()
            what = {'proto': 'tcp', 'data': data.decode(errors='replace')}
        else:
            data, peer = s.recvfrom(2000)
            what = {'proto': 'udp', 'data': data.decode(errors='replace')}
        what['local'] = s.getsockname()[0]
        print(json.dumps(what), flush=True)
"""

# (source, destination, source port, destination port), each sent as TCP SYN and UDP
ADDR_PROBES = [
    (HOST4, "127.0.0.1", 40100, PORT), (HOST4, "127.3.4.5", 40101, PORT),
    (HOST4, "0.0.0.0", 40102, PORT), ("127.0.0.1", GW4, 40103, PORT),
    ("0.0.0.0", GW4, 40104, PORT),
    (HOST6, "::1", 40105, PORT), (HOST6, "::", 40106, PORT),
    (HOST6, "::ffff:127.0.0.1", 40107, PORT), (HOST6, "::ffff:0.0.0.0", 40108, PORT),
    (HOST6, "::ffff:" + GW4, 40109, PORT), ("::1", GW6, 40110, PORT), ("::", GW6, 40111, PORT),
    ("::ffff:" + HOST4, GW6, 40112, PORT),
]
PORT0_PROBES = [(HOST4, GW4, 0, PORT), (HOST4, GW4, 40120, 0), (HOST6, GW6, 0, PORT),
                (HOST6, GW6, 40121, 0)]
CAST_PROBES = [(HOST4, "224.0.0.1", 40130, PORT), (HOST4, "255.255.255.255", 40131, PORT),
               (HOST4, "10.77.0.255", 40132, PORT), (HOST6, "ff02::1", 40133, PORT)]
# (source, destination, identifier) for ICMP echo requests
ECHO_PROBES = [(HOST4, "127.0.0.1", 0x7101), (HOST4, "0.0.0.0", 0x7102),
               ("127.0.0.1", GW4, 0x7103), (HOST6, "::1", 0x7104), (HOST6, "::", 0x7105),
               (HOST6, "::ffff:127.0.0.1", 0x7106), ("::1", GW6, 0x7107)]
CONTROL_ECHO = {GW4: 0x7201, GW6: 0x7202}


def _counters(stderr: str, name: str) -> dict[str, int]:
    """The last `NAME: key n, key n` line the data plane logged when it stopped."""
    found: dict[str, int] = {}
    for line in stderr.splitlines():
        m = re.fullmatch(rf"{name}: ((?:\w+ \d+(?:, )?)+)", line.strip())
        if m:
            found = {k: int(v) for k, v in (p.split() for p in m.group(1).split(", "))}
    return found


def _listen(procs, ns):
    p = procs.start(ns.cmd(sys.executable, "-c", LISTEN, str(PORT)), text=True)
    assert p.stdout.readline().strip() == "listening", p.stderr.read()
    return p


def _arrivals(p) -> list[dict]:
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=5)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _start(mode, topo, procs, tmp, variant):
    if mode == "passt":
        path = str(tmp / "passt.socket")
        p = procs.start(topo.host.cmd(*our_command("passt"), "-f", "-d", "-s", path, *variant),
                        text=True)
        return p, PasstGuest(path, timeout=20), GUEST_MAC
    target = topo.target()
    allow_ping_sockets(topo.host)
    p = procs.start(topo.host.cmd(*our_command("pasta"), "-f", "-d", "--config-net", "-t", "none",
                                  "-u", "none", "-T", "none", "-U", "none", *variant,
                                  "--netns", target.name), text=True)
    wait_for(lambda: HOST4 in target.run("ip", "-4", "addr", "show", "dev", "eth0",
                                         check=False).stdout, timeout=20, what="pasta's tap")
    link = json.loads(target.run("ip", "-j", "link", "show", "dev", "eth0").stdout)[0]
    return p, TapGuest(target.cmd(), "eth0"), bytes.fromhex(link["address"].replace(":", ""))


@pytest.mark.parametrize("mode", ["passt", "pasta"])
@pytest.mark.parametrize("variant", [(), ("--no-map-gw",)], ids=["default", "no-map-gw"])
def test_guest_never_reaches_host_loopback(topo, procs, tmp_path, mode, variant):
    allow_ping_sockets(topo.host)
    listener = _listen(procs, topo.host)
    with socket_dir() as d:
        prog, guest, mac = _start(mode, topo, procs, d, variant)
        try:
            for src, dst, sp, dp in ADDR_PROBES + PORT0_PROBES + CAST_PROBES:
                tag = f"bad {src} {dst} {sp} {dp}".encode()
                guest.send(tcp_syn(BCAST_MAC, mac, src, dst, sp, dp))
                guest.send(udp(BCAST_MAC, mac, src, dst, sp, dp, tag))
            for src, dst, ident in ECHO_PROBES:
                guest.send(echo_request(BCAST_MAC, mac, src, dst, ident))
            # the positive control: the gateway is the host's loopback, unless --no-map-gw
            for src, gw, sp in ((HOST4, GW4, 40200), (HOST6, GW6, 40201)):
                guest.send(tcp_syn(BCAST_MAC, mac, src, gw, sp, PORT))
                guest.send(udp(BCAST_MAC, mac, src, gw, sp, PORT, f"control {gw}".encode()))
                guest.send(echo_request(BCAST_MAC, mac, src, gw, CONTROL_ECHO[gw]))
            frames = guest.recv(2.0)
        finally:
            guest.close()
        time.sleep(0.3)
        prog.send_signal(signal.SIGTERM)
        _, err = prog.communicate(timeout=15)
    arrived = _arrivals(listener)

    bad_idents = {ident for _, _, ident in ECHO_PROBES}
    replies = {i for i in bad_idents | set(CONTROL_ECHO.values())
               if any(is_echo_reply(f, i) for f in frames)}
    assert not replies & bad_idents, f"echo replies from loopback: {replies & bad_idents}"
    assert not [a for a in arrived if a["data"].startswith("bad")], arrived
    if variant:
        assert arrived == [], arrived
    else:
        got = sorted((a["proto"], a["local"]) for a in arrived)
        assert got == [("tcp", "127.0.0.1"), ("tcp", "::1"), ("udp", "127.0.0.1"),
                       ("udp", "::1")], arrived
        assert replies == set(CONTROL_ECHO.values()), replies

    tcp, udp_c, icmp = (_counters(err, n) for n in ("tcp", "udp", "icmp"))
    n_addr, n_port0, n_cast = len(ADDR_PROBES), len(PORT0_PROBES), len(CAST_PROBES)
    assert tcp.get("bad_addr") == n_addr, (tcp, err[-3000:])
    assert tcp.get("port_zero") == n_port0, tcp
    assert tcp.get("bad_dst") == n_cast, tcp
    assert udp_c.get("bad_addr") == n_addr, udp_c
    assert udp_c.get("port_zero") == n_port0, udp_c
    assert udp_c.get("bad_dst", 0) + udp_c.get("multicast", 0) == n_cast, udp_c
    assert icmp.get("bad_addr") == len(ECHO_PROBES), icmp


HOLD = """
import socket, sys
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(('127.0.0.1', int(sys.argv[1])))
ls.listen(1024)
print('listening', flush=True)
held = []
while True:
    held.append(ls.accept()[0])
"""


def test_flow_limits_follow_the_descriptor_limit(topo, procs, tmp_path):
    """passt under RLIMIT_NOFILE 300: a guest opening 300 connections meets our
    descriptor budget (counted, answered with a reset), never EMFILE, and new connections
    work again once the guest closes its own."""
    from common.budget import FdBudget
    from common.packet.tcp import RST, SYN

    nofile, n = 300, 300
    limit = FdBudget(nofile).guest_limit         # nothing but these connections holds any
    hold = procs.start(topo.host.cmd(sys.executable, "-c", HOLD, str(PORT)), text=True)
    assert hold.stdout.readline().strip() == "listening"
    with socket_dir() as d:
        path = str(d / "passt.socket")
        prog = procs.start(topo.host.cmd("prlimit", f"--nofile={nofile}:{nofile}", "--",
                                         *our_command("passt"), "-f", "-d", "-s", path,
                                         "-t", str(FWD)), text=True)
        guest = PasstGuest(path, timeout=20)
        try:
            for sport in range(30000, 30000 + n):
                guest.send(tcp_syn(BCAST_MAC, GUEST_MAC, HOST4, GW4, sport, PORT))
            frames = guest.recv(3.0)
            synacks = len({_synack_port(f) for f in frames} - {None})   # (and resent)
            # the guest's share is spent, the host's reserve is not: a forwarded port
            # still takes connections to the guest
            topo.host.run(sys.executable, "-c", POKE, str(FWD))
            forwarded = [f for f in guest.recv(1.0) if tcp_flags_to(f, FWD) == SYN]
            for sport in range(30000, 30000 + n):        # the guest gives up on all of them
                guest.send(_tcp(GUEST_MAC, HOST4, GW4, sport, PORT, 1001, RST))
            guest.recv(0.5)
            guest.send(tcp_syn(BCAST_MAC, GUEST_MAC, HOST4, GW4, 31000, PORT))
            again = [f for f in guest.recv(2.0) if _synack_port(f) == 31000]
        finally:
            guest.close()
        time.sleep(0.2)
        prog.send_signal(signal.SIGTERM)
        _, err = prog.communicate(timeout=15)
    tcp = _counters(err, "tcp")
    assert synacks == limit, (synacks, limit, tcp)
    assert tcp.get("limit") == n - limit, tcp
    assert "socket_fail" not in tcp and "Too many open files" not in err, err[-2000:]
    assert again, "a new connection after the guest closed its own"
    assert forwarded, "a forwarded port's connection reached the guest"


FWD = 7202
POKE = """
import socket, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3)
s.close()
"""


def _tcp(mac: bytes, src: str, dst: str, sport: int, dport: int, seq: int, flags: int) -> bytes:
    from common.packet.frames import build_ipv4_frame
    from common.packet.tcp import build_tcp4
    from integration.rawguest import packed
    s, d = packed(src), packed(dst)
    return build_ipv4_frame(BCAST_MAC, mac, s, d, 6, build_tcp4(s, d, sport, dport, seq, 0,
                                                                flags, 65535))


def _synack_port(frame: bytes) -> int | None:
    """The guest port a SYN-ACK goes to, or None."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    l4 = 14 + (frame[14] & 0x0F) * 4
    if frame[l4 + 13] & 0x12 != 0x12:
        return None
    return frame[l4 + 2] << 8 | frame[l4 + 3]
