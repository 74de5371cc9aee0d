"""Frame demux: every frame from the guest goes to the one handler that owns it.

ARP, NDP, DHCP and DHCPv6 go to the sans-I/O responders, whose reply frames
go straight back to the tap.  TCP, UDP and ICMP go to the L4 translation
handlers registered in `l4` as `handler(frame, l3, l4, end, key)`, where
`frame` is a memoryview of the whole Ethernet frame (valid only during the
call), `l3`/`l4` are the offsets of the IP and transport headers, `end` is
where the IP packet ends (trailing Ethernet padding excluded) and `key` the
frame's flow key (`common.flow`: cut out here, once, for every handler).  A
key of a frame too short for its transport header is garbage the handler
never looks up: it drops the frame as a runt first.  What a handler returns
goes back to the tap backend: true when the frame likely ends what the guest
sends for now (see `common.tap`).

The parsing here is the minimum needed to route a frame, done on the
memoryview with no intermediate objects: this runs for every packet.  The
commonest frame, IPv4 without options carrying a whole TCP segment, is told
apart in `__call__` with one unpack and handed to TCP at once; anything that
check does not recognise goes the general way (`_ipv4`), which routes it or
drops it as before (tests/test_demux.py holds the two to the same result).  A frame
that is malformed, fragmented or for nobody is dropped and counted in
`counters`; a responder's reply larger than the link's MTU is dropped and
counted too (`reply_oversize`).  Nothing a guest sends can raise out of
here: a handler that raises costs that one frame, and is counted per
handler in `errors` and logged at a bounded rate (`common.ratelimit`).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable

from common import arp, dhcp, dhcpv6, ndp
from common.conf import Config
from common.flow import echo_key4, echo_key6, frame_key4, frame_key6
from common.guest import GuestState
from common.ratelimit import HandlerErrors, handler_name
from common.tap import TapBackend

log = logging.getLogger("demux")

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
# IPv6 extension headers we skip over to find the transport header
_EXT_SKIP = frozenset((0, 43, 60))
_EXT_FRAGMENT = 44
_NDP_TYPES = frozenset((133, 134, 135, 136, 137))
# the IPv4 header fields the demux reads, in one call: version and IHL, total length,
# flags and fragment offset, protocol
_IP4_FIELDS = struct.Struct("!BxHxxHxB")

L4Handler = Callable[[memoryview, int, int, int, bytes], object]


class FrameDemux:
    def __init__(self, conf: Config, guest: GuestState, tap: TapBackend) -> None:
        self.conf = conf
        self.guest = guest
        self.tap = tap
        self.counters: Counter[str] = Counter()
        self.errors = HandlerErrors(log)
        self._frame_max = 14 + conf.mtu
        svc = conf.services
        self._ip4 = self._arp = conf.ip4 is not None
        self._dhcp = svc.dhcp and conf.ip4 is not None
        self._ndp = svc.ndp and conf.ip6 is not None
        self._dhcpv6 = svc.dhcpv6 and conf.ip6 is not None
        self._our_ll = conf.ip6.our_ll.packed if conf.ip6 else b""
        # L4 translation handlers, registered by tcp/udp/icmp when enabled
        self.tcp4: L4Handler | None = None
        self.tcp6: L4Handler | None = None
        self.udp4: L4Handler | None = None
        self.udp6: L4Handler | None = None
        self.icmp4: L4Handler | None = None
        self.icmp6: L4Handler | None = None

    def _drop(self, why: str) -> None:
        self.counters[why] += 1

    def _reply(self, frames: list[bytes]) -> None:
        for f in frames:
            if len(f) > self._frame_max:
                self.counters["reply_oversize"] += 1
                continue
            self.tap.send_frame(f)

    def __call__(self, frame: memoryview) -> object:
        # one bad frame costs one frame (a try costs nothing until it catches)
        try:
            n = len(frame)
            if n < 14:
                return self._drop("runt")
            if frame[6:12] != self.guest.mac:
                self.guest.observe_mac(bytes(frame[6:12]))
            ethertype = frame[12] << 8 | frame[13]
            if ethertype == ETH_P_IP:
                if n >= 54:
                    # the usual frame, told apart in one unpack: IPv4 without options
                    # carrying a whole TCP segment; anything else takes `_ipv4`
                    vihl, total, frag, proto = _IP4_FIELDS.unpack_from(frame, 14)
                    if (vihl == 0x45 and proto == PROTO_TCP and not frag & 0x3FFF
                            and 40 <= total <= n - 14 and self._ip4):
                        h = self.tcp4
                        if h is not None:
                            return h(frame, 14, 34, 14 + total, bytes(frame[26:38]))
                return self._ipv4(frame, n)
            if ethertype == ETH_P_IPV6:
                return self._ipv6(frame, n)
            if ethertype == ETH_P_ARP and self._arp:
                return self._reply(arp.handle(frame, self.conf, self.guest))
            return self._drop("ethertype")
        except Exception as exc:
            self.errors.failed(handler_name(exc, __file__), exc)

    def _ipv4(self, frame: memoryview, n: int) -> None:
        if n < 34 or self.conf.ip4 is None:
            return self._drop("ipv4")
        vihl, total, frag, proto = _IP4_FIELDS.unpack_from(frame, 14)
        ihl = (vihl & 0x0F) * 4
        end = 14 + total
        l4 = 14 + ihl
        if vihl >> 4 != 4 or ihl < 20 or end > n or end < l4:
            return self._drop("ipv4")
        if frag & 0x3FFF:                             # MF set or offset != 0
            return self._drop("fragment")
        if proto == PROTO_TCP:
            h = self.tcp4
        elif proto == PROTO_UDP:
            if end - l4 >= 8 and frame[l4 + 2] == 0 and frame[l4 + 3] == 67:
                if self._dhcp:
                    return self._reply(dhcp.handle(frame, self.conf, self.guest))
                return self._drop("dhcp")
            h = self.udp4
        elif proto == PROTO_ICMP:
            if self.icmp4 is None:
                return self._drop("proto4")
            return self.icmp4(frame, 14, l4, end, echo_key4(frame, 14, l4))
        else:
            h = None
        if h is None:
            return self._drop("proto4")
        # frame_key4's usual case (no IP options) written out: this runs for every frame
        return h(frame, 14, l4, end,
                 bytes(frame[26:38]) if l4 == 34 else frame_key4(frame, 14, l4))

    def _ipv6(self, frame: memoryview, n: int) -> None:
        if n < 54 or frame[14] >> 4 != 6 or self.conf.ip6 is None:
            return self._drop("ipv6")
        end = 54 + (frame[18] << 8 | frame[19])
        if end > n:
            return self._drop("ipv6")
        nh = frame[20]
        l4 = 54
        while nh in _EXT_SKIP or nh == _EXT_FRAGMENT:
            if l4 + 8 > end:
                return self._drop("ipv6")
            if nh == _EXT_FRAGMENT:
                return self._drop("fragment")
            nh, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if l4 > end:
            return self._drop("ipv6")
        if nh == PROTO_TCP:
            h = self.tcp6
        elif nh == PROTO_UDP:
            if (end - l4 >= 8 and frame[l4 + 2] == 2 and frame[l4 + 3] == 0x23   # port 547
                    and (frame[38] == 0xFF or frame[38:54] == self._our_ll)):
                if self._dhcpv6:
                    return self._reply(dhcpv6.handle(frame, self.conf, self.guest))
                return self._drop("dhcpv6")
            h = self.udp6
        elif nh == PROTO_ICMPV6:
            if end - l4 >= 4 and frame[l4] in _NDP_TYPES:
                if self._ndp:
                    return self._reply(ndp.handle(frame, self.conf, self.guest))
                return self._drop("ndp")
            if self.icmp6 is None:
                return self._drop("proto6")
            return self.icmp6(frame, 14, l4, end, echo_key6(frame, 14, l4))
        else:
            h = None
        if h is None:
            return self._drop("proto6")
        return h(frame, 14, l4, end, frame_key6(frame, 14, l4))
