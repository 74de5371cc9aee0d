"""DHCPv6 server: client messages in as frames, replies out, decoded field by field.

Replies are decoded here with plain struct code (not with common.dhcpv6's own
parser); the message sequences are those a real client (dhclient -6,
systemd-networkd, NetworkManager) goes through.
"""

from __future__ import annotations

import struct
from ipaddress import IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import dhcpv6 as d6
from common.conf import Config, Ip6Config, Services
from common.guest import BROADCAST_MAC, GuestState
from common.packet.checksum import l4_checksum6
from common.packet.ethernet import ETH_P_IPV6, parse_ethernet
from common.packet.frames import udp6_frame
from common.packet.ipv6 import IPPROTO_UDP, parse_ipv6
from common.packet.udp import parse_udp
from common.record import replace

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("025500000001")
OUR_LL = IPv6Address("fe80::1")
GATEWAY = IPv6Address("2001:db8:1::1")
GUEST_ADDR = IPv6Address("2001:db8:1::42")
GUEST_LL = IPv6Address("fe80::55:ff:fe00:1")
DNS1 = IPv6Address("2001:db8:53::1")
DNS2 = IPv6Address("2001:db8:53::2")
ALL_SERVERS = IPv6Address("ff02::1:2").packed
SERVER_DUID = bytes.fromhex("00030001") + OUR_MAC
CLIENT_DUID = bytes.fromhex("0001000100000001") + GUEST_MAC       # a DUID-LLT
IAID = bytes.fromhex("55000001")
XID = bytes.fromhex("abcdef")
INF = 0xFFFFFFFF


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


# ---------------------------------------------------------------- client messages


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack("!HH", code, len(data)) + data


def iaaddr(addr: IPv6Address, pref: int = 0, valid: int = 0) -> bytes:
    return opt(5, addr.packed + struct.pack("!II", pref, valid))


def ia_na(iaid: bytes = IAID, *inner: bytes, t1: int = 0, t2: int = 0) -> bytes:
    return opt(3, iaid + struct.pack("!II", t1, t2) + b"".join(inner))


CLIENT_ID = opt(1, CLIENT_DUID)
SERVER_ID = opt(2, SERVER_DUID)
ELAPSED = opt(8, b"\0\0")
ORO = opt(6, struct.pack("!HHH", 23, 24, 39))


def message(msg_type: int, *options: bytes, xid: bytes = XID) -> bytes:
    return bytes((msg_type,)) + xid + b"".join(options)


def frame(payload: bytes, *, src: bytes = GUEST_LL.packed, dst: bytes = ALL_SERVERS,
          sport: int = 546, dport: int = 547, mac: bytes = GUEST_MAC) -> bytes:
    dst_mac = b"\x33\x33" + dst[12:] if dst[0] == 0xFF else OUR_MAC
    return udp6_frame(dst_mac, mac, src, dst, sport, dport, payload, hop_limit=1)


# ---------------------------------------------------------------- decoding


