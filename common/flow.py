"""Flows: one table for every conversation we translate, whatever its kind.

Rules of this module: it owns the flow table, and it alone decides which
flows exist, how a frame finds its flow, how many flows may exist, when a
flow's timer fires, and who hears that a flow opened or closed.  It knows
neither the mode (pasta or passt) nor the tap backend, nor what a kind of
flow does with its sockets: that is its handler's (`common.tcp`,
`common.udp`, `common.icmp`, `pasta.splice`, `pasta.udp_splice`).

Theory of operation
-------------------
A flow is one conversation between the guest's side and the host's side.
There are five kinds:

    kind        guest side                           host side
    TCP         the guest's segments (tap frames)    a TCP socket
    TCP_SPLICE  a socket in the namespace            a socket on the host's loopback
    UDP         the guest's datagrams (tap frames)   a UDP socket (its own or a -u port's)
    UDP_SPLICE  a socket in the namespace            a socket on the host's loopback
    ICMP        the guest's echo requests (tap)      a ping socket

A tap flow records its two ends as plain fields: on the guest side the
guest's address and port and the address and port the guest talks to (its
frames come from there), on the host side the far end as the host sees it
(after address mapping, `common.mapping`), and the path: "tap", "loopback"
(a tap flow that reaches the host's loopback through the mapped gateway
address) or "splice" (splice flows name their ends from their sockets, when
asked).  A flow's counters are bytes and frames each way ("up":
from the guest side, "down": towards it), when it opened and when it last
carried anything; `common.flowinfo` turns a flow into the record that
`pesto --flows` lists and the flow log writes.

Finding a flow.  A frame from the guest names its flow by its addresses and
ports (for ICMP echo, its identifier): the *key* is those bytes as the frame
carries them, guest address, remote address, guest port, remote port, cut
out once per frame by the demux (`frame_key4/6`, `echo_key4/6`) and handed
to the handler, which looks it up in its protocol's index
(`table.index[proto]`, one dict per protocol, so no protocol byte needs to be
glued on).  A flow the host opens towards the guest (a forwarded port) is
keyed the same way from its parts (`make_key`), so the guest's answers find
it.  Splice flows never see a frame: their sockets' callbacks hold them.

Opening.  A handler that meets a new flow asks, in this order: the decision
hook (`decide`: the egress policy of `common.gate`; denied flows are the
handler's to refuse), then room (`reserve(kind, nfds)`): at most `limit`
flows in all, derived from the descriptor budget (`common.budget`) and
capped at FLOW_MAX, at most its kind's `quota` for a kind that has one (UDP,
ICMP and the splice paths keep the bounds they always had, so that a flood
of one kind is stopped before it fills the table), and the descriptors the
flow will hold, taken from that budget (none for an inbound UDP flow: it
answers through its listener's socket).  When any of these is short, the
oldest datagram flow that never saw an answer is evicted (of the same kind,
when it is the kind's quota that is short): nothing in a datagram says a
conversation ended, so a flood of one-way flows must make way for new flows
rather than lock them out.  When no such flow is left, the new flow is
refused and counted (`refused`, and the handler's `limit`).  Then the
handler makes its sockets and `add`s the flow: indexed, listed, and
announced to the gate (`opened`, which the flow log writes).  A spliced TCP
connection is added once its connect() completed: until then it holds its
reservation only, and a failed connect is no flow.

Closing.  `close(flow, why)` is the one place a flow ends, whoever ends it
(its handler, eviction, expiry, exit): it leaves the index and the list, its
kind's `release` callback closes what it holds, its descriptors go back to
the budget, and the gate hears why (`fin`, `rst`, `timeout`, `evicted`...).

Timers.  One heap of (time, flow) for every flow that needs waking, and one
loop timer for the earliest entry: nothing runs periodically, so a process
with idle flows sleeps until the first of them needs something.  A handler
asks for a wake-up with `arm(flow, when)`; a flow is woken no later than the
earliest time it asked for (`flow.timer_at`), and only a time earlier than
that pushes a heap entry, so moving a deadline later (a retransmission timer
pushed back by every ACK) costs an attribute write, no heap operation.  When
an entry comes due its kind's `timer(flow, now)` callback does what is due
and returns when it wants to be woken next (0: not at all); entries of
closed flows, and entries a later `arm` made obsolete, are skipped.  Times
that need no precision (idle expiry: seconds to hours away) are rounded up to
whole seconds (`coarse`), so many flows share one wake-up.

Idle datagram flows (UDP, ICMP, UDP splice) expire like conntrack's entries:
after `idle` seconds without traffic while it only ever went one way, after
`idle_replied` once it went both ways (`reply_seen`); `DatagramExpiry` is that
timer callback.
"""

