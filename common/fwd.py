"""Port-forwarding specifications: the `-t/-u/-T/-U SPEC` syntax and what it selects.

This module owns the parsing and validation of forwarding specs and the
defaults C passt/pasta apply to them.  It does no I/O except reading the
ephemeral port range; binding sockets and following `auto` at run time belong
to the listeners (the ports bound on the other side come from `procnet`).

SPEC is one of:

- `none`: forward nothing;
- `auto` (pasta only): follow the ports bound on the other side;
- `all`: every port from 1 to 65535 except the ephemeral range;
- `[ADDR[%IF]/]LIST`: LIST is comma-separated items `FIRST[-LAST][:TOFIRST[-TOLAST]]`
  and exclusions `~FIRST[-LAST]`; an exclusion-only LIST means every other
  non-ephemeral port.  ADDR is IPv4 or IPv6 (brackets around IPv6 are accepted
  although C pasta refuses them), `%IF` binds to an interface and may also be
  given without ADDR.

Several specs may be given for one option (`-t 22 -t 80:8080`): they combine,
and no source port may be forwarded twice, whatever the address (like C pasta,
whose map has one target per port).  The keywords `none`, `auto` and `all` stand
alone.  Exclusions apply to the spec they appear in, whatever their position in
it; an item whose every port is excluded is an error (C pasta accepts it, then
fails to bind).  Deliberate differences from the C parser, which reads numbers
with strtoul: port 0, signs and hex are refused, and `all` is allowed in pasta
too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

PORT_MAX = 65535
IFNAMSIZ = 16                      # Linux: interface names are at most 15 bytes + NUL
EPHEMERAL_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
EPHEMERAL_DEFAULT = (32768, 60999)  # the kernel's default ip_local_port_range


class SpecError(ValueError):
    """A forwarding spec that cannot be parsed; the message is one line."""


@dataclass(frozen=True, slots=True)
class PortMap:
    """One forwarded port: listen on `port` (at `addr`/`ifname` if given), reach `to_port`."""
    port: int
    to_port: int
    addr: IPv4Address | IPv6Address | None = None
    ifname: str | None = None


@dataclass(frozen=True, repr=False)
class ForwardSpec:
    """What one protocol/direction forwards.

    auto: follow the ports bound on the other side (pasta); `maps` then lists
    nothing and `excluded` the ports never to follow.  Otherwise `maps` lists
    every forwarded port, in the order the specs gave them.  `text` keeps the
    specs as given, for messages ("failed to bind any port for -t ...").
    """
    auto: bool = False
    maps: tuple[PortMap, ...] = ()
    excluded: frozenset[int] = frozenset()
    text: tuple[str, ...] = field(default=(), compare=False)

    @property
    def enabled(self) -> bool:
        return self.auto or bool(self.maps)

    @cached_property
    def by_port(self) -> dict[int, PortMap]:
        """Source port -> its map (explicit specs; empty for `auto`)."""
        return {m.port: m for m in self.maps}

    def target(self, port: int) -> int | None:
        """The port `port` is forwarded to, or None if it is not forwarded."""
        m = self.by_port.get(port)
        return None if m is None else m.to_port

    def binds(self, bound: Iterable[int] = ()) -> tuple[PortMap, ...]:
        """The ports to listen on: `maps`, or for `auto` the `bound` ports of the
        other side (from a procnet scan) minus `excluded`, untranslated."""
        if not self.auto:
            return self.maps
        return tuple(PortMap(p, p) for p in sorted(set(bound) - self.excluded))

    def describe(self) -> str:
        """Compact summary, e.g. `22->2222, 192.0.2.1%eth0/80-81->8080-8081`."""
        if self.auto:
            return "auto" + (f" except {len(self.excluded)} ports" if self.excluded else "")
        if not self.maps:
            return "none"
        runs: list[list[PortMap]] = []         # consecutive ports, targets and binding
        for m in self.maps:
            last = runs[-1][-1] if runs else None
            if (last is not None and m.port == last.port + 1 and m.to_port == last.to_port + 1
                    and m.addr == last.addr and m.ifname == last.ifname):
                runs[-1].append(m)
            else:
                runs.append([m])
        parts = []
        for run in runs:
            first, last = run[0], run[-1]
            where = "" if first.addr is None else str(first.addr)
            where += "" if first.ifname is None else f"%{first.ifname}"
            text = f"{where}/" if where else ""
            text += str(first.port) if len(run) == 1 else f"{first.port}-{last.port}"
            if first.to_port != first.port:
                text += (f"->{first.to_port}" if len(run) == 1
                         else f"->{first.to_port}-{last.to_port}")
            parts.append(text)
        return ", ".join(parts)

    def __repr__(self) -> str:
        # `all` lists some 37 000 maps: keep logs and test failures readable
        return f"ForwardSpec({self.describe()})"


NONE = ForwardSpec()
AUTO = ForwardSpec(auto=True)


def ephemeral_range(path: str = EPHEMERAL_PATH) -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last), or its default if unreadable."""
    try:
        with open(path) as f:
            first, last = (int(w) for w in f.read().split())
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT
    return (first, last) if 0 < first <= last <= PORT_MAX else EPHEMERAL_DEFAULT


