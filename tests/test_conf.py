"""build_config: options given more than once, the address mappings, and local mode.

The host is described by hand (documentation addresses), so these run without
touching the machine's network; discovery itself is tested in
integration/test_pasta_namespace.py on test-made hosts.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest

from common.conf import ConfigError, build_config
from common.fwd import forward_config
from common.hostinfo import FamilyInfo, HostInfo, HostRoute
from common.options import UsageError, parse_args

HOST = HostInfo(
    v4=FamilyInfo("eth0", "192.0.2.1", (("192.0.2.10", 24),),
                  routes=(HostRoute("default", "192.0.2.1"), HostRoute("192.0.2.0/24", None))),
    v6=FamilyInfo("eth0", "fe80::1", (("2001:db8::10", 64),), link_local="fe80::2"),
    macs={"eth0": "02:11:22:33:44:55"}, nameservers=("192.0.2.53",))
# only a prefix route on eth0 (no gateway), nothing at all for IPv6
PREFIX_ONLY = HostInfo(
    v4=FamilyInfo("eth0", None, (("192.0.2.10", 24),), routes=(HostRoute("192.0.2.0/24", None),)),
    v6=None, macs={"eth0": "02:11:22:33:44:55"})
NOTHING = HostInfo(v4=None, v6=None)


def conf(mode: str = "pasta", *argv: str, host: HostInfo = HOST):
    return build_config(mode, parse_args(mode, list(argv)), host, forward_parser=forward_config)


@pytest.mark.parametrize("argv, v4, v6", [
    ((), "192.0.2.1", "fe80::1"),                                   # the gateways, by default
    (("--map-host-loopback", "none"), None, None),
    (("--map-host-loopback", "10.0.2.2"), "10.0.2.2", "fe80::1"),
    (("--map-host-loopback", "10.0.2.2", "--map-host-loopback", "10.0.2.3"), "10.0.2.3",
     "fe80::1"),
    (("--map-host-loopback", "none", "--map-host-loopback", "fd00::2"), None, "fd00::2"),
    (("--map-host-loopback", "fd00::2", "--map-host-loopback", "none"), None, None),
    (("--no-map-gw", "--map-host-loopback", "10.0.2.2"), "10.0.2.2", None),
])
def test_map_host_loopback(argv, v4, v6):
    c = conf("pasta", *argv)
    assert c.ip4.map_host_loopback == (IPv4Address(v4) if v4 else None)
    assert c.ip6.map_host_loopback == (IPv6Address(v6) if v6 else None)


@pytest.mark.parametrize("argv, v4, v6", [
    ((), None, None),
    (("--map-guest-addr", "none"), None, None),                     # podman may pass it
    (("--map-guest-addr", "169.254.1.2"), "169.254.1.2", None),
    (("--map-guest-addr", "169.254.1.2", "--map-guest-addr", "fd00::5",
      "--map-guest-addr", "169.254.1.3"), "169.254.1.3", "fd00::5"),
    (("--map-guest-addr", "169.254.1.2", "--map-guest-addr", "none"), None, None),
])
def test_map_guest_addr(argv, v4, v6):
    c = conf("passt", *argv)
    assert c.ip4.map_guest_addr == (IPv4Address(v4) if v4 else None)
    assert c.ip6.map_guest_addr == (IPv6Address(v6) if v6 else None)


@pytest.mark.parametrize("option", ["--map-guest-addr", "--map-host-loopback"])
@pytest.mark.parametrize("value", ["0.0.0.0", "127.0.0.1", "::1", "224.0.0.1", "nothing"])
def test_map_refuses_what_cannot_stand_for_the_host(option, value):
    with pytest.raises(ConfigError, match=f"invalid {option} address: {value}"):
        conf("pasta", option, value)


def test_last_one_takes_effect_per_family():
    c = conf("passt", "-a", "10.0.0.2", "-a", "fd00::2", "-a", "10.0.0.3/16",
             "-g", "10.0.0.1", "-g", "10.0.0.254", "-o", "192.0.2.10", "-o", "192.0.2.11",
             "--dns-forward", "10.0.0.53", "--dns-forward", "10.0.0.54",
             "--dns-host", "192.0.2.53", "--dns-host", "192.0.2.54")
    assert (c.ip4.addr, c.ip4.prefix_len, c.ip6.addr) == (
        IPv4Address("10.0.0.3"), 16, IPv6Address("fd00::2"))
    assert c.ip4.gateway == IPv4Address("10.0.0.254")
    assert c.ip4.outbound == IPv4Address("192.0.2.11")
    assert c.ip4.dns_forward == IPv4Address("10.0.0.54")
    assert c.ip4.dns_host == IPv4Address("192.0.2.54")
    assert conf("passt", "-6", "-4").ip6 is None
    assert conf("passt", "-4", "-6").ip4 is None


def test_prefix_route_only():
    """No default route: the interface with a route is the template, without a gateway."""
    c = conf("pasta", host=PREFIX_ONLY)
    assert (c.ip4.addr, c.ip4.prefix_len, c.ip4.gateway) == (IPv4Address("192.0.2.10"), 24, None)
    assert c.ip4.host_ifname == "eth0" and c.ip4.map_host_loopback is None
    assert c.our_mac == bytes.fromhex("021122334455")
    assert c.ip6.addr is None and c.ip6.gateway == IPv6Address("fe80::1")     # local mode


@pytest.mark.parametrize("mode", ["pasta", "passt"])
def test_local_mode(mode):
    """passt(1), "Local mode for disconnected setups"."""
    c = conf(mode, host=NOTHING)
    assert (c.ip4.addr, c.ip4.prefix_len, c.ip4.gateway) == (
        IPv4Address("169.254.2.1"), 16, IPv4Address("169.254.2.2"))
    assert c.ip4.our_addr == IPv4Address("169.254.2.2")
    assert c.ip4.map_host_loopback == IPv4Address("169.254.2.2")
    assert c.ip6.addr is None and c.ip6.prefix is None
    assert c.ip6.gateway == c.ip6.our_ll == c.ip6.map_host_loopback == IPv6Address("fe80::1")
    assert c.ip4.host_ifname is None and c.ip6.host_ifname is None
    assert c.services.dhcp and c.services.ndp and c.services.ra
    assert not c.services.dhcpv6             # no address to lease
    assert any("IPv4: no host interface with a route, local mode" in n for n in c.notes)


def test_local_mode_keeps_what_was_given():
    c = conf("passt", "-a", "10.0.0.2/24", "-g", "10.0.0.1", "-a", "fd00::2", host=NOTHING)
    assert (c.ip4.addr, c.ip4.prefix_len, c.ip4.gateway) == (
        IPv4Address("10.0.0.2"), 24, IPv4Address("10.0.0.1"))
    assert c.ip6.addr == IPv6Address("fd00::2") and c.services.dhcpv6
    assert conf("passt", "-6", host=NOTHING).ip6.gateway == IPv6Address("fe80::1")


def test_local_mode_router_advertisement_has_no_prefix():
    from common.guest import GuestState
    from common.ndp import router_advertisement
    c = conf("passt", host=NOTHING)
    ra = router_advertisement(c, GuestState(c))
    body = ra[14 + 40 + 16:]
    kinds = []
    while body:
        kinds.append(body[0])
        body = body[body[1] * 8:]
    assert 3 not in kinds and 1 in kinds        # no prefix information, a source link-layer


@pytest.mark.parametrize("mode, argv, dns, search", [
    # pasta: the namespace keeps its own resolv.conf unless asked (as C pasta)
    ("pasta", (), False, False),
    ("pasta", ("--dhcp-dns",), True, False),
    ("pasta", ("--dhcp-search",), False, True),
    ("pasta", ("--dhcp-dns", "--dhcp-search", "-D", "192.0.2.99"), True, True),
    ("pasta", ("-D", "192.0.2.99", "-S", "x.test"), False, False),
    # passt: offered unless refused
    ("passt", (), True, True),
    ("passt", ("--no-dhcp-dns",), False, True),
    ("passt", ("--no-dhcp-search",), True, False),
])
def test_dns_and_search_offered_per_mode(mode, argv, dns, search):
    c = conf(mode, *argv, host=HostInfo(v4=HOST.v4, v6=HOST.v6, macs=HOST.macs,
                                        nameservers=("192.0.2.53",), search=("a.test",)))
    assert (c.offer_dns, c.offer_search) == (dns, search)


@pytest.mark.parametrize("mode, option", [
    ("pasta", "--no-dhcp-dns"), ("pasta", "--no-dhcp-search"),
    ("passt", "--dhcp-dns"), ("passt", "--dhcp-search"),
])
def test_dns_offer_options_of_the_other_mode_are_refused(mode, option):
    other = "passt" if mode == "pasta" else "pasta"
    with pytest.raises(UsageError, match=f"^{option} is for {other} mode only$"):
        parse_args(mode, [option])
