"""Port-forwarding specs: syntax, validation, defaults (common.fwd)."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.fwd import (
    AUTO,
    NONE,
    ForwardSpec,
    PortMap,
    SpecError,
    ephemeral_range,
    forward_config,
    parse_forward,
    udp_follows_tcp,
)

EPH = (32768, 60999)


def r(first, last, to_first=None, addr=None, ifname=None):
    """Expected rows for a range: (port, to_port, addr, ifname)."""
    to_first = first if to_first is None else to_first
    addr = None if addr is None else ip_address(addr)
    return [(p, p - first + to_first, addr, ifname) for p in range(first, last + 1)]


def rows(spec: ForwardSpec):
    return [(m.port, m.to_port, m.addr, m.ifname) for m in spec.maps]


def parse(*specs, mode="pasta", proto="tcp", ephemeral=EPH):
    return parse_forward(list(specs), mode=mode, proto=proto, ephemeral=ephemeral)


NON_EPHEMERAL = r(1, 32767) + r(61000, 65535)

TABLE = [
    # every example of `man pasta` / `man passt`, -t and -u alike
    (["22"], r(22, 22)),
    (["22:23"], [(22, 23, None, None)]),
    (["22,25"], [(22, 22, None, None), (25, 25, None, None)]),
    (["22-80"], r(22, 80)),
    (["22-80:32-90"], r(22, 80, 32)),
    (["192.0.2.1/22"], r(22, 22, addr="192.0.2.1")),
    (["192.0.2.1%eth0/22"], r(22, 22, addr="192.0.2.1", ifname="eth0")),
    (["2000-5000,~3000-3010"], r(2000, 2999) + r(3011, 5000)),
    (["192.0.2.1/20-30,~25"], r(20, 24, addr="192.0.2.1") + r(26, 30, addr="192.0.2.1")),
    (["~20000-20010"], r(1, 19999) + r(20011, 32767) + r(61000, 65535)),
    # more
    (["1"], r(1, 1)),
    (["65535"], r(65535, 65535)),
    (["65535:1"], [(65535, 1, None, None)]),
    (["00022"], r(22, 22)),                                  # leading zeros are decimal
    (["  22 "], r(22, 22)),                                  # outer blanks ignored
    (["8080:80,8443:443"], [(8080, 80, None, None), (8443, 443, None, None)]),
    (["5000-5001:6000-6001,5002:6000"],                      # targets may repeat
     [(5000, 6000, None, None), (5001, 6001, None, None), (5002, 6000, None, None)]),
    (["65530-65535:1-6"], r(65530, 65535, 1)),
    (["30-32:40-42,~31"], [(30, 40, None, None), (32, 42, None, None)]),
    (["~31,30-32"], r(30, 30) + r(32, 32)),                  # exclusions apply anywhere
    (["22-80,~100"], r(22, 80)),                             # exclusion outside: no-op
    (["22", "80:8080"], [(22, 22, None, None), (80, 8080, None, None)]),
    (["80:8080", "22"], [(80, 8080, None, None), (22, 22, None, None)]),
    (["127.0.0.1/5000", "::1/5001"],
     r(5000, 5000, addr="127.0.0.1") + r(5001, 5001, addr="::1")),
    (["2000-5000,~3000", "3000"], r(2000, 2999) + r(3001, 5000) + r(3000, 3000)),
    # addresses
    (["::1/22"], r(22, 22, addr="::1")),
    (["[::1]/22"], r(22, 22, addr="::1")),                   # C refuses brackets
    (["[2001:db8::1]%eth0/22"], r(22, 22, addr="2001:db8::1", ifname="eth0")),
    (["[2001:db8::1%eth0]/22"], r(22, 22, addr="2001:db8::1", ifname="eth0")),
    (["::1%lo/22"], r(22, 22, addr="::1", ifname="lo")),
    (["fe80::1%lo/22"], r(22, 22, addr="fe80::1", ifname="lo")),
    (["::ffff:192.0.2.1/22"], r(22, 22, addr="::ffff:192.0.2.1")),
    (["0.0.0.0/22"], r(22, 22, addr="0.0.0.0")),
    (["%lo/22"], r(22, 22, ifname="lo")),                    # interface, any address
    (["1.2.3.4%abcdefghijklmno/22"], r(22, 22, addr="1.2.3.4", ifname="abcdefghijklmno")),
    (["192.0.2.1/~22"],
     r(1, 21, addr="192.0.2.1") + r(23, 32767, addr="192.0.2.1")
     + r(61000, 65535, addr="192.0.2.1")),
    # all and exclusion-only
    (["all"], NON_EPHEMERAL),
    (["~1-100,~200"], r(101, 199) + r(201, 32767) + r(61000, 65535)),
    (["~61000-65535"], r(1, 32767)),
    (["~30000-40000"], r(1, 29999) + r(61000, 65535)),      # overlaps ephemeral: fine
]


@pytest.mark.parametrize("specs,expected", TABLE, ids=[" ".join(s) for s, _ in TABLE])
def test_table(specs, expected):
    spec = parse(*specs)
    assert not spec.auto
    assert rows(spec) == expected
    assert spec.enabled
    assert spec.text == tuple(s.strip() for s in specs)


def test_table_same_for_passt_and_udp():
    for specs, expected in TABLE:
        assert rows(parse(*specs, mode="passt", proto="udp")) == expected


def test_other_ephemeral_range():
    assert rows(parse("all", ephemeral=(1000, 65535))) == r(1, 999)
    assert rows(parse("~5", ephemeral=(10, 20))) == r(1, 4) + r(6, 9) + r(21, 65535)


def test_ephemeral_read_only_when_needed(tmp_path, monkeypatch):
    import common.fwd as fwd

    def boom(*_args):
        raise AssertionError("ephemeral range read for an explicit spec")

    monkeypatch.setattr(fwd, "ephemeral_range", boom)
    assert rows(parse_forward(["22"], mode="pasta", proto="tcp")) == r(22, 22)


def test_ephemeral_range_file(tmp_path):
    path = tmp_path / "range"
    path.write_text("40000\t50000\n")
    assert ephemeral_range(str(path)) == (40000, 50000)
    path.write_text("garbage\n")
    assert ephemeral_range(str(path)) == (32768, 60999)
    assert ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
    first, last = ephemeral_range()                 # this machine's
    assert 0 < first <= last <= 65535


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
    (["22,22"], "port 22 forwarded twice"),
    (["10-20,15"], "port 15 forwarded twice"),
    (["22", "20-30"], "port 22 forwarded twice (also by 22)"),
    (["127.0.0.1/5000", "127.0.0.2/5000"], "port 5000 forwarded twice"),
    (["~20", "20-30"], "forwarded twice"),
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
    (["1.2.3.4/5/22"], "invalid address '1.2.3.4/5'"),
    (["[::1/22"], "invalid address '[::1'"),
    (["1.2.3.4%abcdefghijklmnop/22"], "interface name 'abcdefghijklmnop' too long"),
    (["1.2.3.4%a b/22"], "invalid interface name 'a b'"),
    (["1.2.3.4%../22"], "invalid interface name"),
    (["none", "22"], "'none' cannot be combined"),
    (["22", "none"], "'none' cannot be combined"),
    (["auto", "22"], "'auto' cannot be combined"),
    (["all", "22"], "'all' cannot be combined"),
    (["none", "auto"], "cannot be combined"),
    (["all", "all"], "'all' given more than once"),
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
    with pytest.raises(SpecError, match=r"^-u 22,22: port 22 forwarded twice$"):
        parse_forward(["22,22"], mode="passt", proto="udp", option="-u")


def test_keywords():
    assert parse("none") == NONE and not parse("none").enabled
    assert parse("none", "none") == NONE
    assert parse() == NONE
    assert parse("auto") == AUTO and parse("auto").enabled and parse("auto").maps == ()
    assert parse(" auto ").auto
    assert parse("auto", "auto") == AUTO


def test_auto_only_for_pasta():
    with pytest.raises(SpecError, match="'auto' port forwarding is only for pasta"):
        parse("auto", mode="passt")


def test_all_in_both_modes():
    assert rows(parse("all", mode="passt")) == NON_EPHEMERAL
    assert rows(parse("all", mode="pasta")) == NON_EPHEMERAL


def test_unknown_mode():
    with pytest.raises(ValueError):
        parse("22", mode="qemu")


def test_lookup_and_binds():
    spec = parse("22:2222", "::1%lo/80-81:8080-8081")
    assert spec.target(22) == 2222
    assert spec.target(81) == 8081
    assert spec.target(23) is None
    assert spec.by_port[80] == PortMap(80, 8080, ip_address("::1"), "lo")
    assert spec.binds([1, 2, 3]) == spec.maps            # explicit: scans don't matter
    auto = ForwardSpec(auto=True, excluded=frozenset({53}))
    assert auto.binds({8080, 53, 22}) == (PortMap(22, 22), PortMap(8080, 8080))
    assert auto.target(22) is None


def test_text_does_not_affect_equality():
    assert parse("22") == parse(" 22")
    assert parse("22-23") == parse("22,23")


# ---------------------------------------------------------------- UDP following TCP


def test_udp_follows_tcp_drops_translation_keeps_binding():
    tcp = parse("22:2222", "192.0.2.1%eth0/80-81:8080-8081", "443")
    udp = udp_follows_tcp(tcp)
    assert rows(udp) == (r(22, 22) + r(80, 81, addr="192.0.2.1", ifname="eth0")
                         + r(443, 443))


def test_udp_follows_tcp_keywords():
    assert udp_follows_tcp(NONE) == NONE
    assert udp_follows_tcp(AUTO) == AUTO
    assert rows(udp_follows_tcp(parse("all"))) == NON_EPHEMERAL


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
    assert conf("pasta") == dict(tcp_in=AUTO, udp_in=AUTO, tcp_out=AUTO, udp_out=AUTO)


def test_passt_udp_follows_tcp():
    c = conf("passt", tcp_ports=["22:2222"])
    assert rows(c["tcp_in"]) == [(22, 2222, None, None)]
    assert rows(c["udp_in"]) == [(22, 22, None, None)]
    c = conf("passt", tcp_ports=["22"], udp_ports=["53"])
    assert rows(c["udp_in"]) == r(53, 53)
    c = conf("passt", tcp_ports=["22"], udp_ports=["none"])
    assert c["udp_in"] == NONE


def test_pasta_udp_follows_tcp_per_direction():
    c = conf("pasta", tcp_ports=["8080:80"], tcp_ns=["none"])
    assert rows(c["tcp_in"]) == [(8080, 80, None, None)]
    assert rows(c["udp_in"]) == [(8080, 8080, None, None)]
    assert c["tcp_out"] == NONE and c["udp_out"] == NONE
    c = conf("pasta", udp_ports=["53"])            # -t not given: auto; -u given
    assert c["tcp_in"] == AUTO and rows(c["udp_in"]) == r(53, 53)
    assert c["tcp_out"] == AUTO and c["udp_out"] == AUTO
    c = conf("pasta", tcp_ns=["5432"])
    assert rows(c["udp_out"]) == r(5432, 5432)
    assert c["tcp_in"] == AUTO


def test_podman_style_command_line():
    c = conf("pasta", tcp_ports=["8080-8080:80-80"],
             udp_ports=["none"], tcp_ns=["none"], udp_ns=["none"])
    assert rows(c["tcp_in"]) == [(8080, 80, None, None)]
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
    assert rows(c["udp_in"]) == r(22, 22)           # UDP still follows the -t spec
    c = conf("pasta", Services(udp=False))
    assert c["udp_in"] == NONE and c["udp_out"] == NONE and c["tcp_in"] == AUTO
    with pytest.raises(SpecError):                  # specs still validated
        conf("pasta", Services(tcp=False), tcp_ports=["0"])


def test_build_config_uses_it():
    from common.conf import build_config
    from common.hostinfo import FamilyInfo, HostInfo

    host = HostInfo(v4=FamilyInfo("eth0", "192.0.2.1", (("192.0.2.2", 24),)), v6=None)
    c = build_config("passt", opts(tcp_ports=["22"]), host, forward_parser=forward_config)
    assert rows(c.tcp_in) == r(22, 22) and rows(c.udp_in) == r(22, 22)
    assert c.tcp_out == NONE
    c = build_config("pasta", opts(), host, forward_parser=forward_config)
    assert c.tcp_in == c.udp_in == c.tcp_out == c.udp_out == AUTO


# ---------------------------------------------------------------- properties


@st.composite
def item_lists(draw):
    """Disjoint source ranges with in-range targets, and the spec text for them."""
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
        expected += r(first, last, to_first)
    return items, expected


@given(item_lists(), st.integers(1, 3))
def test_roundtrip(data, n_options):
    items, expected = data
    per = max(1, len(items) // n_options)
    specs = [",".join(items[i:i + per]) for i in range(0, len(items), per)]
    assert rows(parse(*specs)) == expected


@given(st.text(max_size=40))
def test_garbage_only_raises_spec_error(text):
    try:
        spec = parse(text)
    except SpecError as e:
        assert "\n" not in str(e)
    else:
        assert spec.auto or all(1 <= m.port <= 65535 and 1 <= m.to_port <= 65535
                                for m in spec.maps)


def test_describe():
    assert parse("22:2222", "192.0.2.1%eth0/80-81:8080-8081,~90").describe() == \
        "22->2222, 192.0.2.1%eth0/80-81->8080-8081"
    assert parse("all").describe() == "1-32767, 61000-65535"
    assert parse("1-3:3-5,4-5:6-7").describe() == "1-5->3-7"          # runs merge
    assert parse("1-3:3-5,4-5:1-2").describe() == "1-3->3-5, 4-5->1-2"
    assert NONE.describe() == "none" and AUTO.describe() == "auto"
    assert repr(parse("[::1]/22")) == "ForwardSpec(::1/22)"
