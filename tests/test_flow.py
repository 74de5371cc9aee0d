"""The flow table (`common.flow`): keys, one limit, eviction of one-way datagram flows,
descriptors from the budget, the one close point, timers armed only when needed."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from common.budget import FdBudget
from common.flow import (
    ICMP,
    PROTO_UDP,
    TCP,
    UDP,
    DatagramExpiry,
    Flow,
    FlowTable,
    echo_key4,
    frame_key4,
    frame_key6,
    key_addrs,
    key_ports,
    make_key,
)
from common.loop import Loop
from tests.support import run_until, spin

G4, R4 = bytes([10, 0, 0, 2]), bytes([192, 0, 2, 1])


class Rig:
    def __init__(self, limit: int = 3, fds: int = 1000) -> None:
        self.loop = Loop()
        self.fds = FdBudget(nofile=1 << 16)
        self.fds.limit, self.fds.host_reserve = fds, 0
        self.table = FlowTable(self.loop, fds=self.fds, limit=limit)
        self.closed: list[tuple[bytes | None, str]] = []
        self.woken: list[Flow] = []
        self.why: dict[Flow, str] = {}
        for kind in (TCP, UDP, ICMP):
            self.table.serve(kind, release=self._release, timer=self._timer)
        self.next: dict[Flow, float] = {}

    def _release(self, flow: Flow) -> None:
        self.closed.append(flow.key)

    def _timer(self, flow: Flow, now: float) -> float:
        self.woken.append(flow)
        return self.next.pop(flow, 0.0)

    def open(self, key: bytes, kind: int = UDP, nfds: int = 1) -> Flow | None:
        if not self.table.reserve(kind, nfds, by_guest=True):
            return None
        f = Flow(kind, key, False, False, time.monotonic(), (R4, 53))
        self.table.add(f, nfds)
        return f


def test_keys_from_frames_and_from_parts_agree():
    frame = bytearray(14 + 20 + 8)
    frame[14] = 0x45
    frame[14 + 12:14 + 16] = G4
    frame[14 + 16:14 + 20] = R4
    frame[34:38] = (40000).to_bytes(2, "big") + (53).to_bytes(2, "big")
    key = frame_key4(memoryview(frame), 14, 34)
    assert key == make_key(G4, R4, 40000, 53)
    assert key_addrs(key, False) == (G4, R4) and key_ports(key, False) == (40000, 53)
    # IPv4 options: the ports come from the transport header wherever it starts
    frame2 = frame[:34] + bytes(4) + frame[34:]
    frame2[14] = 0x46
    assert frame_key4(memoryview(frame2), 14, 38) == key
    g6, r6 = bytes(15) + b"\x02", b"\x20\x01" + bytes(13) + b"\x01"
    f6 = bytearray(14 + 40 + 8)
    f6[14 + 8:14 + 24], f6[14 + 24:14 + 40] = g6, r6
    f6[54:58] = (1).to_bytes(2, "big") + (2).to_bytes(2, "big")
    assert frame_key6(memoryview(f6), 14, 54) == make_key(g6, r6, 1, 2)
    echo = bytearray(frame)
    echo[34 + 4:34 + 6] = (0x1234).to_bytes(2, "big")
    assert echo_key4(memoryview(echo), 14, 34) == G4 + R4 + b"\x12\x34"


def test_index_and_close_once():
    r = Rig()
    f = r.open(b"a")
    assert r.table.index[PROTO_UDP][b"a"] is f and len(r.table) == 1 and r.fds.used == 1
    r.table.close(f, "closed")
    r.table.close(f, "closed")
    assert r.closed == [b"a"] and f.closed and len(r.table) == 0 and r.fds.used == 0
    assert b"a" not in r.table.index[PROTO_UDP]


def test_full_table_evicts_the_oldest_one_way_datagram_flow():
    r = Rig(limit=3)
    flows = [r.open(k) for k in (b"a", b"b", b"c")]
    r.table.mark_replied(flows[0])                  # a conversation: kept
    assert r.open(b"d") is not None
    assert r.closed == [b"b"] and flows[1].closed and r.table.stats(UDP)["evicted"] == 1
    assert r.open(b"e") is not None
    assert r.closed == [b"b", b"c"]
    assert set(r.table.index[PROTO_UDP]) == {b"a", b"d", b"e"}


def test_tcp_is_never_evicted_and_a_full_table_refuses():
    r = Rig(limit=2)
    r.open(b"t", TCP)
    u = r.open(b"u")
    r.table.mark_replied(u)
    assert r.open(b"x") is None and r.table.counters["refused"] == 1
    assert r.closed == [] and len(r.table) == 2


def test_short_descriptors_evict_a_one_way_flow_that_holds_some():
    r = Rig(limit=100, fds=2)
    r.open(b"in", UDP, nfds=0)                     # an inbound flow: the listener's socket
    r.open(b"a")
    r.open(b"b")
    assert r.open(b"c") is not None and r.closed == [b"a"] and r.fds.used == 2


def test_timers_fire_at_the_earliest_time_asked_and_only_then():
    r = Rig()
    f, g = r.open(b"f"), r.open(b"g")
    now = time.monotonic()
    r.table.arm(f, now + 10.0)
    r.table.arm(f, now + 0.02)                     # earlier: a new entry
    r.table.arm(f, now + 5.0)                      # later: nothing
    r.table.arm(g, now + 0.04)
    r.next[f] = now + 0.06                         # f asks again once woken
    run_until(r.loop, lambda: len(r.woken) >= 3, 2.0)
    assert r.woken == [f, g, f]
    r.table.close(g, "closed")
    r.table.arm(g, time.monotonic())               # closed: never woken
    spin(r.loop, 0.05)
    assert r.woken == [f, g, f]


def test_datagram_expiry_one_way_and_replied():
    r = Rig(limit=10)
    exp = DatagramExpiry(r.table, 0.05, 0.3)
    exp.grid = 0.01
    r.table.serve(UDP, release=r._release, timer=exp)
    one_way, talked = r.open(b"o"), r.open(b"t")
    for f in (one_way, talked):
        exp.start(f)
    r.table.reply_seen(talked, time.monotonic())
    run_until(r.loop, lambda: one_way.closed, 2.0)
    assert not talked.closed
    run_until(r.loop, lambda: talked.closed, 2.0)
    assert r.closed == [b"o", b"t"] and r.table.stats(UDP)["expired"] == 2


@given(st.lists(st.tuples(st.sampled_from("arc"), st.integers(0, 40)), max_size=200))
def test_limit_always_holds(ops):
    r = Rig(limit=8, fds=6)
    live: dict[bytes, Flow] = {}
    for i, (op, n) in enumerate(ops):
        if op == "a":
            f = r.open(n.to_bytes(2, "big") + i.to_bytes(2, "big"))
            if f is not None:
                live[f.key] = f
        elif op == "r" and live:
            r.table.mark_replied(list(live.values())[n % len(live)])
        elif op == "c" and live:
            r.table.close(list(live.values())[n % len(live)], "closed")
        live = {k: f for k, f in live.items() if not f.closed}
        assert len(r.table) <= 8 and r.fds.used <= 6
        assert set(r.table.index[PROTO_UDP]) == set(live) and r.fds.used == len(live)
    assert len(r.closed) == len(set(r.closed))


def test_a_kind_at_its_quota_evicts_its_own_one_way_flows_first():
    r = Rig(limit=100)
    r.table.serve(ICMP, release=r._release, timer=r._timer, quota=2)
    u = r.open(b"u")                               # older, but another kind
    r.open(b"p1", ICMP)
    r.open(b"p2", ICMP)
    assert r.open(b"p3", ICMP) is not None
    assert r.closed == [b"p1"] and not u.closed
    for f in r.table.of_kind(ICMP):
        r.table.mark_replied(f)
    assert r.open(b"p4", ICMP) is None and r.table.stats(ICMP)["refused"] == 1
