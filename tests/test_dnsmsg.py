"""DNS answers read for their addresses (common.dnsmsg): real message layouts, compression,
hostile messages, and DNS over TCP reassembled from bytes that may repeat."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from common.dnsmsg import AAAA, CNAME, A, BadMessage, DnsStream, parse_answer


def name(text: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\0"


def response(question: str, records, qtype: int = A, rcode: int = 0, qid: int = 0x1234) -> bytes:
    """A response as resolvers write it: the question once, owners as pointers to it."""
    head = struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, len(records), 0, 0)
    body = name(question) + struct.pack("!HH", qtype, 1)
    for owner, rtype, ttl, data in records:
        owner_bytes = struct.pack("!H", 0xC00C) if owner == question else name(owner)
        if rtype == CNAME:
            data = name(data)
        body += owner_bytes + struct.pack("!HHIH", rtype, 1, ttl, len(data)) + data
    return head + body


A1 = socket.inet_aton("192.0.2.80")
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::80")


def test_a_aaaa_cname():
    msg = response("WWW.Allowed.Test", [("WWW.Allowed.Test", CNAME, 300, "edge.allowed.test"),
                                        ("edge.allowed.test", A, 60, A1),
                                        ("edge.allowed.test", AAAA, 30, A6),
                                        ("edge.allowed.test", 16, 30, b"\x03txt")])
    q, records = parse_answer(msg)
    assert q == "www.allowed.test"
    assert records == [("www.allowed.test", CNAME, 300, "edge.allowed.test"),
                       ("edge.allowed.test", A, 60, A1), ("edge.allowed.test", AAAA, 30, A6)]


def test_not_an_answer():
    ok = response("a.test", [("a.test", A, 1, A1)])
    parse_answer(ok)
    query = bytearray(ok)
    query[2] &= 0x7F                                   # QR=0: a query
    for bad in (bytes(query), response("a.test", [], rcode=3), ok[:11],
                ok[:-2],                              # record data cut short
                response("a.test", [("a.test", A, 1, A1)])[:12] + b"\xc0\x0c"):  # self pointer
        with pytest.raises(BadMessage):
            parse_answer(bad)


def test_pointer_loops_and_forward_pointers_refused():
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    with pytest.raises(BadMessage, match="backwards"):
        parse_answer(head + b"\xc0\x0e\xc0\x0c" + b"\0\1\0\1")
    with pytest.raises(BadMessage, match="dot"):
        parse_answer(head + b"\x03a.b\0" + b"\0\1\0\1")


def test_garbage_never_raises_anything_else():
    rnd = random.Random(5)
    base = response("a.test", [("a.test", CNAME, 5, "b.test"), ("b.test", A, 5, A1)])
    for _ in range(20000):
        msg = bytearray(base)
        for _ in range(rnd.randrange(1, 6)):
            msg[rnd.randrange(len(msg))] = rnd.randrange(256)
        msg = msg[:rnd.randrange(len(msg) + 1)] if rnd.random() < 0.3 else msg
        try:
            parse_answer(bytes(msg))
        except BadMessage:
            pass


def test_tcp_stream_reassembly_with_repeats():
    m1 = response("a.test", [("a.test", A, 5, A1)])
    m2 = response("b.test", [("b.test", AAAA, 5, A6)], qtype=AAAA)
    wire = struct.pack("!H", len(m1)) + m1 + struct.pack("!H", len(m2)) + m2
    isn = 0xFFFFFFF0                                  # wraps around 2^32 on the way
    s = DnsStream(isn)
    got = []
    got += s.feed(isn, wire[:5])
    got += s.feed(isn, wire[:5])                      # a retransmission
    got += s.feed(isn + 3, wire[3:40])                # overlaps what we had
    got += s.feed((isn + 40) & 0xFFFFFFFF, wire[40:])
    assert got == [m1, m2]
    assert s.feed(isn, wire) == []                    # all old
    t = DnsStream(100)
    assert t.feed(105, wire[5:]) == [] and t.broken   # a gap: give up
    assert t.feed(100, wire) == []