def options(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        code, length = struct.unpack_from("!HH", data, pos)
        assert pos + 4 + length <= len(data)
        out.append((code, data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out


def decode(reply: bytes, client: bytes = GUEST_LL.packed) -> dict:
    """Headers checked, then the DHCPv6 message as {type, xid, opts: code -> [bodies]}."""
    eth, l3 = parse_ethernet(reply)
    assert eth.ethertype == ETH_P_IPV6
    assert eth.src == OUR_MAC and eth.dst == GUEST_MAC
    ip, l4 = parse_ipv6(l3)
    assert len(l3) == 40 + ip.payload_length
    assert ip.next_header == IPPROTO_UDP and not ip.fragment
    assert ip.src == OUR_LL.packed and ip.dst == client
    udp, payload = parse_udp(l4)
    assert (udp.sport, udp.dport) == (547, 546)
    assert udp.length == len(l4)
    assert udp.checksum and l4_checksum6(ip.src, ip.dst, IPPROTO_UDP, l4) == 0
    payload = bytes(payload)
    opts: dict[int, list[bytes]] = {}
    for code, body in options(payload[4:]):
        opts.setdefault(code, []).append(body)
    return dict(type=payload[0], xid=payload[1:4], opts=opts)


def status(body: bytes) -> tuple[int, str]:
    return struct.unpack_from("!H", body)[0], body[2:].decode()


def decode_ia_na(body: bytes) -> dict:
    iaid, t1, t2 = body[:4], *struct.unpack_from("!II", body, 4)
    addrs, st_code = [], None
    for code, inner in options(body[12:]):
        if code == 5:
            addr, pref, valid = struct.unpack_from("!16sII", inner)
            assert len(inner) == 24
            addrs.append((IPv6Address(addr), pref, valid))
        elif code == 13:
            st_code = status(inner)[0]
        else:
            raise AssertionError(f"unexpected option {code} in IA_NA")
    return dict(iaid=iaid, t1=t1, t2=t2, addrs=addrs, status=st_code)


def wire_names(data: bytes) -> list[str]:
    names, pos = [], 0
    while pos < len(data):
        labels = []
        while data[pos]:
            n = data[pos]
            labels.append(data[pos + 1:pos + 1 + n].decode())
            pos += 1 + n
        pos += 1
        names.append(".".join(labels))
    return names


def exchange(msg: bytes, conf: Config = CONF, guest: GuestState | None = None,
             **kw) -> dict | None:
    replies = d6.handle(frame(msg, **kw), conf, guest or fresh_guest(conf))
    if not replies:
        return None
    [reply] = replies
    return decode(reply, kw.get("src", GUEST_LL.packed))


def check_ids(d: dict, client: bool = True) -> None:
    assert d["xid"] == XID
    assert d["opts"][2] == [SERVER_DUID]
    if client:
        assert d["opts"][1] == [CLIENT_DUID]
    else:
        assert 1 not in d["opts"]


def check_lease(d: dict, iaid: bytes = IAID) -> dict:
    (ia,) = d["opts"][3]
    ia = decode_ia_na(ia)
    assert ia["iaid"] == iaid
    assert ia["t1"] == INF and ia["t2"] == INF
    assert ia["addrs"][0] == (GUEST_ADDR, INF, INF)
    assert ia["status"] is None
    return ia


def check_config(d: dict) -> None:
    (dns,) = d["opts"][23]
    assert [IPv6Address(dns[i:i + 16]) for i in range(0, len(dns), 16)] == [DNS1, DNS2]
    (domains,) = d["opts"][24]
    assert wire_names(domains) == ["example.com", "lab.example.org"]


# ---------------------------------------------------------------- sequences


def test_solicit_advertise_request_reply():
    guest = fresh_guest()
    solicit = message(d6.SOLICIT, CLIENT_ID, ELAPSED, ORO, ia_na())
    adv = exchange(solicit, guest=guest)
    assert adv["type"] == d6.ADVERTISE
    check_ids(adv)
    assert adv["opts"][7] == [b"\xff"]                    # preference: take us at once
    check_lease(adv)
    check_config(adv)
    assert 14 not in adv["opts"] and 13 not in adv["opts"] and 39 not in adv["opts"]
    assert guest.mac == GUEST_MAC and guest.addr6_ll == GUEST_LL

    # the client echoes the server id and the advertised address
    server_id = opt(2, adv["opts"][2][0])
    request = message(d6.REQUEST, CLIENT_ID, server_id, ELAPSED, ORO,
                      ia_na(IAID, iaaddr(GUEST_ADDR)), xid=b"\x01\x02\x03")
    rep = exchange(request, guest=guest)
    assert rep["type"] == d6.REPLY and rep["xid"] == b"\x01\x02\x03"
    assert rep["opts"][2] == [SERVER_DUID] and rep["opts"][1] == [CLIENT_DUID]
    ia = check_lease(rep)
    assert len(ia["addrs"]) == 1
    check_config(rep)
    assert 7 not in rep["opts"]


def test_solicit_with_rapid_commit_gets_reply():
    rep = exchange(message(d6.SOLICIT, CLIENT_ID, opt(14), ELAPSED, ia_na()))
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    assert rep["opts"][14] == [b""]
    assert 7 not in rep["opts"]
    check_lease(rep)
    check_config(rep)


def test_solicit_without_ia_na_advertises_no_address():
    adv = exchange(message(d6.SOLICIT, CLIENT_ID, ELAPSED))
    assert adv["type"] == d6.ADVERTISE
    check_ids(adv)
    assert 3 not in adv["opts"]
    assert status(adv["opts"][13][0])[0] == d6.STATUS_NO_ADDRS_AVAIL
    check_config(adv)


def test_renew_and_rebind_get_the_same_lease():
    renew = message(d6.RENEW, CLIENT_ID, SERVER_ID, ELAPSED, ia_na(IAID, iaaddr(GUEST_ADDR)))
    rep = exchange(renew)
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    check_lease(rep)
    check_config(rep)
    rebind = message(d6.REBIND, CLIENT_ID, ELAPSED, ia_na(IAID, iaaddr(GUEST_ADDR)))
    rep = exchange(rebind)
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    check_lease(rep)


@pytest.mark.parametrize("msg_type", [d6.REQUEST, d6.RENEW, d6.REBIND])
def test_stale_addresses_are_returned_with_zero_lifetimes(msg_type):
    stale = IPv6Address("2001:db8:99::7")
    sid = () if msg_type == d6.REBIND else (SERVER_ID,)
    msg = message(msg_type, CLIENT_ID, *sid, ia_na(IAID, iaaddr(stale, 100, 200),
                                                    iaaddr(GUEST_ADDR)))
    ia = check_lease(exchange(msg))
    assert ia["addrs"][1:] == [(stale, 0, 0)]


def test_information_request():
    rep = exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID, ELAPSED, ORO))
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    assert 3 not in rep["opts"] and 13 not in rep["opts"]
    check_config(rep)
    # no client id is fine for an information-request
    rep = exchange(message(d6.INFORMATION_REQUEST, ELAPSED))
    check_ids(rep, client=False)
    check_config(rep)
    # nor is our own server id
    assert exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID, SERVER_ID)) is not None


