"""The egress policy (common.policy): rule syntax, first match wins, DNS-learned
addresses with their TTL, counters, and the cost of a long rule list."""

from __future__ import annotations

import random
import socket
import time
from ipaddress import ip_address, ip_network

import pytest

from common.fwd import parse_port_set
from common.policy import (
    ICMP,
    TCP,
    UDP,
    DenyLog,
    Policy,
    PolicyError,
    parse_cli,
    parse_policy_text,
    parse_rule,
)


def pk(text: str) -> bytes:
    return ip_address(text).packed


def no_resolve(name: str):
    raise OSError(-2, f"unknown name {name}")


HOSTS = {"allowed.test": ["192.0.2.80", "2001:db8::80"], "one.test": ["198.51.100.1"]}


def resolve(name: str):
    if name not in HOSTS:
        raise OSError(-2, "Name or service not known")
    return HOSTS[name]


# ---------------------------------------------------------------- syntax


@pytest.mark.parametrize("spec, slots, nets, ports", [
    ("tcp:10.0.0.0/8:443", (TCP,), ["10.0.0.0/8"], ((443, 443),)),
    ("udp:192.0.2.1:53", (UDP,), ["192.0.2.1/32"], ((53, 53),)),
    ("10.0.0.0/8", (TCP, UDP, ICMP), ["10.0.0.0/8"], None),
    ("10.0.0.0/8:80,443,8000-8100", (TCP, UDP), ["10.0.0.0/8"],
     ((80, 80), (443, 443), (8000, 8100))),
    ("tcp:[2001:db8::]/32:443", (TCP,), ["2001:db8::/32"], ((443, 443),)),
    ("tcp:[2001:db8::/32]:443", (TCP,), ["2001:db8::/32"], ((443, 443),)),
    ("[::1]", (TCP, UDP, ICMP), ["::1/128"], None),
    ("icmp:[fd00::]/8", (ICMP,), ["fd00::/8"], None),
    ("TCP:*:22", (TCP,), ["0.0.0.0/0", "::/0"], ((22, 22),)),
    ("tcp:*:~22", (TCP,), ["0.0.0.0/0", "::/0"], ((1, 21), (23, 65535))),
    ("tcp:allowed.test:443", (TCP,), ["192.0.2.80/32", "2001:db8::80/128"], ((443, 443),)),
    ("tcp:0.0.0.0/0:1-65535", (TCP,), ["0.0.0.0/0"], None),
])
def test_rule_syntax(spec, slots, nets, ports):
    r = parse_rule("allow", spec, resolve)
    assert r.slots == slots
    assert r.nets == tuple(ip_network(n) for n in nets)
    assert r.ports == ports
    assert r.text == f"allow {spec}"


@pytest.mark.parametrize("spec, message", [
    ("tcp:10.0.0.0/33:443", "invalid prefix length '33'"),
    ("tcp:10.0.0.1/8", "has host bits set (did you mean 10.0.0.0/8?)"),
    ("tcp:[2001:db8::1]/32", "did you mean [2001:db8::]/32?"),
    ("tcp:2001:db8::/32:443", "IPv6 address goes in brackets"),
    ("tcp:[2001:db8::/32:443", "missing ']'"),
    ("tcp:10.0.0.0/8:0", "port 0 is not allowed"),
    ("tcp:10.0.0.0/8:70000", "out of range"),
    ("tcp:10.0.0.0/8:443-80", "ends before it starts"),
    ("icmp:10.0.0.0/8:7", "ICMP has no ports"),
    ("tcp:10.0.0.300", "invalid address '10.0.0.300'"),
    ("tcp:bad_name!:443", "invalid address or host name"),
    ("tcp:nowhere.test:443", "cannot resolve host name 'nowhere.test'"),
    ("tcp:allowed.test/24", "a host name has no prefix length"),
    ("", "empty rule"),
    ("tcp:", "missing address"),
    ("tcp:[10.0.0.1]", "is not an IPv6 address"),
])
def test_bad_rules_say_why(spec, message):
    with pytest.raises(ValueError, match=None) as err:
        parse_rule("deny", spec, resolve)
    assert message in str(err.value), str(err.value)


