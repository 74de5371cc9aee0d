"""The data plane: one tap backend, the frame demux and the protocol handlers, on one loop.

Both modes build one of these after their own set-up (pasta: a tap in the
namespace; passt: a connected VM socket) and then run the loop.  It owns the
wiring only: which handler gets which frames, and the periodic work (Router
Advertisements).
"""

from __future__ import annotations

import logging
import sys

from common import ndp
from common.conf import Config
from common.demux import FrameDemux
from common.flow import FlowTable
from common.gate import Gate
from common.guest import GuestState
from common.icmp import IcmpHandler
from common.loop import IN, OUT, Loop
from common.mapping import AddressMap
from common.tap import TapBackend
from common.tcp.handler import TcpHandler
from common.udp import UdpHandler

log = logging.getLogger("dataplane")

RA_INTERVAL = getattr(ndp, "RA_INTERVAL", 60.0)


class DataPlane:
    def __init__(self, conf: Config, loop: Loop, tap: TapBackend,
                 guest: GuestState | None = None, addrmap: AddressMap | None = None,
                 *, gate: Gate | None = None, flows: FlowTable | None = None) -> None:
        """`addrmap`: made at set-up and shared by passt's successive guests, since
        making one asks the host about interfaces (not possible in the sandbox).
        `gate`: the process's (policy and flow log), which outlives this data plane.
        `flows`: the flow table (pasta shares it with its splice paths), else one of its
        own, which tells that gate about the flows that open and close."""
        self.conf = conf
        self.loop = loop
        self.tap = tap
        self.guest = guest or GuestState(conf)
        self.gate = gate or Gate()
        self.demux = FrameDemux(conf, self.guest, tap)
        self.addrmap = addrmap or AddressMap(conf)
        self.flows = flows if flows is not None else FlowTable(loop, gate=self.gate)
        log.debug("descriptors for flows: %r, at most %d flows", self.flows.fds,
                  self.flows.limit)
        self.tcp: TcpHandler | None = None
        if conf.services.tcp:
            self.tcp = TcpHandler(conf, loop, tap, self.guest, self.addrmap, flows=self.flows)
            self.demux.tcp4 = self.tcp.on_frame4
            self.demux.tcp6 = self.tcp.on_frame6
        self.udp: UdpHandler | None = None
        if conf.services.udp:
            self.udp = UdpHandler(conf, loop, tap, self.guest, self.addrmap,
                           flows=self.flows)
            self.demux.udp4 = self.udp.on_frame4
            self.demux.udp6 = self.udp.on_frame6
        self.icmp: IcmpHandler | None = None
        if conf.services.icmp:
            self.icmp = IcmpHandler(conf, loop, tap, self.guest, self.addrmap,
                             flows=self.flows)
            self.demux.icmp4 = self.icmp.on_frame4
            self.demux.icmp6 = self.icmp.on_frame6
        self._flush = [h.flush for h in (self.tcp,) if h is not None]
        self._ra_timer = None
        self._backlog_timer = None
        self._backlogs = hasattr(tap, "backlog")     # the backend may keep frames (see tap)
        self._stats_timer = None
        self._stats_last: dict[str, int] = {}
        self.on_tap_gone = lambda: loop.stop(0)

    def start(self) -> None:
        self.loop.add(self.tap.fileno(), IN, self._tap_readable)
        if self.conf.services.ra and self.conf.ip6 is not None:
            self._ra_timer = self.loop.call_every(RA_INTERVAL, self.send_ra, first=0.2)
        if self.conf.stats:
            self._stats_timer = self.loop.call_every(self.conf.stats, self.print_stats)

    def send_ra(self) -> None:
        self.tap.send_frame(ndp.router_advertisement(self.conf, self.guest))

    def _tap_readable(self, events: int) -> None:
        if events & OUT:
            # only a backend that queues output asks for EPOLLOUT (passt's StreamTap)
            self.tap.on_writable()
            if not events & ~OUT:
                return
        alive = self.tap.read(self.demux)
        for flush in self._flush:
            flush()
        if not alive:
            log.info("guest link closed")
            self.loop.remove(self.tap.fileno())
            self.on_tap_gone()
        elif self._backlog_timer is None and self._backlogs and self.tap.backlog:
            # frames the batch left in the backend's buffer: after everyone else's turn
            self._backlog_timer = self.loop.call_later(0, self._tap_backlog)

    def _tap_backlog(self) -> None:
        self._backlog_timer = None
        if self.loop.watching(self.tap.fileno()):
            self._tap_readable(IN)

    def counters(self) -> dict[str, int]:
        """Every event counter of the data plane, flat: `tcp.opened` and the like."""
        out = {"tap.frames_in": getattr(self.tap, "frames_in", 0),
               "tap.frames_out": getattr(self.tap, "frames_out", 0)}
        for name, counters in (("frames", self.demux.counters),
                               ("errors", self.demux.errors.counts),
                               ("tcp", self.tcp.counters if self.tcp else {}),
                               ("udp", self.udp.stats() if self.udp else {}),
                               ("icmp", self.icmp.counters if self.icmp else {}),
                               ("policy", self.gate.stats())):
            out.update((f"{name}.{k}", v) for k, v in counters.items())
        return out

    def print_stats(self) -> None:
        """--stats: the counters that moved since the last time, to stderr; nothing if none."""
        now = self.counters()
        moved = {k: v for k, v in now.items() if v != self._stats_last.get(k, 0)}
        self._stats_last = now
        if moved:
            print("stats: " + " ".join(f"{k}={v}" for k, v in sorted(moved.items())),
                  file=sys.stderr, flush=True)

    def log_counters(self) -> None:
        for name, counters in (("frames", self.demux.counters),
                               ("errors", self.demux.errors.counts),
                               ("tcp", self.tcp.counters if self.tcp else {}),
                               ("udp", self.udp.stats() if self.udp else {}),
                               ("icmp", self.icmp.counters if self.icmp else {}),
                               ("policy", self.gate.stats())):
            if counters:
                log.debug("%s: %s", name, ", ".join(f"{k} {v}" for k, v in
                                                    sorted(counters.items())))

    def stop(self) -> None:
        self.log_counters()
        if self.tcp is not None:
            self.tcp.close_all()
        if self.udp is not None:
            self.udp.close_all()
        if self.icmp is not None:
            self.icmp.close_all()
        self.flows.close_all()         # what is left (pasta's splice flows), and its timer
        if self._ra_timer is not None:
            self._ra_timer.cancel()
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        if self.loop.watching(self.tap.fileno()):
            self.loop.remove(self.tap.fileno())
