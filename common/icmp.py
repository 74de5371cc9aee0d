"""ICMP echo: the guest's pings (ICMP and ICMPv6) through unprivileged ping sockets.

Rules of this module: it owns the echo flow table; it does not know the mode
(pasta or passt) nor the tap backend.

An echo request from the guest opens (or reuses) a flow keyed by (guest
address, destination, identifier): a "ping socket" (socket(2) with
SOCK_DGRAM and IPPROTO_ICMP or IPPROTO_ICMPV6, see icmp(7)) bound, where
free, to the guest's identifier and connected to the mapped destination (the
gateway reaches the host's loopback, as for TCP and UDP).  Each request is
one send(): the kernel writes its own identifier and the checksum.  Replies
are read straight into the frame buffer; the guest's identifier is written
back (the kernel's may differ), the sequence number and data are the host's
reply as it came, and the frame leaves from the address the guest pinged.

Ping sockets need no capability, but the kernel only grants them to groups
in net.ipv4.ping_group_range (per network namespace; "1 0", nobody, is a
common default).  Where that forbids them we say so once in the log and drop
echo requests; everything else keeps working.  Other ICMP messages from the
guest (errors it generates, timestamps...) are counted and dropped.  Flows
expire after 60 s without traffic.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import Counter
from functools import partial

from common import log as plog
from common.conf import Config
from common.flow import ICMP, DatagramExpiry, FlowTable, TapFlow
from common.flow import PROTO_ICMP as ICMP_INDEX
from common.flowheader import PROTO_ICMP, PROTO_ICMPV6, FlowHeader
from common.flowinfo import datagram_record
from common.gate import Gate
from common.guest import GuestState
from common.loop import IN, Loop
from common.mapping import AddressMap, forbidden
from common.refuse import prohibited4, prohibited6
from common.tap import TapBackend
from common.udp.frame import DatagramWriter

log = logging.getLogger("icmp")

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
IDLE_TIMEOUT = 60.0
MAX_FLOWS = 1024               # echo flows at most (the table's quota for them)
DRAIN_MAX = 64
PING_GROUP_RANGE = "/proc/sys/net/ipv4/ping_group_range"


def _read_ping_range() -> str:
    try:
        with open(PING_GROUP_RANGE) as f:
            return " ".join(f.read().split())
    except OSError:
        return "?"


# read at import, during set-up: the warning that quotes it may come after the sandbox
_PING_RANGE_AT_START = _read_ping_range()


class EchoFlow(TapFlow):
    __slots__ = ("sock", "fd", "ident", "read_turn")

    def __init__(self, key: bytes, now: float, hdr: FlowHeader, sock: socket.socket,
                 ident: int, host: bytes) -> None:
        super().__init__(ICMP, key, hdr.v6, False, now, (host, 0))
        self.hdr = hdr            # replies: from the pinged address to the guest
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = ident        # the guest's identifier
        self.read_turn = -2       # the loop's turn when the socket was last read


class IcmpHandler:
    def __init__(self, conf: Config, loop: Loop, tap: TapBackend, guest: GuestState,
                 addrmap: AddressMap | None = None, *, flows: FlowTable | None = None,
                 idle: float = IDLE_TIMEOUT, gate: Gate | None = None) -> None:
        """`flows`: the flow table (the data plane's), else one of its own."""
        self.conf = conf
        self.loop = loop
        self.tap = tap
        self.guest = guest
        self.gate = gate or (flows.gate if flows is not None else None) or Gate()
        self.map = addrmap or AddressMap(conf)
        self.writer = DatagramWriter(tap, conf.our_mac, guest)
        self.table = flows if flows is not None else FlowTable(loop, gate=self.gate)
        self.expiry = DatagramExpiry(self.table, idle, idle)
        self.table.serve(ICMP, release=self._release, timer=self.expiry,
                         record=datagram_record, quota=MAX_FLOWS)
        self.flows: dict[bytes, EchoFlow] = self.table.index[ICMP_INDEX]   # by echo key
        self.counters: Counter[str] = Counter()
        self.max4 = conf.mtu - 20
        self.max6 = conf.mtu - 40
        self.forbidden_noted = False

    # ================================================================ guest side

    def on_frame4(self, frame: memoryview, l3: int, l4: int, end: int, key: bytes) -> None:
        if end - l4 < 8:
            self.counters["runt"] += 1
            return
        if frame[l4] != ICMP_ECHO_REQUEST or frame[l4 + 1] != 0:
            self.counters["not_echo"] += 1
            return
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(False, key, frame, l3 + 12, l3 + 16, l4, l3, end)
            if flow is None:
                return
        self._send(flow, frame[l4:end])

    def on_frame6(self, frame: memoryview, l3: int, l4: int, end: int, key: bytes) -> None:
        if end - l4 < 8:
            self.counters["runt"] += 1
            return
        if frame[l4] != ICMPV6_ECHO_REQUEST or frame[l4 + 1] != 0:
            self.counters["not_echo"] += 1
            return
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(True, key, frame, l3 + 8, l3 + 24, l4, l3, end)
            if flow is None:
                return
        self._send(flow, frame[l4:end])

    def _send(self, flow: EchoFlow, msg: memoryview) -> None:
        flow.last = time.monotonic()
        try:
            flow.sock.send(msg)
            flow.bytes_up += len(msg)
            flow.frames_up += 1
        except BlockingIOError:
            self.counters["sock_full"] += 1
        except OSError as exc:
            self.counters["send_error"] += 1
            if plog.TRACE_ON:
                log.log(plog.TRACE, "icmp: echo send: %s", exc)

    def _open(self, v6: bool, key: bytes, frame: memoryview, src: int, dst: int,
              l4: int, l3: int, end: int) -> EchoFlow | None:
        alen = 16 if v6 else 4
        gaddr, raddr = bytes(frame[src:src + alen]), bytes(frame[dst:dst + alen])
        ident = frame[l4 + 4] << 8 | frame[l4 + 5]
        if forbidden(v6, gaddr, raddr):        # no flow has such a key: new ones only
            self.counters["bad_addr"] += 1
            return None
        if raddr[0] == 0xFF or (not v6 and raddr[0] >= 224):
            self.counters["bad_dst"] += 1
            return None
        verdict = self.gate.check(PROTO_ICMPV6 if v6 else PROTO_ICMP, v6, gaddr, 0, raddr, 0)
        if not verdict.allow:
            self.counters["denied"] += 1
            if self.gate.reset:
                packet = frame[l3:end]
                our, mac = self.conf.our_mac, self.guest.mac
                self.tap.send_frame(prohibited6(mac, our, packet) if v6 else
                                    prohibited4(mac, our, packet))
            return None
        table = self.table
        if not table.reserve(ICMP, 1, by_guest=True):
            self.counters["limit"] += 1
            return None
        host_addr, _ = self.map.to_host(v6, raddr, 0)
        try:
            sock = self._socket(v6, ident)
        except OSError as exc:
            table.unreserve(1)
            self.counters["socket_fail"] += 1
            if exc.errno in (errno.EACCES, errno.EPERM):
                self._note_forbidden()
            else:
                log.debug("icmp: no ping socket: %s", exc)
            return None
        try:
            sock.connect(self.map.host_sockaddr(v6, host_addr, 0))
        except OSError as exc:
            self.counters["connect_fail"] += 1
            log.debug("icmp: connect: %s", exc)
            sock.close()
            table.unreserve(1)
            return None
        hdr = FlowHeader(v6, PROTO_ICMPV6 if v6 else PROTO_ICMP, raddr, gaddr)
        flow = EchoFlow(key, time.monotonic(), hdr, sock, ident, host_addr)
        table.add(flow, 1, verdict)
        self.expiry.start(flow)
        self.loop.add(flow.fd, IN, partial(self._sock_event, flow))
        self.counters["opened"] += 1
        return flow

    def _socket(self, v6: bool, ident: int) -> socket.socket:
        if v6:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMPV6)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, socket.IPPROTO_ICMP)
        try:
            self.map.bind_outbound(sock, v6, ident)   # the kernel's identifier: the guest's
        except BaseException:
            sock.close()
            raise
        return sock

    def _note_forbidden(self) -> None:
        if self.forbidden_noted:
            return
        self.forbidden_noted = True
        allowed = _PING_RANGE_AT_START
        log.warning("ICMP echo: ping sockets are not allowed for group %d "
                    "(net.ipv4.ping_group_range is \"%s\"): echo requests are dropped",
                    os.getgid(), allowed)

    # ================================================================ host side

    def _sock_event(self, flow: EchoFlow, _events: int) -> None:
        if flow.closed:
            return
        hdr = flow.hdr
        writer = self.writer
        if hdr.v6:
            view, buf, off, limit = writer.l4_6, writer.buf6, writer.l4_off6, self.max6
            reply = ICMPV6_ECHO_REPLY
        else:
            view, buf, off, limit = writer.l4_4, writer.buf4, writer.l4_off4, self.max4
            reply = ICMP_ECHO_REPLY
        recv_into = flow.sock.recv_into
        ident = flow.ident
        got = 0
        for _ in range(self.loop.reads(flow, DRAIN_MAX)):
            try:
                n = recv_into(view)
            except BlockingIOError:
                break
            except OSError as exc:     # an ICMP error about our request: nothing to answer
                self.counters["sock_error"] += 1
                if plog.TRACE_ON:
                    log.log(plog.TRACE, "icmp: %s", exc)
                continue
            got += 1
            if n < 8 or buf[off] != reply:
                self.counters["not_reply"] += 1
                continue
            if n > limit:
                self.counters["oversize"] += 1
                continue
            buf[off + 4] = ident >> 8
            buf[off + 5] = ident & 0xFF
            if not writer.send_icmp(hdr, n):
                self.counters["tap_drop"] += 1
            else:
                flow.bytes_down += n
                flow.frames_down += 1
        if got:
            self.table.reply_seen(flow, time.monotonic())

    # ================================================================ lifetime

    def _release(self, flow: EchoFlow) -> None:
        """The flow table's callback: a flow is gone (expired, evicted or closed)."""
        self.loop.remove(flow.fd)
        flow.sock.close()

    def close_all(self) -> None:
        self.table.close_kind(ICMP)
