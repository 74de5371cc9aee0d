"""The egress policy: rules, how they are written, and how they decide a new flow.

Rules of this module: it owns the rule syntax (command line and policy file),
the matcher, the per-rule counters and the addresses DNS answers allow for a
while (`--allow-dns-name`).  It does no I/O and reads no clock: host names in
rules are resolved by a function the caller passes (getaddrinfo at start-up,
before the sandbox; at run time the addresses pesto resolved), and `now` is
an argument.  It does not know the handlers, the tap or the flow log.

A rule is `allow SPEC`, `deny SPEC` or `allow-dns-name SPEC` with SPEC =
`[tcp:|udp:|icmp:]ADDR[:PORTS]`:

- ADDR is an IPv4 CIDR (`10.0.0.0/8`, `192.0.2.1`), an IPv6 one in brackets
  (`[2001:db8::]/32`, `[2001:db8::/32]`, `[::1]`), `*` (every address of both
  families) or a host name (resolved once, when the rule is read: its
  addresses are fixed from then on).  For `allow-dns-name` it is a DNS name
  or `*.SUFFIX` (any name below SUFFIX), matched against DNS answers instead.
- PORTS is the port list of `-t` (`443`, `80,443`, `8000-8100`, `~22`); none
  means every port.  Without a protocol a rule is for TCP, UDP and ICMP
  alike (with PORTS: TCP and UDP only); ICMP has no ports.

Theory of operation.  A new flow (never a packet of a flow that exists) is
decided by its protocol, the destination address as the guest wrote it, and
its port: the first rule that matches decides; the addresses learned from DNS
answers count as a match of their `allow-dns-name` rule, at its place in the
list; with no match, DNS to a `--dns-forward` address is allowed, and
anything else gets the default.

The matcher is built for lists of hundreds of rules, so that the decision
costs about the same as with one.  For each protocol and address family, the
address space is cut at every rule's network boundaries into intervals in
which the same rules apply: `bisect` finds the interval of an address.  The
first time an interval is used, the port space is cut the same way for its
rules and the first matching rule is noted for each piece; later decisions in
that interval are a second `bisect`.  Learned addresses are one dict lookup.

Every decision counts against the rule (or the default) that made it: a
`Verdict` per rule, made once, carries the counter and the label the flow
log and pesto show.
"""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network

from common.fwd import format_port_set, parse_port_set, show

Network = IPv4Network | IPv6Network
Resolver = Callable[[str], Sequence[str]]

TCP, UDP, ICMP = 0, 1, 2                  # protocol slots of the matcher
SLOTS = {"tcp": (TCP,), "udp": (UDP,), "icmp": (ICMP,)}
SLOT_NAMES = ("tcp", "udp", "icmp")
SLOT_OF_PROTO = {6: TCP, 17: UDP, 1: ICMP, 58: ICMP}
ACTIONS = ("allow", "deny")
DEFAULTS = ("allow", "deny")
DENY_ACTIONS = ("reset", "drop")
RULES_MAX = 4096                          # rules in one policy
NAME_ADDRS_MAX = 64                       # addresses a host name in a rule may add
LEARNED_MAX = 8192                        # addresses learned from DNS answers at once
TTL_MIN = 1                               # a TTL of 0 still lets the answer be used
TTL_MAX = 86400
DNS_PORT = 53
_ANY = (IPv4Network("0.0.0.0/0"), IPv6Network("::/0"))


class PolicyError(ValueError):
    """A rule or policy file that cannot be used; the message is one line naming it."""


class Rule:
    """One rule, as parsed (immutable by convention).  A plain class: a dataclass costs
    a millisecond of start-up to build."""
    __slots__ = ("action", "slots", "nets", "ports", "text", "dns")

    def __init__(self, action: str, slots: tuple[int, ...], nets: tuple[Network, ...],
                 ports: tuple[tuple[int, int], ...] | None, text: str,
                 dns: str | None = None) -> None:
        self.action = action          # "allow" or "deny"
        self.slots = slots            # protocols: TCP, UDP, ICMP
        self.nets = nets              # destinations (none for a DNS rule)
        self.ports = ports            # None: every port
        self.text = text              # as shown: "allow tcp:10.0.0.0/8:443"
        self.dns = dns                # allow-dns-name: the name or *.SUFFIX

    def fits(self, slot: int, port: int) -> bool:
        """Protocol and port match (the address is the matcher's business)."""
        if slot not in self.slots:
            return False
        ports = self.ports
        return ports is None or any(lo <= port <= hi for lo, hi in ports)

    def __repr__(self) -> str:
        return f"<Rule {self.text!r}>"


