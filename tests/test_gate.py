"""The gate in the handlers (common.gate with TcpHandler, UdpHandler, IcmpHandler): one
decision per new flow, refusals as frames, the flow log's records and counters."""

from __future__ import annotations

import json
import socket
import struct

import pytest

from common.dataplane import DataPlane
from common.flow import FlowTable, frame_key4
from common.flowlog import FlowLog
from common.gate import Gate
from common.guest import GuestState
from common.loop import Loop
from common.packet.frames import build_ipv4_frame, udp4_frame
from common.packet.icmp import build_icmp4
from common.packet.ipv4 import IPPROTO_ICMP, IPPROTO_TCP
from common.packet.tcp import ACK, FIN, RST, SYN, TcpOptions, build_tcp4, parse_tcp
from common.policy import PolicyConfig, parse_policy_text
from common.udp.handler import UdpHandler
from tests.support import (
    GUEST_MAC,
    GW4,
    HOST4,
    OUR_MAC,
    FakeTap,
    make_conf,
    parse_frame,
    run_until,
    spin,
)

G = socket.inet_aton(HOST4)
GW = socket.inet_aton(GW4)
FAR = socket.inet_aton("198.51.100.7")


class Rig:
    def __init__(self, policy: str, action: str = "reset", flow_log=None) -> None:
        rules, default = parse_policy_text(policy, "T", None)
        self.conf = make_conf("passt", tcp_ports=["none"], udp_ports=["none"])
        self.loop = Loop()
        self.tap = FakeTap()
        self.gate = Gate(PolicyConfig(rules=tuple(rules), default=default or "allow",
                                      deny_action=action), loop=self.loop, flow_log=flow_log)
        self.dp = DataPlane(self.conf, self.loop, self.tap, GuestState(self.conf, GUEST_MAC),
                            gate=self.gate)

    def send(self, frame: bytes) -> list[bytes]:
        before = len(self.tap.frames)
        self.dp.demux(memoryview(frame))
        self.dp.tcp.flush()
        return self.tap.frames[before:]

    def syn(self, dst: bytes, dport: int, sport: int = 40000) -> bytes:
        return build_ipv4_frame(OUR_MAC, GUEST_MAC, G, dst, IPPROTO_TCP,
                                build_tcp4(G, dst, sport, dport, 1000, 0, SYN, 65535,
                                           options=TcpOptions(mss=1460)))

    def close(self) -> None:
        self.dp.stop()
        self.gate.close()
        self.loop.close()


@pytest.fixture
def rig():
    made = []

    def make(*a, **kw):
        made.append(Rig(*a, **kw))
        return made[-1]
    yield make
    for r in made:
        r.close()


def test_denied_syn_reset_or_dropped(rig):
    r = rig("deny tcp:198.51.100.0/24:443")
    (out,) = r.send(r.syn(FAR, 443))
    ip, l4 = parse_frame(out)
    tcp, _ = parse_tcp(l4)
    assert (ip.src, ip.dst) == (FAR, G) and tcp.flags == RST | ACK and tcp.ack == 1001
    assert not r.dp.tcp.conns and r.dp.tcp.counters["denied"] == 1
    assert r.gate.policy.verdicts[0].flows == 1
    d = rig("deny tcp:198.51.100.0/24:443", action="drop")
    assert d.send(d.syn(FAR, 443)) == [] and not d.dp.tcp.conns


def test_denied_datagram_and_echo_get_prohibited(rig):
    r = rig("deny 198.51.100.7")
    (out,) = r.send(udp4_frame(OUR_MAC, GUEST_MAC, G, FAR, 40000, 53, b"query"))
    ip, l4 = parse_frame(out)
    assert ip.src == FAR and (l4[0], l4[1]) == (3, 13)
    assert struct.unpack_from("!HH", l4, 28) == (40000, 53)
    assert not r.dp.udp.flows
    echo = build_icmp4(8, 0, struct.pack("!HH", 7, 1), b"ping")
    (out,) = r.send(build_ipv4_frame(OUR_MAC, GUEST_MAC, G, FAR, IPPROTO_ICMP, echo))
    _, l4 = parse_frame(out)
    assert (l4[0], l4[1]) == (3, 13) and l4[28:36] == echo[:8]
    assert not r.dp.icmp.flows
    assert r.gate.counters["denied"] == 2


