"""Port-forwarding tables: syntax, validation, combination, defaults (common.fwd).

Each row is input -> the table we build, one rule per line in the form
`pesto --show` prints: `[listening address]%interface:ports => [target/]ports`.
"""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.fwd import (
    NONE,
    ForwardSpec,
    Rule,
    SpecError,
    add_rules,
    delete_rules,
    ephemeral_range,
    forward_config,
    parse_forward,
    udp_follows_tcp,
)

EPH = (32768, 60999)


def parse(*specs, mode="pasta", proto="tcp", ephemeral=EPH, families=(4, 6), option=None):
    return parse_forward(list(specs), mode=mode, proto=proto, ephemeral=ephemeral,
                         families=families, option=option)


def table(spec: ForwardSpec) -> list[str]:
    return [str(r) for r in spec.rules]


ALL = ["[*]:1-32767 => 1-32767 (best effort)", "[*]:61000-65535 => 61000-65535 (best effort)"]
AUTO = [r.replace("(best effort)", "(best effort) (auto-scan)") for r in ALL]

# every example of passt(1) and pesto(1) of C passt 2026 (37a73a2), -t and -u alike
MAN_PAGE = [
    (["all"], ALL),
    (["::1/all"], ["[::1]:1-32767 => 1-32767 (best effort)",
                   "[::1]:61000-65535 => 61000-65535 (best effort)"]),
    (["22"], ["[*]:22 => 22"]),
    (["22:23"], ["[*]:22 => 23"]),
    (["22,25"], ["[*]:22 => 22", "[*]:25 => 25"]),
    (["22-80"], ["[*]:22-80 => 22-80"]),
    (["22-80:32-90"], ["[*]:22-80 => 32-90"]),
    (["192.0.2.1/22"], ["[192.0.2.1]:22 => 22"]),
    (["192.0.2.1%eth0/22"], ["[192.0.2.1]%eth0:22 => 22"]),
    (["%eth0/22"], ["[*]%eth0:22 => 22"]),
    (["0.0.0.0/5000:192.0.2.5/6000"], ["[0.0.0.0]:5000 => 192.0.2.5/6000"]),
    (["127.0.0.6/all:192.0.2.6"],
     ["[127.0.0.6]:1-32767 => 192.0.2.6/1-32767 (best effort)",
      "[127.0.0.6]:61000-65535 => 192.0.2.6/61000-65535 (best effort)"]),
    (["2000-5000,~3000-3010"], ["[*]:2000-2999 => 2000-2999", "[*]:3011-5000 => 3011-5000"]),
    (["192.0.2.1/20-30,~25"], ["[192.0.2.1]:20-24 => 20-24", "[192.0.2.1]:26-30 => 26-30"]),
    (["~20000-20010"], ["[*]:1-19999 => 1-19999 (best effort)",
                        "[*]:20011-32767 => 20011-32767 (best effort)",
                        "[*]:61000-65535 => 61000-65535 (best effort)"]),
    (["auto"], AUTO),
    (["::1/auto"], ["[::1]:1-32767 => 1-32767 (best effort) (auto-scan)",
                    "[::1]:61000-65535 => 61000-65535 (best effort) (auto-scan)"]),
    (["8000-8010,auto"], ["[*]:8000-8010 => 8000-8010 (auto-scan)"]),
]

