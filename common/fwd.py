"""Port-forwarding tables: the `-t/-u/-T/-U SPEC` syntax and the rules it builds.

This module owns the parsing and validation of forwarding specs, the table of
rules they build, how rules combine, and the defaults C passt/pasta apply.  It
does no I/O except reading the ephemeral port range; binding sockets, and
following `auto` at run time, belong to `listeners`.

A table is a sequence of `Rule`s, each a range of listening ports on one
address (or every address: `*`) and interface, the target port of its first
port, optionally a target address, and two flags: `weak` (best effort: a port
that cannot be bound is skipped) and `scan` (`auto`: a port is bound only
while something listens on it on the other side).

SPEC is `none`, or `[ADDR[%IF]/]ITEMS` where ADDR is IPv4, IPv6 (brackets
allowed), `*` or `[*]` (every address; also what no ADDR means), and ITEMS
is a comma-separated list of:

- `FIRST[-LAST][:TARGET]`, TARGET being `TOFIRST[-TOLAST]`, `TOADDR`, or
  `TOADDR/TOFIRST[-TOLAST]` (`-t 0.0.0.0/5000:192.0.2.5/6000`);
- `~FIRST[-LAST]`: never forward these (whatever their position);
- `all[:TOADDR]`: every non-ephemeral port not excluded, best effort;
- `auto` (pasta only): every rule of this spec becomes a scanning one.

A spec with no FIRST[-LAST] item means every non-ephemeral port that is not
excluded, best effort (`-t auto`, `-t ~22`, `-t all`).

Rules of one table must not overlap (same ports, addresses that meet),
with one exception of ours, beyond C passt: a best-effort rule gives way to
an exact one, so that `-t auto -t 18082` (what podman builds from
`pasta_options = ["-t", "auto"]` and `-p 18082:18082`) forwards 18082 always
and scans the rest.  Deliberate differences from the C parser, which reads
numbers with strtoul: port 0, signs and hex are refused, an item whose every
port is excluded is an error, and `all` is allowed in pasta too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

from common.record import field, record, replace

TYPE_CHECKING = False   # typing itself costs 2-5 ms at start-up
if TYPE_CHECKING:
    from typing import Any

PORT_MAX = 65535
IFNAMSIZ = 16                      # Linux: interface names are at most 15 bytes + NUL
EPHEMERAL_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
EPHEMERAL_DEFAULT = (32768, 60999)  # the kernel's default ip_local_port_range
RULES_MAX = 256                    # rules per table (C passt: 256 too)

Address = IPv4Address | IPv6Address


class SpecError(ValueError):
    """A forwarding spec that cannot be parsed or added; the message is one line."""


@record(frozen=True, slots=True)
class Rule:
    """Listen on ports first..last at `addr` (None: every address) and `ifname`;
    port p goes to port `to + p - first`, at `to_addr` (None: the guest's)."""
    first: int
    last: int
    to: int
    addr: Address | None = None
    ifname: str | None = None
    to_addr: Address | None = None
    weak: bool = False
    scan: bool = False

    @property
    def ports(self) -> range:
        return range(self.first, self.last + 1)

    def target(self, port: int) -> int:
        return self.to + port - self.first

    def meets(self, other: Rule) -> bool:
        """Overlapping ports on addresses that meet: they cannot both be bound."""
        if self.last < other.first or other.last < self.first:
            return False
        a, b = self.addr, other.addr
        if a is None or b is None:
            return True
        if a.is_unspecified or b.is_unspecified:
            return a.version == b.version
        return a == b

    def without(self, ports: range) -> list[Rule]:
        """This rule minus `ports`: zero, one or two rules."""
        out = []
        if self.first < ports.start:
            out.append(replace(self, last=min(self.last, ports.start - 1)))
        if self.last >= ports.stop:
            first = max(self.first, ports.stop)
            out.append(replace(self, first=first, to=self.target(first)))
        return out

    def __str__(self) -> str:
        where = "*" if self.addr is None else str(self.addr)
        where = f"[{where}]" + (f"%{self.ifname}" if self.ifname else "")
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        tolast = self.target(self.last)
        to = str(self.to) if self.first == self.last else f"{self.to}-{tolast}"
        if self.to_addr is not None:
            to = f"{self.to_addr}/{to}"
        flags = (" (best effort)" if self.weak else "") + (" (auto-scan)" if self.scan else "")
        return f"{where}:{ports} => {to}{flags}"


@record(frozen=True)
class ForwardSpec:
    """The table of one protocol and direction.  `text` keeps the specs as given."""
    rules: tuple[Rule, ...] = ()
    text: tuple[str, ...] = field(default=(), compare=False)

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    @property
    def scans(self) -> bool:
        """Some rule follows the other side's bound ports (`auto`)."""
        return any(r.scan for r in self.rules)

    def describe(self) -> str:
        """Compact summary, e.g. `22->2222, 192.0.2.1%eth0/80-81->8080-8081, auto`."""
        if not self.rules:
            return "none"
        parts = []
        for r in self.rules:
            where = "" if r.addr is None else str(r.addr)
            where += f"%{r.ifname}" if r.ifname else ""
            text = f"{where}/" if where else ""
            text += str(r.first) if r.first == r.last else f"{r.first}-{r.last}"
            if r.to != r.first or r.to_addr is not None:
                to = str(r.to) if r.first == r.last else f"{r.to}-{r.target(r.last)}"
                text += f"->{r.to_addr}/{to}" if r.to_addr is not None else f"->{to}"
            parts.append(text + (" (auto)" if r.scan else ""))
        return ", ".join(parts)

    def __str__(self) -> str:
        return "\n".join(map(str, self.rules))

    def __repr__(self) -> str:
        return f"ForwardSpec({self.describe()})"


NONE = ForwardSpec()


def ephemeral_range(path: str = EPHEMERAL_PATH) -> tuple[int, int]:
    """The kernel's ephemeral port range (first, last), or its default if unreadable."""
    try:
        with open(path) as f:
            first, last = (int(w) for w in f.read().split())
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT
    return (first, last) if 0 < first <= last <= PORT_MAX else EPHEMERAL_DEFAULT


# ---------------------------------------------------------------- parsing


def show(text: str, limit: int = 40) -> str:
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
        raise ValueError(f"invalid {what} '{show(text)}'")
    if len(text.lstrip("0")) > 5 or int(text) > PORT_MAX:
        raise ValueError(f"{what} {show(text, 12)} out of range (1-{PORT_MAX})")
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


def _address(text: str) -> Address | None:
    """An address, bracketed or not; None if `text` is not one."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ip_address(text)
    except ValueError:
        return None


def _ifname(name: str, whole: str) -> str:
    if not name:
        raise ValueError(f"empty interface name in '{show(whole)}'")
    if len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name '{show(name)}' too long "
                         f"(at most {IFNAMSIZ - 1} bytes)")
    if name in (".", "..") or any(c in "/:%" or c.isspace() or not c.isprintable()
                                  for c in name):
        raise ValueError(f"invalid interface name '{show(name)}'")
    return name


def _listen_part(head: str) -> tuple[Address | None, str | None]:
    """`ADDR[%IF]`, `[ADDR]%IF`, `[ADDR%IF]`, `*`, `[*]`, `*%IF` or `%IF`."""
    text = head
    if text.startswith("[") and text.endswith("]") and "%" in text:
        text = text[1:-1]                       # [ADDR%IF]
    addr_text, pct, ifname = text.partition("%")
    name = _ifname(ifname, head) if pct else None
    if addr_text in ("", "*", "[*]"):
        if not addr_text and not pct:
            raise ValueError("empty address before '/'")
        return None, name
    addr = _address(addr_text)
    if addr is None:
        raise ValueError(f"invalid address '{show(addr_text)}'")
    return addr, name


def _target(text: str, src: tuple[int, int]) -> tuple[int, Address | None]:
    """After ':': `TOFIRST[-TOLAST]`, `TOADDR` or `TOADDR/TOFIRST[-TOLAST]`."""
    first, last = src
    addr_text, slash, ports = text.rpartition("/")
    if slash:
        to_addr = _address(addr_text)
        if to_addr is None:
            raise ValueError(f"invalid target address '{show(addr_text)}'")
    else:
        to_addr = _address(text)
        if to_addr is not None:
            return first, to_addr
        ports = text
    to_first, to_last = _range(ports, "target port")
    if to_last - to_first != last - first:
        raise ValueError(f"target {ports} is {_ports(to_last - to_first + 1)}, "
                         f"source {first if first == last else f'{first}-{last}'} is "
                         f"{_ports(last - first + 1)}")
    return to_first, to_addr


def _split_listen(spec: str) -> tuple[str | None, str]:
    """(listening part, items).  A '/' among the items only ever follows a ':' (a
    target address), so what stands before the first '/' is the listening part
    when it has no ':', looks like one (`[`, `%`, `*`), or is an IPv6 address."""
    head, slash, body = spec.partition("/")
    if not slash:
        return None, spec
    if ":" not in head or head[:1] in ("[", "%", "*") or "%" in head \
            or _address(head) is not None:
        return head, body
    return None, spec


def parse_rules(spec: str, *, mode: str, families: Sequence[int] = (4, 6),
                ephemeral: Callable[[], tuple[int, int]] | tuple[int, int] = ephemeral_range,
                ns_side: bool = False) -> list[Rule]:
    """The rules one SPEC (not `none`) builds.  ValueError names what is wrong.

    `families` are the IP versions in use: with only one, "every address" is
    that family's unspecified address.  `ns_side` is for -T/-U, which listen
    on the namespace's loopback: no listening or target address there.
    """
    text = spec.strip()
    if not text:
        raise ValueError("empty spec")
    head, body = _split_listen(text)
    addr, ifname = _listen_part(head) if head is not None else (None, None)
    if ns_side and head is not None:
        raise ValueError("no listening address or interface for -T/-U: they listen on "
                         "the namespace's loopback")
    if not body:
        raise ValueError("empty port list")
    if addr is not None and addr.version not in families:
        raise ValueError(f"IPv{addr.version} forward, but IPv{addr.version} is disabled")
    if addr is None and len(families) == 1 and not ns_side:
        addr = IPv4Address(0) if families[0] == 4 else IPv6Address(0)

    includes: list[tuple[int, int, int, Address | None]] = []
    excluded: list[tuple[int, int]] = []              # (first, last) ranges
    scan = False
    all_to: Address | None = None
    for item in body.split(","):
        if not item:
            raise ValueError("empty item in port list")
        if item == "auto":
            if mode != "pasta":
                raise ValueError("'auto' port forwarding is only for pasta")
            scan = True
        elif item == "all" or item.startswith("all:"):
            if item != "all":
                all_to = _address(item[4:])
                if all_to is None:
                    raise ValueError(f"invalid target address '{show(item[4:])}'")
        elif item.startswith("~"):
            if ":" in item:
                raise ValueError(f"exclusion '{show(item)}' cannot have a target")
            first, last = _range(item[1:], "port")
            clash = [max(first, f) for f, la in excluded if f <= last and first <= la]
            if clash:
                raise ValueError(f"port {min(clash)} excluded twice")
            excluded.append((first, last))
        else:
            src, colon, dst = item.partition(":")
            first, last = _range(src, "port")
            to, to_addr = _target(dst, (first, last)) if colon else (first, None)
            includes.append((first, last, to, to_addr))

    weak = not includes
    if weak:
        lo, hi = ephemeral() if callable(ephemeral) else ephemeral
        includes = [(1, PORT_MAX, 1, all_to)]
        excluded.append((lo, hi))
    rules: list[Rule] = []
    for first, last, to, to_addr in includes:
        if to_addr is not None:
            _check_target(addr, to_addr, ns_side)
        made = _runs(Rule(first, last, to, addr, ifname, to_addr, weak, scan), excluded)
        if not made and not weak:
            item = str(first) if first == last else f"{first}-{last}"
            raise ValueError(f"every port of '{item}' is excluded")
        rules += made
    if not rules:
        raise ValueError("no port left to forward")
    return rules



def parse_port_set(text: str) -> tuple[tuple[int, int], ...]:
    """The ports of a `-t`-style item list without targets: `FIRST[-LAST]` and
    `~FIRST[-LAST]` items, comma-separated (`80,443,8000-8100`, `~22`).  Only
    exclusions means every port but those.  Returns sorted, merged (first, last)
    ranges; ValueError names what is wrong.  Used by policy rules (`common.policy`)."""
    if not text:
        raise ValueError("empty port list")
    included: list[tuple[int, int]] = []
    excluded: list[tuple[int, int]] = []
    for item in text.split(","):
        if not item:
            raise ValueError("empty item in port list")
        if ":" in item or item in ("all", "auto"):
            raise ValueError(f"invalid port item '{show(item)}'")
        if item.startswith("~"):
            excluded.append(_range(item[1:], "port"))
        else:
            included.append(_range(item, "port"))
    ranges = merge_ranges(included or [(1, PORT_MAX)])
    for lo, hi in excluded:
        ranges = [piece for r in ranges for piece in _cut(r, lo, hi)]
    if not ranges:
        raise ValueError(f"every port of '{show(text)}' is excluded")
    return tuple(ranges)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _cut(r: tuple[int, int], lo: int, hi: int) -> list[tuple[int, int]]:
    first, last = r
    if hi < first or lo > last:
        return [r]
    return [p for p in ((first, lo - 1), (hi + 1, last)) if p[0] <= p[1]]


def format_port_set(ranges: Sequence[tuple[int, int]]) -> str:
    """`80,443,8000-8100`: the inverse of parse_port_set (without exclusions)."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _check_target(addr: Address | None, to_addr: Address, ns_side: bool) -> None:
    if ns_side:
        raise ValueError("no target address for -T/-U: they reach the host's loopback")
    if to_addr.is_multicast or to_addr.is_unspecified:
        raise ValueError(f"invalid target address {to_addr}")
    if addr is None:
        other = "0.0.0.0" if to_addr.version == 4 else "[::]"
        raise ValueError(f"a target address needs a listening address of its family "
                         f"(did you mean {other}/...?)")
    if addr.version != to_addr.version:
        raise ValueError(f"IPv{addr.version} listening address {addr} with IPv"
                         f"{to_addr.version} target {to_addr}")


def _runs(rule: Rule, excluded: Sequence[tuple[int, int]]) -> list[Rule]:
    """`rule` split around the excluded (first, last) port ranges."""
    out, start = [], rule.first
    for first, last in sorted(excluded):
        if last < start or first > rule.last:
            continue
        if first > start:
            out.append(replace(rule, first=start, last=first - 1, to=rule.target(start)))
        start = max(start, last + 1)
    if start <= rule.last:
        out.append(replace(rule, first=start, last=rule.last, to=rule.target(start)))
    return out


# ---------------------------------------------------------------- combining


def add_rules(table: Sequence[Rule], new: Iterable[Rule]) -> list[Rule]:
    """`table` with `new` added, in order.  Overlaps are errors, except that a
    best-effort rule gives way to an exact one (module docstring)."""
    out = list(table)
    for rule in new:
        adding = [rule]
        for old in list(out):
            if not any(old.meets(a) for a in adding):
                continue
            if old.weak and not rule.weak:
                at = out.index(old)
                out[at:at + 1] = old.without(rule.ports)
            elif rule.weak and not old.weak:
                adding = [piece for a in adding for piece in a.without(old.ports)]
            else:
                raise SpecError(f"{rule} conflicts with {old}")
        out += adding
        if len(out) > RULES_MAX:
            raise SpecError(f"too many rules (at most {RULES_MAX})")
    return out


def delete_rules(table: Sequence[Rule], gone: Iterable[Rule]) -> list[Rule]:
    """`table` without `gone`, each of which must be in it exactly."""
    out = list(table)
    for rule in gone:
        if rule in out:
            out.remove(rule)
            continue
        clash = next((r for r in out if r.meets(rule)), None)
        if clash is not None:
            raise SpecError(f"{rule} conflicts with {clash}, but doesn't match it: "
                            "can't delete")
        raise SpecError(f"no rule {rule} to delete")
    return out


def parse_forward(specs: Sequence[str], *, mode: str, proto: str,
                  families: Sequence[int] = (4, 6),
                  ephemeral: tuple[int, int] | None = None,
                  option: str | None = None) -> ForwardSpec:
    """The table the specs given for one option build.

    `mode` is "pasta" or "passt" (only pasta has `auto`); `proto` "tcp" or
    "udp" names the protocol in messages, as `option` (e.g. "-t") does when
    given; -T/-U (`option` in upper case) listen on the namespace's loopback.
    `ephemeral` is the (first, last) port range best-effort specs leave out;
    by default it is read from /proc, and only when such a spec needs it.
    `none` first is a no-op (podman passes it); after other specs, an error.
    """
    if mode not in ("pasta", "passt"):
        raise ValueError(f"unknown mode {mode!r}")
    label = option or f"{proto.upper()} port spec"
    ns_side = option in ("-T", "-U")
    eph_cache: list[tuple[int, int]] = []

    def want_eph() -> tuple[int, int]:
        if not eph_cache:
            eph_cache.append(ephemeral if ephemeral is not None else ephemeral_range())
        return eph_cache[0]

    texts = tuple(specs)
    rules: list[Rule] = []
    for text in texts:
        if text.strip() == "none":
            if rules:
                raise SpecError(f"{label} none: conflicts with the specs before it")
            continue
        try:
            new = parse_rules(text, mode=mode, families=families, ephemeral=want_eph,
                              ns_side=ns_side)
        except ValueError as e:
            raise SpecError(f"{label} {show(text)}: {e}") from None
        try:
            rules = add_rules(rules, new)
        except SpecError as e:
            raise SpecError(f"{label} {show(text)}: {e}") from None
    return ForwardSpec(rules=tuple(rules), text=tuple(t.strip() for t in texts))


def udp_follows_tcp(tcp: ForwardSpec) -> ForwardSpec:
    """The UDP table C passt/pasta derive from the TCP one when -u/-U is not given.

    The man page: "unless overridden, UDP ports with numbers corresponding to
    forwarded TCP port numbers are forwarded too, without, however, any port
    translation".  So UDP gets the same rules with `to == first` (`-t 22:2222`
    gives UDP 22 -> 22); addresses, interfaces and flags are kept: the user
    limited the TCP ports to them, and binding UDP more widely would expose
    more than was asked.
    """
    return ForwardSpec(rules=tuple(replace(r, to=r.first) for r in tcp.rules), text=tcp.text)


_OPTIONS = {  # key in the option dict -> (flag, proto, direction key)
    "tcp_ports": ("-t", "tcp", "tcp_in"),
    "udp_ports": ("-u", "udp", "udp_in"),
    "tcp_ns": ("-T", "tcp", "tcp_out"),
    "udp_ns": ("-U", "udp", "udp_out"),
}


def forward_config(mode: str, opts: dict[str, Any], services: Any = None, *,
                   families: Sequence[int] = (4, 6),
                   ephemeral: tuple[int, int] | None = None) -> dict[str, ForwardSpec]:
    """The four tables from the parsed options (`common.options` keys).

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
        parsed[out] = parse_forward(given, mode=mode, proto=proto, families=families,
                                    ephemeral=ephemeral, option=flag)

    result: dict[str, ForwardSpec] = {}
    for direction in ("in", "out"):
        tcp = parsed[f"tcp_{direction}"]
        udp = parsed[f"udp_{direction}"]
        if mode == "passt" and direction == "out":
            tcp = udp = NONE
        if tcp is None:
            tcp = NONE if mode == "passt" else parse_forward(
                ["auto"], mode=mode, proto="tcp", families=families, ephemeral=ephemeral,
                option="-t" if direction == "in" else "-T")
        udp = udp_follows_tcp(tcp) if udp is None else udp
        if services is not None and not getattr(services, "tcp", True):
            tcp = NONE
        if services is not None and not getattr(services, "udp", True):
            udp = NONE
        result[f"tcp_{direction}"] = tcp
        result[f"udp_{direction}"] = udp
    return result
