"""UDP translation: guest datagrams <-> host UDP sockets, one flow per conversation.

Rules of this module: it owns the UDP flow table and is the only code that
opens, changes or closes a UDP flow; it does not know the mode (pasta or
passt) nor the tap backend.

Theory of operation
-------------------
A flow is keyed like the guest's datagrams: (guest address, remote address,
guest port, remote port), the remote being the address the guest used.

Guest -> host.  The first datagram of an unknown key opens a flow: a host
UDP socket bound, where the host allows it, to the guest's source port (so
a service on the host sees the port the guest chose), connected to the
mapped destination (`AddressMap.to_host`: the gateway reaches the host's
loopback, a `--dns-forward` address the host's resolver...).  Every datagram
of the flow is one send() on that socket.  The guest's UDP checksum is never
looked at: with checksum offload it arrives partial.

Host -> guest.  The socket's datagrams are read straight into the frame
buffer (`frame.DatagramWriter`) behind room for the headers, and sent to the
guest *from the address and port the guest sent to*, so a reply to a query
sent to the `--dns-forward` address comes from that address.  A datagram
larger than the guest's MTU allows is dropped and counted (we never
fragment, and never truncate: the buffer holds the largest datagram).  An
event reads one datagram (an answer comes alone) unless the socket was
read on the loop's previous turn too, then as many as there are
(`Loop.reads`): a read that finds the queue empty costs a system call and
an exception.

Forwarded ports (`-u`).  `udp_listener` binds a host socket per forwarded
port; a datagram from a new host peer opens an *inbound* flow towards the
guest's `to_port`, its source mapped as for TCP (host loopback -> the
gateway or `--map-host-loopback` address).  The guest's replies find that
flow by their key and leave through the listening socket (sendto the peer),
so the peer sees the port it talked to.  A listener can divert datagrams
from loopback peers to a `local` hook (pasta's splice path); the listener
outlives guests in passt, so it asks `handler()` for the current handler on
each event.

ICMP errors.  Sockets have IP_RECVERR / IPV6_RECVERR: an ICMP error about a
datagram we sent (port unreachable...) wakes us with EPOLLERR, and the error
queue says what happened to which datagram; `icmperr` rebuilds it as an
ICMP/ICMPv6 error about the guest's own datagram, so the guest's socket gets
ECONNREFUSED just as on a real link.

Lifetime.  Flows live in the flow table (`common.flow`) with every other
flow: they expire when idle (30 s, 180 s once traffic went both ways), and
when the table or the descriptor budget is full a new flow evicts the oldest
one-way datagram flow first.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from functools import partial

from common import log as plog
from common.conf import Config
from common.flow import UDP, DatagramExpiry, FlowTable, TapFlow, make_key
from common.flowheader import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, FlowHeader
from common.flowinfo import datagram_record
from common.gate import Gate
from common.guest import GuestState
from common.listeners import set_freebind
from common.loop import ERR, IN, Loop
from common.mapping import AddressMap, forbidden
from common.packet.frames import build_ipv4_frame, build_ipv6_frame
from common.ratelimit import RateLimited
from common.refuse import prohibited4, prohibited6
from common.tap import TapBackend
from common.udp.frame import DatagramWriter
from common.udp.icmperr import IP_RECVERR, IPV6_RECVERR, error_for_guest, parse_sock_error

log = logging.getLogger("udp")
_limited = RateLimited(log)      # auto-forwarding follows what the namespace binds

IDLE_TIMEOUT = 30.0            # a flow that only ever went one way
IDLE_TIMEOUT_REPLIED = 180.0   # a flow that has seen traffic both ways
MAX_FLOWS = 8192               # UDP flows at most (the table's quota for them)
DRAIN_MAX = 128                # datagrams per socket event; level-triggered, so fair
ERRQUEUE_MAX = 16              # error-queue entries handled per event
ERRQUEUE_BUF = 1500            # quoted payload read from the error queue (we quote less)
MSG_ERRQUEUE = 0x2000
# socket buffers: bursts of a tap batch (up to 128 frames) must fit; the kernel caps
# this at net.core.rmem_max / wmem_max
SOCK_BUF = 4 << 20

# errors a send() reports when an earlier ICMP error left one pending on the socket
_PENDING_ICMP = frozenset((errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                           errno.EPROTO, errno.EMSGSIZE, errno.ETIMEDOUT))
_PORTS = struct.Struct("!HH")
SOL_IP, SOL_IPV6 = 0, 41
UDP_INDEX = PROTO_UDP


class UdpFlow(TapFlow):
    """One conversation.  Outbound flows own a connected socket (`peer` None);
    inbound flows (from a forwarded port) send through the listener's socket
    to `peer`."""
    __slots__ = ("sock", "fd", "peer", "listener", "dns", "read_turn")

    def __init__(self, key: bytes, now: float, hdr: FlowHeader, sock: socket.socket,
                 host: tuple[bytes, int], peer: tuple | None = None,
                 listener: UdpListener | None = None) -> None:
        super().__init__(UDP, key, hdr.v6, listener is not None, now, host)
        self.hdr = hdr             # frames to the guest: from the remote as it knows it
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer           # inbound: the host-side sockaddr replies go to
        self.listener = listener
        self.dns = False           # its answers are read for --allow-dns-name
        self.read_turn = -2        # the loop's turn when its socket was last read

    def __repr__(self) -> str:
        h = self.hdr
        fam = socket.AF_INET6 if h.v6 else socket.AF_INET
        return (f"<udp {socket.inet_ntop(fam, h.dst)}:{h.dport} <-> "
                f"{socket.inet_ntop(fam, h.src)}:{h.sport}{' in' if self.listener else ''}>")


def _recverr(sock: socket.socket, v6: bool) -> None:
    if v6:
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)


def set_buffers(sock: socket.socket) -> None:
    """Large socket buffers (best effort): datagrams arrive and leave in bursts."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    except OSError:
        pass


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1"