from __future__ import annotations

import heapq
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator

from common import budget
from common.budget import FdBudget
from common.loop import Loop, Timer

log = logging.getLogger("flow")

# kinds
TCP, TCP_SPLICE, UDP, UDP_SPLICE, ICMP = 1, 2, 3, 4, 5
KIND_NAMES = {TCP: "tcp", TCP_SPLICE: "tcp_splice", UDP: "udp", UDP_SPLICE: "udp_splice",
              ICMP: "icmp"}
PROTO_NAMES = {TCP: "tcp", TCP_SPLICE: "tcp", UDP: "udp", UDP_SPLICE: "udp", ICMP: "icmp"}
DATAGRAM = frozenset((UDP, UDP_SPLICE, ICMP))   # kinds that can be evicted when one-way
SPLICED = frozenset((TCP_SPLICE, UDP_SPLICE))
# paths
TAP, LOOPBACK, SPLICE = "tap", "loopback", "splice"
# the indices frames are looked up in
PROTO_TCP, PROTO_UDP, PROTO_ICMP = 6, 17, 1

FLOW_MAX = 65536               # flows at most, whatever the descriptor limit (memory)
EVICT_SCAN = 64                # one-way flows looked at for one that holds descriptors
COARSE = 1.0                   # grid of the times that need no precision, seconds
MIN_REARM = 0.001              # a timer callback is never asked back sooner than this

_PORTS = struct.Struct("!HH")


# ---------------------------------------------------------------- keys

def frame_key4(frame: memoryview, l3: int, l4: int) -> bytes:
    """The key of a TCP or UDP frame over IPv4: source address, destination address,
    source port, destination port (12 bytes)."""
    if l4 == l3 + 20:
        return bytes(frame[l3 + 12:l3 + 24])
    return bytes(frame[l3 + 12:l3 + 20]) + bytes(frame[l4:l4 + 4])


def frame_key6(frame: memoryview, l3: int, l4: int) -> bytes:
    """The key of a TCP or UDP frame over IPv6 (36 bytes)."""
    if l4 == l3 + 40:
        return bytes(frame[l3 + 8:l3 + 44])
    return bytes(frame[l3 + 8:l3 + 40]) + bytes(frame[l4:l4 + 4])


def echo_key4(frame: memoryview, l3: int, l4: int) -> bytes:
    """The key of an ICMP echo request: addresses, then the identifier (10 bytes)."""
    return bytes(frame[l3 + 12:l3 + 20]) + bytes(frame[l4 + 4:l4 + 6])


def echo_key6(frame: memoryview, l3: int, l4: int) -> bytes:
    """The key of an ICMPv6 echo request (34 bytes)."""
    return bytes(frame[l3 + 8:l3 + 40]) + bytes(frame[l4 + 4:l4 + 6])


def make_key(guest: bytes, remote: bytes, gport: int, rport: int) -> bytes:
    """The key the guest's frames of a flow will carry, from its parts."""
    return guest + remote + _PORTS.pack(gport, rport)


def key_addrs(key: bytes, v6: bool) -> tuple[bytes, bytes]:
    """(guest address, remote address) of a key."""
    return (key[:16], key[16:32]) if v6 else (key[:4], key[4:8])


def key_ports(key: bytes, v6: bool) -> tuple[int, int]:
    """(guest port, remote port) of a TCP or UDP key."""
    return _PORTS.unpack_from(key, 32 if v6 else 8)


_LOOPBACK6 = bytes(15) + b"\x01"


