"""Structure-aware, seeded fuzzing of everything a guest can send, through both tap backends.

`FrameMaker(rng, ctx)` builds frames as a guest would (ARP, DHCP, DHCPv6,
NDP, ICMP and ICMPv6, UDP and TCP over IPv4 and IPv6, IPv6 extension
header chains, payloads up to 64 KiB) and then, most of the time, mutates
them knowing where their fields are: lengths, header lengths, offsets,
flags, protocol numbers, addresses and ports set to the values that break
parsers (0, 1, just short, just long, all ones, loopback, multicast...),
TLV option lengths inside DHCP, DHCPv6, NDP and TCP options, many repeated
options; or bytes flipped, frames cut short, padded or spliced together.
It also plays a guest that follows along: it learns our SYN-ACKs and data
from what we send back, and answers within (or just outside) the window,
so that mutations also meet live TCP connections in every state.

`run(frames, seed)` is the harness.  Call it in a network namespace of its
own (`tests.support.in_fresh_netns`): it makes a tap device there and one
loop with two real data planes, pasta's on a `TunTap` (frames written with
an AF_PACKET socket on the tap) and passt's on a `StreamTap` (a socketpair:
length-prefixed frames), each frame going to one of them.  Real host
sockets on the namespace's loopback are what the gateway maps to: TCP and
UDP echo services, plus forwarded ports that a host client connects and
sends to now and then (inbound flows).  After the frames, it waits for
flows to end and reports:

- exceptions that escaped a handler (the demux and loop counts, by name);
- flows left in any table after expiry (timeouts are shortened for that
  phase only), and descriptors left open beyond those we began with;
- RSS sampled along the way; frames in and out; the drop counters.

The same seed gives the same frames (`random.Random(seed)` only); what the
data plane answers depends on timing, so the live-connection frames may
differ between runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from common.conf import Config
from common.dataplane import DataPlane
from common.flow import ICMP, TCP, UDP
from common.guest import GuestState
from common.listeners import TcpListener
from common.loop import Loop
from common.packet.arp import Arp, build_arp
from common.packet.frames import build_ipv4_frame, build_ipv6_frame, udp4_frame, udp6_frame
from common.packet.icmp import build_icmp4, build_icmp6
from common.packet.tcp import ACK, FIN, PSH, RST, SYN, TcpOptions, build_tcp4, build_tcp6
from common.tap import StreamTap, TunTap
from common.udp.handler import UdpListener

ETH_P_ALL = 0x0003
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFMTU, IFF_UP = 0x8913, 0x8914, 0x8922, 1
MAX_FRAME = 65535 + 14
BCAST = b"\xff" * 6


def _p(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


@dataclass
class Ctx:
    our_mac: bytes
    guest_mac: bytes
    g4: bytes
    gw4: bytes
    g6: bytes
    gw6: bytes
    our_ll: bytes
    guest_ll: bytes
    tcp_port: int             # host echo services the gateway reaches
    udp_port: int
    fwd_tcp: int              # guest ports forwarded connections go to
    fwd_udp: int


@dataclass
class LiveConn:
    v6: bool
    sport: int
    dport: int
    seq: int                  # the guest's next sequence number
    ack: int                  # the next byte we (the data plane) send


# interesting values, per field width
_V8 = (0, 1, 2, 4, 5, 6, 15, 16, 17, 40, 44, 58, 59, 60, 0x7F, 0x80, 0xFE, 0xFF)
_V16 = (0, 1, 7, 8, 19, 20, 21, 28, 40, 41, 53, 67, 547, 576, 1280, 1500, 0x7FFF, 0x8000,
        0xFFFE, 0xFFFF)
_V32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_ADDR4 = ("127.0.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.1", "192.0.2.255",
          "192.0.2.1", "192.0.2.10", "10.0.0.1")
_ADDR6 = ("::1", "::", "ff02::1", "ff02::2", "ff02::1:2", "fe80::1", "::ffff:127.0.0.1",
          "2001:db8:1::10", "2001:db8:1::1", "64:ff9b::7f00:1")


class FrameMaker:
    def __init__(self, rng: random.Random, ctx: Ctx) -> None:
        self.rng = rng
        self.c = ctx
        self.live: dict[int, LiveConn] = {}       # guest port -> connection
        self.inbound: dict[int, LiveConn] = {}    # our SYNs to forwarded ports, by peer port
        self._sport = 20000
        self.pending: list[bytes] = []            # frames owed before the next new one
        self.kinds = [
            (self.arp, 4), (self.dhcp, 6), (self.dhcpv6, 6), (self.ndp, 6), (self.icmp4, 5),
            (self.icmp6, 5), (self.udp, 14), (self.tcp_syn, 10), (self.tcp_live, 20),
            (self.tcp_inbound, 4), (self.ext6, 5), (self.ipv4_options, 3), (self.big, 2),
            (self.junk, 2),
        ]
        self._weights = [w for _, w in self.kinds]
        self.made: dict[str, int] = {}

    # ------------------------------------------------------------ what we send back

    def learn(self, frame: bytes) -> None:
        """A frame the data plane sent to the guest: follow TCP along."""
        et = frame[12:14]
        if et == b"\x08\x00" and len(frame) >= 54 and frame[23] == 6:
            l4, v6, end = 14 + (frame[14] & 0x0F) * 4, False, 14 + (frame[16] << 8 | frame[17])
        elif et == b"\x86\xdd" and len(frame) >= 74 and frame[20] == 6:
            l4, v6, end = 54, True, 54 + (frame[18] << 8 | frame[19])
        else:
            return
        if end > len(frame) or l4 + 20 > end:
            return
        sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", frame, l4)
        data = end - l4 - (off >> 4) * 4
        if flags & RST:
            self.live.pop(dport, None)
            self.inbound.pop(sport, None)
            return
        conn = self.live.get(dport)
        if flags & SYN and flags & ACK:
            if conn is not None:
                conn.ack = (seq + 1) & 0xFFFFFFFF
        elif flags & SYN and dport in (self.c.fwd_tcp,):
            self.inbound[sport] = LiveConn(v6, dport, sport, self.rng.getrandbits(32),
                                           (seq + 1) & 0xFFFFFFFF)
        elif conn is not None:
            conn.ack = (seq + max(data, 0) + (1 if flags & FIN else 0)) & 0xFFFFFFFF

    # ------------------------------------------------------------ one frame

    def frame(self) -> bytes:
        if self.pending:
            return self.pending.pop()
        rng = self.rng
        make = rng.choices(self.kinds, self._weights)[0][0]
        self.made[make.__name__] = self.made.get(make.__name__, 0) + 1
        f = make()
        r = rng.random()
        if r < 0.55:
            f = self.mutate_fields(f)
        elif r < 0.75:
            f = self.mutate_bytes(f)
        return f[:MAX_FRAME]

    def _eth(self, dst: bytes | None = None) -> tuple[bytes, bytes]:
        return (dst or self.c.our_mac), self.c.guest_mac

    def _addr4(self, peer: bool) -> bytes:
        rng = self.rng
        if rng.random() < 0.85:
            return self.c.gw4 if peer else self.c.g4
        return _p(rng.choice(_ADDR4))

    def _addr6(self, peer: bool) -> bytes:
        rng = self.rng
        if rng.random() < 0.85:
            return self.c.gw6 if peer else self.c.g6
        return _p(rng.choice(_ADDR6))

    def _payload(self, limit: int = 1400) -> bytes:
        n = self.rng.choice((0, 1, 8, 64, 512, self.rng.randrange(limit + 1)))
        return self.rng.randbytes(n)

    def _port(self, kind: str) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.6:
            return self.c.tcp_port if kind == "tcp" else self.c.udp_port
        if r < 0.8:
            return rng.choice((0, 7, 53, 67, 68, 546, 547, 65535))
        return rng.randrange(1, 65536)

    def _next_sport(self) -> int:
        self._sport = 20000 + (self._sport - 19999) % 30000
        return self._sport

    def arp(self) -> bytes:
        rng = self.rng
        op = rng.choice((1, 1, 1, 2, 3, 0xFFFF))
        tpa = rng.choice((self.c.gw4, self.c.g4, _p("192.0.2.77"), _p("0.0.0.0")))
        body = build_arp(Arp(op, self.c.guest_mac, self._addr4(False), bytes(6), tpa))
        return BCAST + self.c.guest_mac + b"\x08\x06" + body

    def dhcp(self) -> bytes:
        rng = self.rng
        msg = bytearray(240)
        msg[0:4] = bytes((1, 1, 6, 0))
        msg[4:8] = rng.randbytes(4)
        msg[28:34] = self.c.guest_mac
        msg[236:240] = b"\x63\x82\x53\x63"
        opts = bytes((53, 1, rng.choice((1, 3, 4, 7, 8, 0, 99))))
        for _ in range(rng.randrange(6)):
            code = rng.choice((12, 50, 54, 55, 57, 61, 81, 119, 52, 0, 255, rng.randrange(256)))
            data = rng.randbytes(rng.choice((0, 1, 2, 4, 16, 255)))
            opts += bytes((code, len(data))) + data
        if rng.random() < 0.1:                       # a long run of options
            opts += bytes((55, 255)) * rng.randrange(1, 200)
        msg += opts + b"\xff"
        src = bytes(4) if rng.random() < 0.7 else self.c.g4
        return udp4_frame(BCAST, self.c.guest_mac, src, b"\xff" * 4, 68, 67, bytes(msg))

    def dhcpv6(self) -> bytes:
        rng = self.rng
        mtype = rng.choice((1, 1, 3, 4, 5, 6, 8, 9, 11, 0, 255))
        duid = struct.pack("!HH", 3, 1) + self.c.guest_mac
        msg = bytes((mtype,)) + rng.randbytes(3) + struct.pack("!HH", 1, len(duid)) + duid
        for _ in range(rng.randrange(4)):
            code = rng.choice((2, 3, 4, 6, 14, 25, 39, 0, rng.randrange(65536)))
            if code in (3, 25):
                inner = b"".join(struct.pack("!HH16sII", 5, 24, rng.randbytes(16), 0, 0)
                                 for _ in range(rng.randrange(4)))
                body = rng.randbytes(12) + inner
            elif code == 4:
                body = rng.randbytes(4)
            else:
                body = rng.randbytes(rng.choice((0, 1, 2, 16, 130)))
            msg += struct.pack("!HH", code, len(body)) + body
        if rng.random() < 0.05:                      # thousands of IAs
            msg += struct.pack("!HHI", 4, 4, 1) * rng.randrange(100, 3000)
        dst = rng.choice((_p("ff02::1:2"), self.c.our_ll, _p("ff05::1:3")))
        dmac = b"\x33\x33\x00\x01\x00\x02"
        return udp6_frame(dmac, self.c.guest_mac, self.c.guest_ll, dst, 546, 547, msg)

    def ndp(self) -> bytes:
        rng = self.rng
        t = rng.choice((133, 135, 135, 136, 137, 134))
        src = rng.choice((self.c.guest_ll, self.c.g6, bytes(16)))
        if t == 133:
            dst, body = _p("ff02::2"), b""
        else:
            target = rng.choice((self.c.our_ll, self.c.gw6, self.c.g6, _p("fe80::99")))
            dst, body = rng.choice((target, _p("ff02::1:ff00:1"))), target
            if t == 137:
                body += target
        for _ in range(rng.randrange(4)):
            otype = rng.choice((1, 2, 3, 5, 0, 255))
            olen = rng.choice((0, 1, 2, 4, 255))
            body += bytes((otype, olen)) + rng.randbytes(max(olen * 8 - 2, 0))
        icmp = build_icmp6(src, dst, t, rng.choice((0, 0, 0, 1)), rng.randbytes(4), body)
        return build_ipv6_frame(b"\x33\x33\x00\x00\x00\x02", self.c.guest_mac, src, dst, 58,
                                icmp, hop_limit=rng.choice((255, 255, 255, 64)))

    def icmp4(self) -> bytes:
        rng = self.rng
        t = rng.choice((8, 8, 8, 0, 3, 11, 13, 42))
        rest = struct.pack("!HH", rng.randrange(65536), rng.randrange(65536))
        return build_ipv4_frame(*self._eth(), self.c.g4, self._addr4(True), 1,
                                build_icmp4(t, rng.choice((0, 0, 3)), rest,
                                            self._payload(2000)))

    def icmp6(self) -> bytes:
        rng = self.rng
        t = rng.choice((128, 128, 128, 129, 1, 2, 3, 4, 200))
        src, dst = self.c.g6, self._addr6(True)
        rest = struct.pack("!HH", rng.randrange(65536), rng.randrange(65536))
        return build_ipv6_frame(*self._eth(), src, dst, 58,
                                build_icmp6(src, dst, t, rng.choice((0, 0, 4)), rest,
                                            self._payload(2000)))

    def udp(self) -> bytes:
        rng = self.rng
        sport = rng.choice((self._next_sport(), 0, 53, 5353, self.c.fwd_udp))
        if rng.random() < 0.5:
            return udp4_frame(*self._eth(), self._addr4(False), self._addr4(True), sport,
                              self._port("udp"), self._payload())
        return udp6_frame(*self._eth(), self._addr6(False), self._addr6(True), sport,
                          self._port("udp"), self._payload())

    def _tcp(self, v6: bool, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
             ack: int, flags: int, payload: bytes = b"", options: TcpOptions | None = None,
             window: int = 65535) -> bytes:
        if v6:
            return build_ipv6_frame(*self._eth(), src, dst, 6, build_tcp6(
                src, dst, sport, dport, seq, ack, flags, window, payload, options))
        return build_ipv4_frame(*self._eth(), src, dst, 6, build_tcp4(
            src, dst, sport, dport, seq, ack, flags, window, payload, options))

    def tcp_syn(self) -> bytes:
        rng = self.rng
        v6 = rng.random() < 0.4
        sport = self._next_sport()
        seq = rng.getrandbits(32)
        opts = TcpOptions(mss=rng.choice((None, 1, 88, 536, 1460, 65535)),
                          wscale=rng.choice((None, 0, 7, 14, 15, 255)),
                          sack_permitted=rng.random() < 0.5,
                          timestamps=(1, 0) if rng.random() < 0.3 else None)
        dport = self._port("tcp")
        if dport == self.c.tcp_port:
            if len(self.live) >= 64:                 # forget the oldest, resetting it
                old = self.live.pop(next(iter(self.live)))
                if old.ack:
                    s, d = (self.c.g6, self.c.gw6) if old.v6 else (self.c.g4, self.c.gw4)
                    self.pending.append(self._tcp(old.v6, s, d, old.sport, old.dport,
                                                  old.seq, old.ack, RST | ACK))
            self.live[sport] = LiveConn(v6, sport, dport, (seq + 1) & 0xFFFFFFFF, 0)
        src, dst = (self._addr6(False), self._addr6(True)) if v6 else \
            (self._addr4(False), self._addr4(True))
        return self._tcp(v6, src, dst, sport, dport, seq, 0, SYN, options=opts)

    def tcp_live(self) -> bytes:
        rng = self.rng
        answered = [c for c in self.live.values() if c.ack]
        if not answered:
            return self.tcp_syn()
        conn = rng.choice(answered)
        flags = rng.choice((ACK, ACK | PSH, ACK | PSH, ACK | FIN, RST, ACK | RST, ACK | SYN,
                            0, 0xFF))
        payload = self._payload(3000) if flags & PSH or rng.random() < 0.2 else b""
        seq = conn.seq
        if rng.random() < 0.25:                      # around the edges of the window
            seq = (seq + rng.choice((-1, 1, -1000, 65536, 1 << 30, 1 << 31))) & 0xFFFFFFFF
        ack = conn.ack
        if rng.random() < 0.25:
            ack = (ack + rng.choice((-1, 1, 1 << 20, 1 << 31))) & 0xFFFFFFFF
        window = rng.choice((65535, 65535, 0, 1, 512))
        src, dst = (self.c.g6, self.c.gw6) if conn.v6 else (self.c.g4, self.c.gw4)
        f = self._tcp(conn.v6, src, dst, conn.sport, conn.dport, seq, ack, flags, payload,
                      window=window)
        if seq == conn.seq:
            conn.seq = (conn.seq + len(payload) + (1 if flags & FIN else 0)) & 0xFFFFFFFF
        if flags & RST or flags & FIN and rng.random() < 0.5:
            self.live.pop(conn.sport, None)
        return f

    def tcp_inbound(self) -> bytes:
        """Answer one of our SYNs to a forwarded port (or carry on with it)."""
        rng = self.rng
        if not self.inbound:
            return self.tcp_syn()
        conn = self.inbound[rng.choice(list(self.inbound))]
        src, dst = (self.c.g6, self.c.gw6) if conn.v6 else (self.c.g4, self.c.gw4)
        flags = rng.choice((SYN | ACK, SYN | ACK, ACK | PSH, ACK | FIN, RST, SYN))
        opts = TcpOptions(mss=rng.choice((None, 1, 1460)), wscale=rng.choice((None, 7, 14)))
        payload = self._payload() if flags & PSH else b""
        f = self._tcp(conn.v6, src, dst, conn.sport, conn.dport, conn.seq, conn.ack, flags,
                      payload, opts if flags & SYN else None)
        if flags & SYN:
            conn.seq = (conn.seq + 1) & 0xFFFFFFFF
        conn.seq = (conn.seq + len(payload)) & 0xFFFFFFFF
        if flags & (RST | FIN):
            self.inbound.pop(conn.dport, None)
        return f

    def ext6(self) -> bytes:
        """IPv6 with a chain of extension headers in front of UDP, TCP or ICMPv6."""
        rng = self.rng
        inner_nh, inner = rng.choice((
            (17, struct.pack("!HHHH", self._next_sport(), self.c.udp_port, 12, 0) + b"abcd"),
            (6, build_tcp6(self.c.g6, self.c.gw6, self._next_sport(), self.c.tcp_port, 1, 0,
                           SYN, 65535)),
            (58, build_icmp6(self.c.g6, self.c.gw6, 128, 0, b"\0\1\0\1", b"x")),
        ))
        chain = []
        for _ in range(rng.randrange(1, 5)):
            kind = rng.choice((0, 43, 60, 44, 51, 50, 59))
            chain.append(kind)
        body = inner
        nh = inner_nh
        for kind in reversed(chain):
            if kind == 44:
                ext = bytes((nh, 0)) + struct.pack("!HI", rng.choice((0, 1, 8, 0xFFF9)),
                                                   rng.getrandbits(32))
            else:
                n = rng.choice((0, 0, 1, 2, 255))
                ext = bytes((nh, n)) + rng.randbytes(6 + 8 * n)
            body = ext + body
            nh = kind
        return build_ipv6_frame(*self._eth(), self.c.g6, self.c.gw6, nh, body[:65000])

    def ipv4_options(self) -> bytes:
        rng = self.rng
        f = bytearray(udp4_frame(*self._eth(), self.c.g4, self.c.gw4, self._next_sport(),
                                 self.c.udp_port, self._payload()))
        opts = rng.randbytes(4 * rng.randrange(1, 11))
        f[14] = 0x40 | (5 + len(opts) // 4)
        f[34:34] = opts
        struct.pack_into("!H", f, 16, len(f) - 14)
        return bytes(f)

    def big(self) -> bytes:
        """Up to 64 KiB: UDP or TCP with the largest payloads."""
        rng = self.rng
        n = rng.choice((1472, 9000, 65507, rng.randrange(65508)))
        if rng.random() < 0.5:
            return udp4_frame(*self._eth(), self.c.g4, self.c.gw4, self._next_sport(),
                              self.c.udp_port, bytes(n))
        if self.live and rng.random() < 0.7:
            conn = self.live[rng.choice(list(self.live))]
            src, dst = (self.c.g6, self.c.gw6) if conn.v6 else (self.c.g4, self.c.gw4)
            f = self._tcp(conn.v6, src, dst, conn.sport, conn.dport, conn.seq, conn.ack,
                          ACK | PSH, bytes(min(n, 65495)))
            conn.seq = (conn.seq + min(n, 65495)) & 0xFFFFFFFF
            return f
        return udp6_frame(*self._eth(), self.c.g6, self.c.gw6, self._next_sport(),
                          self.c.udp_port, bytes(min(n, 65487)))

    def junk(self) -> bytes:
        rng = self.rng
        et = rng.choice((b"\x08\x00", b"\x86\xdd", b"\x08\x06", b"\x81\x00", rng.randbytes(2)))
        return self.c.our_mac + self.c.guest_mac + et + rng.randbytes(rng.randrange(0, 200))

    # ------------------------------------------------------------ mutations

    def fields(self, f: bytes) -> list[tuple[int, int]]:
        """(offset, width) of the header fields of `f` worth lying in."""
        out = [(12, 2)]
        et = f[12:14]
        if et == b"\x08\x00" and len(f) >= 34:
            out += [(14, 1), (16, 2), (20, 2), (22, 1), (23, 1), (26, 4), (30, 4)]
            l4 = 14 + (f[14] & 0x0F) * 4
            proto = f[23]
        elif et == b"\x86\xdd" and len(f) >= 54:
            out += [(14, 1), (18, 2), (20, 1), (21, 1), (22, 16), (38, 16)]
            l4, proto = 54, f[20]
            if proto in (0, 43, 60, 44) and len(f) >= 56:
                out += [(54, 1), (55, 1)]
        elif et == b"\x08\x06":
            out += [(14, 2), (16, 2), (18, 1), (19, 1), (20, 2), (28, 4), (38, 4)]
            return [(o, w) for o, w in out if o + w <= len(f)]
        else:
            return out if len(f) >= 14 else []
        if proto == 6 and len(f) >= l4 + 20:
            out += [(l4, 2), (l4 + 2, 2), (l4 + 4, 4), (l4 + 8, 4), (l4 + 12, 1), (l4 + 13, 1),
                    (l4 + 14, 2)]
            if len(f) > l4 + 21:
                out += [(l4 + 20, 1), (l4 + 21, 1)]          # the first option: kind, length
        elif proto == 17 and len(f) >= l4 + 8:
            out += [(l4, 2), (l4 + 2, 2), (l4 + 4, 2)]
            app = l4 + 8
            if len(f) >= app + 8:                             # DHCPv6 options / DHCP fields
                out += [(app, 1), (app + 4, 2), (app + 6, 2)]
            if len(f) >= app + 244:
                out += [(app + 240, 1), (app + 241, 1), (app + 243, 1), (app + 244, 1)]
        elif proto in (1, 58) and len(f) >= l4 + 8:
            out += [(l4, 1), (l4 + 1, 1), (l4 + 4, 2), (l4 + 6, 2)]
            if len(f) >= l4 + 26:
                out += [(l4 + 24, 1), (l4 + 25, 1)]          # an NDP option: type, length
        return [(o, w) for o, w in out if o + w <= len(f)]

    def mutate_fields(self, f: bytes) -> bytes:
        rng = self.rng
        b = bytearray(f)
        fields = self.fields(f)
        if not fields:
            return f
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            off, width = rng.choice(fields)
            if width == 1:
                b[off] = rng.choice(_V8) if rng.random() < 0.8 else rng.randrange(256)
            elif width == 2:
                v = rng.choice(_V16 + (len(b), len(b) - 14, len(b) - 34, len(b) - 54))
                struct.pack_into("!H", b, off, v & 0xFFFF)
            elif width == 4:
                if rng.random() < 0.5:
                    b[off:off + 4] = _p(rng.choice(_ADDR4))
                else:
                    struct.pack_into("!I", b, off, rng.choice(_V32))
            else:
                b[off:off + 16] = _p(rng.choice(_ADDR6))
        return bytes(b)

    def mutate_bytes(self, f: bytes) -> bytes:
        rng = self.rng
        b = bytearray(f)
        how = rng.randrange(5)
        if how == 0 and b:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif how == 1:
            del b[rng.randrange(len(b) + 1):]
        elif how == 2:
            b += rng.randbytes(rng.choice((1, 3, 60, 1000)))
        elif how == 3:                                       # two frames spliced together
            other = self.kinds[rng.randrange(len(self.kinds))][0]()
            cut = rng.randrange(len(b) + 1)
            b = b[:cut] + other[rng.randrange(len(other) + 1):]
        else:
            b = b[:14] + rng.randbytes(rng.randrange(200))
        return bytes(b)


# ---------------------------------------------------------------- the harness


@dataclass
class Report:
    frames: int = 0
    seed: int = 0
    seconds: float = 0.0
    sent: dict = field(default_factory=dict)
    frames_in: dict = field(default_factory=dict)
    frames_out: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)          # handler -> exceptions
    flows_left: dict = field(default_factory=dict)
    fds_left: int = 0
    rss_kib: list = field(default_factory=list)         # (frames so far, VmRSS KiB)
    counters: dict = field(default_factory=dict)
    made: dict = field(default_factory=dict)
    echo: dict = field(default_factory=dict)            # what reached the host services
    budget_left: int = 0                                # descriptors the budget lost track of
    budget: str = ""

    @property
    def exceptions(self) -> int:
        return sum(self.errors.values())


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _link_up(name: str, mtu: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFMTU, struct.pack("16si12x", name.encode(), mtu))
        for dev in (name, "lo"):
            ifr = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", dev.encode(), 0))
            flags = struct.unpack_from("16sH", ifr)[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", dev.encode(), flags | IFF_UP))


ECHO = r"""
import json, selectors, socket, sys
sel = selectors.DefaultSelector()
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
tcp.bind(("::", 0))
tcp.listen(4096)
port = tcp.getsockname()[1]
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", port))
for s in (tcp, udp, sys.stdin):
    if s is not sys.stdin:
        s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print(port, flush=True)