def test_information_request_with_ia_or_foreign_server_id_is_dropped():
    assert exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID, ia_na())) is None
    foreign = opt(2, bytes.fromhex("00030001020000000099"))
    assert exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID, foreign)) is None


def test_confirm_on_link():
    on_link = IPv6Address("2001:db8:1::1234")
    rep = exchange(message(d6.CONFIRM, CLIENT_ID, ELAPSED,
                           ia_na(IAID, iaaddr(GUEST_ADDR), iaaddr(on_link))))
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    assert status(rep["opts"][13][0])[0] == d6.STATUS_SUCCESS
    assert 3 not in rep["opts"] and 23 not in rep["opts"]


def test_confirm_off_link():
    off_link = IPv6Address("2001:db8:2::42")
    rep = exchange(message(d6.CONFIRM, CLIENT_ID, ia_na(IAID, iaaddr(GUEST_ADDR),
                                                        iaaddr(off_link))))
    check_ids(rep)
    assert status(rep["opts"][13][0])[0] == d6.STATUS_NOT_ON_LINK


def test_confirm_without_addresses_gets_no_reply():
    assert exchange(message(d6.CONFIRM, CLIENT_ID, ia_na())) is None
    assert exchange(message(d6.CONFIRM, CLIENT_ID)) is None


@pytest.mark.parametrize("msg_type", [d6.RELEASE, d6.DECLINE])
def test_release_and_decline(msg_type):
    rep = exchange(message(msg_type, CLIENT_ID, SERVER_ID, ia_na(IAID, iaaddr(GUEST_ADDR))))
    assert rep["type"] == d6.REPLY
    check_ids(rep)
    assert status(rep["opts"][13][0])[0] == d6.STATUS_SUCCESS
    assert 3 not in rep["opts"]