def tap_path(host_addr: bytes) -> str:
    """The path of a tap flow: LOOPBACK when its host end is the host's loopback (the
    guest reached it through the mapped gateway address), else TAP."""
    if len(host_addr) == 4:
        return LOOPBACK if host_addr[0] == 127 else TAP
    return LOOPBACK if host_addr == _LOOPBACK6 else TAP


def coarse(when: float, grid: float = COARSE) -> float:
    """A time that needs no precision, rounded up to the grid many flows share."""
    return math.ceil(when / grid) * grid


# ---------------------------------------------------------------- flows

class Flow:
    """What every flow has.  Each kind subclasses it with its own slots, and says where
    its guest side is: `guest_addr`/`guest_port` (the guest's end) and
    `remote_addr`/`remote_port` (what the guest talks to); tap kinds read them off the
    header their frames are built from (`hdr`, a `FlowHeader`: from remote to guest)."""
    __slots__ = ("kind", "key", "v6", "inbound", "host_addr", "host_port",
                 "opened", "last", "bytes_up", "bytes_down", "frames_up", "frames_down",
                 "replied", "closed", "nfds", "timer_at", "fid", "verdict", "ends")

    def __init__(self, kind: int, key: bytes | None, v6: bool, inbound: bool, now: float,
                 host: tuple[bytes, int]) -> None:
        self.kind = kind
        self.key = key                     # the index key (tap flows), None: not indexed
        self.v6 = v6
        self.inbound = inbound             # opened from the host side (a forwarded port)
        self.host_addr, self.host_port = host      # the far end, as the host sees it
        self.opened = now
        self.last = now                    # last traffic, either way
        self.bytes_up = 0                  # from the guest side (what the host side took)
        self.bytes_down = 0                # towards the guest side
        self.frames_up = 0
        self.frames_down = 0
        self.replied = False               # traffic went both ways (datagram kinds)
        self.closed = False
        self.nfds = 0                      # descriptors it holds from the budget
        self.timer_at = 0.0                # the earliest wake-up asked for, 0: none
        self.fid = 0                       # the flow log's id and the policy's verdict
        self.verdict = None
        self.ends = None                   # endpoint strings, made once (common.flowinfo)

    def __lt__(self, other: Flow) -> bool:
        """Heap order among flows due at the same time: any, but stable."""
        return id(self) < id(other)

    @property
    def path(self) -> str:
        return SPLICE if self.kind in SPLICED else tap_path(self.host_addr)


class TapFlow(Flow):
    """A flow whose guest side is the guest's frames, built from `hdr`."""
    __slots__ = ("hdr",)

    @property
    def guest_addr(self) -> bytes:
        return self.hdr.dst

    @property
    def guest_port(self) -> int:
        return self.hdr.dport

    @property
    def remote_addr(self) -> bytes:
        return self.hdr.src

    @property
    def remote_port(self) -> int:
        return self.hdr.sport


TimerFn = Callable[[Flow, float], float]
ReleaseFn = Callable[[Flow], None]


class _Kind:
    __slots__ = ("release", "timer", "record", "quota", "count", "oneway", "evicted",
                 "expired", "refused", "opened")

    def __init__(self, release: ReleaseFn, timer: TimerFn | None, record, quota: int) -> None:
        self.release = release
        self.timer = timer
        self.record = record
        self.quota = quota         # flows of this kind at most (0: only the table's limit)
        self.count = 0
        self.oneway: dict[Flow, None] = {}   # datagram flows without an answer, oldest first
        self.refused = 0
        self.evicted = 0
        self.expired = 0
        self.opened = 0


