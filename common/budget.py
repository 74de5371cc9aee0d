"""The descriptors flows may hold: one budget, shared by every flow table, from RLIMIT_NOFILE.

Every flow holds descriptors: a TCP connection or an outbound UDP or ICMP
flow one socket, a spliced TCP connection two sockets and two pipes (six),
a UDP splice flow one socket.  Were the tables allowed more than
RLIMIT_NOFILE, a guest opening flows would make accept(), socket() and
pipe() fail with EMFILE wherever it happened to strike, listeners included.
So every table takes its descriptors from one `FdBudget` before it opens
anything (`take`), and gives them back when the flow closes (`give`): the
budget is RLIMIT_NOFILE (read after `raise_fd_limit`) less a reserve for
what is not a flow (listening sockets of forwarded ports, the tap, epoll,
timers, the splice paths' socket pools, the log).  Out of budget, a new flow
is refused and counted (`limit`), as when a table is full: running out of
descriptors is a limit we chose, not a failure.  Each table keeps its own
maximum too.

Flows the guest opens (its connections and datagrams out, `-T`/`-U` from the
namespace) may not take the last `host_reserve` descriptors: those are for
flows the host opens, through forwarded ports, so that a guest flooding us
with connections to nowhere cannot close the services it publishes.

One budget per process (`shared()`): in passt it outlives guests, whose
flows all give back what they took when their data plane stops.
"""

from __future__ import annotations

import resource

RESERVE_FIXED = 64              # the tap, epoll, timers, signals, logs, socket pools
RESERVE_SHARE = 32              # and one descriptor in this many, for listening sockets
HOST_SHARE = 16                 # of the budget, one descriptor in this many: host-opened only


class FdBudget:
    def __init__(self, nofile: int | None = None) -> None:
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if nofile == resource.RLIM_INFINITY:
                nofile = 1 << 20
        self.nofile = nofile
        self.limit = max(nofile - RESERVE_FIXED - nofile // RESERVE_SHARE, 0)
        self.host_reserve = self.limit // HOST_SHARE
        self.used = 0

    @property
    def guest_limit(self) -> int:
        """What flows the guest opens may hold in all."""
        return self.limit - self.host_reserve

    def take(self, n: int = 1, *, by_guest: bool) -> bool:
        """Reserve `n` descriptors for a new flow opened by the guest (or by the host, on
        a forwarded port); False, nothing taken, if over budget."""
        if self.used + n > (self.limit - self.host_reserve if by_guest else self.limit):
            return False
        self.used += n
        return True

    def give(self, n: int = 1) -> None:
        self.used -= n

    def __repr__(self) -> str:
        return f"<FdBudget {self.used}/{self.limit} of {self.nofile}>"


_shared: FdBudget | None = None


def shared() -> FdBudget:
    """The process's budget, sized at first use (after the descriptor limit is raised)."""
    global _shared
    if _shared is None:
        _shared = FdBudget()
    return _shared