# ---------------------------------------------------------------- identifiers


FOREIGN_ID = opt(2, bytes.fromhex("0003000102000000ffff"))


@pytest.mark.parametrize("msg_type", [d6.REQUEST, d6.RENEW, d6.RELEASE, d6.DECLINE])
def test_messages_for_another_server_or_none_are_ignored(msg_type):
    assert exchange(message(msg_type, CLIENT_ID, FOREIGN_ID, ia_na())) is None
    assert exchange(message(msg_type, CLIENT_ID, ia_na())) is None
    assert exchange(message(msg_type, CLIENT_ID, SERVER_ID, FOREIGN_ID, ia_na())) is None
    assert exchange(message(msg_type, CLIENT_ID, SERVER_ID, ia_na())) is not None


@pytest.mark.parametrize("msg_type", [d6.SOLICIT, d6.CONFIRM, d6.REBIND])
def test_messages_that_must_not_carry_a_server_id(msg_type):
    msg = message(msg_type, CLIENT_ID, SERVER_ID, ia_na(IAID, iaaddr(GUEST_ADDR)))
    assert exchange(msg) is None


@pytest.mark.parametrize("msg_type", [d6.SOLICIT, d6.REQUEST, d6.CONFIRM, d6.RENEW,
                                      d6.REBIND, d6.RELEASE, d6.DECLINE])
def test_client_id_is_required(msg_type):
    msg = message(msg_type, SERVER_ID, ia_na(IAID, iaaddr(GUEST_ADDR)))
    assert exchange(msg) is None
    assert exchange(message(msg_type, opt(1), SERVER_ID, ia_na())) is None
    assert exchange(message(msg_type, opt(1, bytes(131)), SERVER_ID, ia_na())) is None


@pytest.mark.parametrize("msg_type", [d6.ADVERTISE, d6.REPLY, d6.RECONFIGURE,
                                      d6.RELAY_FORW, d6.RELAY_REPL, 0, 14, 255])
def test_server_and_relay_messages_are_ignored(msg_type):
    assert exchange(message(msg_type, CLIENT_ID, SERVER_ID, ia_na())) is None


def test_server_duid():
    assert d6.server_duid(CONF) == SERVER_DUID


# ---------------------------------------------------------------- options


def test_several_ias():
    second = bytes.fromhex("55000002")
    ia_ta = opt(4, bytes.fromhex("66000001"))
    ia_pd = opt(25, bytes.fromhex("77000001") + bytes(8))
    adv = exchange(message(d6.SOLICIT, CLIENT_ID, ia_na(), ia_na(second), ia_ta, ia_pd))
    first, other = (decode_ia_na(b) for b in adv["opts"][3])
    assert first["iaid"] == IAID and first["addrs"] == [(GUEST_ADDR, INF, INF)]
    assert other["iaid"] == second and other["addrs"] == []
    assert other["status"] == d6.STATUS_NO_ADDRS_AVAIL
    (ta,) = adv["opts"][4]
    assert ta[:4] == bytes.fromhex("66000001")
    assert options(ta[4:])[0][0] == 13 and status(options(ta[4:])[0][1])[0] == 2
    (pd,) = adv["opts"][25]
    assert pd[:4] == bytes.fromhex("77000001") and pd[4:12] == bytes(8)
    assert status(options(pd[12:])[0][1])[0] == d6.STATUS_NO_PREFIX_AVAIL


def test_no_dns_no_search():
    conf = make_conf(offer_dns=False, offer_search=False)
    rep = exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID), conf)
    assert 23 not in rep["opts"] and 24 not in rep["opts"]
    conf = make_conf(ip6={"dns": ()}, search=("bad..name",))
    rep = exchange(message(d6.INFORMATION_REQUEST, CLIENT_ID), conf)
    assert 23 not in rep["opts"] and 24 not in rep["opts"]


@pytest.mark.parametrize("client_flags,expected", [(None, 0x04), (0x00, 0x04), (0x01, 0x06),
                                                   (0x04, 0x04)])