def test_flow_log_records_a_tcp_connection(rig, tmp_path):
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(2)
    port = srv.getsockname()[1]
    path = tmp_path / "flows"
    r = rig("deny tcp:198.51.100.7", flow_log=FlowLog.open(str(path), 1 << 20))
    r.send(r.syn(GW, port))
    spin(r.loop)
    frames = r.tap.frames
    tcp, _ = parse_tcp(parse_frame(frames[-1])[1])
    assert tcp.flags == SYN | ACK
    isn = tcp.seq
    peer, _ = srv.accept()

    def seg(seq, ack, flags, data=b""):
        return build_ipv4_frame(OUR_MAC, GUEST_MAC, G, GW, IPPROTO_TCP,
                                build_tcp4(G, GW, 40000, port, seq, ack, flags, 65535, data))
    r.send(seg(1001, isn + 1, ACK, b"x" * 300))
    assert peer.recv(1000) == b"x" * 300
    peer.sendall(b"y" * 70)
    peer.shutdown(socket.SHUT_WR)
    spin(r.loop)
    r.send(seg(1301, isn + 1 + 70 + 1, ACK | FIN))
    spin(r.loop)
    r.send(r.syn(FAR, 80, sport=40001))               # and one denied
    assert not r.dp.tcp.conns
    r.gate.flush()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["event"], x["id"]) for x in recs] == [("open", 1), ("close", 1), ("open", 2),
                                                      ("close", 2)]
    close = recs[1]
    assert close["guest"] == f"{HOST4}:40000" and close["host"] == f"127.0.0.1:{port}"
    assert close["path"] == "loopback" and close["end"] == "fin"
    assert (close["from_guest"], close["to_guest"]) == (300, 70)
    assert close["frames_from_guest"] == 3 and close["frames_to_guest"] >= 3
    assert close["rule"] == "default allow" and close["verdict"] == "allow"
    assert recs[3]["end"] == "denied" and recs[3]["rule"] == "deny tcp:198.51.100.7"
    peer.close()
    srv.close()


def test_log_lines_are_json_of_the_record():
    from common.flowinfo import FlowRecord
    from common.gate import log_line
    r = FlowRecord("udp", "tap", "[2001:db8::2]:5353", "[2001:db8::53]:53", True, 10, None,
                   1.25, 7, "deny", 'deny udp:"odd\\é"', 2, 0)
    assert json.loads(log_line("open", r, 1796000000.1234)) == {
        "time": 1796000000.123, "event": "open", "id": 7, "proto": "udp", "path": "tap",
        "guest": "[2001:db8::2]:5353", "host": "[2001:db8::53]:53", "inbound": True,
        "verdict": "deny", "rule": 'deny udp:"odd\\é"'}
    closed = json.loads(log_line("close", r, 5.0, "timeout"))
    assert closed["to_guest"] == 10 and closed["from_guest"] is None
    assert (closed["frames_to_guest"], closed["frames_from_guest"]) == (2, 0)
    assert closed["duration"] == 1.25 and closed["end"] == "timeout"
    assert log_line("close", r, 5.0, "fin").isascii()


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_flow_log_says_why_flows_ended_evicted_timeout_rst(rig, tmp_path):
    """The ends other than fin/denied/exit, from the handlers' real paths: a UDP flow
    evicted from a full table, UDP flows idle past their timeout, a TCP connection the
    guest resets."""
    path = tmp_path / "flows"
    flog = FlowLog.open(str(path), 1 << 20)
    loop = Loop()
    conf = make_conf("passt", tcp_ports=["none"], udp_ports=["none"])
    gate = Gate(PolicyConfig(), loop=loop, flow_log=flog)
    udp = UdpHandler(conf, loop, FakeTap(), GuestState(conf, GUEST_MAC),
                     flows=FlowTable(loop, limit=2, gate=gate), idle=0.15, idle_replied=0.4)
    udp.expiry.grid = 0.01
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    try:
        for gport in (40011, 40012, 40013):
            f = udp4_frame(OUR_MAC, GUEST_MAC, G, GW, gport, port, b"x")
            udp.on_frame4(memoryview(f), 14, 34, len(f), frame_key4(memoryview(f), 14, 34))
        run_until(loop, lambda: not udp.flows, 2.0, what="the flows to expire")
    finally:
        udp.close_all()
        srv.close()
    gate.flush()
    ends = {r["guest"]: r["end"] for r in _records(path) if r["event"] == "close"}
    assert ends == {f"{HOST4}:40011": "evicted", f"{HOST4}:40012": "timeout",
                    f"{HOST4}:40013": "timeout"}
    gate.close()
    loop.close()

    tpath = tmp_path / "tcp-flows"
    lsn = socket.create_server(("127.0.0.1", 0))
    lsn.settimeout(2)
    tport = lsn.getsockname()[1]
    r = rig("", flow_log=FlowLog.open(str(tpath), 1 << 20))
    r.send(r.syn(GW, tport))
    spin(r.loop)
    tcp, _ = parse_tcp(parse_frame(r.tap.frames[-1])[1])
    assert tcp.flags == SYN | ACK
    peer, _ = lsn.accept()
    r.send(build_ipv4_frame(OUR_MAC, GUEST_MAC, G, GW, IPPROTO_TCP,
                            build_tcp4(G, GW, 40000, tport, 1001, tcp.seq + 1, ACK, 65535)))
    spin(r.loop)
    r.send(build_ipv4_frame(OUR_MAC, GUEST_MAC, G, GW, IPPROTO_TCP,
                            build_tcp4(G, GW, 40000, tport, 1001, 0, RST, 0)))
    spin(r.loop)
    assert not r.dp.tcp.conns
    r.gate.flush()
    (close,) = [x for x in _records(tpath) if x["event"] == "close"]
    assert close["end"] == "rst" and close["host"] == f"127.0.0.1:{tport}"
    peer.close()
    lsn.close()