def test_cli_order_and_files_keep_their_place(tmp_path):
    f = tmp_path / "p"
    f.write_text("# a comment\n\nallow tcp:192.0.2.0/24:443   # trailing\n"
                 "deny 192.0.2.0/24\ndefault deny\n")
    entries = [("--deny", "tcp:192.0.2.7:443"), ("--policy-file", str(f)),
               ("--allow-dns-name", "tcp:allowed.test:443")]
    rules, default = parse_cli(entries, resolve, lambda p: open(p).read())
    assert [r.text for r in rules] == ["deny tcp:192.0.2.7:443", "allow tcp:192.0.2.0/24:443",
                                       "deny 192.0.2.0/24",
                                       "allow-dns-name tcp:allowed.test:443"]
    assert default == "deny"
    assert rules[3].dns == "allowed.test" and rules[3].nets == ()


def test_cli_errors_name_the_rule(tmp_path):
    with pytest.raises(PolicyError) as err:
        parse_cli([("--allow", "tcp:10.0.0.0/8:443"), ("--deny", "udp:10.0.0.0/33")],
                  resolve, lambda p: "")
    assert str(err.value).startswith("--deny udp:10.0.0.0/33: invalid prefix length")
    f = tmp_path / "p"
    f.write_text("allow tcp:192.0.2.0/24:443\nallow tcp:192.0.2.0/24:44x3\n")
    with pytest.raises(PolicyError) as err:
        parse_cli([("--policy-file", str(f))], resolve, lambda p: open(p).read())
    assert str(err.value) == (f"policy file {f} line 2: allow tcp:192.0.2.0/24:44x3: "
                              "invalid port '44x3'")
    with pytest.raises(PolicyError, match="No such file"):
        parse_cli([("--policy-file", str(tmp_path / "none"))], resolve,
                  lambda p: open(p).read())
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("line, message", [
    ("permit 10.0.0.0/8", "unknown keyword 'permit'"),
    ("allow", "expected 'allow SPEC'"),
    ("allow 10.0.0.0/8 extra", "expected 'allow SPEC'"),
    ("default maybe", "the default is 'allow' or 'deny'"),
    ("allow-dns-name tcp:exa mple", "expected"),
    ("allow-dns-name tcp:*:443", "invalid DNS name '*'"),
    ("allow-dns-name 10.0.0.0/8", "invalid DNS name"),
])
def test_bad_file_lines(line, message):
    with pytest.raises(PolicyError) as err:
        parse_policy_text(f"allow 10.0.0.0/8\n{line}\n", "F", resolve)
    assert str(err.value).startswith(f"F line 2: {line}: ") and message in str(err.value)


def test_names_need_a_resolver_at_run_time():
    with pytest.raises(ValueError, match="cannot be resolved here"):
        parse_rule("allow", "tcp:allowed.test:443", None)


def test_port_set():
    assert parse_port_set("443,80,81-90,85") == ((80, 90), (443, 443))
    assert parse_port_set("~1-1023") == ((1024, 65535),)
    with pytest.raises(ValueError, match="excluded"):
        parse_port_set("22,~22")


# ---------------------------------------------------------------- deciding


def policy(*lines: str, default: str = "allow", dns_forward=()) -> Policy:
    rules, file_default = parse_policy_text("\n".join(lines), "T", resolve)
    return Policy(rules, file_default or default, dns_forward)


def test_first_match_wins_then_default():
    p = policy("allow tcp:192.0.2.0/24:443", "deny tcp:192.0.2.0/24", "allow udp:*:53",
               "deny icmp:[2001:db8::]/32", "default deny")
    assert p.decide(TCP, pk("192.0.2.9"), 443, 0).label == "allow tcp:192.0.2.0/24:443"
    v = p.decide(TCP, pk("192.0.2.9"), 80, 0)
    assert not v.allow and v.index == 2
    assert p.decide(UDP, pk("192.0.2.9"), 53, 0).index == 3
    assert p.decide(UDP, pk("2001:db8::1"), 53, 0).index == 3
    assert p.decide(ICMP, pk("2001:db8::1"), 0, 0).index == 4
    v = p.decide(TCP, pk("198.51.100.1"), 443, 0)
    assert v is p.default_verdict and not v.allow and v.label == "default deny"
    assert [v.flows for v in p.verdicts] == [1, 1, 2, 1]
    assert p.default_verdict.flows == 1