def drain_errors(sock: socket.socket) -> None:
    """Empty a socket's error queue when nobody is told about its errors."""
    for _ in range(ERRQUEUE_MAX):
        try:
            sock.recvmsg(1, 512, MSG_ERRQUEUE)
        except OSError:
            return


class UdpHandler:
    def __init__(self, conf: Config, loop: Loop, tap: TapBackend, guest: GuestState,
                 addrmap: AddressMap | None = None, *, flows: FlowTable | None = None,
                 idle: float = IDLE_TIMEOUT, idle_replied: float = IDLE_TIMEOUT_REPLIED,
                 gate: Gate | None = None) -> None:
        """`flows`: the flow table (the data plane's), else one of its own."""
        self.conf = conf
        self.loop = loop
        self.tap = tap
        self.guest = guest
        self.gate = gate or (flows.gate if flows is not None else None) or Gate()
        self.map = addrmap or AddressMap(conf)
        self.writer = DatagramWriter(tap, conf.our_mac, guest)
        self.table = flows if flows is not None else FlowTable(loop, gate=self.gate)
        self.expiry = DatagramExpiry(self.table, idle, idle_replied)
        self.table.serve(UDP, release=self._release, timer=self.expiry,
                         record=datagram_record, quota=MAX_FLOWS)
        # flows by key (outbound: one descriptor each; inbound: the listener's socket)
        self.flows: dict[bytes, UdpFlow] = self.table.index[UDP_INDEX]
        self.counters: Counter[str] = Counter()
        self.max4 = conf.mtu - 28          # largest payload the guest's link carries
        self.max6 = conf.mtu - 48
        self._listeners: set[UdpListener] = set()
        # forwarded flows by (far end, ports) only: a guest with several addresses may
        # answer from another one of its own (an unbound server picks its source)
        self._inbound_replies: dict[bytes, UdpFlow] = {}
        self.bcast4 = conf.ip4.network.broadcast_address.packed if conf.ip4 else b""

    # ================================================================ guest side

    def on_frame4(self, frame: memoryview, l3: int, l4: int, end: int,
                  key: bytes) -> bool | None:
        if end - l4 < 8:
            self.counters["runt"] += 1
            return
        ulen = frame[l4 + 4] << 8 | frame[l4 + 5]
        if ulen < 8 or l4 + ulen > end:
            self.counters["malformed"] += 1
            return
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(False, key, frame, l3 + 12, l3 + 16, l4, l3, end)
            if flow is None:
                return
        self._to_host(flow, frame[l4 + 8:l4 + ulen])
        return True             # the guest mostly waits for an answer now (common.tap)

    def on_frame6(self, frame: memoryview, l3: int, l4: int, end: int,
                  key: bytes) -> bool | None:
        if end - l4 < 8:
            self.counters["runt"] += 1
            return
        ulen = frame[l4 + 4] << 8 | frame[l4 + 5]
        if ulen < 8 or l4 + ulen > end:
            self.counters["malformed"] += 1
            return
        flow = self.flows.get(key)
        if flow is None:
            flow = self._open(True, key, frame, l3 + 8, l3 + 24, l4, l3, end)
            if flow is None:
                return
        self._to_host(flow, frame[l4 + 8:l4 + ulen])
        return True             # the guest mostly waits for an answer now (common.tap)

    def _to_host(self, flow: UdpFlow, data: memoryview) -> None:
        flow.last = self.loop.now
        for _attempt in range(2):
            try:
                if flow.peer is None:
                    flow.sock.send(data)
                else:
                    flow.sock.sendto(data, flow.peer)
                    if not flow.replied:
                        self.table.mark_replied(flow)
                flow.bytes_up += len(data)
                flow.frames_up += 1
                return
            except BlockingIOError:
                self.counters["sock_full"] += 1
                return
            except OSError as exc:
                # an ICMP error reported on this socket fails the next send once (and
                # clears itself): try again, the error queue tells the guest about it
                if exc.errno not in _PENDING_ICMP:
                    self.counters["send_error"] += 1
                    if plog.TRACE_ON:
                        log.log(plog.TRACE, "udp: send on %r: %s", flow, exc)
                    return
        self.counters["send_error"] += 1

    # ---------------------------------------------------------------- opening

    def _bad_destination(self, v6: bool, raddr: bytes) -> bool:
        if v6:
            return raddr[0] == 0xFF
        return raddr[0] >= 224 or raddr == self.bcast4

    def _open(self, v6: bool, key: bytes, frame: memoryview, src: int, dst: int,
              l4: int, l3: int, end: int) -> UdpFlow | None:
        alen = 16 if v6 else 4
        gaddr, raddr = bytes(frame[src:src + alen]), bytes(frame[dst:dst + alen])
        gport, rport = _PORTS.unpack_from(frame, l4)
        if forbidden(v6, gaddr, raddr):        # no flow has such a key: new ones only
            self.counters["bad_addr"] += 1
            return None
        if not gport or not rport:
            self.counters["port_zero"] += 1
            return None
        inbound = self._inbound_replies.get(raddr + bytes(frame[l4:l4 + 4]))
        if inbound is not None and not inbound.closed:
            self.counters["reply_from_other_addr"] += 1
            return inbound
        if self._bad_destination(v6, raddr):
            self.counters["multicast" if raddr[0] >= 224 else "bad_dst"] += 1
            return None
        verdict = self.gate.check(PROTO_UDP, v6, gaddr, gport, raddr, rport)
        if not verdict.allow:
            self.counters["denied"] += 1
            if self.gate.reset:
                self._prohibited(v6, frame[l3:end])
            return None
        table = self.table
        if not table.reserve(UDP, 1, by_guest=True):
            self.counters["limit"] += 1
            return None
        host_addr, host_port = self.map.to_host(v6, raddr, rport)
        try:
            sock = self._socket(v6, gport)
        except OSError as exc:
            table.unreserve(1)
            self.counters["socket_fail"] += 1
            log.debug("udp: no socket for a new flow: %s", exc)
            return None
        try:
            sock.connect(self.map.host_sockaddr(v6, host_addr, host_port))
        except OSError as exc:
            self.counters["connect_fail"] += 1
            if plog.TRACE_ON:
                log.log(plog.TRACE, "udp: connect to port %d: %s", host_port, exc)
            sock.close()
            table.unreserve(1)
            return None
        flow = UdpFlow(key, time.monotonic(), FlowHeader(v6, PROTO_UDP, raddr, gaddr, rport, gport),
                       sock, (host_addr, host_port))
        table.add(flow, 1, verdict)
        self.expiry.start(flow)
        self.loop.add(flow.fd, IN, partial(self._sock_event, flow))
        self.counters["opened"] += 1
        flow.dns = self.gate.watch_dns(PROTO_UDP, raddr, rport)
        _observe(self.guest, v6, gaddr)
        if plog.TRACE_ON:
            log.log(plog.TRACE, "udp: new flow %r, host port %d", flow, host_port)
        return flow

    def _prohibited(self, v6: bool, packet: memoryview) -> None:
        """Refuse a denied datagram as a firewall does: ICMP administratively prohibited."""
        our, mac = self.conf.our_mac, self.guest.mac
        self.tap.send_frame(prohibited6(mac, our, packet) if v6 else
                            prohibited4(mac, our, packet))

    def _socket(self, v6: bool, gport: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                             socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            _recverr(sock, v6)
            set_buffers(sock)
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.map.bind_outbound(sock, v6, gport)    # the guest's source port, where free
        except BaseException:
            sock.close()
            raise
        return sock

    # ================================================================ host side

    def _sock_event(self, flow: UdpFlow, events: int) -> None:
        if flow.closed:
            return
        if events & ERR:
            self._errqueue(flow.sock, flow, None)
        if events & IN:
            self._drain(flow)

    def _drain(self, flow: UdpFlow) -> None:
        hdr = flow.hdr
        writer = self.writer
        if hdr.v6:
            view, limit = writer.udp_payload6, self.max6
        else:
            view, limit = writer.udp_payload4, self.max4
        recv_into = flow.sock.recv_into
        send = writer.send_udp
        dns = self.gate.dns_datagram if flow.dns else None
        got = 0
        for _ in range(self.loop.reads(flow, DRAIN_MAX)):
            try:
                n = recv_into(view)
            except BlockingIOError:
                break
            except OSError:
                # a pending ICMP error: reading it clears it, the queue has the details
                self._errqueue(flow.sock, flow, None)
                break
            got += 1
            if n > limit:
                self.counters["oversize"] += 1
                continue
            if dns is not None:
                dns(view[:n])
            if not send(hdr, n):
                self.counters["tap_drop"] += 1
            else:
                flow.bytes_down += n
                flow.frames_down += 1
        if got:
            self.table.reply_seen(flow, self.loop.now)

    # ---------------------------------------------------------------- forwarded ports

    def listener_event(self, listener: UdpListener, events: int) -> None:
        if listener.owner is not self:
            self._adopt(listener)
        if events & ERR:
            self._errqueue(listener.sock, None, listener)
        if events & IN:
            self._drain_listener(listener)

    def _adopt(self, listener: UdpListener) -> None:
        listener.owner = self
        listener.peers = {}
        self._listeners.add(listener)

    def _drain_listener(self, listener: UdpListener) -> None:
        writer = self.writer
        if listener.v6:
            view, limit = writer.udp_payload6, self.max6
        else:
            view, limit = writer.udp_payload4, self.max4
        recvfrom_into = listener.sock.recvfrom_into
        peers = listener.peers
        local = listener.local
        send = writer.send_udp
        now = self.loop.now
        for _ in range(self.loop.reads(listener, DRAIN_MAX)):
            try:
                n, addr = recvfrom_into(view)
            except BlockingIOError:
                return
            except OSError:
                self._errqueue(listener.sock, None, listener)
                return
            flow = peers.get(addr)
            if flow is None:
                if local is not None and listener.to_addr is None and _is_loopback(addr[0]):
                    local(listener, view[:n], addr)
                    continue
                flow = self._open_inbound(listener, addr, now)
                if flow is None:
                    continue
            if n > limit:
                self.counters["oversize"] += 1
                continue
            flow.last = now
            if not send(flow.hdr, n):
                self.counters["tap_drop"] += 1
            else:
                flow.bytes_down += n
                flow.frames_down += 1

    def _open_inbound(self, listener: UdpListener, addr: tuple, now: float) -> UdpFlow | None:
        v6 = listener.v6
        gaddr = self.guest.addr6 if v6 else self.guest.addr4
        if listener.to_addr is not None:
            guest = listener.to_addr
        elif gaddr is None:
            self.counters["no_guest_addr"] += 1
            return None
        else:
            guest = gaddr.packed
        peer = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr[0])
        src = self.map.to_guest_source(v6, peer)
        key = make_key(guest, src, listener.to_port, addr[1])
        existing = self.flows.get(key)
        if existing is not None:
            # the guest already talks to this very address and port: same frames
            self.counters["collision"] += 1
            return existing
        verdict = self.gate.check_inbound(PROTO_UDP, v6, guest, listener.to_port, peer, addr[1])
        if not verdict.allow:
            self.counters["denied"] += 1       # no ICMP: ours would come from no socket
            return None
        if not self.table.reserve(UDP, 0, by_guest=False):
            self.counters["limit"] += 1
            return None
        flow = UdpFlow(key, now, FlowHeader(v6, PROTO_UDP, src, guest, addr[1], listener.to_port),
                       listener.sock, (peer, addr[1]), peer=addr, listener=listener)
        self.table.add(flow, 0, verdict)
        self.expiry.start(flow)
        listener.peers[addr] = flow
        self._inbound_replies[src + _PORTS.pack(listener.to_port, addr[1])] = flow
        self.counters["opened_inbound"] += 1
        if plog.TRACE_ON:
            log.log(plog.TRACE, "udp: new inbound flow %r", flow)
        return flow

    def drop_listener(self, listener: UdpListener) -> None:
        """A forwarded port closes: forget the flows that came through it."""
        for flow in list(listener.peers.values()):
            self.table.close(flow, "closed")
        listener.peers = {}
        listener.owner = None
        self._listeners.discard(listener)

    # ---------------------------------------------------------------- ICMP errors

    def _errqueue(self, sock: socket.socket, flow: UdpFlow | None,
                  listener: UdpListener | None) -> None:
        for _ in range(ERRQUEUE_MAX):
            try:
                data, anc, _flags, addr = sock.recvmsg(ERRQUEUE_BUF, 512, MSG_ERRQUEUE)
            except OSError:       # EAGAIN: the queue is empty
                return
            err = None
            for level, type_, cdata in anc:
                err = parse_sock_error(level, type_, cdata) or err
            target = flow if flow is not None else (
                listener.peers.get(addr) if listener is not None else None)
            if err is None or target is None or target.closed:
                continue
            self._icmp_to_guest(target, err, data)

    def _icmp_to_guest(self, flow: UdpFlow, err, payload: bytes) -> None:
        hdr = flow.hdr
        v6 = hdr.v6
        if err.offender is None or err.offender == flow.host_addr:
            sender = hdr.src
        else:
            sender = self.map.to_guest_source(v6, err.offender)
        msg = error_for_guest(v6, err, guest=hdr.dst, remote=hdr.src, guest_port=hdr.dport,
                              remote_port=hdr.sport, payload=payload,
                              guest_mtu=self.conf.mtu, sender=sender)
        if msg is None:
            self.counters["icmp_ignored"] += 1
            return
        if v6:
            frame = build_ipv6_frame(self.guest.mac, self.conf.our_mac, sender, hdr.dst,
                                     PROTO_ICMPV6, msg, hop_limit=64)
        else:
            frame = build_ipv4_frame(self.guest.mac, self.conf.our_mac, sender, hdr.dst,
                                     PROTO_ICMP, msg)
        self.counters["icmp_error"] += 1
        if plog.TRACE_ON:
            log.log(plog.TRACE, "udp: ICMP error type %d code %d for %r", err.type, err.code,
                    flow)
        self.tap.send_frame(frame)

    # ================================================================ lifetime

    def _release(self, flow: UdpFlow) -> None:
        """The flow table's callback: a flow is gone (expired, evicted or closed)."""
        listener = flow.listener
        if listener is not None:
            if listener.peers.get(flow.peer) is flow:
                del listener.peers[flow.peer]
            reply_key = flow.hdr.src + _PORTS.pack(flow.hdr.dport, flow.hdr.sport)
            if self._inbound_replies.get(reply_key) is flow:
                del self._inbound_replies[reply_key]
            return
        self.loop.remove(flow.fd)
        flow.sock.close()

    def close_all(self) -> None:
        self.table.close_kind(UDP)
        self._inbound_replies.clear()
        for listener in list(self._listeners):
            listener.owner = None
            listener.peers = {}
        self._listeners.clear()

    def stats(self) -> dict[str, int]:
        return {**self.counters, **self.table.stats(UDP)}


