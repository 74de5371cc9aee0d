"""Mangled frames from the guest are counted and dropped: nothing escapes, no flow leaks.

The whole data plane (demux, ARP/DHCP/NDP/DHCPv6 responders, TCP, UDP, ICMP)
takes tens of thousands of frames derived from valid ones of every kind the
guest sends (ARP, DHCP, DHCPv6, NDP, TCP opening and mid-connection, UDP,
ICMP echo, IPv6 extension headers): bytes flipped, cut short, padded, length
fields rewritten.  It runs in a network namespace of its own with only
loopback (`in_fresh_netns`), so a mangled address reaches nothing.  Any
exception escaping the demux, a handler error in the loop, or a TCP flow
left without a deadline once the flood settles is a failure.
"""

from __future__ import annotations

import random
import socket
import struct
import traceback

import pytest

from common.dataplane import DataPlane
from common.guest import GuestState
from common.loop import Loop
from common.packet.arp import Arp, build_arp
from common.packet.frames import build_ipv4_frame, build_ipv6_frame, udp4_frame, udp6_frame
from common.packet.icmp import build_icmp4, build_icmp6
from common.packet.tcp import ACK, PSH, SYN, TcpOptions, build_tcp4, build_tcp6, parse_tcp
from tests.support import (
    GUEST_MAC,
    GW4,
    HOST4,
    HOST6,
    OUR_MAC,
    FakeTap,
    in_fresh_netns,
    make_conf,
    spin,
)

G4, GW = socket.inet_aton(HOST4), socket.inet_aton(GW4)
G6 = socket.inet_pton(socket.AF_INET6, HOST6)
GUEST_LL = socket.inet_pton(socket.AF_INET6, "fe80::5054:ff:fe12:3456")
ALL_ROUTERS = socket.inet_pton(socket.AF_INET6, "ff02::2")
ALL_DHCP = socket.inet_pton(socket.AF_INET6, "ff02::1:2")
BCAST = b"\xff" * 6


def seeds(conf, listen_port: int, conn_seq: int, conn_ack: int) -> list[bytes]:
    our_ll = conf.ip6.our_ll.packed
    gw6 = conf.ip6.gateway.packed if conf.ip6.gateway else our_ll
    dhcp = bytearray(240)
    dhcp[0:4] = b"\x01\x01\x06\x00"
    dhcp[28:34] = GUEST_MAC
    dhcp[236:240] = b"\x63\x82\x53\x63"
    dhcp += bytes((53, 1, 1, 55, 4, 1, 3, 6, 15, 255))
    dhcpv6 = bytes((1, 0x12, 0x34, 0x56)) + struct.pack("!HH", 1, 10) + \
        b"\x00\x03\x00\x01" + GUEST_MAC + struct.pack("!HHIII", 3, 12, 1, 0, 0)
    hop_by_hop = bytes((17, 0, 1, 4, 0, 0, 0, 0))          # next: UDP, PadN
    fragment = bytes((17, 0, 0, 1, 0, 0, 0, 1))             # a first fragment of UDP
    udp6 = bytes(struct.pack("!HHHH", 40001, 5353, 12, 0)) + b"abcd"
    return [
        bytes(BCAST + GUEST_MAC + b"\x08\x06") + build_arp(Arp(1, GUEST_MAC, G4, bytes(6), GW)),
        udp4_frame(BCAST, GUEST_MAC, bytes(4), b"\xff" * 4, 68, 67, dhcp),
        udp6_frame(b"\x33\x33\x00\x01\x00\x02", GUEST_MAC, GUEST_LL, ALL_DHCP, 546, 547, dhcpv6),
        build_ipv6_frame(b"\x33\x33\x00\x00\x00\x02", GUEST_MAC, GUEST_LL, ALL_ROUTERS, 58,
                         build_icmp6(GUEST_LL, ALL_ROUTERS, 133, 0, bytes(4),
                                     bytes((1, 1)) + GUEST_MAC)),
        build_ipv6_frame(OUR_MAC, GUEST_MAC, GUEST_LL, our_ll, 58,
                         build_icmp6(GUEST_LL, our_ll, 135, 0, bytes(4),
                                     our_ll + bytes((1, 1)) + GUEST_MAC)),
        build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 6,
                         build_tcp4(G4, GW, 40000, listen_port, 7, 0, SYN, 65535,
                                    options=TcpOptions(mss=1460, wscale=7))),
        build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 6,
                         build_tcp4(G4, GW, 40001, listen_port, conn_seq, conn_ack,
                                    ACK | PSH, 512, b"payload" * 20)),
        build_ipv6_frame(OUR_MAC, GUEST_MAC, G6, gw6, 6,
                         build_tcp6(G6, gw6, 40002, 9, 1, 0, SYN, 65535,
                                    options=TcpOptions(mss=1440, wscale=2, sack_permitted=True,
                                                       timestamps=(1, 0)))),
        udp4_frame(OUR_MAC, GUEST_MAC, G4, GW, 40003, 53, b"\x12\x34" + bytes(10)),
        udp6_frame(OUR_MAC, GUEST_MAC, G6, gw6, 40004, 9, b"x" * 100),
        build_ipv6_frame(OUR_MAC, GUEST_MAC, G6, gw6, 0, hop_by_hop + udp6),
        build_ipv6_frame(OUR_MAC, GUEST_MAC, G6, gw6, 44, fragment + udp6),
        build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 1,
                         build_icmp4(8, 0, struct.pack("!HH", 77, 1), b"ping" * 8)),
        build_ipv6_frame(OUR_MAC, GUEST_MAC, G6, gw6, 58,
                         build_icmp6(G6, gw6, 128, 0, struct.pack("!HH", 78, 1), b"ping6")),
    ]