def test_client_fqdn(client_flags, expected):
    conf = make_conf(fqdn="guest.example.com")
    extra = () if client_flags is None else (opt(39, bytes((client_flags,)) + b"\x05guest"),)
    for msg in (message(d6.SOLICIT, CLIENT_ID, ia_na(), *extra),
                message(d6.REQUEST, CLIENT_ID, SERVER_ID, ia_na(), *extra),
                message(d6.INFORMATION_REQUEST, CLIENT_ID, *extra)):
        rep = exchange(msg, conf)
        (fqdn,) = rep["opts"][39]
        assert fqdn[0] == expected                          # N, and O if we overrode S
        assert fqdn[1:] == b"\x05guest\x07example\x03com\x00"


def test_no_fqdn_without_conf():
    rep = exchange(message(d6.REQUEST, CLIENT_ID, SERVER_ID, ia_na(), opt(39, b"\x01")))
    assert 39 not in rep["opts"]


def test_unknown_options_are_skipped():
    rep = exchange(message(d6.SOLICIT, opt(0xfff0, b"junk"), CLIENT_ID, opt(16, bytes(9)),
                           ia_na(IAID, opt(0xfff1, b"x"), iaaddr(GUEST_ADDR, 1, 2))))
    check_lease(rep)


# ---------------------------------------------------------------- addressing and validation


def test_unicast_to_our_link_local_is_answered():
    rep = exchange(message(d6.RENEW, CLIENT_ID, SERVER_ID, ia_na()), dst=OUR_LL.packed)
    check_lease(rep)


def test_all_dhcp_servers_is_answered():
    rep = exchange(message(d6.SOLICIT, CLIENT_ID, ia_na()),
                   dst=IPv6Address("ff05::1:3").packed)
    assert rep["type"] == d6.ADVERTISE


def test_reply_goes_to_client_source_address_and_port_546():
    rep = d6.handle(frame(message(d6.SOLICIT, CLIENT_ID, ia_na()), src=GUEST_ADDR.packed,
                          sport=5460), CONF, fresh_guest())
    decode(rep[0], GUEST_ADDR.packed)                       # asserts port 546


@pytest.mark.parametrize("dst", [GATEWAY.packed, GUEST_ADDR.packed,
                                 IPv6Address("ff02::1").packed])
def test_other_destinations_are_not_ours(dst):
    assert exchange(message(d6.SOLICIT, CLIENT_ID, ia_na()), dst=dst) is None


def test_frames_not_for_us_teach_nothing():
    guest = fresh_guest()
    d6.handle(frame(message(d6.SOLICIT, CLIENT_ID, ia_na()), dst=GATEWAY.packed), CONF, guest)
    assert guest.mac == BROADCAST_MAC and guest.addr6_ll is None


def test_wrong_port_or_source_is_dropped():
    msg = message(d6.SOLICIT, CLIENT_ID, ia_na())
    assert exchange(msg, dport=546) is None
    assert exchange(msg, src=bytes(16)) is None
    assert exchange(msg, src=IPv6Address("ff02::1").packed) is None


def test_udp_checksum_is_not_checked():
    # partial checksums from a vnet-header tap must get through (see the module docstring)
    f = bytearray(frame(message(d6.SOLICIT, CLIENT_ID, ia_na())))
    csum_off = 14 + 40 + 6
    f[csum_off] ^= 0x01
    assert d6.handle(bytes(f), CONF, fresh_guest())
    f[csum_off:csum_off + 2] = b"\0\0"
    assert d6.handle(bytes(f), CONF, fresh_guest())


def test_trailing_padding_is_ignored():
    rep = d6.handle(frame(message(d6.SOLICIT, CLIENT_ID, ia_na())) + bytes(20), CONF,
                    fresh_guest())
    check_lease(decode(rep[0]))