class FlowTable:
    def __init__(self, loop: Loop, *, fds: FdBudget | None = None, limit: int | None = None,
                 gate=None) -> None:
        """`gate`: the new-flow decision and open/close hooks (`common.gate.Gate`);
        None: every flow allowed, nobody told."""
        self.loop = loop
        self.fds = fds or budget.shared()
        self.limit = limit if limit is not None else min(self.fds.limit, FLOW_MAX)
        self.gate = gate
        # tap flows by key, one index per protocol; the others (splice) in a set
        self.index: dict[int, dict[bytes, Flow]] = {PROTO_TCP: {}, PROTO_UDP: {},
                                                    PROTO_ICMP: {}}
        self.unindexed: dict[Flow, None] = {}
        self.count = 0
        self._kinds: dict[int, _Kind] = {}
        self._heap: list[tuple[float, Flow]] = []
        self._wake: Timer | None = None
        self._wake_at = 0.0
        self.counters: Counter[str] = Counter()

    def serve(self, kind: int, *, release: ReleaseFn, timer: TimerFn | None = None,
              record=None, quota: int = 0) -> None:
        """A handler takes charge of a kind: `release(flow)` closes what a flow of it holds,
        `timer(flow, now)` runs when it asked to be woken, returning its next time (0: none),
        `record(flow)` describes a flow for the flow log (`common.flowinfo`); at most
        `quota` flows of the kind (0: no quota of its own), so that a flood of one kind
        (datagrams from new ports) is bounded before it fills the table."""
        self._kinds[kind] = _Kind(release, timer, record, quota)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Flow]:
        """Every live flow (a snapshot: closing flows while iterating is fine)."""
        out: list[Flow] = []
        for index in self.index.values():
            out.extend(index.values())
        out.extend(self.unindexed)
        return iter(out)

    def of_kind(self, kind: int) -> list[Flow]:
        if kind in _INDEX:
            return [f for f in self.index[_INDEX[kind]].values() if f.kind == kind]
        return [f for f in self.unindexed if f.kind == kind]

    # ------------------------------------------------------------ opening

    def decide(self, proto: int, v6: bool, guest: bytes, gport: int, remote: bytes,
               rport: int, *, inbound: bool = False):
        """The new-flow decision hook: the gate's verdict (`.allow`), None if no gate."""
        gate = self.gate
        if gate is None:
            return None
        if inbound:
            return gate.check_inbound(proto, v6, guest, gport, remote, rport)
        return gate.check(proto, v6, guest, gport, remote, rport)

    def reserve(self, kind: int, nfds: int, *, by_guest: bool) -> bool:
        """Room for one more flow of `kind` holding `nfds` descriptors, evicting a one-way
        datagram flow if that is what it takes (of the same kind when the kind is at its
        quota); False (counted) if there is none to evict.  On True the descriptors are
        taken: `add` the flow, or `unreserve`."""
        fds = self.fds
        k = self._kinds[kind]
        for _ in range(EVICT_SCAN):
            if k.quota and k.count >= k.quota:
                victim = next(iter(k.oneway), None)
            else:
                room = self.count < self.limit
                if room and fds.take(nfds, by_guest=by_guest):
                    return True
                victim = self._victim(room)
            if victim is None:
                break
            self._kinds[victim.kind].evicted += 1
            self.counters["evicted"] += 1
            self.close(victim, "evicted")
        k.refused += 1
        self.counters["refused"] += 1
        return False

    def _victim(self, need_fds: bool) -> Flow | None:
        """The oldest one-way datagram flow (holding descriptors, if `need_fds`)."""
        best = None
        for k in self._kinds.values():
            for i, f in enumerate(k.oneway):
                if not need_fds or f.nfds:
                    if best is None or f.opened < best.opened:
                        best = f
                    break
                if i >= EVICT_SCAN:
                    break
        return best

    def unreserve(self, nfds: int) -> None:
        """Give back what `reserve` took for a flow that could not be made."""
        self.fds.give(nfds)

    def add(self, flow: Flow, nfds: int, verdict=None) -> None:
        """A new flow exists (its descriptors reserved): index it, list it, announce it."""
        flow.nfds = nfds
        if flow.key is not None:
            self.index[_INDEX[flow.kind]][flow.key] = flow
        else:
            self.unindexed[flow] = None
        self.count += 1
        kind = self._kinds[flow.kind]
        kind.count += 1
        if flow.kind in DATAGRAM and not flow.replied:
            kind.oneway[flow] = None
        kind.opened += 1
        if self.gate is not None and verdict is not None:
            self.gate.opened(flow, verdict, kind.record)

    # ------------------------------------------------------------ living

    def reply_seen(self, flow: Flow, now: float) -> None:
        """Traffic came back on a datagram flow: it is alive, and a conversation."""
        flow.last = now
        if not flow.replied:
            self._answered(flow)

    def mark_replied(self, flow: Flow) -> None:
        if not flow.replied:
            self._answered(flow)

    # ------------------------------------------------------------ closing

    def close(self, flow: Flow, why: str) -> None:
        """The one place a flow ends: unlisted, released, its descriptors given back,
        the gate told why."""
        if flow.closed:
            return
        flow.closed = True
        key = flow.key
        if key is not None:
            index = self.index[_INDEX[flow.kind]]
            if index.get(key) is flow:
                del index[key]
        else:
            self.unindexed.pop(flow, None)
        self.count -= 1
        kind = self._kinds[flow.kind]
        kind.count -= 1
        kind.oneway.pop(flow, None)
        if why == "timeout":
            kind.expired += 1
        try:
            kind.release(flow)
        finally:
            if flow.nfds:
                self.fds.give(flow.nfds)
            if self.gate is not None:
                self.gate.closed(flow, why, kind.record)

    def close_kind(self, kind: int, why: str = "exit") -> None:
        for f in self.of_kind(kind):
            self.close(f, why)

    def close_all(self, why: str = "exit") -> None:
        for f in self:
            self.close(f, why)
        self._heap.clear()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    # ------------------------------------------------------------ timers

    def arm(self, flow: Flow, when: float) -> None:
        """Wake `flow`'s kind timer no later than `when` (a monotonic time)."""
        at = flow.timer_at
        if at and at <= when:
            return
        flow.timer_at = when
        heapq.heappush(self._heap, (when, flow))
        if self._wake is None or when < self._wake_at:
            self._schedule(when)

    def _schedule(self, when: float) -> None:
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = when
        self._wake = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._wake = None
        now = time.monotonic()
        heap = self._heap
        kinds = self._kinds
        while heap:
            when, flow = heap[0]
            if flow.closed or flow.timer_at != when:
                heapq.heappop(heap)           # closed, or armed earlier since
                continue
            if when > now:
                break
            heapq.heappop(heap)
            flow.timer_at = 0.0
            nxt = kinds[flow.kind].timer(flow, now)
            if nxt and not flow.closed:
                self.arm(flow, nxt if nxt > now else now + MIN_REARM)
        if heap and self._wake is None:
            self._schedule(heap[0][0])

    def wake_all(self, kind: int) -> None:
        """Run the timer of every flow of `kind` now, as if each had come due (a harness
        that shortened the timeouts uses this rather than wait for the wake-ups armed
        under the old ones)."""
        now = time.monotonic()
        timer = self._kinds[kind].timer
        for flow in self.of_kind(kind):
            if flow.closed:
                continue
            nxt = timer(flow, now)
            if nxt and not flow.closed:
                self.arm(flow, nxt if nxt > now else now + MIN_REARM)

    def _answered(self, flow: Flow) -> None:
        flow.replied = True
        self._kinds[flow.kind].oneway.pop(flow, None)

    def pending_timers(self) -> int:
        """Heap entries (live or stale): for tests and --stats."""
        return len(self._heap)

    def stats(self, kind: int) -> dict[str, int]:
        k = self._kinds.get(kind)
        if k is None:
            return {"flows": 0}
        return {"flows": k.count, "evicted": k.evicted, "refused": k.refused,
                "expired": k.expired}


_INDEX = {TCP: PROTO_TCP, UDP: PROTO_UDP, ICMP: PROTO_ICMP}


class DatagramExpiry:
    """The timer of a datagram kind: a flow idle longer than its timeout is closed, at
    most `grid` seconds late (tests with short timeouts shorten it too)."""
    __slots__ = ("table", "idle", "idle_replied", "grid")

    def __init__(self, table: FlowTable, idle: float, idle_replied: float) -> None:
        self.table = table
        self.idle = idle
        self.idle_replied = idle_replied
        self.grid = COARSE

    def deadline(self, flow: Flow) -> float:
        return flow.last + (self.idle_replied if flow.replied else self.idle)

    def start(self, flow: Flow) -> None:
        """Arm a new flow's expiry."""
        self.table.arm(flow, coarse(self.deadline(flow), self.grid))

    def __call__(self, flow: Flow, now: float) -> float:
        deadline = self.deadline(flow)
        if now >= deadline:
            self.table.close(flow, "timeout")
            return 0.0
        return coarse(deadline, self.grid)
