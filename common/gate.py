"""The gate: where the handlers ask whether a new flow may open, and say that one opened
or closed.  It holds the egress policy in force, the flow log and the DNS learning.

Rules of this module: handlers make exactly these calls, each at one place:

- `check(proto, v6, guest, gport, remote, rport)` when a new guest flow is
  decided (a TCP SYN from the guest, the first datagram of a UDP flow, the
  first echo request of an ICMP flow); `check_inbound(...)` for a forwarded
  port's new flow.  The verdict says allow or deny; on deny the handler
  refuses as `reset` says (RST, or ICMP administratively prohibited:
  `common.refuse`) or drops, and the gate has already counted, logged and
  written the denied flow to the flow log.
- `opened(flow, verdict, record)` once a flow exists, `closed(flow, why,
  record)` as it ends (`record` is the `common.flowinfo` builder for that kind
  of flow: the flow log writes the records `pesto --flows` shows).
- `watch_dns(...)` when a flow opens: whether its answers are to be read for
  `--allow-dns-name`, then `dns_datagram` / `dns_stream` with what the host's
  resolver sent back.

It knows neither the mode nor the tap.  One gate serves a process for its
whole life (passt's guests come and go; the counters and the log go on);
the policy in it is replaced whole at run time (`install`, from the control
socket).  Flows already open when a policy is installed run on; addresses
learned from DNS are kept for the names the new policy still allows.

Denials are logged at the default level once per destination address per
minute (`policy.DenyLog`), whatever the guest sends.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quote

from common.dnsmsg import BadMessage, DnsStream, parse_answer
from common.flowinfo import FlowRecord, endpoint
from common.flowlog import FlowLog
from common.loop import Loop
from common.policy import (
    DNS_PORT,
    SLOT_OF_PROTO,
    DenyLog,
    Policy,
    PolicyConfig,
    Verdict,
    name_matches,
    parse_policy_text,
)

log = logging.getLogger("policy")

FLUSH_INTERVAL = 1.0           # the flow log reaches its file at least this often
EXPIRE_INTERVAL = 10.0         # learned addresses past their TTL are forgotten this often
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}

Describe = Callable[..., FlowRecord]


class Gate:
    def __init__(self, pconf: PolicyConfig | None = None, *, dns_forward: Sequence[bytes] = (),
                 loop: Loop | None = None, flow_log: FlowLog | None = None) -> None:
        pconf = pconf or PolicyConfig()
        self.dns_forward = frozenset(dns_forward)
        self.policy = Policy(pconf.rules, pconf.default, self.dns_forward)
        self.reset = pconf.deny_action == "reset"
        self.inbound = pconf.inbound
        self.forwarded = Verdict(True, "forwarded port", 0)   # inbound, not checked
        self.flow_log = flow_log
        self.denials = DenyLog()
        self.counters: Counter[str] = Counter()
        self.next_id = 1
        self.loop = loop
        self._timers = []
        if loop is not None:
            # due on the monotonic clock's whole seconds, as pasta's other periodic
            # timers (common/listeners.py, pasta/watch.py): no wake-ups of their own
            now = time.monotonic()
            if flow_log is not None:
                self._timers.append(loop.call_every(FLUSH_INTERVAL, flow_log.flush,
                                                    first=FLUSH_INTERVAL - now % FLUSH_INTERVAL))
            self._timers.append(loop.call_every(EXPIRE_INTERVAL, self._expire,
                                                first=EXPIRE_INTERVAL - now % EXPIRE_INTERVAL))

    # ------------------------------------------------------------ deciding

    def check(self, proto: int, v6: bool, guest: bytes, gport: int, remote: bytes,
              rport: int) -> Verdict:
        """A new outbound flow from `guest`:`gport` to `remote`:`rport` (as the guest
        addressed it; ports 0 for ICMP)."""
        v = self.policy.decide(SLOT_OF_PROTO[proto], remote, rport, time.monotonic())
        if not v.allow:
            self._denied(proto, v6, guest, gport, remote, rport, v, False)
        return v

    def check_inbound(self, proto: int, v6: bool, guest: bytes, gport: int, peer: bytes,
                      peer_port: int) -> Verdict:
        """A new flow from a forwarded port: checked only with --policy-inbound, by the
        host-side peer's address and the guest's port."""
        if not self.inbound:
            return self.forwarded
        v = self.policy.decide(SLOT_OF_PROTO[proto], peer, gport, time.monotonic())
        if not v.allow:
            self._denied(proto, v6, guest, gport, peer, peer_port, v, True)
        return v

    def _denied(self, proto: int, v6: bool, guest: bytes, gport: int, remote: bytes,
                rport: int, v: Verdict, inbound: bool) -> None:
        self.counters["denied"] += 1
        now = time.monotonic()
        family = socket.AF_INET6 if v6 else socket.AF_INET
        name = PROTO_NAMES.get(proto, str(proto))
        if self.denials.should_log(remote, now):
            far = endpoint(family, remote, rport) if rport else socket.inet_ntop(family, remote)
            log.info("policy: denied %s %s %s (%s); more denials for %s are not logged "
                     "for %d s", name, "from" if inbound else "to", far, v.label,
                     socket.inet_ntop(family, remote), self.denials.interval)
        if self.flow_log is not None:
            fid = self.next_id
            self.next_id += 1
            g = endpoint(family, guest, gport) if gport else socket.inet_ntop(family, guest)
            h = endpoint(family, remote, rport) if rport else socket.inet_ntop(family, remote)
            base = {"id": fid, "proto": name, "path": "tap", "guest": g, "host": h,
                    "inbound": inbound, "verdict": "deny", "rule": v.label}
            t = time.time()
            self.flow_log.add({"time": round(t, 3), "event": "open", **base})
            self.flow_log.add({"time": round(t, 3), "event": "close", **base, "to_guest": 0,
                               "from_guest": 0, "frames_to_guest": 0,
                               "frames_from_guest": 1, "duration": 0.0, "end": "denied"})

    # ------------------------------------------------------------ flows opening and closing

    def opened(self, flow, verdict: Verdict, record: Describe) -> None:
        flow.fid = self.next_id
        self.next_id += 1
        flow.verdict = verdict
        if self.flow_log is not None:
            self.flow_log.add_line(log_line("open", record(flow), time.time()))

    def closed(self, flow, why: str, record: Describe) -> None:
        if self.flow_log is None or not flow.fid:
            return
        self.flow_log.add_line(log_line("close", record(flow), time.time(), why))

    # ------------------------------------------------------------ DNS answers

    def watch_dns(self, proto: int, remote: bytes, rport: int) -> bool:
        """Whether a new flow carries `--dns-forward` DNS, to be read for answers."""
        return rport == DNS_PORT and proto in (6, 17) and remote in self.dns_forward

    def dns_datagram(self, msg: bytes | memoryview) -> None:
        """A DNS answer the resolver sent back over UDP."""
        if self.policy.dns_rules:
            self._answer(bytes(msg))

    def dns_stream(self, stream: DnsStream, seq: int, data: memoryview) -> None:
        """Bytes of a DNS-over-TCP connection sent to the guest at sequence `seq`."""
        if self.policy.dns_rules:
            for msg in stream.feed(seq, data):
                self._answer(msg)

    def _answer(self, msg: bytes) -> None:
        try:
            question, records = parse_answer(msg)
        except BadMessage as exc:
            self.counters["dns_unread"] += 1
            log.debug("policy: DNS answer not read: %s", exc)
            return
        n = self.policy.learn(question, records, time.monotonic())
        if n:
            self.counters["dns_learned"] += n
            log.debug("policy: %d address(es) of %s allowed for their TTL", n, question)

    def _expire(self) -> None:
        if self.policy.learned:
            self.policy.expire(time.monotonic())

    # ------------------------------------------------------------ run time

    def parse(self, text: str, source: str, resolved: Mapping[str, Sequence[str]]) -> tuple:
        """A policy file's rules (PolicyError if any is wrong), with host names looked up
        in `resolved` (what pesto resolved: no resolver may run here, after set-up)."""
        def resolve(name: str) -> Sequence[str]:
            addrs = resolved.get(name) or resolved.get(name.lower())
            if not addrs:
                raise LookupError("not resolved by the client")
            return addrs
        return parse_policy_text(text, source, resolve)

    def install(self, rules, default: str | None) -> Policy:
        """Put a new policy in force (the old default stays if `default` is None)."""
        old = self.policy
        new = Policy(rules, default or old.default, self.dns_forward)
        now = time.monotonic()
        for addr, entry in old.learned.items():
            for expires, question in entry.values():
                if expires <= now:
                    continue
                for i, pattern in new.dns_rules:
                    if name_matches(pattern, question):
                        new.learned.setdefault(addr, {})[i] = (expires, question)
        self.policy = new
        log.info("policy: %d rule(s) in force, default %s", len(new.rules), new.default)
        return new

    def describe(self) -> dict:
        out = self.policy.describe(time.monotonic())
        out.update(deny_action="reset" if self.reset else "drop", inbound=self.inbound,
                   denied=self.counters["denied"], learned_dropped=self.policy.learned_dropped)
        return out

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        if self.flow_log is not None:
            out.update(flow_log_records=self.flow_log.records,
                       flow_log_dropped=self.flow_log.dropped)
        return out

    def flush(self) -> None:
        if self.flow_log is not None:
            self.flow_log.flush()

    def close(self) -> None:
        """At exit: the rest of the flow log out (the flows' close records came first)."""
        for t in self._timers:
            t.cancel()
        self._timers = []
        if self.flow_log is not None:
            self.flow_log.close()


def _str(v: str | None) -> str:
    return "null" if v is None else _quote(v)


def _num(v: float | None) -> str:
    return "null" if v is None else repr(v)


def log_line(event: str, r: FlowRecord, now: float, why: str | None = None) -> bytes:
    """One flow log record as a JSON line: the FlowRecord's fields (those `pesto --flows`
    shows), the time and the event; at close the counters, the duration and why it ended.
    Written out by hand: json.dumps of a dict costs twice as much, per flow."""
    head = (f'{{"time":{now:.3f},"event":"{event}","id":{_num(r.id)},"proto":"{r.proto}",'
            f'"path":"{r.path}","guest":{_quote(r.guest)},"host":{_quote(r.host)},'
            f'"inbound":{"true" if r.inbound else "false"},"verdict":{_str(r.verdict)},'
            f'"rule":{_str(r.rule)}')
    if why is None:
        return (head + "}\n").encode()
    return (f'{head},"to_guest":{_num(r.to_guest)},"from_guest":{_num(r.from_guest)},'
            f'"frames_to_guest":{_num(r.frames_to_guest)},'
            f'"frames_from_guest":{_num(r.frames_from_guest)},"duration":{_num(r.age)},'
            f'"end":{_quote(why)}}}\n').encode()


def open_gate(conf, loop: Loop | None) -> Gate:
    """The process's gate from the Config: the flow log opened now (before the sandbox).
    OSError (one line) if the flow log cannot be opened."""
    pconf = conf.policy
    flow_log = FlowLog.open(pconf.flow_log, pconf.flow_log_size) if pconf.flow_log else None
    fwd = [c.dns_forward.packed for c in (conf.ip4, conf.ip6)
           if c is not None and c.dns_forward is not None]
    if pconf.rules or pconf.default != "allow":
        log.info("policy: %d rule(s), default %s, denied flows %s%s", len(pconf.rules),
                 pconf.default, "refused" if pconf.deny_action == "reset" else "dropped",
                 ", forwarded ports too" if pconf.inbound else "")
    return Gate(pconf, dns_forward=fwd, loop=loop, flow_log=flow_log)