@pytest.mark.parametrize("payload", [
    b"",
    b"\x01",
    b"\x01\xab\xcd",                                         # shorter than type + xid
    message(d6.SOLICIT, CLIENT_ID[:-1]),                      # option runs past the end
    message(d6.SOLICIT, CLIENT_ID, b"\x00\x03\x00"),          # truncated option header
    message(d6.SOLICIT, CLIENT_ID, opt(3, IAID + bytes(7))),  # IA_NA shorter than 12
    message(d6.SOLICIT, CLIENT_ID, ia_na(IAID, opt(5, bytes(23)))),   # short IAADDR
    message(d6.SOLICIT, CLIENT_ID, ia_na(IAID, b"\x00\x05\x00\x30")), # IAADDR past the IA
    message(d6.SOLICIT, CLIENT_ID, ia_na(IAID, opt(5, bytes(24) + b"\x00"))),  # bad inside
    message(d6.SOLICIT, CLIENT_ID, opt(4, b"\0\0")),          # IA_TA shorter than 4
    message(d6.SOLICIT, CLIENT_ID, opt(25, bytes(11))),       # IA_PD shorter than 12
    message(d6.CONFIRM, CLIENT_ID, ia_na(IAID, opt(5, bytes(10)))),
])
def test_malformed_messages_are_dropped(payload):
    assert exchange(payload) is None


def test_every_truncation_is_dropped_without_raising():
    msg = message(d6.REQUEST, CLIENT_ID, SERVER_ID, ELAPSED, ORO,
                  ia_na(IAID, iaaddr(GUEST_ADDR)))
    full = frame(msg)
    for n in range(len(full)):
        assert d6.handle(full[:n], CONF, fresh_guest()) == []
    # a truncated message in a well-formed frame: dropped unless it still parses
    for n in range(len(msg)):
        replies = d6.handle(frame(msg[:n]), CONF, fresh_guest())
        for r in replies:
            decode(r)


def test_dhcpv6_disabled():
    conf = make_conf(services=Services(dhcpv6=False))
    assert exchange(message(d6.SOLICIT, CLIENT_ID, ia_na()), conf) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_payloads_never_raise(payload):
    for r in d6.handle(frame(payload), CONF, fresh_guest()):
        decode(r)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.binary(max_size=40)), max_size=8),
       st.sampled_from([d6.SOLICIT, d6.REQUEST, d6.RENEW, d6.REBIND, d6.CONFIRM,
                        d6.INFORMATION_REQUEST, d6.RELEASE]))
def test_random_options_never_raise(opts, msg_type):
    msg = message(msg_type, *(opt(c, b) for c, b in opts))
    for r in d6.handle(frame(msg), CONF, fresh_guest()):
        d = decode(r)
        assert d["xid"] == XID and d["opts"][2] == [SERVER_DUID]


# ---------------------------------------------------------------- frames a real client sent