CALLERS = [
    # podman 5.x: -p 8080:80 (pasta_linux.go: "%s%d-%d:%d-%d")
    (["8080-8080:80-80"], ["[*]:8080 => 80"]),
    (["127.0.0.1/8080-8081:80-81"], ["[127.0.0.1]:8080-8081 => 80-81"]),
    # pasta_options = ["-t", "auto"] and -p 18082:18082: the exact rule wins its port
    (["auto", "18082-18082:18082-18082"],
     ["[*]:1-18081 => 1-18081 (best effort) (auto-scan)",
      "[*]:18083-32767 => 18083-32767 (best effort) (auto-scan)",
      "[*]:61000-65535 => 61000-65535 (best effort) (auto-scan)",
      "[*]:18082 => 18082"]),
    (["none"], []),
    # podman's pesto (pesto_linux.go): host address / port : container address / port
    (["0.0.0.0/8080:10.88.0.2/80"], ["[0.0.0.0]:8080 => 10.88.0.2/80"]),
    (["[::]/8080:fd00::2/80"], ["[::]:8080 => fd00::2/80"]),
    (["[::1]/8080-8081:fd00::2/80-81"], ["[::1]:8080-8081 => fd00::2/80-81"]),
    # rootlesskit's pesto driver: "%s/%d:%d" with net.IP.String()
    (["0.0.0.0/8080:80"], ["[0.0.0.0]:8080 => 80"]),
    (["::/8080:80"], ["[::]:8080 => 80"]),
    # libvirt's qemuPasstStart(): "ADDR%DEV/", then "all" or ranges "[~]N[-M][:T[-U]]"
    (["192.0.2.1%eth0/all"], ["[192.0.2.1]%eth0:1-32767 => 1-32767 (best effort)",
                              "[192.0.2.1]%eth0:61000-65535 => 61000-65535 (best effort)"]),
    (["2000-2010:3000-3010,~2005"], ["[*]:2000-2004 => 3000-3004",
                                     "[*]:2006-2010 => 3006-3010"]),
    (["fd00::1/443:8443"], ["[fd00::1]:443 => 8443"]),
]

MORE = [
    (["*/22"], ["[*]:22 => 22"]),
    (["[*]/22"], ["[*]:22 => 22"]),
    (["*%eth0/22"], ["[*]%eth0:22 => 22"]),
    (["1"], ["[*]:1 => 1"]),
    (["65535:1"], ["[*]:65535 => 1"]),
    (["00022"], ["[*]:22 => 22"]),                                   # leading zeros: decimal
    (["  22 "], ["[*]:22 => 22"]),                                   # outer blanks ignored
    (["8080:80,8443:443"], ["[*]:8080 => 80", "[*]:8443 => 443"]),
    (["5000-5001:6000-6001,5002:6000"],                              # targets may repeat
     ["[*]:5000-5001 => 6000-6001", "[*]:5002 => 6000"]),
    (["30-32:40-42,~31"], ["[*]:30 => 40", "[*]:32 => 42"]),
    (["~31,30-32"], ["[*]:30 => 30", "[*]:32 => 32"]),              # exclusions apply anywhere
    (["22", "80:8080"], ["[*]:22 => 22", "[*]:80 => 8080"]),
    (["127.0.0.1/5000", "::1/5000"], ["[127.0.0.1]:5000 => 5000", "[::1]:5000 => 5000"]),
    (["127.0.0.1/5000", "127.0.0.2/5000"],                           # other address: no clash
     ["[127.0.0.1]:5000 => 5000", "[127.0.0.2]:5000 => 5000"]),
    (["none", "22"], ["[*]:22 => 22"]),                              # none first: no-op
    (["~20", "20-30"], ["[*]:1-19 => 1-19 (best effort)",
                        "[*]:31-32767 => 31-32767 (best effort)",
                        "[*]:61000-65535 => 61000-65535 (best effort)",
                        "[*]:20-30 => 20-30"]),
    (["22", "all"], ["[*]:22 => 22", "[*]:1-21 => 1-21 (best effort)",
                     "[*]:23-32767 => 23-32767 (best effort)",
                     "[*]:61000-65535 => 61000-65535 (best effort)"]),
    (["0.0.0.0/all:192.0.2.9"], ["[0.0.0.0]:1-32767 => 192.0.2.9/1-32767 (best effort)",
                                 "[0.0.0.0]:61000-65535 => 192.0.2.9/61000-65535 (best effort)"]),
    (["::1/22"], ["[::1]:22 => 22"]),
    (["[2001:db8::1]%eth0/22"], ["[2001:db8::1]%eth0:22 => 22"]),
    (["[2001:db8::1%eth0]/22"], ["[2001:db8::1]%eth0:22 => 22"]),
    (["fe80::1%lo/22"], ["[fe80::1]%lo:22 => 22"]),
    (["192.0.2.1/5000:192.0.2.5"], ["[192.0.2.1]:5000 => 192.0.2.5/5000"]),
    (["1.2.3.4%abcdefghijklmno/22"], ["[1.2.3.4]%abcdefghijklmno:22 => 22"]),
    (["~1-100,~200"], ["[*]:101-199 => 101-199 (best effort)",
                       "[*]:201-32767 => 201-32767 (best effort)",
                       "[*]:61000-65535 => 61000-65535 (best effort)"]),
    (["~61000-65535"], ["[*]:1-32767 => 1-32767 (best effort)"]),
]

