"""The datagram flow table: lookup by key, an explicit limit, idle expiry.

Shared by the UDP and ICMP echo handlers (and pasta's loopback UDP path):
all of them keep one entry per conversation and must forget it when it goes
quiet, because nothing in a datagram says "this was the last one".  The
table is pure bookkeeping: it never touches a socket and never reads the
clock; callers pass `now` and give an `on_close` callback that releases
whatever a flow holds.

Policy, after conntrack's:

- a flow that has only ever carried traffic one way expires after `idle`
  seconds without traffic (30 s for UDP); once traffic went both ways
  (`mark_replied`) it is a conversation and gets `idle_replied` (180 s);
- at most `limit` flows.  A new flow in a full table evicts the oldest flow
  that never saw a reply (a flood of new source ports evicts its own
  previous flows, not the conversations in progress); when every flow has
  seen a reply, the new flow is refused.

One-way flows sit, oldest first, in a second insertion-ordered dict, so both
eviction and `mark_replied` are O(1); `expire` is one pass over the table,
run by the owner every few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar


class Flow:
    """What the table needs of an entry; handlers subclass it with their own slots."""
    __slots__ = ("key", "last", "replied", "closed", "opened", "bytes_up", "bytes_down",
                 "frames_up", "frames_down", "fid", "verdict", "why", "ends")

    def __init__(self, key: bytes | tuple, now: float) -> None:
        self.key = key
        self.opened = now        # for `pesto --flows`
        self.bytes_up = 0        # payload bytes from the guest (counted where cheap)
        self.bytes_down = 0      # payload bytes towards the guest
        self.frames_up = 0       # datagrams (messages) from the guest, and towards it
        self.frames_down = 0
        self.fid = 0             # the flow log's id and the policy's verdict (common.gate)
        self.verdict = None
        self.why = "closed"      # why it ended: the table says "timeout", "evicted", "exit"
        self.ends = None         # (path, guest, host) as the flow log writes them, once made
        self.last = now          # time of the last datagram, either way
        self.replied = False     # traffic has gone both ways
        self.closed = False


F = TypeVar("F", bound=Flow)


class FlowTable(Generic[F]):
    def __init__(self, *, limit: int, idle: float, idle_replied: float,
                 on_close: Callable[[F], None]) -> None:
        self.limit = limit
        self.idle = idle
        self.idle_replied = idle_replied
        self.on_close = on_close
        self.flows: dict[bytes | tuple, F] = {}
        self._oneway: dict[bytes | tuple, F] = {}
        self.evicted = 0
        self.refused = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self.flows)

    def __iter__(self) -> Iterator[F]:
        return iter(list(self.flows.values()))

    def get(self, key: bytes | tuple) -> F | None:
        return self.flows.get(key)

    def room(self) -> bool:
        """Make room for one more flow if the table is full: False if impossible.

        Call before creating what a new flow holds (a socket), then `add` it.
        """
        if len(self.flows) < self.limit:
            return True
        if not self._oneway:
            self.refused += 1
            return False
        victim = next(iter(self._oneway.values()))
        self.evicted += 1
        victim.why = "evicted"
        self.close(victim)
        return True

    def add(self, flow: F) -> bool:
        if not self.room():
            return False
        self.flows[flow.key] = flow
        if not flow.replied:
            self._oneway[flow.key] = flow
        return True

    def mark_replied(self, flow: F) -> None:
        if not flow.replied:
            flow.replied = True
            self._oneway.pop(flow.key, None)

    def reply_seen(self, flow: F, now: float) -> None:
        """Traffic came back on `flow` at `now`: it is alive, and a conversation."""
        flow.last = now
        self.mark_replied(flow)

    def remove(self, flow: F) -> None:
        """Forget a flow without calling on_close (its owner is closing it)."""
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if self._oneway.get(flow.key) is flow:
            del self._oneway[flow.key]

    def close(self, flow: F) -> None:
        """Forget a flow and let its owner release it."""
        if flow.closed:
            return
        self.remove(flow)
        flow.closed = True
        self.on_close(flow)

    def expire(self, now: float) -> int:
        """Close every flow idle for longer than its timeout; return how many."""
        oneway_before = now - self.idle
        replied_before = now - self.idle_replied
        idle = [f for f in self.flows.values()
                if f.last < (replied_before if f.replied else oneway_before)]
        for f in idle:
            f.why = "timeout"
            self.close(f)
        self.expired += len(idle)
        return len(idle)

    def close_all(self) -> None:
        for f in list(self.flows.values()):
            f.why = "exit"
            self.close(f)