def mangle(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    how = rng.randrange(6)
    if how == 0:                                   # flip a few bytes anywhere
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == 1:                                 # flip bytes in the headers only
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 14 + 40 + 60))] = rng.randrange(256)
    elif how == 2:                                 # cut short
        del b[rng.randrange(len(b)):]
    elif how == 3:                                 # trailing junk
        b += rng.randbytes(rng.randint(1, 200))
    elif how == 4:                                 # lie about the lengths
        if b[12:14] == b"\x08\x00" and len(b) >= 18:
            struct.pack_into("!H", b, 16, rng.choice((0, 19, 20, 21, len(b), 0xFFFF)))
            b[14] = (b[14] & 0xF0) | rng.choice((0, 4, 5, 6, 15))
        elif b[12:14] == b"\x86\xdd" and len(b) >= 20:
            struct.pack_into("!H", b, 18, rng.choice((0, 1, 7, len(b), 0xFFFF)))
        if len(b) > 60:                            # and the transport header's own
            b[rng.randrange(34, min(len(b), 80))] = rng.choice((0, 0xFF, 0x50, 0xF0))
    else:                                          # garbage wearing a valid Ethernet header
        b = b[:14] + rng.randbytes(rng.randint(0, 120))
    return bytes(b)


def flood(rounds: int, seed: int) -> dict:
    """Feed `rounds` frames (mangled nine times in ten) and report what came of them."""
    rng = random.Random(seed)
    conf = make_conf("pasta", tcp_ns=["none"], udp_ns=["none"], tcp_ports=["none"],
                     udp_ports=["none"])
    loop = Loop()
    tap = FakeTap()
    dp = DataPlane(conf, loop, tap, GuestState(conf, GUEST_MAC))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    # one real connection, so mangled segments also meet an established flow
    dp.demux(memoryview(build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 6, build_tcp4(
        G4, GW, 40001, port, 99, 0, SYN, 65535, options=TcpOptions(mss=1460, wscale=7)))))
    spin(loop, 0.1)
    synack = next(parse_tcp(f[34:])[0] for f in tap.frames
                  if len(f) > 34 and f[23] == 6 and parse_tcp(f[34:])[0].flags & SYN)
    dp.demux(memoryview(build_ipv4_frame(OUR_MAC, GUEST_MAC, G4, GW, 6, build_tcp4(
        G4, GW, 40001, port, 100, synack.seq + 1, ACK, 512))))
    established = len(dp.tcp.conns)
    corpus = seeds(conf, port, 100, synack.seq + 1)

    escaped: list[str] = []
    for i in range(rounds):
        frame = mangle(rng, rng.choice(corpus)) if rng.random() < 0.9 else rng.choice(corpus)
        try:
            dp.demux(memoryview(frame))
            dp.tcp.flush()
        except Exception:  # what we are looking for
            if len(escaped) < 5:
                escaped.append(frame.hex() + "\n" + traceback.format_exc())
        if i % 500 == 499:
            spin(loop, 0.01)
        if i % 2000 == 1999:
            del tap.frames[:]
    # let refused connections, resets and timers settle
    spin(loop, 1.0)
    # a flow may stay only with a deadline that ends it (a handshake a mangled SYN began)
    # or as the connection made above
    left = [repr(c) for c in dp.tcp.conns.values()
            if not c.deadline and c.guest_port != 40001]
    report = {
        "rounds": rounds,
        "established_before": established,
        "escaped": escaped,
        # the demux catches what a handler raises: counted there, never escaping
        "handler_errors": loop.handler_errors + dp.demux.errors.total,
        "tcp_left": left,
        "udp_flows": len(dp.udp.flows) if dp.udp else 0,
        "dropped": dict(dp.demux.counters),
        "tcp": dict(dp.tcp.counters),
        "frames_out": tap.frames_out,
    }
    dp.stop()
    loop.close()
    listener.close()
    return report



@pytest.mark.parametrize("seed", [11, 12])
def test_mangled_frames_are_dropped_without_harm(seed):
    report = in_fresh_netns(lambda: flood(30000, seed))
    assert report["escaped"] == [], report["escaped"][0]
    assert report["handler_errors"] == 0
    assert report["established_before"] == 1
    assert report["tcp_left"] == [], report["tcp_left"]
    dropped = report["dropped"]
    # the mangling reached every layer: Ethernet, both IP versions, TCP's own checks
    for why in ("runt", "ethertype", "ipv4", "ipv6", "fragment"):
        assert dropped.get(why, 0) > 0, dropped
    tcp = report["tcp"]
    assert tcp.get("malformed", 0) + tcp.get("runt", 0) > 0, tcp
    assert tcp.get("duplicate", 0) + tcp.get("out_of_order", 0) > 0, tcp   # hit the live flow