# ---------------------------------------------------------------- parsing


def _label_ok(label: str) -> bool:
    return (0 < len(label) <= 63 and label.isascii()
            and all(c.isalnum() or c in "-_" for c in label)
            and not label.startswith("-") and not label.endswith("-"))


def valid_name(name: str, wildcard: bool = False) -> bool:
    """A host name (letters, digits, '-', '_' in dot-separated labels); with
    `wildcard`, `*.SUFFIX` too."""
    if wildcard and name.startswith("*."):
        name = name[2:]
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_label_ok(p) for p in name.split("."))


def _split(spec: str) -> tuple[tuple[int, ...] | None, str, str | None]:
    """SPEC -> (protocol slots or None, address part, ports part or None)."""
    proto, colon, rest = spec.partition(":")
    slots = SLOTS.get(proto.lower()) if colon else None
    if slots is None:
        rest = spec
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ValueError("missing ']' after the IPv6 address")
        addr, tail = rest[:close + 1], rest[close + 1:]
        if tail.startswith("/"):
            prefix, colon, ports = tail[1:].partition(":")
            addr += "/" + prefix
            return slots, addr, ports if colon else None
        if tail and not tail.startswith(":"):
            raise ValueError(f"unexpected '{show(tail, 12)}' after the address")
        return slots, addr, tail[1:] if tail else None
    if rest.count(":") > 1:
        raise ValueError("an IPv6 address goes in brackets, as in tcp:[2001:db8::]/32:443")
    addr, colon, ports = rest.partition(":")
    return slots, addr, ports if colon else None


def _network(text: str) -> Network | None:
    """`ADDR[/PREFIX]` (IPv6 in brackets, prefix inside or outside) -> network; None if
    `text` is no address.  Host bits set is an error (say which network was meant)."""
    inner = text
    if inner.startswith("["):
        close = inner.find("]")
        inner = inner[1:close] + inner[close + 1:]
        if ":" not in inner:
            raise ValueError(f"'{show(text)}' is not an IPv6 address")
    addr_text, slash, prefix = inner.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        if text.startswith("[") or addr_text.replace(".", "").isdigit():
            raise ValueError(f"invalid address '{show(addr_text)}'") from None
        return None
    if addr.version == 6 and not text.startswith("["):
        raise ValueError("an IPv6 address goes in brackets, as in tcp:[2001:db8::]/32:443")
    if slash:
        if not (prefix.isascii() and prefix.isdigit()) or int(prefix) > addr.max_prefixlen:
            raise ValueError(f"invalid prefix length '{show(prefix, 12)}' (0-"
                             f"{addr.max_prefixlen} for IPv{addr.version})")
        try:
            return ipaddress.ip_network(f"{addr}/{int(prefix)}")
        except ValueError:
            net = ipaddress.ip_network(f"{addr}/{int(prefix)}", strict=False)
            shown = str(net) if net.version == 4 else f"[{net.network_address}]/{net.prefixlen}"
            raise ValueError(f"{addr}/{int(prefix)} has host bits set (did you mean "
                             f"{shown}?)") from None
    return ipaddress.ip_network(addr)