def test_names_fixed_at_start_up():
    p = policy("allow tcp:allowed.test:443", default="deny")
    assert p.decide(TCP, pk("192.0.2.80"), 443, 0).allow
    assert p.decide(TCP, pk("2001:db8::80"), 443, 0).allow
    assert not p.decide(TCP, pk("192.0.2.81"), 443, 0).allow


def test_dns_forward_allowed_unless_a_rule_says_otherwise():
    fwd = pk("169.254.1.1")
    p = policy(default="deny", dns_forward=[fwd])
    v = p.decide(UDP, fwd, 53, 0)
    assert v.allow and v.label == "dns-forward"
    assert p.decide(TCP, fwd, 53, 0).allow
    assert not p.decide(UDP, fwd, 54, 0).allow
    assert not p.decide(ICMP, fwd, 0, 0).allow
    p = policy("deny udp:169.254.1.1:53", default="deny", dns_forward=[fwd])
    assert not p.decide(UDP, fwd, 53, 0).allow
    assert p.decide(TCP, fwd, 53, 0).label == "dns-forward"


def test_empty_policy_allows_everything():
    p = Policy()
    assert p.decide(TCP, pk("192.0.2.1"), 1, 0).allow
    assert p.default_verdict.flows == 1


def test_matches_a_brute_force_reference():
    """Random rules, random flows: the interval tables decide exactly like a plain
    first-match loop."""
    rnd = random.Random(7)
    lines = []
    for _ in range(120):
        proto = rnd.choice(["tcp:", "udp:", "", "icmp:"])
        if rnd.random() < 0.5:
            net = ip_network((rnd.choice([0xC0000200, 0x0A000000, 0xC6336400])
                              + rnd.randrange(256), rnd.choice([8, 16, 24, 28, 32])),
                             strict=False)
            where = str(net)
        else:
            net = ip_network((rnd.choice([0x20010DB8 << 96, 0xFD00 << 112])
                              + rnd.randrange(1 << 16), rnd.choice([16, 32, 64, 128])),
                             strict=False)
            where = f"[{net.network_address}]/{net.prefixlen}"
        ports = ""
        if proto != "icmp:" and rnd.random() < 0.7:
            lo = rnd.randrange(1, 2000)
            ports = f":{lo}-{lo + rnd.randrange(300)},{rnd.randrange(1, 65536)}"
        lines.append(f"{rnd.choice(['allow', 'deny'])} {proto}{where}{ports}")
    p = policy(*lines, default="deny")
    rules = p.rules
    for _ in range(4000):
        r = rnd.choice(rules)
        net = rnd.choice(r.nets)
        addr = net.network_address + rnd.randrange(min(net.num_addresses, 1 << 20))
        if rnd.random() < 0.2:
            addr = ip_address(rnd.getrandbits(32 if net.version == 4 else 128))
        slot = rnd.choice([TCP, UDP, ICMP])
        port = 0 if slot == ICMP else rnd.choice([rnd.randrange(1, 2400),
                                                  rnd.randrange(1, 65536)])
        want = next((i for i, r in enumerate(rules)
                     if r.fits(slot, port) and any(addr in n for n in r.nets
                                                   if n.version == addr.version)), -1)
        got = p.decide(slot, addr.packed, port, 0)
        assert got.index == want + 1, (addr, slot, port, rules[want].text if want >= 0
                                       else None, got)


def test_a_hundred_rules_cost_little():
    """One decision with 100 rules costs a few microseconds, not a hundred rule checks."""
    lines = [f"deny tcp:10.{i}.0.0/16:{1000 + i},{2000 + i}-{2100 + i}" for i in range(99)]
    p = policy(*lines, "allow tcp:*:443", default="deny")
    one = Policy(parse_policy_text("allow tcp:*:443", "T", None)[0], "deny")
    rnd = random.Random(3)
    flows = [(socket.inet_aton(f"10.{rnd.randrange(120)}.{rnd.randrange(256)}.1"),
              rnd.choice([443, 1005, 2050, 80])) for _ in range(2000)]

    def cost(pol: Policy) -> float:
        for dst, port in flows:          # warm: tables are built on first use
            pol.decide(TCP, dst, port, 0)
        best = 1.0
        for _ in range(5):
            t = time.perf_counter()
            for dst, port in flows:
                pol.decide(TCP, dst, port, 0)
            best = min(best, (time.perf_counter() - t) / len(flows))
        return best

    per_flow, baseline = cost(p), cost(one)
    assert per_flow < 20e-6, per_flow
    assert per_flow < baseline * 3, (per_flow, baseline)