# ---------------------------------------------------------------- parsing


def _show(text: str, limit: int = 40) -> str:
    """`text` fit for a one-line message: printable, not too long."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."


def _ports(n: int) -> str:
    return "1 port" if n == 1 else f"{n} ports"


def _port(text: str, what: str) -> int:
    """One port number: ASCII decimal digits, 1-65535."""
    if not text:
        raise ValueError(f"missing {what}")
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"invalid {what} '{_show(text)}'")
    if len(text.lstrip("0")) > 5 or int(text) > PORT_MAX:
        raise ValueError(f"{what} {_show(text, 12)} out of range (1-{PORT_MAX})")
    if int(text) == 0:
        raise ValueError(f"{what} 0 is not allowed")
    return int(text)


def _range(text: str, what: str) -> tuple[int, int]:
    """`FIRST[-LAST]` -> (first, last)."""
    first_text, dash, last_text = text.partition("-")
    first = _port(first_text, what)
    if not dash:
        return first, first
    last = _port(last_text, what)
    if last < first:
        raise ValueError(f"range {first}-{last} ends before it starts")
    return first, last


def _addr_if(head: str) -> tuple[IPv4Address | IPv6Address | None, str | None]:
    """`ADDR[%IF]`, `[ADDR][%IF]`, `[ADDR%IF]` or `%IF` -> (address, interface)."""
    text = head
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]                       # [ADDR%IF]
    addr_text, pct, ifname = text.partition("%")
    if addr_text.startswith("[") and addr_text.endswith("]"):
        addr_text = addr_text[1:-1]             # [ADDR]%IF
    if pct and not ifname:
        raise ValueError(f"empty interface name in '{_show(head)}'")
    if ifname:
        if len(ifname.encode()) >= IFNAMSIZ:
            raise ValueError(f"interface name '{_show(ifname)}' too long "
                             f"(at most {IFNAMSIZ - 1} bytes)")
        if ifname in (".", "..") or any(c in "/:%" or c.isspace() or not c.isprintable()
                                         for c in ifname):
            raise ValueError(f"invalid interface name '{_show(ifname)}'")
    if not addr_text:
        if not ifname:
            raise ValueError("empty address before '/'")
        return None, ifname
    try:
        addr = ip_address(addr_text)
    except ValueError:
        raise ValueError(f"invalid address '{_show(addr_text)}'") from None
    return addr, ifname or None


def _parse_list(spec: str, want_eph: Callable[[], tuple[int, int]]) -> list[PortMap]:
    """One `[ADDR[%IF]/]LIST` spec -> its maps (exclusions applied)."""
    head, slash, body = spec.rpartition("/")
    addr, ifname = _addr_if(head) if slash else (None, None)
    if not body:
        raise ValueError("empty port list")

    items: list[tuple[str, int, int, int]] = []     # (item, first, last, to_first)
    excluded: set[int] = set()
    for item in body.split(","):
        if not item:
            raise ValueError("empty item in port list")
        if item.startswith("~"):
            if ":" in item:
                raise ValueError(f"exclusion '{_show(item)}' cannot have a target")
            first, last = _range(item[1:], "port")
            clash = excluded.intersection(range(first, last + 1))
            if clash:
                raise ValueError(f"port {min(clash)} excluded twice")
            excluded.update(range(first, last + 1))
            continue
        src, colon, dst = item.partition(":")
        first, last = _range(src, "port")
        if colon:
            to_first, to_last = _range(dst, "target port")
            if to_last - to_first != last - first:
                raise ValueError(f"target {dst} is {_ports(to_last - to_first + 1)}, "
                                 f"source {src} is {_ports(last - first + 1)}")
        else:
            to_first = first
        items.append((item, first, last, to_first))

    if not items:
        if not excluded:
            raise ValueError("empty port list")
        lo, hi = want_eph()
        items.append(("", 1, PORT_MAX, 1))
        excluded.update(range(lo, hi + 1))

    maps: list[PortMap] = []
    for item, first, last, to_first in items:
        kept = [PortMap(p, p - first + to_first, addr, ifname)
                for p in range(first, last + 1) if p not in excluded]
        if not kept and item:
            raise ValueError(f"every port of '{_show(item)}' is excluded")
        maps += kept
    if not maps:
        raise ValueError("no port left to forward")
    return maps


def parse_forward(specs: Sequence[str], *, mode: str, proto: str,
                  ephemeral: tuple[int, int] | None = None,
                  option: str | None = None) -> ForwardSpec:
    """Combine the specs given for one option into a ForwardSpec.

    `mode` is "pasta" or "passt" (only pasta has `auto`); `proto` "tcp" or
    "udp" names the protocol in messages, as `option` (e.g. "-t") does when
    given.  `ephemeral` is the (first, last) port range `all` and
    exclusion-only specs leave out; by default it is read from /proc, and only
    when such a spec needs it.  An empty `specs` means `none`.
    """
    if mode not in ("pasta", "passt"):
        raise ValueError(f"unknown mode {mode!r}")
    label = option or f"{proto.upper()} port spec"
    eph_cache: list[tuple[int, int]] = []

    def want_eph() -> tuple[int, int]:
        if not eph_cache:
            eph_cache.append(ephemeral if ephemeral is not None else ephemeral_range())
        return eph_cache[0]

    texts = tuple(s.strip() for s in specs)
    keyword = next((t for t in texts if t in ("none", "auto", "all")), None)
    if keyword is not None and any(t != keyword for t in texts):
        raise SpecError(f"{label}: '{keyword}' cannot be combined with other specs "
                        f"({', '.join(_show(t) for t in texts)})")
    if keyword == "none" or not texts:
        return ForwardSpec(text=texts)
    if keyword == "auto":
        if mode != "pasta":
            raise SpecError(f"{label} auto: 'auto' port forwarding is only for pasta")
        return ForwardSpec(auto=True, text=texts)
    if keyword == "all":
        if len(texts) > 1:
            raise SpecError(f"{label} all: 'all' given more than once")
        lo, hi = want_eph()
        maps = tuple(PortMap(p, p) for p in range(1, PORT_MAX + 1) if not lo <= p <= hi)
        return ForwardSpec(maps=maps, text=texts)

    maps: list[PortMap] = []
    seen: dict[int, int] = {}          # port -> index of the spec that forwards it
    for index, text in enumerate(texts):
        if not text:
            raise SpecError(f"{label}: empty spec")
        try:
            new = _parse_list(text, want_eph)
        except ValueError as e:
            raise SpecError(f"{label} {_show(text)}: {e}") from None
        for m in new:
            other = seen.get(m.port)
            if other is not None:
                where = "" if other == index else f" (also by {_show(texts[other])})"
                raise SpecError(f"{label} {_show(text)}: port {m.port} "
                                f"forwarded twice{where}")
            seen[m.port] = index
        maps += new
    return ForwardSpec(maps=tuple(maps), text=texts)


def udp_follows_tcp(tcp: ForwardSpec) -> ForwardSpec:
    """The UDP spec C passt/pasta derive from the TCP one when -u/-U is not given.

    The man page: "unless overridden, UDP ports with numbers corresponding to
    forwarded TCP port numbers are forwarded too, without, however, any port
    translation".  So UDP gets the same source ports with `to_port == port`
    (`-t 22:2222` gives UDP 22 -> 22), `auto` stays `auto`, `none` stays
    `none`.  The address and interface binding are kept: the user limited the
    TCP ports to them, and binding UDP more widely would expose more than was
    asked.  (The C build installed here binds no UDP socket in that case at
    all; we follow the documented behaviour.)
    """
    if tcp.auto:
        return ForwardSpec(auto=True, excluded=tcp.excluded, text=tcp.text)
    return ForwardSpec(maps=tuple(PortMap(m.port, m.port, m.addr, m.ifname)
                                  for m in tcp.maps), text=tcp.text)


_OPTIONS = {  # key in the option dict -> (flag, proto, direction key)
    "tcp_ports": ("-t", "tcp", "tcp_in"),
    "udp_ports": ("-u", "udp", "udp_in"),
    "tcp_ns": ("-T", "tcp", "tcp_out"),
    "udp_ns": ("-U", "udp", "udp_out"),
}


def forward_config(mode: str, opts: dict[str, Any], services: Any = None, *,
                   ephemeral: tuple[int, int] | None = None) -> dict[str, ForwardSpec]:
    """The four ForwardSpecs from the parsed options (`common.options` keys).

    Defaults: passt forwards nothing and has no -T/-U; pasta uses `auto` for
    each option not given.  A missing -u/-U follows -t/-T (`udp_follows_tcp`).
    With --no-tcp/--no-udp (`services.tcp/udp` false) the specs are still
    validated, then nothing of that protocol is forwarded.
    """
    parsed: dict[str, ForwardSpec | None] = {}
    for key, (flag, proto, out) in _OPTIONS.items():
        given = opts.get(key)
        if not given:
            parsed[out] = None
            continue
        if mode == "passt" and out.endswith("_out"):
            raise SpecError(f"{flag}: only pasta forwards ports from a namespace")
        parsed[out] = parse_forward(given, mode=mode, proto=proto, ephemeral=ephemeral,
                                    option=flag)

    default = AUTO if mode == "pasta" else NONE
    result: dict[str, ForwardSpec] = {}
    for direction in ("in", "out"):
        tcp = parsed[f"tcp_{direction}"]
        udp = parsed[f"udp_{direction}"]
        if direction == "out" and mode == "passt":
            tcp = udp = NONE
        tcp = default if tcp is None else tcp
        udp = udp_follows_tcp(tcp) if udp is None else udp
        if services is not None and not getattr(services, "tcp", True):
            tcp = NONE
        if services is not None and not getattr(services, "udp", True):
            udp = NONE
        result[f"tcp_{direction}"] = tcp
        result[f"udp_{direction}"] = udp
    return result