def parse_rule(action: str, spec: str, resolve: Resolver | None) -> Rule:
    """One rule: `action` is allow, deny or allow-dns-name.  ValueError says what is
    wrong (the caller names the rule)."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty rule")
    if not spec.isprintable() or " " in spec:
        raise ValueError("a rule is one word, printable")
    slots, addr_text, ports_text = _split(spec)
    if not addr_text:
        raise ValueError("missing address")
    ports = None
    if ports_text is not None:
        if slots == (ICMP,):
            raise ValueError("ICMP has no ports")
        ports = parse_port_set(ports_text)
        if ports == ((1, 65535),):
            ports = None
    if slots is None:
        slots = (TCP, UDP) if ports is not None else (TCP, UDP, ICMP)
    if action == "allow-dns-name":
        name = addr_text.lower().rstrip(".")
        if "/" in addr_text or not valid_name(name, wildcard=True):
            raise ValueError(f"invalid DNS name '{show(addr_text)}'")
        return Rule("allow", slots, (), ports, f"{action} {spec}", dns=name)
    if action not in ACTIONS:
        raise ValueError(f"unknown action '{show(action)}'")
    if addr_text == "*":
        nets: tuple[Network, ...] = _ANY
    else:
        net = _network(addr_text)
        if net is not None:
            nets = (net,)
        else:
            if "/" in addr_text:
                raise ValueError(f"'{show(addr_text)}': a host name has no prefix length")
            if not valid_name(addr_text):
                raise ValueError(f"invalid address or host name '{show(addr_text)}'")
            nets = _resolved(addr_text, resolve)
    return Rule(action, slots, nets, ports, f"{action} {spec}")


def _resolved(name: str, resolve: Resolver | None) -> tuple[Network, ...]:
    if resolve is None:
        raise ValueError(f"host name '{show(name)}' cannot be resolved here")
    try:
        addrs = list(dict.fromkeys(resolve(name)))
    except (OSError, LookupError, ValueError) as exc:
        raise ValueError(f"cannot resolve host name '{show(name)}': "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if not addrs:
        raise ValueError(f"host name '{show(name)}' has no address")
    if len(addrs) > NAME_ADDRS_MAX:
        raise ValueError(f"host name '{show(name)}' has {len(addrs)} addresses "
                         f"(at most {NAME_ADDRS_MAX})")
    try:
        return tuple(ipaddress.ip_network(a) for a in addrs)
    except ValueError:
        raise ValueError(f"host name '{show(name)}' resolved to something that is not "
                         "an address") from None


def parse_policy_text(text: str, source: str, resolve: Resolver | None
                      ) -> tuple[list[Rule], str | None]:
    """A policy file: one rule a line (`allow SPEC`, `deny SPEC`, `allow-dns-name SPEC`),
    `default allow|deny`, blank lines and `#` comments.  Returns (rules, default or
    None); PolicyError names the file, the line and the rule."""
    rules: list[Rule] = []
    default = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {n}: {show(line, 60)}"
        words = line.split()
        if len(words) != 2:
            raise PolicyError(f"{where}: expected 'allow SPEC', 'deny SPEC', "
                              "'allow-dns-name SPEC' or 'default allow|deny'")
        keyword, spec = words[0].lower(), words[1]
        if keyword == "default":
            if spec.lower() not in DEFAULTS:
                raise PolicyError(f"{where}: the default is 'allow' or 'deny'")
            default = spec.lower()
            continue
        if keyword not in (*ACTIONS, "allow-dns-name"):
            raise PolicyError(f"{where}: unknown keyword '{show(words[0], 20)}'")
        try:
            rules.append(parse_rule(keyword, spec, resolve))
        except ValueError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        if len(rules) > RULES_MAX:
            raise PolicyError(f"{source}: too many rules (at most {RULES_MAX})")
    return rules, default


CLI_ACTIONS = {"--allow": "allow", "--deny": "deny", "--allow-dns-name": "allow-dns-name"}


def parse_cli(entries: Iterable[tuple[str, str]], resolve: Resolver | None,
              read_file: Callable[[str], str]) -> tuple[list[Rule], str | None]:
    """The rules of --allow/--deny/--allow-dns-name/--policy-file, in command-line
    order (a file's rules stand where the option does).  Returns (rules, the last
    file's `default` or None)."""
    rules: list[Rule] = []
    default = None
    for flag, value in entries:
        if flag == "--policy-file":
            try:
                text = read_file(value)
            except OSError as exc:
                raise PolicyError(f"--policy-file {value}: {exc.strerror or exc}") from None
            except UnicodeDecodeError:
                raise PolicyError(f"--policy-file {value}: not UTF-8 text") from None
            more, file_default = parse_policy_text(text, f"policy file {value}", resolve)
            rules += more
            default = file_default or default
        else:
            try:
                rules.append(parse_rule(CLI_ACTIONS[flag], value, resolve))
            except ValueError as exc:
                raise PolicyError(f"{flag} {show(value, 60)}: {exc}") from None
        if len(rules) > RULES_MAX:
            raise PolicyError(f"too many policy rules (at most {RULES_MAX})")
    return rules, default


class PolicyConfig:
    """What the command line says about the policy and the flow log."""
    __slots__ = ("rules", "default", "deny_action", "inbound", "flow_log", "flow_log_size")

    def __init__(self, rules: tuple[Rule, ...] = (), default: str = "allow",
                 deny_action: str = "reset", inbound: bool = False,
                 flow_log: str | None = None, flow_log_size: int = 1 << 20) -> None:
        self.rules = rules
        self.default = default
        self.deny_action = deny_action    # reset (RST / ICMP prohibited) or drop
        self.inbound = inbound            # --policy-inbound: forwarded ports too
        self.flow_log = flow_log          # PATH or "-" (stderr)
        self.flow_log_size = flow_log_size

    @property
    def enabled(self) -> bool:
        return bool(self.rules) or self.default != "allow"


# ---------------------------------------------------------------- deciding


class Verdict:
    """What decided a flow: a rule (index >= 1), or the default / DNS forward (0)."""
    __slots__ = ("allow", "label", "index", "flows")

    def __init__(self, allow: bool, label: str, index: int) -> None:
        self.allow = allow
        self.label = label
        self.index = index
        self.flows = 0

    @property
    def word(self) -> str:
        return "allow" if self.allow else "deny"

    def __repr__(self) -> str:
        return f"<Verdict {self.word} {self.label!r} {self.flows}>"


class _Table:
    """The rules of one protocol and family, cut into address intervals (see top)."""
    __slots__ = ("bounds", "ports", "rules", "nets")

    def __init__(self, rules: Sequence[Rule], indices: list[int], version: int) -> None:
        self.rules = rules
        bits = 32 if version == 4 else 128
        cuts = {0}
        nets: list[tuple[int, list[tuple[int, int]]]] = []
        for i in indices:
            spans = [(int(n.network_address), int(n.broadcast_address))
                     for n in rules[i].nets if n.version == version]
            if not spans:
                continue
            nets.append((i, spans))
            for lo, hi in spans:
                cuts.add(lo)
                if hi + 1 < 1 << bits:
                    cuts.add(hi + 1)
        self.nets = nets
        self.bounds = sorted(cuts)
        self.ports: list[tuple[list[int], list[int]] | None] = [None] * len(self.bounds)

    def lookup(self, addr: int, port: int) -> int:
        """Index of the first rule matching, or -1."""
        i = bisect_right(self.bounds, addr) - 1
        pt = self.ports[i]
        if pt is None:
            pt = self.ports[i] = self._port_table(self.bounds[i])
        cuts, first = pt
        return first[bisect_right(cuts, port) - 1]

    def _port_table(self, addr: int) -> tuple[list[int], list[int]]:
        rules = self.rules
        here = []
        for i, spans in self.nets:
            if any(lo <= addr <= hi for lo, hi in spans):
                here.append(i)
                if rules[i].ports is None:
                    break                    # nothing after it is ever reached
        cuts = {0}
        for i in here:
            for lo, hi in rules[i].ports or ():
                cuts.add(lo)
                if hi < 65535:
                    cuts.add(hi + 1)
        ordered = sorted(cuts)
        first = []
        for p in ordered:
            for i in here:
                ports = rules[i].ports
                if ports is None or any(lo <= p <= hi for lo, hi in ports):
                    first.append(i)
                    break
            else:
                first.append(-1)
        return ordered, first


class Policy:
    """Rules compiled for deciding, with their counters and the learned addresses.

    Immutable in its rules: a new policy (at run time, from pesto) is a new
    object, with counters from zero.  `dns_forward` are the packed guest-side
    `--dns-forward` addresses, to which DNS is allowed unless a rule says otherwise.
    """

    def __init__(self, rules: Sequence[Rule] = (), default: str = "allow",
                 dns_forward: Iterable[bytes] = (), *, learned_max: int = LEARNED_MAX) -> None:
        if default not in DEFAULTS:
            raise ValueError(f"invalid default {default!r}")
        self.rules = tuple(rules)
        self.default = default
        self.verdicts = [Verdict(r.action == "allow", r.text, i + 1)
                         for i, r in enumerate(self.rules)]
        self.default_verdict = Verdict(default == "allow", f"default {default}", 0)
        self.dns_forward_verdict = Verdict(True, "dns-forward", 0)
        self.dns_forward = frozenset(dns_forward)
        self.dns_rules = [(i, r.dns) for i, r in enumerate(self.rules) if r.dns]
        self.learned: dict[bytes, dict[int, tuple[float, str]]] = {}
        self.learned_max = learned_max
        self.learned_dropped = 0
        self._tables: dict[tuple[int, int], _Table] = {}
        self.empty = not self.rules

    # ------------------------------------------------------------ deciding

    def decide(self, slot: int, dst: bytes, port: int, now: float) -> Verdict:
        """The verdict on a new flow of protocol `slot` to packed address `dst`, `port`
        (0 for ICMP), counted."""
        best = -1
        if not self.empty:
            v6 = len(dst) == 16
            table = self._tables.get((slot, v6))
            if table is None:
                table = self._table(slot, v6)
            best = table.lookup(int.from_bytes(dst, "big"), port)
            if self.learned:
                entry = self.learned.get(dst)
                if entry:
                    rules = self.rules
                    for i, (expires, _name) in entry.items():
                        if expires > now and (best < 0 or i < best) and rules[i].fits(slot,
                                                                                      port):
                            best = i
        if best >= 0:
            v = self.verdicts[best]
        elif port == DNS_PORT and slot != ICMP and dst in self.dns_forward:
            v = self.dns_forward_verdict
        else:
            v = self.default_verdict
        v.flows += 1
        return v

    def _table(self, slot: int, v6: bool) -> _Table:
        indices = [i for i, r in enumerate(self.rules) if slot in r.slots and not r.dns]
        table = self._tables[(slot, v6)] = _Table(self.rules, indices, 6 if v6 else 4)
        return table

    # ------------------------------------------------------------ DNS answers

    @property
    def watches_dns(self) -> bool:
        return bool(self.dns_rules)

    def learn(self, question: str, records: Iterable[tuple[str, int, int, bytes | str]],
              now: float) -> int:
        """A DNS answer to `question`: the A and AAAA records reachable from it (through
        CNAMEs) become allowed by each `allow-dns-name` rule matching `question`, until
        their TTL ends.  Returns how many addresses were added or renewed."""
        rules = [i for i, pattern in self.dns_rules if name_matches(pattern, question)]
        if not rules:
            return 0
        records = list(records)
        names = {question}
        for _ in range(8):                              # CNAME chains, in any order
            more = {data for owner, rtype, _ttl, data in records
                    if rtype == 5 and owner in names and isinstance(data, str)} - names
            if not more:
                break
            names |= more
        added = 0
        for owner, rtype, ttl, data in records:
            if rtype not in (1, 28) or owner not in names or not isinstance(data, bytes):
                continue
            expires = now + min(max(ttl, TTL_MIN), TTL_MAX)
            entry = self.learned.get(data)
            if entry is None:
                if len(self.learned) >= self.learned_max:
                    self.expire(now)
                    if len(self.learned) >= self.learned_max:
                        self.learned_dropped += 1
                        continue
                entry = self.learned[data] = {}
            for i in rules:
                old = entry.get(i)
                if old is None or old[0] < expires:
                    entry[i] = (expires, question)
            added += 1
        return added

    def expire(self, now: float) -> int:
        """Forget learned addresses whose TTL ended; returns how many."""
        gone = 0
        for addr in list(self.learned):
            entry = self.learned[addr]
            for i in [i for i, (expires, _) in entry.items() if expires <= now]:
                del entry[i]
            if not entry:
                del self.learned[addr]
                gone += 1
        return gone

    # ------------------------------------------------------------ showing

    def describe(self, now: float) -> dict:
        """The rules with their counters, and what DNS answers added (for pesto)."""
        rules = [{"n": v.index, "rule": v.label, "flows": v.flows} for v in self.verdicts]
        learned = []
        for addr, entry in self.learned.items():
            text = ipaddress.ip_address(addr).compressed
            for i, (expires, name) in entry.items():
                if expires > now:
                    learned.append({"addr": text, "name": name, "rule": i + 1,
                                    "expires_in": round(expires - now, 1)})
        return {"default": self.default, "rules": rules,
                "default_flows": self.default_verdict.flows,
                "dns_forward_flows": self.dns_forward_verdict.flows,
                "learned": sorted(learned, key=lambda e: (e["rule"], e["name"], e["addr"]))}

    def text(self) -> str:
        """The policy as a policy file."""
        return "".join(f"{r.text}\n" for r in self.rules) + f"default {self.default}\n"


def name_matches(pattern: str, name: str) -> bool:
    """`pattern` (lower case, no trailing dot) names `name`; `*.SUFFIX` any name below
    SUFFIX, not SUFFIX itself."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def slot_of(proto: int) -> int:
    return SLOT_OF_PROTO[proto]


def describe_rule(rule: Rule) -> str:
    """A rule as its parts say it (for debugging and tests)."""
    protos = "/".join(SLOT_NAMES[s] for s in rule.slots)
    where = rule.dns or ", ".join(map(str, rule.nets))
    ports = format_port_set(rule.ports) if rule.ports else "*"
    return f"{rule.action} {protos} {where} ports {ports}"


class DenyLog:
    """Which denials to log: once per destination per `interval` seconds, with at most
    `keys` destinations remembered (beyond that, nothing new is logged until the
    oldest are forgotten).  `suppressed` counts the denials not logged."""

    def __init__(self, interval: float = 60.0, keys: int = 1024) -> None:
        self.interval = interval
        self.keys = keys
        self.last: dict[object, float] = {}
        self.suppressed = 0

    def should_log(self, key: object, now: float) -> bool:
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.suppressed += 1
            return False
        if last is None and len(self.last) >= self.keys:
            limit = now - self.interval
            for k in [k for k, t in self.last.items() if t <= limit]:
                del self.last[k]
            if len(self.last) >= self.keys:
                self.suppressed += 1
                return False
        self.last[key] = now
        return True