def _observe(guest: GuestState, v6: bool, packed: bytes) -> None:
    import ipaddress  # only on new flows

    if v6:
        guest.observe_addr6(ipaddress.IPv6Address(packed))
    else:
        guest.observe_addr4(ipaddress.IPv4Address(packed))


# ================================================================ forwarded port sockets


LocalHook = Callable[["UdpListener", memoryview, tuple], None]


class UdpListener:
    """The bound socket of one forwarded port (-u) and its peers.

    Datagrams go to the current handler (`handler()`; None between guests in
    passt: then they are read and dropped).  With `local`, datagrams from a
    loopback peer go there instead (pasta's splice path).
    """

    def __init__(self, loop: Loop, sock: socket.socket, to_port: int,
                 handler: Callable[[], UdpHandler | None], local: LocalHook | None = None,
                 to_addr: bytes | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.v6 = sock.family == socket.AF_INET6
        self.to_port = to_port
        self.to_addr = to_addr      # target address on the guest side; None: the guest's
        self.handler = handler
        self.local = local
        self.owner: UdpHandler | None = None
        self.peers: dict[tuple, UdpFlow] = {}
        self.closed = False
        self.read_turn = -2         # the loop's turn when the socket was last read
        loop.add(self.fd, IN, self._event)

    def _event(self, events: int) -> None:
        h = self.handler()
        if h is not None:
            h.listener_event(self, events)
            return
        # nobody to give them to: read and drop (loopback peers may still have a taker)
        buf = bytearray(65536)
        view = memoryview(buf)
        for _ in range(DRAIN_MAX):
            try:
                n, addr = self.sock.recvfrom_into(view)
            except OSError:
                break
            if self.local is not None and self.to_addr is None and _is_loopback(addr[0]):
                self.local(self, view[:n], addr)
        if events & ERR:
            drain_errors(self.sock)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.owner is not None:
            self.owner.drop_listener(self)
        self.loop.remove(self.fd)
        self.sock.close()


SocketFactory = Callable[[int, int], socket.socket]


def bind_udp(make_socket: SocketFactory, family: int, addr: str, port: int,
             ifname: str | None, *, strict: bool = False,
             freebind: bool = False) -> socket.socket | None:
    """A bound, non-blocking UDP socket with IP(V6)_RECVERR, or None (logged) if taken;
    `strict`: OSError instead of None (forwarded ports say why they failed)."""
    try:
        sock = make_socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        if strict:
            raise
        _limited.warning("udp-socket", "cannot create a UDP socket for port %d: %s", port,
                         exc.strerror)
        return None
    try:
        v6 = family == socket.AF_INET6
        _recverr(sock, v6)
        set_buffers(sock)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if freebind:
            set_freebind(sock, family)
        if ifname:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind((addr, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if strict:
            raise
        log.debug("cannot bind UDP %s port %d: %s", addr, port, exc.strerror)
        return None
    return sock


def udp_listener(loop: Loop, make_socket: SocketFactory,
                 handler: Callable[[], UdpHandler | None], local: LocalHook | None = None,
                 *, freebind: bool = False):
    """An `open_port` for `common.listeners.PortForwarder`: UDP sockets for -u
    (OSError when the port cannot be bound)."""

    def open_port(family: int, addr: str, port: int, ifname: str | None,
                  to_port: int, to_addr: bytes | None = None) -> UdpListener:
        sock = bind_udp(make_socket, family, addr, port, ifname, strict=True,
                        freebind=freebind)
        assert sock is not None
        return UdpListener(loop, sock, to_port, handler, local, to_addr)

    return open_port