TABLE = MAN_PAGE + CALLERS + MORE


@pytest.mark.parametrize("specs,expected", TABLE, ids=[" ".join(s) for s, _ in TABLE])
def test_table(specs, expected):
    assert table(parse(*specs)) == expected


def test_one_family_makes_every_address_that_family():
    assert table(parse("22", families=(4,))) == ["[0.0.0.0]:22 => 22"]
    assert table(parse("22", families=(6,))) == ["[::]:22 => 22"]
    assert table(parse("22:192.0.2.5", families=(4,))) == ["[0.0.0.0]:22 => 192.0.2.5/22"]
    with pytest.raises(SpecError, match="IPv6 forward, but IPv6 is disabled"):
        parse("::1/22", families=(4,))


def test_other_ephemeral_range():
    assert table(parse("all", ephemeral=(1024, 65535))) == [
        "[*]:1-1023 => 1-1023 (best effort)"]


def test_ephemeral_read_only_when_needed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("common.fwd.ephemeral_range", lambda: calls.append(1) or EPH)
    parse_forward(["22"], mode="passt", proto="tcp")
    assert calls == []
    parse_forward(["all"], mode="passt", proto="tcp")
    assert calls == [1]


def test_ephemeral_range_file(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(str(f)) == (40000, 50000)
    f.write_text("garbage")
    assert ephemeral_range(str(f)) == EPH
    assert ephemeral_range(str(tmp_path / "missing")) == EPH


ERRORS = [
    # (specs, words the one-line message must contain)
    (["0"], "port 0"),
    (["0-5"], "port 0"),
    (["22:0"], "target port 0"),
    (["65536"], "65536 out of range"),
    (["99999999999999999999"], "out of range"),
    (["1" * 5000], "out of range"),
    (["80-22"], "80-22"),
    (["22-80:32-33"], "target 32-33 is 2 ports, source 22-80 is 59 ports"),
    (["22-80:32"], "target 32 is 1 port, source 22-80 is 59 ports"),
    (["22:32-33"], "target 32-33 is 2 ports"),
    (["65530-65535:65531-65536"], "target port 65536 out of range"),
    (["22,22"], "conflicts with [*]:22 => 22"),
    (["10-20,15"], "[*]:15 => 15 conflicts with [*]:10-20 => 10-20"),
    (["22", "20-30"], "conflicts"),
    (["127.0.0.1/5000", "0.0.0.0/5000"], "conflicts"),             # addresses that meet
    (["5000", "::1/5000"], "conflicts"),
    (["all", "all"], "conflicts"),                                  # two best-effort rules
    (["22-30,~25,~25"], "port 25 excluded twice"),
    (["22-30,~24-26,~26-28"], "port 26 excluded twice"),
    (["22,~22"], "every port of '22' is excluded"),
    (["~22,22"], "every port of '22' is excluded"),
    (["10-20,~15,15"], "every port of '15' is excluded"),  # C pasta drops 15 silently
    (["~1-65535"], "no port left"),
    (["22x"], "invalid port '22x'"),
    (["x22"], "invalid port 'x22'"),
    (["+22"], "invalid port '+22'"),
    (["0x16"], "invalid port '0x16'"),
    (["２２"], "invalid port"),                  # fullwidth digits are not ASCII
    (["22 ,25"], "invalid port '22 '"),
    (["22,,25"], "empty item"),
    (["22,"], "empty item"),
    ([",22"], "empty item"),
    ([""], "empty spec"),
    (["22-"], "missing port"),
    (["-22"], "missing port"),
    ([":22"], "missing port"),
    (["22:"], "missing target port"),
    (["~"], "missing port"),
    (["22:23:24"], "invalid target port '23:24'"),
    (["22-23-24"], "invalid port '23-24'"),
    (["~22:23"], "exclusion '~22:23' cannot have a target"),
    (["1.2.3.4/"], "empty port list"),
    (["/22"], "empty address"),
    (["%/22"], "empty interface name"),
    (["1.2.3.4%/22"], "empty interface name"),
    (["lo/22"], "invalid address 'lo'"),
    (["1.2.3.256/22"], "invalid address '1.2.3.256'"),
    (["1.2.3.4/5/22"], "invalid port '5/22'"),
    (["[::1/22"], "invalid address '[::1'"),
    (["1.2.3.4%abcdefghijklmnop/22"], "interface name 'abcdefghijklmnop' too long"),
    (["1.2.3.4%a b/22"], "invalid interface name 'a b'"),
    (["1.2.3.4%../22"], "invalid interface name"),
    (["22", "none"], "none: conflicts with the specs before it"),
    (["22:192.0.2.5"], "a target address needs a listening address of its family "
                       "(did you mean 0.0.0.0/...?)"),
    (["0.0.0.0/22:fd00::5"], "IPv4 listening address 0.0.0.0 with IPv6 target fd00::5"),
    (["0.0.0.0/22:224.0.0.1/22"], "invalid target address 224.0.0.1"),
    (["0.0.0.0/22:bogus/22"], "invalid target address 'bogus'"),
    (["0.0.0.0/all:bogus"], "invalid target address 'bogus'"),
    (["all:192.0.2.9"], "a target address needs a listening address of its family"),
    (["22\n23"], "'22\\n23'"),                   # shown escaped, still one line
]


@pytest.mark.parametrize("specs,words", ERRORS, ids=[" ".join(s)[:30] for s, _ in ERRORS])
def test_errors(specs, words):
    with pytest.raises(SpecError) as info:
        parse(*specs)
    message = str(info.value)
    assert words in message
    assert "\n" not in message and len(message) < 200
    assert message.startswith("TCP port spec")


def test_error_names_option():
    with pytest.raises(SpecError, match=r"^-u 22,22: \[\*\]:22 => 22 conflicts with"):
        parse_forward(["22,22"], mode="passt", proto="udp", option="-u")


def test_none():
    assert parse("none") == NONE and not parse("none").enabled
    assert parse("none", "none") == NONE
    assert parse() == NONE


def test_auto_only_for_pasta():
    with pytest.raises(SpecError, match="'auto' port forwarding is only for pasta"):
        parse("auto", mode="passt")
    with pytest.raises(SpecError, match="'auto' port forwarding is only for pasta"):
        parse("80,auto", mode="passt")


def test_ns_side_has_no_addresses():
    assert table(parse("22", option="-T", families=(4,))) == ["[*]:22 => 22"]
    with pytest.raises(SpecError, match="no listening address or interface for -T/-U"):
        parse("127.0.0.1/22", option="-T")
    with pytest.raises(SpecError, match="no target address for -T/-U"):
        parse("22:127.0.0.1", option="-U", families=(4,))


def test_all_in_both_modes():
    assert table(parse("all", mode="passt")) == ALL
    assert table(parse("all", mode="pasta")) == ALL


def test_unknown_mode():
    with pytest.raises(ValueError):
        parse("22", mode="qemu")


def test_text_does_not_affect_equality():
    assert parse("22") == parse(" 22")
    assert parse("22-23") != parse("22,23")          # one rule, or two


def test_rule_arithmetic():
    r = Rule(10, 20, 110)
    assert r.target(15) == 115 and list(r.ports) == list(range(10, 21))
    assert r.without(range(12, 14)) == [Rule(10, 11, 110), Rule(14, 20, 114)]
    assert r.without(range(1, 100)) == []
    a4, b4 = ip_address("127.0.0.1"), ip_address("0.0.0.0")
    assert Rule(1, 1, 1, a4).meets(Rule(1, 1, 1, b4))
    assert not Rule(1, 1, 1, a4).meets(Rule(1, 1, 1, ip_address("127.0.0.2")))
    assert not Rule(1, 1, 1, a4).meets(Rule(1, 1, 1, ip_address("::")))
    assert Rule(1, 1, 1).meets(Rule(1, 1, 1, ip_address("::1")))


def test_add_and_delete():
    t = add_rules([], parse("8080:80").rules)
    t = add_rules(t, parse("0.0.0.0/9090:10.88.0.2/90").rules)
    assert [str(r) for r in t] == ["[*]:8080 => 80", "[0.0.0.0]:9090 => 10.88.0.2/90"]
    with pytest.raises(SpecError, match="conflicts"):
        add_rules(t, parse("8080").rules)
    t = delete_rules(t, parse("8080:80").rules)
    assert [str(r) for r in t] == ["[0.0.0.0]:9090 => 10.88.0.2/90"]
    with pytest.raises(SpecError, match="no rule .*9090 => 9090 to delete"):
        delete_rules(t, parse("::1/9090").rules)
    with pytest.raises(SpecError, match="doesn't match it"):
        delete_rules(t, parse("0.0.0.0/9090").rules)


# ---------------------------------------------------------------- UDP following TCP


def test_udp_follows_tcp_drops_translation_keeps_binding():
    tcp = parse("22:2222", "192.0.2.1%eth0/80-81:8080-8081", "443")
    assert table(udp_follows_tcp(tcp)) == [
        "[*]:22 => 22", "[192.0.2.1]%eth0:80-81 => 80-81", "[*]:443 => 443"]


def test_udp_follows_tcp_keywords():
    assert udp_follows_tcp(NONE) == NONE
    assert table(udp_follows_tcp(parse("auto"))) == AUTO
    assert table(udp_follows_tcp(parse("all"))) == ALL


# ---------------------------------------------------------------- defaults per mode


def opts(**given):
    base = {"tcp_ports": None, "udp_ports": None, "tcp_ns": None, "udp_ns": None}
    base.update({k: list(v) for k, v in given.items()})
    return base


class Services:
    def __init__(self, tcp=True, udp=True):
        self.tcp, self.udp = tcp, udp


def conf(mode, services=None, **given):
    return forward_config(mode, opts(**given), services or Services(), ephemeral=EPH)


def test_defaults():
    assert conf("passt") == dict(tcp_in=NONE, udp_in=NONE, tcp_out=NONE, udp_out=NONE)
    c = conf("pasta")
    assert {k: table(v) for k, v in c.items()} == dict(
        tcp_in=AUTO, udp_in=AUTO, tcp_out=AUTO, udp_out=AUTO)


def test_passt_udp_follows_tcp():
    c = conf("passt", tcp_ports=["22:2222"])
    assert table(c["tcp_in"]) == ["[*]:22 => 2222"]
    assert table(c["udp_in"]) == ["[*]:22 => 22"]
    c = conf("passt", tcp_ports=["22"], udp_ports=["53"])
    assert table(c["udp_in"]) == ["[*]:53 => 53"]
    c = conf("passt", tcp_ports=["22"], udp_ports=["none"])
    assert c["udp_in"] == NONE


def test_pasta_udp_follows_tcp_per_direction():
    c = conf("pasta", tcp_ports=["8080:80"], tcp_ns=["none"])
    assert table(c["tcp_in"]) == ["[*]:8080 => 80"]
    assert table(c["udp_in"]) == ["[*]:8080 => 8080"]
    assert c["tcp_out"] == NONE and c["udp_out"] == NONE
    c = conf("pasta", udp_ports=["53"])            # -t not given: auto; -u given
    assert table(c["tcp_in"]) == AUTO and table(c["udp_in"]) == ["[*]:53 => 53"]
    c = conf("pasta", tcp_ns=["5432"])
    assert table(c["udp_out"]) == ["[*]:5432 => 5432"]


def test_podman_style_command_line():
    c = conf("pasta", tcp_ports=["8080-8080:80-80"],
             udp_ports=["none"], tcp_ns=["none"], udp_ns=["none"])
    assert table(c["tcp_in"]) == ["[*]:8080 => 80"]
    assert c["udp_in"] == c["tcp_out"] == c["udp_out"] == NONE


def test_passt_has_no_ns_options():
    with pytest.raises(SpecError, match="-T"):
        conf("passt", tcp_ns=["22"])


def test_passt_refuses_auto_in_config():
    with pytest.raises(SpecError, match=r"^-t auto: 'auto' port forwarding is only for pasta"):
        conf("passt", tcp_ports=["auto"])


def test_config_error_names_option():
    with pytest.raises(SpecError, match=r"^-U 0: port 0 is not allowed$"):
        conf("pasta", udp_ns=["0"])


def test_disabled_protocols():
    c = conf("pasta", Services(tcp=False), tcp_ports=["22"])
    assert c["tcp_in"] == NONE and c["tcp_out"] == NONE
    assert table(c["udp_in"]) == ["[*]:22 => 22"]    # UDP still follows the -t spec
    c = conf("pasta", Services(udp=False))
    assert c["udp_in"] == NONE and c["udp_out"] == NONE and table(c["tcp_in"]) == AUTO
    with pytest.raises(SpecError):                  # specs still validated
        conf("pasta", Services(tcp=False), tcp_ports=["0"])


def test_build_config_uses_it():
    from common.conf import build_config
    from common.hostinfo import FamilyInfo, HostInfo

    host = HostInfo(v4=FamilyInfo("eth0", "192.0.2.1", (("192.0.2.2", 24),)), v6=None)
    c = build_config("passt", opts(tcp_ports=["22"]) | {"ipv4_only": True}, host,
                     forward_parser=forward_config)
    assert table(c.tcp_in) == table(c.udp_in) == ["[0.0.0.0]:22 => 22"]
    assert c.tcp_out == NONE
    c = build_config("pasta", opts(), host, forward_parser=forward_config)
    assert table(c.tcp_in) == AUTO


# ---------------------------------------------------------------- properties


@st.composite
def item_lists(draw):
    """Disjoint source ranges with in-range targets, the spec text and the rules."""
    cuts = sorted(draw(st.sets(st.integers(1, 65535), min_size=2, max_size=12)))
    items, expected = [], []
    for first, end in zip(cuts[::2], cuts[1::2], strict=False):
        last = draw(st.integers(first, end))
        n = last - first + 1
        to_first = draw(st.integers(1, 65536 - n))
        text = str(first) if n == 1 else f"{first}-{last}"
        if to_first != first or draw(st.booleans()):
            text += f":{to_first}" if n == 1 else f":{to_first}-{to_first + n - 1}"
        items.append(text)
        expected.append(str(Rule(first, last, to_first)))
    return items, expected


@given(item_lists(), st.integers(1, 3))
def test_roundtrip(data, n_options):
    items, expected = data
    per = max(1, len(items) // n_options)
    specs = [",".join(items[i:i + per]) for i in range(0, len(items), per)]
    assert table(parse(*specs)) == expected


@given(st.text(max_size=40))
def test_garbage_only_raises_spec_error(text):
    try:
        spec = parse(text)
    except SpecError as e:
        assert "\n" not in str(e)
    else:
        assert all(1 <= r.first <= r.last <= 65535 and 1 <= r.target(r.last) <= 65535
                   for r in spec.rules)


def test_describe():
    assert parse("22:2222", "192.0.2.1%eth0/80-81:8080-8081,~90").describe() == \
        "22->2222, 192.0.2.1%eth0/80-81->8080-8081"
    assert parse("all").describe() == "1-32767, 61000-65535"
    assert parse("0.0.0.0/5000:192.0.2.5/6000").describe() == "0.0.0.0/5000->192.0.2.5/6000"
    assert NONE.describe() == "none"
    assert repr(parse("[::1]/22")) == "ForwardSpec(::1/22)"