accepted = nbytes = 0
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is sys.stdin:
            print(json.dumps({"tcp_connections": accepted, "tcp_bytes": nbytes}), flush=True)
            sys.exit(0)
        if s is tcp:
            try:
                c, _ = tcp.accept()
            except OSError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            accepted += 1
        elif s is udp:
            try:
                data, peer = udp.recvfrom(65536)
                udp.sendto(data[:1400], peer)
            except OSError:
                pass
        else:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                nbytes += len(data)
                try:
                    s.send(data[:32768])
                except OSError:
                    pass
            else:
                sel.unregister(s)
                s.close()
"""


class _Echo:
    """TCP and UDP echo services on the namespace's loopback, in a process of their own
    (started from this thread, so in its namespace): their descriptors are not ours."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def stats(self) -> dict:
        self.proc.stdin.close()
        line = self.proc.stdout.readline()
        self.proc.wait(10)
        self.proc.stdout.close()
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _spin(loop: Loop, seconds: float) -> None:
    loop.call_later(seconds, lambda: loop.stop(0))
    loop.run()
    loop._exit_code = None      # run again next time


def run(frames: int, seed: int, *, confs: tuple[Config, Config], chunk: int = 32,
        samples: int = 20, expire_within: float = 30.0) -> Report:
    """Fuzz `frames` frames with `seed` (see the module docstring); `confs`: the pasta
    and passt Configs of the made-up host.  Runs in the caller's network namespace."""
    import common.tcp.handler as tcp_mod
    from common import budget

    rng = random.Random(seed)
    fds_budget = budget.shared()
    budget_before = fds_budget.used
    rep = Report(frames=frames, seed=seed)
    fds_before = _fds()
    loop = Loop()
    echo = _Echo()
    # the fuzzer is the only guest: the namespace's own kernel stays silent on the tap
    # (no IPv6 there) and forwards nothing back to us (a new namespace may inherit
    # forwarding from the host's, and would return every frame we send the guest)
    for path, value in (("ipv4/ip_forward", "0"), ("ipv6/conf/all/forwarding", "0"),
                        ("ipv6/conf/default/disable_ipv6", "1")):
        with open(f"/proc/sys/net/{path}", "w") as f:
            f.write(value)
    tap_fd, tap_name = _open_tap("fuzz0")
    _link_up(tap_name, 65520)
    tun = TunTap(tap_fd, vnet_hdr=True)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = StreamTap(ours, loop)
    peer.setblocking(False)
    pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    pkt.bind((tap_name, 0))
    pkt.setblocking(False)
    pasta_conf, passt_conf = confs
    planes = {"pasta": DataPlane(pasta_conf, loop, tun, GuestState(pasta_conf)),
              "passt": DataPlane(passt_conf, loop, stream, GuestState(passt_conf))}
    for dp in planes.values():
        dp.start()
    # forwarded ports: a host client connects and sends now and then (inbound flows)
    fwd = {}
    for name, dp in planes.items():
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        ls.setblocking(False)
        us = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        us.bind(("127.0.0.1", 0))
        us.setblocking(False)
        fwd[name] = (TcpListener(loop, ls, 8080, dp.tcp.accept),
                     UdpListener(loop, us, 8081, lambda dp=dp: dp.udp))
    c4 = pasta_conf.ip4
    c6 = pasta_conf.ip6
    assert c4 is not None and c6 is not None and c4.gateway is not None
    gw6 = c6.gateway or c6.our_ll
    ctx = Ctx(our_mac=pasta_conf.our_mac, guest_mac=b"\x52\x54\x00\x12\x34\x56",
              g4=c4.addr.packed, gw4=c4.gateway.packed, g6=c6.addr.packed, gw6=gw6.packed,
              our_ll=c6.our_ll.packed, guest_ll=_p("fe80::5054:ff:fe12:3456"),
              tcp_port=echo.port, udp_port=echo.port, fwd_tcp=8080, fwd_udp=8081)
    # one guest per data plane, each following its own connections; `rng` picks which
    # plane gets the next frame, each guest's own generator what the frame is
    makers = {"pasta": FrameMaker(random.Random(seed * 2), ctx),
              "passt": FrameMaker(random.Random(seed * 2 + 1), ctx)}
    output = _Output(makers, pkt, peer)
    sent = {"pasta": 0, "passt": 0}
    clients: list[socket.socket] = []
    every = max(frames // samples, 1)
    t0 = time.monotonic()
    n = 0
    try:
        while n < frames:
            for _ in range(min(chunk, frames - n)):
                n += 1
                if rng.random() < 0.5:
                    f = makers["pasta"].frame()
                    try:
                        pkt.send(f)
                        sent["pasta"] += 1
                    except OSError:
                        pass                 # too short for the device, or its queue is full
                else:
                    f = makers["passt"].frame()
                    try:
                        peer.send(struct.pack("!I", len(f)) + f)
                        sent["passt"] += 1
                    except BlockingIOError:
                        pass
                if n % every == 0:
                    rep.rss_kib.append((n, rss_kib()))
            if rng.random() < 0.02:
                clients.append(_poke(rng, fwd))
                if len(clients) > 32:
                    clients.pop(0).close()
            _spin(loop, 0.0005)
            output.read()
        rep.seconds = round(time.monotonic() - t0, 2)
        # the end: stop sending, close the host clients, shorten the timeouts, let flows end
        for c in clients:
            c.close()
        clients.clear()
        saved = tcp_mod.IDLE_TIMEOUT, tcp_mod.HANDSHAKE_TIMEOUT
        tcp_mod.IDLE_TIMEOUT, tcp_mod.HANDSHAKE_TIMEOUT = 1.0, 1.0
        for dp in planes.values():
            for expiry in (dp.udp.expiry, dp.icmp.expiry):
                expiry.idle = expiry.idle_replied = 1.0
        deadline = time.monotonic() + expire_within
        try:
            while time.monotonic() < deadline and any(_flows(dp) for dp in planes.values()):
                for dp in planes.values():
                    for kind in (TCP, UDP, ICMP):     # the shortened timeouts, now
                        dp.flows.wake_all(kind)
                _spin(loop, 0.2)
                output.read()
        finally:
            tcp_mod.IDLE_TIMEOUT, tcp_mod.HANDSHAKE_TIMEOUT = saved
        rep.rss_kib.append((n, rss_kib()))
        for name, dp in planes.items():
            rep.flows_left[name] = _flows(dp)
            rep.frames_in[name] = dp.tap.frames_in
            rep.frames_out[name] = dp.tap.frames_out
            for k, v in dp.demux.errors.counts.items():
                rep.errors[f"{name}:{k}"] = v
            rep.counters[name] = dp.counters()
        for k, v in loop.errors.counts.items():
            rep.errors[f"loop:{k}"] = v
        rep.sent = sent
        rep.echo = echo.stats()
        rep.made = {k: sum(m.made.get(k, 0) for m in makers.values())
                    for k in sorted(makers["pasta"].made)}
    finally:
        for c in clients:
            c.close()
        for tl, ul in fwd.values():
            tl.close()
            ul.close()
        for dp in planes.values():
            dp.stop()
        stream.close()
        peer.close()
        tun.close()
        pkt.close()
        echo.close()
        loop.close()
    rep.fds_left = len(_fds() - fds_before)
    rep.budget_left = fds_budget.used - budget_before
    rep.budget = repr(fds_budget)
    return rep


def _flows(dp: DataPlane) -> int:
    return len(dp.tcp.conns) + len(dp.udp.flows) + len(dp.icmp.flows)


def _poke(rng: random.Random, fwd: dict) -> socket.socket:
    """A host client on a forwarded port: a TCP connection or a UDP datagram."""
    tl, ul = fwd[rng.choice(list(fwd))]
    if rng.random() < 0.5:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(tl.sock.getsockname())
        return s
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(rng.randbytes(rng.randrange(1, 1400)), ul.sock.getsockname())
    return s


class _Output:
    """What the data planes send the guest, read back (so their output keeps moving) and
    shown to the guest, which follows its TCP connections with it."""

    def __init__(self, makers: dict[str, FrameMaker], pkt: socket.socket,
                 peer: socket.socket) -> None:
        self.makers, self.pkt, self.peer = makers, pkt, peer
        self.buf = b""

    def read(self) -> None:
        learn = self.makers["pasta"].learn
        for _ in range(256):
            try:
                data, addr = self.pkt.recvfrom(MAX_FRAME)
            except BlockingIOError:
                break
            if addr[2] != 4:                          # not our own PACKET_OUTGOING
                learn(data)
        for _ in range(64):
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        buf, pos = self.buf, 0
        learn = self.makers["passt"].learn
        while len(buf) - pos >= 4:
            (length,) = struct.unpack_from("!I", buf, pos)
            if len(buf) - pos - 4 < length:
                break
            learn(buf[pos + 4:pos + 4 + length])
            pos += 4 + length
        self.buf = buf[pos:]


def _open_tap(name: str) -> tuple[int, str]:
    from pasta.tapdev import open_tap
    return open_tap(name, True)
