"""The datagram flow table: limit, eviction of one-way flows, idle expiry (no sockets, no clock)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from common.udp.flow import Flow, FlowTable


def table(limit=3, idle=30.0, idle_replied=180.0):
    closed: list[bytes] = []
    t = FlowTable(limit=limit, idle=idle, idle_replied=idle_replied,
                  on_close=lambda f: closed.append(f.key))
    return t, closed


def test_add_get_remove():
    t, closed = table()
    f = Flow(b"a", 0.0)
    assert t.add(f) and t.get(b"a") is f and len(t) == 1
    t.remove(f)
    assert t.get(b"a") is None and closed == [] and not f.closed


def test_full_table_evicts_the_oldest_one_way_flow():
    t, closed = table(limit=3)
    flows = [Flow(k, 0.0) for k in (b"a", b"b", b"c")]
    for f in flows:
        assert t.add(f)
    t.mark_replied(flows[0])                  # a conversation: kept
    assert t.add(Flow(b"d", 1.0))
    assert closed == [b"b"] and flows[1].closed and t.evicted == 1
    assert t.add(Flow(b"e", 1.0))
    assert closed == [b"b", b"c"]
    assert set(t.flows) == {b"a", b"d", b"e"}


def test_full_table_of_conversations_refuses():
    t, closed = table(limit=2)
    for k in (b"a", b"b"):
        f = Flow(k, 0.0)
        t.add(f)
        t.mark_replied(f)
    assert not t.room() and not t.add(Flow(b"c", 0.0))
    assert closed == [] and t.refused == 2 and len(t) == 2


def test_expiry_one_way_and_replied():
    t, closed = table(limit=10, idle=30, idle_replied=180)
    one_way, talked = Flow(b"o", 0.0), Flow(b"t", 0.0)
    t.add(one_way)
    t.add(talked)
    t.mark_replied(talked)
    assert t.expire(29.0) == 0
    assert t.expire(31.0) == 1 and closed == [b"o"]
    talked.last = 100.0
    assert t.expire(279.0) == 0
    assert t.expire(281.0) == 1 and closed == [b"o", b"t"] and len(t) == 0
    assert t.expired == 2


def test_close_is_once_and_close_all():
    t, closed = table()
    f, g = Flow(b"f", 0.0), Flow(b"g", 0.0)
    t.add(f)
    t.add(g)
    t.close(f)
    t.close(f)
    assert closed == [b"f"]
    t.close_all()
    assert closed == [b"f", b"g"] and len(t) == 0


@given(st.lists(st.tuples(st.sampled_from("arc"), st.integers(0, 40)), max_size=200))
def test_limit_always_holds(ops):
    t, closed = table(limit=8)
    live: dict[bytes, Flow] = {}
    now = 0.0
    for op, n in ops:
        now += 1.0
        if op == "a":
            f = Flow(n.to_bytes(2, "big") + bytes([int(now) & 0xFF]), now)
            if t.add(f):
                live[f.key] = f
        elif op == "r" and live:
            t.mark_replied(list(live.values())[n % len(live)])
        elif op == "c" and live:
            t.close(list(live.values())[n % len(live)])
        live = {k: f for k, f in live.items() if not f.closed}
        assert len(t) <= 8
        assert set(t.flows) == set(live)
    assert len(closed) == len(set(closed))
