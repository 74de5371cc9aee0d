"""Port-forwarding specifications: the `-t/-u/-T/-U SPEC` syntax and what it selects.

SPEC is `none`, `auto`, `all`, or `[ADDR[%IF]/]LIST` where LIST items are
`FIRST[-LAST][:TOFIRST[-TOLAST]]` and exclusions `~FIRST[-LAST]`; exclusions
alone mean every other non-ephemeral port.  Several specs may be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address


class SpecError(ValueError):
    """A forwarding spec that cannot be parsed; the message is one line."""


@dataclass(frozen=True)
class PortMap:
    """One forwarded port: listen on `port` (at `addr`/`ifname` if given), reach `to_port`."""
    port: int
    to_port: int
    addr: IPv4Address | IPv6Address | None = None
    ifname: str | None = None


@dataclass(frozen=True)
class ForwardSpec:
    """What one protocol/direction forwards.

    auto: follow the ports bound on the other side (pasta); `maps` then lists
    nothing and `excluded` the ports never to follow.
    """
    auto: bool = False
    maps: tuple[PortMap, ...] = ()
    excluded: frozenset[int] = frozenset()

    @property
    def enabled(self) -> bool:
        return self.auto or bool(self.maps)


NONE = ForwardSpec()