# ---------------------------------------------------------------- DNS-learned addresses


def answer(question: str, *records):
    return question, list(records)


def test_dns_answers_allow_for_their_ttl():
    p = policy("deny tcp:192.0.2.66", "allow-dns-name tcp:allowed.test:443",
               "allow-dns-name *.cdn.test", default="deny")
    a, aaaa = pk("192.0.2.80"), pk("2001:db8::80")
    assert not p.decide(TCP, a, 443, 100).allow
    n = p.learn(*answer("allowed.test", ("allowed.test", 1, 30, a),
                        ("allowed.test", 28, 10, aaaa)), 100)
    assert n == 2
    v = p.decide(TCP, a, 443, 101)
    assert v.allow and v.label == "allow-dns-name tcp:allowed.test:443"
    assert p.decide(TCP, aaaa, 443, 109).allow
    assert not p.decide(TCP, aaaa, 443, 110.5).allow        # its TTL (10 s) is over
    assert p.decide(TCP, a, 443, 129).allow
    assert not p.decide(TCP, a, 80, 101).allow               # the rule's port only
    assert not p.decide(UDP, a, 443, 101).allow
    assert not p.decide(TCP, a, 443, 130.1).allow
    # a name not allowed teaches nothing, nor do its records for an allowed owner
    assert p.learn(*answer("evil.test", ("allowed.test", 1, 30, pk("192.0.2.99"))), 100) == 0
    # an explicit rule before it still wins; CNAME chains are followed; wildcards
    p.learn(*answer("allowed.test", ("allowed.test", 1, 30, pk("192.0.2.66"))), 100)
    assert not p.decide(TCP, pk("192.0.2.66"), 443, 101).allow
    p.learn(*answer("www.cdn.test", ("www.cdn.test", 5, 30, "edge.other.test"),
                    ("edge.other.test", 1, 30, pk("203.0.113.5")),
                    ("unrelated.test", 1, 30, pk("203.0.113.6"))), 100)
    assert p.decide(UDP, pk("203.0.113.5"), 9, 101).label == "allow-dns-name *.cdn.test"
    assert not p.decide(UDP, pk("203.0.113.6"), 9, 101).allow
    assert p.learn(*answer("cdn.test", ("cdn.test", 1, 30, pk("203.0.113.7"))), 100) == 0
    assert p.expire(200) == 4 and not p.learned
    shown = p.describe(100)
    assert shown["rules"][1]["flows"] == 3 and shown["default_flows"] >= 5


def test_ttl_zero_still_usable_and_learned_set_bounded():
    p = Policy(parse_policy_text("allow-dns-name a.test", "T", None)[0], "deny",
               learned_max=4)
    p.learn("a.test", [("a.test", 1, 0, pk("192.0.2.1"))], 50)
    assert p.decide(UDP, pk("192.0.2.1"), 1, 50.5).allow
    assert not p.decide(UDP, pk("192.0.2.1"), 1, 51.5).allow
    for i in range(10):
        p.learn("a.test", [("a.test", 1, 100, pk(f"192.0.2.{10 + i}"))], 60)
    assert len(p.learned) == 4 and p.learned_dropped == 6
    p.learn("a.test", [("a.test", 1, 100, pk("192.0.2.99"))], 200)   # the old ones expired
    assert pk("192.0.2.99") in p.learned


def test_deny_log_once_per_destination_per_minute():
    d = DenyLog(interval=60, keys=2)
    assert d.should_log("a", 0) and not d.should_log("a", 59) and d.should_log("a", 60)
    assert d.should_log("b", 61)
    assert not d.should_log("c", 62)          # two destinations remembered already
    assert d.should_log("c", 121)             # "a" forgotten by now
    assert d.suppressed == 2