# ISC dhclient 4.4.3 (-6, client id 00:01:00:01:00:00:00:01:02:55:00:00:00:01) in a
# namespace behind a veth with checksum offload on, captured with an AF_PACKET socket:
# the UDP checksums are partial (pseudo-header sum only), as through a tap with
# IFF_VNET_HDR.  Transaction ids vary; the server id is DUID-LL of 9a:55:9a:55:9a:55.
def _hex(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


_HDR = ("33330001000202550000000186dd6009c8e2", "1101fe80000000000000005500fffe000001"
        "ff020000000000000000000000010002" "02220223")
DHCLIENT_SOLICIT = _hex(_HDR[0], "003e", _HDR[1], "003efd2b", "014b06cf"
                        "0001000e0001000100000001025500000001000600060017001800270008"
                        "000200000003000c0000000100000e1000001518")
DHCLIENT_REQUEST = _hex(_HDR[0], "0068", _HDR[1], "0068fd55", "03c8aee7"
                        "0001000e00010001000000010255000000010002000a000300019a559a559a55"
                        "00060006001700180027000800020000000300280000000100000e1000001518"
                        "0005001820010db800010000000000000000004200001c2000001d4c")
DHCLIENT_CONFIRM = _hex(_HDR[0], "005a", _HDR[1], "005afd47", "04dc361e"
                        "0001000e000100010000000102550000000100060006001700180027000800"
                        "020000000300280000000100000000000000000005001820010db800010000"
                        "000000000000004200000000000000000000")
DHCLIENT_RELEASE = _hex(_HDR[0], "0068", _HDR[1], "0068fd55", "0819fcd9"
                        "0001000e00010001000000010255000000010002000a000300019a559a559a55"
                        "00060006001700180027000800020000000300280000000100000000000000"
                        "000005001820010db80001000000000000000000420000000000000000")
DHCLIENT_INFO_REQUEST = _hex(_HDR[0], "002e", _HDR[1], "002efd1b", "0b7b23c6"
                             "0001000e000100010000000102550000000100060006001700180027"
                             "000800020000")
DHCLIENT_RAPID_SOLICIT = _hex(_HDR[0], "0042", _HDR[1], "0042fd2f", "01ebade6"
                              "0001000e000100010000000102550000000100060006001700180027"
                              "000800020000000e00000003000c0000000100000e1000001518")
DHCLIENT_DUID = bytes.fromhex("0001000100000001025500000001")
DHCLIENT_IAID = bytes.fromhex("00000001")


def dhclient_exchange(f: bytes, conf: Config = CONF, guest: GuestState | None = None) -> dict:
    [reply] = d6.handle(f, conf, guest or fresh_guest(conf))
    d = decode(reply)
    assert d["xid"] == f[63:66]
    assert d["opts"][1] == [DHCLIENT_DUID] and d["opts"][2] == [SERVER_DUID]
    return d


def test_dhclient_frames_carry_partial_checksums():
    f = DHCLIENT_SOLICIT
    assert l4_checksum6(f[22:38], f[38:54], IPPROTO_UDP, f[54:]) != 0


def test_dhclient_sequence():
    conf = make_conf(fqdn="guest.example.com")
    guest = fresh_guest(conf)
    adv = dhclient_exchange(DHCLIENT_SOLICIT, conf, guest)
    assert adv["type"] == d6.ADVERTISE and adv["opts"][7] == [b"\xff"]
    check_lease(adv, DHCLIENT_IAID)
    check_config(adv)
    assert adv["opts"][39] == [b"\x04\x05guest\x07example\x03com\x00"]
    assert guest.mac == GUEST_MAC and guest.addr6_ll == GUEST_LL
    rep = dhclient_exchange(DHCLIENT_REQUEST, conf, guest)
    assert rep["type"] == d6.REPLY
    assert len(check_lease(rep, DHCLIENT_IAID)["addrs"]) == 1
    check_config(rep)
    rep = dhclient_exchange(DHCLIENT_CONFIRM, conf, guest)
    assert rep["type"] == d6.REPLY and status(rep["opts"][13][0])[0] == d6.STATUS_SUCCESS
    rep = dhclient_exchange(DHCLIENT_RELEASE, conf, guest)
    assert rep["type"] == d6.REPLY and status(rep["opts"][13][0])[0] == d6.STATUS_SUCCESS


def test_dhclient_confirm_after_the_address_moved():
    conf = make_conf(ip6={"addr": IPv6Address("2001:db8:2::42")})
    rep = dhclient_exchange(DHCLIENT_CONFIRM, conf)
    assert status(rep["opts"][13][0])[0] == d6.STATUS_NOT_ON_LINK


def test_dhclient_information_request():
    rep = dhclient_exchange(DHCLIENT_INFO_REQUEST)
    assert rep["type"] == d6.REPLY and 3 not in rep["opts"]
    check_config(rep)


def test_dhclient_rapid_commit():
    rep = dhclient_exchange(DHCLIENT_RAPID_SOLICIT)
    assert rep["type"] == d6.REPLY and rep["opts"][14] == [b""]
    check_lease(rep, DHCLIENT_IAID)


def test_dhclient_request_for_another_server_is_ignored():
    conf = make_conf(our_mac=bytes.fromhex("9a559a559a56"))
    assert d6.handle(DHCLIENT_REQUEST, conf, fresh_guest(conf)) == []
