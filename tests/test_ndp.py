"""NDP responder: frames from the guest in, reply frames out, decoded field by field.

The replies are decoded here with plain struct code (not with common.ndp's own
option parser), and every checksum is verified against the RFC 1071 oracle.
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import ndp
from common.conf import Config, Ip6Config, Services
from common.guest import BROADCAST_MAC, GuestState
from common.packet.checksum import l4_checksum6
from common.packet.ethernet import ETH_P_IP, ETH_P_IPV6, parse_ethernet
from common.packet.frames import build_ipv6_frame, udp6_frame
from common.packet.icmp import (
    ICMPV6_ECHO_REQUEST,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_REDIRECT,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    build_icmp6,
)
from common.packet.ipv6 import IPPROTO_ICMPV6, parse_ipv6
from common.record import replace

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("025500000001")
OUR_LL = IPv6Address("fe80::1")
GATEWAY = IPv6Address("2001:db8:1::1")
GUEST_ADDR = IPv6Address("2001:db8:1::42")
GUEST_LL = IPv6Address("fe80::55:ff:fe00:1")
SLAAC_ADDR = IPv6Address("2001:db8:1::55:ff:fe00:1")
NEIGHBOUR = IPv6Address("2001:db8:1::99")
DNS1 = IPv6Address("2001:db8:53::1")
DNS2 = IPv6Address("2001:db8:53::2")
UNSPEC = bytes(16)
ALL_NODES = IPv6Address("ff02::1").packed
ALL_ROUTERS = IPv6Address("ff02::2").packed


def make_conf(**kw) -> Config:
    ip6 = Ip6Config(
        addr=GUEST_ADDR, prefix_len=64, gateway=GATEWAY, our_ll=OUR_LL,
        dns=(DNS1, DNS2), dns_forward=None, dns_host=None, map_host_loopback=GATEWAY,
        map_guest_addr=None, outbound=None, outbound_if=None, host_ifname="eth0")
    ip6 = replace(ip6, **kw.pop("ip6", {}))
    base = dict(mtu=65520, our_mac=OUR_MAC, ip4=None, ip6=ip6,
                search=("example.com", "lab.example.org"))
    base.update(kw)
    return Config(**base)


CONF = make_conf()


def fresh_guest(conf: Config = CONF) -> GuestState:
    return GuestState(conf)


def solicited_node(addr: IPv6Address) -> bytes:
    return IPv6Address("ff02::1:ff00:0").packed[:13] + addr.packed[13:]


def mcast_mac(addr: bytes) -> bytes:
    return b"\x33\x33" + addr[12:]


def nd_frame(src: bytes, dst: bytes, icmp_type: int, rest: bytes, body: bytes, *,
             mac: bytes = GUEST_MAC, dst_mac: bytes | None = None, hop_limit: int = 255,
             code: int = 0) -> bytes:
    l4 = build_icmp6(src, dst, icmp_type, code, rest, body)
    if dst_mac is None:
        dst_mac = mcast_mac(dst) if dst[0] == 0xff else OUR_MAC
    return build_ipv6_frame(dst_mac, mac, src, dst, IPPROTO_ICMPV6, l4, hop_limit=hop_limit)


def sllao(mac: bytes = GUEST_MAC) -> bytes:
    return bytes((1, 1)) + mac


def rs(src: bytes = GUEST_LL.packed, options: bytes | None = None, **kw) -> bytes:
    if options is None:
        options = sllao() if src != UNSPEC else b""
    return nd_frame(src, ALL_ROUTERS, ND_ROUTER_SOLICIT, bytes(4), options, **kw)


def ns(target: IPv6Address, src: bytes = GUEST_LL.packed, dst: bytes | None = None,
       options: bytes | None = None, **kw) -> bytes:
    if dst is None:
        dst = solicited_node(target)
    if options is None:
        options = sllao() if src != UNSPEC else b""
    return nd_frame(src, dst, ND_NEIGHBOR_SOLICIT, bytes(4), target.packed + options, **kw)


# ---------------------------------------------------------------- decoding


def decode(frame: bytes) -> dict:
    """Ethernet, IPv6 and ICMPv6 header fields of a reply, checksum verified."""
    eth, l3 = parse_ethernet(frame)
    assert eth.ethertype == ETH_P_IPV6
    ip, l4 = parse_ipv6(l3)
    assert len(l3) == 40 + ip.payload_length          # no trailing bytes
    assert ip.next_header == IPPROTO_ICMPV6 and not ip.fragment
    assert ip.hop_limit == 255
    assert ip.flow_label == 0 and ip.traffic_class == 0
    assert l4_checksum6(ip.src, ip.dst, IPPROTO_ICMPV6, l4) == 0
    icmp_type, code, _csum = struct.unpack_from("!BBH", l4)
    return dict(eth_dst=eth.dst, eth_src=eth.src, src=ip.src, dst=ip.dst, type=icmp_type,
                code=code, rest=bytes(l4[4:8]), body=bytes(l4[8:]))


def nd_options(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = data[pos + 1] * 8
        assert length and pos + length <= len(data)
        out.append((data[pos], data[pos:pos + length]))
        pos += length
    assert pos == len(data)
    return out


def decode_ra(frame: bytes) -> dict:
    d = decode(frame)
    assert d["type"] == ND_ROUTER_ADVERT and d["code"] == 0
    d["cur_hop_limit"], d["flags"], d["router_lifetime"] = struct.unpack("!BBH", d["rest"])
    d["reachable"], d["retrans"] = struct.unpack_from("!II", d["body"])
    opts: dict[int, list[bytes]] = {}
    for t, o in nd_options(d["body"][8:]):
        opts.setdefault(t, []).append(o)
    d["opts"] = opts
    return d


def decode_na(frame: bytes) -> dict:
    d = decode(frame)
    assert d["type"] == ND_NEIGHBOR_ADVERT and d["code"] == 0
    assert d["rest"][1:] == bytes(3)
    d["flags"] = d["rest"][0]
    d["target"] = d["body"][:16]
    d["opts"] = nd_options(d["body"][16:])
    return d


def wire_names(data: bytes) -> list[str]:
    """Uncompressed DNS names back to text; the rest must be zero padding."""
    names, pos = [], 0
    while pos < len(data) and data[pos]:
        labels = []
        while data[pos]:
            n = data[pos]
            assert n < 64
            labels.append(data[pos + 1:pos + 1 + n].decode())
            pos += 1 + n
        pos += 1
        names.append(".".join(labels))
    assert not any(data[pos:])
    return names


# ---------------------------------------------------------------- Router Advertisement


def check_ra_contents(d: dict, conf: Config = CONF) -> None:
    assert d["eth_src"] == OUR_MAC
    assert d["src"] == OUR_LL.packed
    assert d["cur_hop_limit"] == 64
    assert d["flags"] == 0xC0                          # M and O: DHCPv6 is on
    assert d["router_lifetime"] == 65535
    assert d["reachable"] == 0 and d["retrans"] == 0
    opts = d["opts"]
    assert opts[1] == [bytes((1, 1)) + OUR_MAC]       # source link-layer address
    assert opts[5] == [bytes((5, 1, 0, 0)) + struct.pack("!I", 65520)]
    (pio,) = opts[3]
    plen, pflags, valid, preferred, reserved, prefix = struct.unpack("!BBIII16s", pio[2:])
    assert pio[1] == 4
    assert plen == 64
    assert pflags == 0xC0                              # L and A
    assert valid == preferred == 0xFFFFFFFF
    assert reserved == 0
    assert IPv6Address(prefix) == IPv6Address("2001:db8:1::")
    (rdnss,) = opts[25]
    assert rdnss[1] == 5                               # 1 + 2 per address
    assert rdnss[2:4] == b"\0\0"
    assert struct.unpack_from("!I", rdnss, 4)[0] == 0xFFFFFFFF
    assert [IPv6Address(rdnss[i:i + 16]) for i in (8, 24)] == [DNS1, DNS2]
    (dnssl,) = opts[31]
    assert len(dnssl) % 8 == 0 and dnssl[1] * 8 == len(dnssl)
    assert dnssl[2:4] == b"\0\0"
    assert struct.unpack_from("!I", dnssl, 4)[0] == 0xFFFFFFFF
    assert wire_names(dnssl[8:]) == ["example.com", "lab.example.org"]


def test_rs_from_link_local_gets_unicast_ra():
    guest = fresh_guest()
    [reply] = ndp.handle(rs(), CONF, guest)
    d = decode_ra(reply)
    assert d["eth_dst"] == GUEST_MAC
    assert d["dst"] == GUEST_LL.packed
    check_ra_contents(d)


def test_rs_from_unspecified_gets_multicast_ra():
    [reply] = ndp.handle(rs(src=UNSPEC), CONF, fresh_guest())
    d = decode_ra(reply)
    assert d["eth_dst"] == bytes.fromhex("333300000001")
    assert d["dst"] == ALL_NODES
    check_ra_contents(d)


def test_rs_from_unspecified_with_sllao_is_dropped():
    assert ndp.handle(rs(src=UNSPEC, options=sllao()), CONF, fresh_guest()) == []


def test_rs_without_options_is_answered():
    [reply] = ndp.handle(rs(options=b""), CONF, fresh_guest())
    assert decode_ra(reply)["dst"] == GUEST_LL.packed


def test_unsolicited_ra_to_all_nodes():
    d = decode_ra(ndp.router_advertisement(CONF, fresh_guest()))
    assert d["eth_dst"] == bytes.fromhex("333300000001")
    assert d["dst"] == ALL_NODES
    check_ra_contents(d)


def test_ra_to_explicit_unicast_uses_guest_mac():
    guest = fresh_guest()
    guest.observe_mac(GUEST_MAC)
    d = decode_ra(ndp.router_advertisement(CONF, guest, GUEST_LL.packed))
    assert d["eth_dst"] == GUEST_MAC and d["dst"] == GUEST_LL.packed


def test_ra_without_dhcpv6_clears_m_and_o():
    conf = make_conf(services=Services(dhcpv6=False))
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    assert d["flags"] == 0
    assert 3 in d["opts"]                               # SLAAC still works


def test_ra_without_dns_and_search():
    conf = make_conf(offer_dns=False, offer_search=False)
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    assert 25 not in d["opts"] and 31 not in d["opts"]
    conf = make_conf(ip6={"dns": ()}, search=())
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    assert 25 not in d["opts"] and 31 not in d["opts"]


def test_ra_mtu_option_follows_conf_and_is_left_out_below_ipv6_minimum():
    conf = make_conf(mtu=1500)
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    assert struct.unpack_from("!I", d["opts"][5][0], 4)[0] == 1500
    conf = make_conf(mtu=1000)
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    assert 5 not in d["opts"]


def test_ra_prefix_is_the_slash_64_of_a_longer_host_prefix():
    conf = make_conf(ip6={"addr": IPv6Address("2001:db8:7:8:9::1"), "prefix_len": 128})
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    pio = d["opts"][3][0]
    assert pio[2] == 64
    assert IPv6Address(pio[16:32]) == IPv6Address("2001:db8:7:8::")


def test_rs_with_ra_disabled_gets_nothing_but_is_learnt():
    conf = make_conf(services=Services(ra=False))
    guest = fresh_guest(conf)
    assert ndp.handle(rs(), conf, guest) == []
    assert guest.mac == GUEST_MAC and guest.addr6_ll == GUEST_LL


def test_dnssl_encoding_and_padding():
    opt = ndp.dnssl_option(["a.b"])
    # header 8 + "\1a\1b\0" 5 bytes, padded to 16
    assert opt == bytes((31, 2, 0, 0)) + b"\xff" * 4 + b"\x01a\x01b\x00" + bytes(3)
    opt = ndp.dnssl_option(["example.com."])
    assert len(opt) == 24 and wire_names(opt[8:]) == ["example.com"]
    assert ndp.dnssl_option([]) == b""
    assert ndp.dnssl_option(["bad..name", "x" * 64 + ".com"]) == b""


def test_dnssl_stays_within_option_size():
    names = [f"{'x' * 60}{i}.example" for i in range(60)]
    opt = ndp.dnssl_option(names)
    assert len(opt) <= 255 * 8 and opt[1] * 8 == len(opt)
    got = wire_names(opt[8:])
    assert got == names[:len(got)] and 0 < len(got) < len(names)


def test_rdnss_option():
    addrs = [IPv6Address(f"2001:db8::{i:x}").packed for i in range(1, 4)]
    opt = ndp.rdnss_option(addrs)
    assert opt[:2] == bytes((25, 7)) and len(opt) == 56 and opt[8:] == b"".join(addrs)
    assert ndp.rdnss_option([]) == b""


def test_encode_domain():
    assert ndp.encode_domain("example.com") == b"\x07example\x03com\x00"
    assert ndp.encode_domain("example.com.") == b"\x07example\x03com\x00"
    assert ndp.encode_domain("") is None
    assert ndp.encode_domain(".") is None
    assert ndp.encode_domain("a..b") is None
    assert ndp.encode_domain("x" * 63) == b"\x3f" + b"x" * 63 + b"\0"
    assert ndp.encode_domain("x" * 64) is None
    assert ndp.encode_domain(".".join(["x" * 63] * 4)) is None        # 257 bytes
    assert ndp.encode_domain("bücher.example") == b"\x0dxn--bcher-kva\x07example\x00"


def test_next_ra_delay():
    assert [ndp.next_ra_delay(n) for n in range(5)] == [16.0, 16.0, 16.0, 60.0, 60.0]
    assert ndp.RA_INTERVAL == 60.0


# ---------------------------------------------------------------- Neighbor Solicitation


def check_na(d: dict, target: IPv6Address) -> None:
    assert d["eth_src"] == OUR_MAC
    assert d["src"] == target.packed
    assert d["target"] == target.packed
    assert d["opts"] == [(2, bytes((2, 1)) + OUR_MAC)]


@pytest.mark.parametrize("target", [OUR_LL, GATEWAY, NEIGHBOUR, IPv6Address("2001:db8:99::1"),
                                    IPv6Address("fe80::1234")])
def test_ns_from_guest_is_answered_for_every_other_address(target):
    guest = fresh_guest()
    [reply] = ndp.handle(ns(target), CONF, guest)
    d = decode_na(reply)
    check_na(d, target)
    assert d["eth_dst"] == GUEST_MAC and d["dst"] == GUEST_LL.packed
    assert d["flags"] == 0x80 | 0x40 | 0x20              # Router, Solicited, Override


def test_unicast_ns_for_reachability_is_answered():
    frame = ns(OUR_LL, src=GUEST_ADDR.packed, dst=OUR_LL.packed)
    [reply] = ndp.handle(frame, CONF, fresh_guest())
    d = decode_na(reply)
    check_na(d, OUR_LL)
    assert d["dst"] == GUEST_ADDR.packed and d["eth_dst"] == GUEST_MAC


def test_ns_without_sllao_is_answered_to_ethernet_source():
    [reply] = ndp.handle(ns(GATEWAY, options=b""), CONF, fresh_guest())
    assert decode_na(reply)["eth_dst"] == GUEST_MAC


def test_ns_for_guest_addresses_is_not_answered():
    guest = fresh_guest()
    # configured global address
    assert ndp.handle(ns(GUEST_ADDR), CONF, guest) == []
    # its link-local, once seen as a source
    assert ndp.handle(ns(GATEWAY), CONF, guest)
    assert guest.addr6_ll == GUEST_LL
    assert ndp.handle(ns(GUEST_LL, src=GUEST_ADDR.packed), CONF, guest) == []
    # an address it started using
    assert ndp.handle(ns(GATEWAY, src=SLAAC_ADDR.packed), CONF, guest)
    assert guest.addr6 == SLAAC_ADDR
    assert ndp.handle(ns(SLAAC_ADDR), CONF, guest) == []
    # the configured one stays the guest's even after it moved to another
    assert ndp.handle(ns(GUEST_ADDR), CONF, guest) == []


@pytest.mark.parametrize("target", [SLAAC_ADDR, GUEST_LL, GUEST_ADDR, NEIGHBOUR,
                                    IPv6Address("fe80::abcd")])
def test_dad_probes_for_guest_tentative_addresses_are_never_answered(target):
    guest = fresh_guest()
    assert ndp.handle(ns(target, src=UNSPEC), CONF, guest) == []
    assert guest.addr6 == GUEST_ADDR and guest.addr6_ll is None     # nothing learnt


@pytest.mark.parametrize("target", [OUR_LL, GATEWAY])
def test_dad_probe_for_our_own_address_is_defended(target):
    [reply] = ndp.handle(ns(target, src=UNSPEC), CONF, fresh_guest())
    d = decode_na(reply)
    check_na(d, target)
    assert d["dst"] == ALL_NODES and d["eth_dst"] == bytes.fromhex("333300000001")
    assert d["flags"] == 0x80 | 0x20                     # not Solicited


def test_dad_probe_for_our_address_that_is_the_guests_is_not_answered():
    conf = make_conf(ip6={"gateway": GUEST_ADDR})
    assert ndp.handle(ns(GUEST_ADDR, src=UNSPEC), conf, fresh_guest(conf)) == []


def test_dad_probe_to_unicast_or_with_sllao_is_invalid():
    assert ndp.handle(ns(OUR_LL, src=UNSPEC, dst=OUR_LL.packed), CONF, fresh_guest()) == []
    assert ndp.handle(ns(OUR_LL, src=UNSPEC, options=sllao()), CONF, fresh_guest()) == []


def test_ns_learns_guest_mac_and_addresses():
    guest = fresh_guest()
    assert guest.mac == BROADCAST_MAC
    ndp.handle(ns(GATEWAY), CONF, guest)
    assert guest.mac == GUEST_MAC and guest.addr6_ll == GUEST_LL
    other_mac = bytes.fromhex("025500000002")
    ndp.handle(ns(GATEWAY, src=SLAAC_ADDR.packed, mac=other_mac), CONF, guest)
    assert guest.mac == other_mac and guest.addr6 == SLAAC_ADDR


def test_ndp_disabled_or_no_ipv6():
    assert ndp.handle(ns(GATEWAY), make_conf(services=Services(ndp=False)), fresh_guest()) == []
    conf = make_conf()
    conf = replace(conf, ip6=None, ip4=None)
    assert ndp.handle(ns(GATEWAY), conf, GuestState(CONF)) == []


# ---------------------------------------------------------------- validation


def corrupt(frame: bytes, offset: int, value: int) -> bytes:
    b = bytearray(frame)
    b[offset] = value
    return bytes(b)


ICMP_OFF = 14 + 40


@pytest.mark.parametrize("make", [lambda **kw: rs(**kw), lambda **kw: ns(GATEWAY, **kw)])
def test_hop_limit_must_be_255(make):
    assert ndp.handle(make(), CONF, fresh_guest())
    for hl in (1, 64, 254):
        assert ndp.handle(make(hop_limit=hl), CONF, fresh_guest()) == []


@pytest.mark.parametrize("make", [lambda: rs(), lambda: ns(GATEWAY)])
def test_bad_checksum_is_dropped_and_not_learnt(make):
    frame = make()
    csum = frame[ICMP_OFF + 2]
    guest = fresh_guest()
    assert ndp.handle(corrupt(frame, ICMP_OFF + 2, csum ^ 0x10), CONF, guest) == []
    assert guest.mac == BROADCAST_MAC and guest.addr6_ll is None


def test_nonzero_code_is_dropped():
    assert ndp.handle(rs(code=1), CONF, fresh_guest()) == []
    assert ndp.handle(ns(GATEWAY, code=1), CONF, fresh_guest()) == []


def test_zero_length_or_truncated_options_are_dropped():
    assert ndp.handle(rs(options=bytes((1, 0)) + GUEST_MAC), CONF, fresh_guest()) == []
    assert ndp.handle(rs(options=bytes((1, 2)) + GUEST_MAC), CONF, fresh_guest()) == []
    assert ndp.handle(rs(options=b"\x01"), CONF, fresh_guest()) == []
    assert ndp.handle(ns(GATEWAY, options=bytes((1, 0)) + GUEST_MAC), CONF, fresh_guest()) == []
    # unknown options are skipped
    assert ndp.handle(rs(options=bytes((200, 1)) + bytes(6) + sllao()), CONF, fresh_guest())


def test_ns_with_short_body_or_multicast_target_is_dropped():
    short = nd_frame(GUEST_LL.packed, solicited_node(GATEWAY), ND_NEIGHBOR_SOLICIT, bytes(4),
                     GATEWAY.packed[:12])
    assert ndp.handle(short, CONF, fresh_guest()) == []
    assert ndp.handle(ns(IPv6Address("ff02::1")), CONF, fresh_guest()) == []


def test_ns_for_unspecified_target_is_dropped():
    frame = nd_frame(GUEST_LL.packed, OUR_LL.packed, ND_NEIGHBOR_SOLICIT, bytes(4),
                     UNSPEC + sllao())
    assert ndp.handle(frame, CONF, fresh_guest()) == []


def test_multicast_source_is_dropped():
    assert ndp.handle(ns(GATEWAY, src=ALL_NODES), CONF, fresh_guest()) == []


def test_fragmented_ns_is_dropped():
    frame = ns(GATEWAY)
    eth, ip_hdr, l4 = frame[:14], bytearray(frame[14:54]), frame[54:]
    ip_hdr[6] = 44                                        # next header: Fragment
    struct.pack_into("!H", ip_hdr, 4, len(l4) + 8)
    frag = bytes((IPPROTO_ICMPV6, 0, 0, 0)) + b"\0\0\0\1"  # offset 0, no more fragments
    assert ndp.handle(eth + bytes(ip_hdr) + frag + l4, CONF, fresh_guest()) == []


def test_trailing_ethernet_padding_is_ignored():
    [reply] = ndp.handle(ns(GATEWAY) + bytes(30), CONF, fresh_guest())
    check_na(decode_na(reply), GATEWAY)


@pytest.mark.parametrize("icmp_type,body", [
    (ND_ROUTER_ADVERT, bytes(8) + sllao()),
    (ND_NEIGHBOR_ADVERT, GUEST_LL.packed + bytes((2, 1)) + GUEST_MAC),
    (ND_REDIRECT, GATEWAY.packed + NEIGHBOUR.packed),
])
def test_advertisements_and_redirects_from_guest_are_ignored_but_learnt(icmp_type, body):
    guest = fresh_guest()
    frame = nd_frame(GUEST_LL.packed, ALL_NODES, icmp_type, bytes(4), body)
    assert ndp.handle(frame, CONF, guest) == []
    assert guest.mac == GUEST_MAC and guest.addr6_ll == GUEST_LL


def test_other_frames_are_not_ours():
    echo = nd_frame(GUEST_LL.packed, OUR_LL.packed, ICMPV6_ECHO_REQUEST, bytes(4), b"x")
    assert ndp.handle(echo, CONF, fresh_guest()) == []
    udp = udp6_frame(OUR_MAC, GUEST_MAC, GUEST_LL.packed, OUR_LL.packed, 1, 2, b"x")
    assert ndp.handle(udp, CONF, fresh_guest()) == []
    ipv4 = bytearray(ns(GATEWAY))
    struct.pack_into("!H", ipv4, 12, ETH_P_IP)
    assert ndp.handle(bytes(ipv4), CONF, fresh_guest()) == []


def test_every_truncation_is_dropped_without_raising():
    for frame in (rs(), ns(GATEWAY), ns(OUR_LL, src=UNSPEC)):
        for n in range(len(frame)):
            assert ndp.handle(frame[:n], CONF, fresh_guest()) == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    assert ndp.handle(data, CONF, fresh_guest()) == []


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 200), st.integers(0, 255), st.sampled_from(["rs", "ns", "dad"]))
def test_single_byte_mutations_never_raise(offset, value, which):
    frame = {"rs": rs, "ns": lambda: ns(GATEWAY),
             "dad": lambda: ns(OUR_LL, src=UNSPEC)}[which]()
    frame = corrupt(frame, offset % len(frame), value)
    for reply in ndp.handle(frame, CONF, fresh_guest()):
        decode(reply)                                      # whatever comes out is valid


@settings(max_examples=100, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True),
                max_size=8),
       st.lists(st.integers(0, 2**128 - 1), max_size=6))
def test_ra_options_decode_for_any_search_list_and_resolvers(search, dns):
    conf = make_conf(search=tuple(search), ip6={"dns": tuple(IPv6Address(a) for a in dns)})
    d = decode_ra(ndp.router_advertisement(conf, fresh_guest(conf)))
    if search:
        assert wire_names(d["opts"][31][0][8:]) == search
    else:
        assert 31 not in d["opts"]
    if dns:
        rd = d["opts"][25][0]
        assert [IPv6Address(rd[i:i + 16]) for i in range(8, len(rd), 16)] == \
            [IPv6Address(a) for a in dns]
    else:
        assert 25 not in d["opts"]


# ---------------------------------------------------------------- frames a real guest sent

# Linux 6.1 in a namespace behind a veth (MAC 02:55:00:00:00:01), captured with an
# AF_PACKET socket while it brought the link up, ran SLAAC and pinged the gateway.
KERNEL_DAD_LL = bytes.fromhex(
    "3333ff00000102550000000186dd6000000000203aff00000000000000000000000000000000ff020000"
    "0000000000000001ff0000018700c95c00000000fe80000000000000005500fffe0000010e019c593995"
    "cf7b")
KERNEL_RS = bytes.fromhex(
    "33330000000202550000000186dd6000000000103afffe80000000000000005500fffe000001ff020000"
    "00000000000000000000000285007a82000000000101025500000001")
KERNEL_DAD_SLAAC = bytes.fromhex(
    "3333ff00000102550000000186dd6000000000203aff00000000000000000000000000000000ff020000"
    "0000000000000001ff0000018700e0ac0000000020010db800010000005500fffe0000010e01358b493a"
    "e01b")
KERNEL_NS_GATEWAY = bytes.fromhex(
    "3333ff00000102550000000186dd6000000000203aff20010db800010000005500fffe000001ff020000"
    "0000000000000001ff00000187001c7d0000000020010db80001000000000000000000010101025500000001")
KERNEL_MLD_REPORT = bytes.fromhex(
    "33330000001602550000000186dd6000000000240001fe80000000000000005500fffe000001ff020000"
    "0000000000000000000000163a000502000001008f0071b20000000104000000ff020000000000000000"
    "0001ff000001")


def test_kernel_bring_up_sequence():
    guest = fresh_guest()
    # DAD for its link-local (with a nonce option): silence
    assert ndp.handle(KERNEL_DAD_LL, CONF, guest) == []
    # router solicitation: RA to its link-local
    [ra] = ndp.handle(KERNEL_RS, CONF, guest)
    d = decode_ra(ra)
    assert d["dst"] == GUEST_LL.packed and d["eth_dst"] == GUEST_MAC
    check_ra_contents(d)
    assert guest.addr6_ll == GUEST_LL and guest.mac == GUEST_MAC
    # DAD for the SLAAC address it derived from our prefix: silence
    assert ndp.handle(KERNEL_DAD_SLAAC, CONF, guest) == []
    # resolving the gateway from its SLAAC address: our MAC
    [na] = ndp.handle(KERNEL_NS_GATEWAY, CONF, guest)
    d = decode_na(na)
    check_na(d, GATEWAY)
    assert d["dst"] == SLAAC_ADDR.packed and d["flags"] == 0xE0
    assert guest.addr6 == SLAAC_ADDR
    # MLD (behind a Hop-by-Hop header) is not NDP
    assert ndp.handle(KERNEL_MLD_REPORT, CONF, guest) == []
