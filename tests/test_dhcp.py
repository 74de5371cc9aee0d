"""DHCP server: request frames in (hand-made and captured from real clients), reply
frames out, parsed back with the codecs."""

from __future__ import annotations

import dataclasses
import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import dhcp
from common.conf import Config, build_config
from common.dhcp import (
    DHCPACK,
    DHCPDECLINE,
    DHCPDISCOVER,
    DHCPINFORM,
    DHCPNAK,
    DHCPOFFER,
    DHCPRELEASE,
    DHCPREQUEST,
    MAGIC_COOKIE,
    DhcpMessage,
    encode_domain_search,
    parse_dhcp,
)
from common.guest import GuestState
from common.hostinfo import FamilyInfo, HostInfo
from common.packet.checksum import l4_checksum4
from common.packet.errors import MalformedPacket
from common.packet.ethernet import ETH_P_IP, parse_ethernet
from common.packet.frames import udp4_frame
from common.packet.ipv4 import IPPROTO_UDP, parse_ipv4
from common.packet.udp import parse_udp
from common.record import replace

CLIENT_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("021122334455")
BCAST_MAC = b"\xff" * 6
BCAST4 = b"\xff" * 4
ZERO4 = b"\0" * 4


def ip(text: str) -> bytes:
    return IPv4Address(text).packed


def unhex(text: str) -> bytes:
    """Hex with runs of zero bytes written as zN."""
    out = bytearray()
    for tok in text.split():
        out += bytes(int(tok[1:])) if tok[0] == "z" else bytes.fromhex(tok)
    return bytes(out)


DHCLIENT_DISCOVER = unhex(
    "ffffffffffff525400123456080045100148000000008011399600000000ffffffff004400430134 "
    "8362010106001005993f z20 525400123456 z202 "
    "638253633501010c02766d370d011c02030f06770c2c2f1a792aff z37 "
)

DHCLIENT_REQUEST = unhex(
    "ffffffffffff525400123456080045100148000000008011399600000000ffffffff004400430134 "
    "6c76010106001005993f z20 525400123456 z202 "
    "638253633501033604c00002013204c000020a0c02766d370d011c02030f06770c2c2f1a792aff "
    "z25 "
)

UDHCPC_DISCOVER = unhex(
    "ffffffffffff52540012345608004500014800000000401179a600000000ffffffff004400430134 "
    "fceb010106004a4bae5c z20 525400123456 z202 638253633501013902024037070103060c0f "
    "1c2a3c0c756468637020312e33352e303d0701525400123456ff z20 "
)

UDHCPC_REQUEST = unhex(
    "ffffffffffff52540012345608004500014800000000401179a600000000ffffffff004400430134 "
    "e5ff010106004a4bae5c z20 525400123456 z202 638253633501033204c000020a3604c00002 "
    "013902024037070103060c0f1c2a3c0c756468637020312e33352e303d0701525400123456ff z8 "
)


def make_conf(opts: dict | None = None, search=("example.com", "corp.example.com"),
              gateway: str | None = "192.0.2.1",
              nameservers=("192.0.2.53", "192.0.2.54")) -> Config:
    host = HostInfo(v4=FamilyInfo("eth0", gateway, (("192.0.2.10", 24),)), v6=None,
                    macs={"eth0": "02:11:22:33:44:55"}, nameservers=nameservers,
                    search=tuple(search))
    return build_config("passt", opts or {}, host)


@pytest.fixture
def conf() -> Config:
    return make_conf()


@pytest.fixture
def guest(conf) -> GuestState:
    return GuestState(conf)


def bootp(msg_type: int | None, options: bytes = b"", *, xid: int = 0x1234abcd,
          flags: int = 0, ciaddr: bytes = ZERO4, chaddr: bytes = CLIENT_MAC, op: int = 1,
          htype: int = 1, hlen: int = 6, cookie: bytes = MAGIC_COOKIE) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s", op, htype, hlen, 0, xid, 3, flags, ciaddr,
                         ZERO4, ZERO4, ZERO4, chaddr + bytes(16 - len(chaddr)))
    opts = (bytes((53, 1, msg_type)) if msg_type is not None else b"") + options + b"\xff"
    return header + bytes(192) + cookie + opts


def frame(msg: bytes, src_ip: bytes = ZERO4, dst_ip: bytes = BCAST4, dport: int = 67) -> bytes:
    return udp4_frame(BCAST_MAC, CLIENT_MAC, src_ip, dst_ip, 68, dport, msg)


def opt(code: int, data: bytes) -> bytes:
    return bytes((code, len(data))) + data


@dataclasses.dataclass
class Reply:
    eth_dst: bytes
    eth_src: bytes
    ip_src: bytes
    ip_dst: bytes
    length: int                 # of the BOOTP message
    msg: DhcpMessage

    @property
    def type(self) -> int:
        return self.msg.options[53][0]


def one_reply(frames: list[bytes]) -> Reply:
    assert len(frames) == 1
    eth, l3 = parse_ethernet(frames[0])
    assert eth.ethertype == ETH_P_IP
    ipv4, l4 = parse_ipv4(l3, verify_checksum=True)
    assert ipv4.proto == IPPROTO_UDP and ipv4.ttl > 1
    assert l4_checksum4(ipv4.src, ipv4.dst, IPPROTO_UDP, l4) == 0
    udp, payload = parse_udp(l4)
    assert (udp.sport, udp.dport) == (67, 68)
    return Reply(eth.dst, eth.src, ipv4.src, ipv4.dst, len(payload), parse_dhcp(payload))


def decode_names(data: bytes) -> list[str]:
    """RFC 1035 names with compression pointers, back to dotted text (test oracle)."""
    names, i = [], 0
    while i < len(data):
        labels, j, jumps = [], i, 0
        end = None
        while True:
            length = data[j]
            if length & 0xc0 == 0xc0:
                end = j + 2 if end is None else end
                j = (length & 0x3f) << 8 | data[j + 1]
                jumps += 1
                assert jumps < 64 and j < i, "pointers must go backwards"
                continue
            if length == 0:
                end = j + 1 if end is None else end
                break
            labels.append(data[j + 1:j + 1 + length].decode())
            j += 1 + length
        names.append(".".join(labels))
        i = end
    return names


# ---------------------------------------------------------------- the exchange


def test_discover_gets_offer(conf, guest):
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER, flags=0x8000)), conf, guest))
    assert (r.eth_dst, r.eth_src) == (CLIENT_MAC, OUR_MAC)
    assert (r.ip_src, r.ip_dst) == (ip("192.0.2.1"), BCAST4)
    m = r.msg
    assert (m.op, m.htype, m.hlen, m.xid, m.flags) == (2, 1, 6, 0x1234abcd, 0x8000)
    assert m.chaddr == CLIENT_MAC + bytes(10)
    assert (m.yiaddr, m.ciaddr, m.siaddr, m.giaddr) == (ip("192.0.2.10"), ZERO4, ZERO4, ZERO4)
    o = m.options
    assert o[53] == bytes((DHCPOFFER,))
    assert o[54] == ip("192.0.2.1")
    assert o[51] == b"\xff\xff\xff\xff"
    assert o[1] == ip("255.255.255.0")
    assert o[3] == ip("192.0.2.1")
    assert o[6] == ip("192.0.2.53") + ip("192.0.2.54")
    assert o[26] == struct.pack("!H", 65520)
    assert decode_names(o[119]) == ["example.com", "corp.example.com"]
    assert o[119] == encode_domain_search(["example.com", "corp.example.com"])
    for absent in (12, 81, 52, 61):
        assert absent not in o
    assert r.length >= 300


def test_request_gets_ack(conf, guest):
    msg = bootp(DHCPREQUEST, opt(50, ip("192.0.2.10")) + opt(54, ip("192.0.2.1")))
    r = one_reply(dhcp.handle(frame(msg), conf, guest))
    assert r.type == DHCPACK and r.msg.yiaddr == ip("192.0.2.10")
    assert r.ip_dst == BCAST4 and r.eth_dst == CLIENT_MAC
    assert r.msg.options[51] == b"\xff" * 4 and r.msg.options[54] == ip("192.0.2.1")
    assert guest.mac == CLIENT_MAC and guest.addr4 == IPv4Address("192.0.2.10")


def test_init_reboot_request_without_server_id(conf, guest):
    msg = bootp(DHCPREQUEST, opt(50, ip("192.0.2.10")))
    assert one_reply(dhcp.handle(frame(msg), conf, guest)).type == DHCPACK


def test_renewing_request_acked_by_unicast(conf, guest):
    msg = bootp(DHCPREQUEST, ciaddr=ip("192.0.2.10"))
    r = one_reply(dhcp.handle(frame(msg, src_ip=ip("192.0.2.10"), dst_ip=ip("192.0.2.1")),
                              conf, guest))
    assert r.type == DHCPACK and r.ip_dst == ip("192.0.2.10")
    assert r.msg.ciaddr == ip("192.0.2.10") and r.msg.yiaddr == ip("192.0.2.10")


@pytest.mark.parametrize("options, ciaddr", [
    (opt(50, ip("192.0.2.77")), ZERO4),                 # another address asked for
    (opt(50, ip("10.0.0.5")) + opt(54, ip("192.0.2.1")), ZERO4),
    (b"", ip("192.0.2.99")),                            # renewing a lease we never gave
])
def test_request_for_another_address_gets_nak(conf, guest, options, ciaddr):
    msg = bootp(DHCPREQUEST, options + opt(61, b"\x01" + CLIENT_MAC), ciaddr=ciaddr)
    r = one_reply(dhcp.handle(frame(msg), conf, guest))
    assert r.type == DHCPNAK
    assert r.ip_dst == BCAST4 and r.ip_src == ip("192.0.2.1")
    assert (r.msg.yiaddr, r.msg.ciaddr) == (ZERO4, ZERO4)
    # RFC 2131 table 3: a NAK carries the server id, the client id, and nothing else
    assert set(r.msg.options) == {53, 54, 61}
    assert r.msg.options[61] == b"\x01" + CLIENT_MAC
    assert r.length >= 300


def test_request_for_another_server_ignored(conf, guest):
    msg = bootp(DHCPREQUEST, opt(50, ip("192.0.2.10")) + opt(54, ip("192.0.2.200")))
    assert dhcp.handle(frame(msg), conf, guest) == []


def test_request_without_any_address_acked(conf, guest):
    assert one_reply(dhcp.handle(frame(bootp(DHCPREQUEST)), conf, guest)).type == DHCPACK


def test_inform_gets_ack_without_address(conf, guest):
    msg = bootp(DHCPINFORM, ciaddr=ip("192.0.2.10"))
    r = one_reply(dhcp.handle(frame(msg, src_ip=ip("192.0.2.10")), conf, guest))
    assert r.type == DHCPACK
    assert r.ip_dst == ip("192.0.2.10") and r.eth_dst == CLIENT_MAC
    assert r.msg.yiaddr == ZERO4 and r.msg.ciaddr == ip("192.0.2.10")
    assert 51 not in r.msg.options                      # RFC 2131 4.3.5
    assert r.msg.options[3] == ip("192.0.2.1") and 6 in r.msg.options


def test_inform_without_ciaddr_broadcast(conf, guest):
    r = one_reply(dhcp.handle(frame(bootp(DHCPINFORM)), conf, guest))
    assert r.type == DHCPACK and r.ip_dst == BCAST4


@pytest.mark.parametrize("msg_type", [DHCPRELEASE, DHCPDECLINE, DHCPOFFER, DHCPACK, DHCPNAK,
                                      9, 200])
def test_other_messages_ignored(conf, guest, msg_type):
    msg = bootp(msg_type, opt(50, ip("192.0.2.10")), ciaddr=ip("192.0.2.10"))
    assert dhcp.handle(frame(msg), conf, guest) == []


def test_client_id_echoed(conf, guest):
    client_id = b"\xff\x00\x01\x02\x03" + bytes(range(20))
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER, opt(61, client_id))), conf, guest))
    assert r.msg.options[61] == client_id


# ---------------------------------------------------------------- captured clients


@pytest.mark.parametrize("discover, req", [
    (DHCLIENT_DISCOVER, DHCLIENT_REQUEST),
    (UDHCPC_DISCOVER, UDHCPC_REQUEST),
])
def test_real_clients(conf, guest, discover, req):
    offer = one_reply(dhcp.handle(discover, conf, guest))
    assert offer.type == DHCPOFFER and offer.msg.yiaddr == ip("192.0.2.10")
    xid = parse_dhcp(parse_udp(parse_ipv4(discover[14:])[1])[1]).xid
    assert offer.msg.xid == xid
    ack = one_reply(dhcp.handle(req, conf, guest))
    assert ack.type == DHCPACK and ack.msg.xid == xid
    assert ack.length <= 576 - 28


def test_udhcpc_max_message_size_and_client_id(conf, guest):
    req = parse_dhcp(parse_udp(parse_ipv4(UDHCPC_DISCOVER[14:])[1])[1])
    assert req.options[57] == struct.pack("!H", 576)
    offer = one_reply(dhcp.handle(UDHCPC_DISCOVER, conf, guest))
    assert offer.msg.options[61] == req.options[61]


def test_memoryview_input(conf, guest):
    assert one_reply(dhcp.handle(memoryview(bytearray(DHCLIENT_DISCOVER)), conf, guest))


# ---------------------------------------------------------------- options from the config


def test_no_gateway_no_router_option():
    conf = make_conf(gateway=None)
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert 3 not in r.msg.options
    assert r.msg.options[54] == conf.ip4.our_addr.packed
    assert r.ip_src == conf.ip4.our_addr.packed


@pytest.mark.parametrize("opts, kwargs", [
    ({"no_dhcp_dns": True}, {}),
    ({}, {"nameservers": ()}),
    ({"dns": ["none"]}, {}),
])
def test_no_dns_option(opts, kwargs):
    conf = make_conf(opts, **kwargs)
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert 6 not in r.msg.options


@pytest.mark.parametrize("opts, search", [({"no_dhcp_search": True}, ("a.example",)),
                                          ({}, ())])
def test_no_search_option(opts, search):
    conf = make_conf(opts, search=search)
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert 119 not in r.msg.options


def test_dns_forward_address_offered():
    conf = make_conf({"dns_forward": ["169.254.1.1"]})
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert r.msg.options[6] == ip("169.254.1.1")


def test_hostname_and_fqdn():
    conf = make_conf({"hostname": "guest", "fqdn": "guest.example.com."})
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert r.msg.options[12] == b"guest"
    fqdn = r.msg.options[81]
    # RFC 4702: flags (E: wire format, N: we update no DNS), two rcodes of 255, the name
    assert fqdn[:3] == bytes((0x0c, 255, 255))
    assert fqdn[3:] == b"\x05guest\x07example\x03com\x00"


def test_invalid_hostname_left_out():
    conf = make_conf({"hostname": "x" * 64, "fqdn": "a..b"})
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert 12 not in r.msg.options and 81 not in r.msg.options


@pytest.mark.parametrize("mtu, expected", [(1500, 1500), (65520, 65520), (70000, 65535)])
def test_mtu_option(conf, mtu, expected):
    conf = replace(conf, mtu=mtu)
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert r.msg.options[26] == struct.pack("!H", expected)


@pytest.mark.parametrize("prefix, mask", [(8, "255.0.0.0"), (23, "255.255.254.0"),
                                          (32, "255.255.255.255"), (0, "0.0.0.0")])
def test_subnet_mask(conf, prefix, mask):
    conf = replace(conf, ip4=replace(conf.ip4, prefix_len=prefix))
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert r.msg.options[1] == ip(mask)


# ---------------------------------------------------------------- sizes and overflow


def names_of(count: int) -> tuple[str, ...]:
    # distinct top-level labels, so compression saves little
    return tuple(f"host{i}-abcdefghijkl.zone{i}-mnopqrstuv" for i in range(count))


def test_long_search_list_split_and_overloaded():
    names = names_of(12)
    encoded = encode_domain_search(names)
    assert len(encoded) > 255 + 100
    conf = make_conf(search=names)
    msg = bootp(DHCPDISCOVER, opt(57, struct.pack("!H", 1500)))
    r = one_reply(dhcp.handle(frame(msg), conf, GuestState(conf)))
    assert decode_names(r.msg.options[119]) == list(names)
    assert r.length <= 1500 - 28


def test_search_list_truncated_to_576(conf):
    names = names_of(14)
    conf = make_conf(search=names)
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER)), conf, GuestState(conf)))
    assert r.length <= 576 - 28
    got = decode_names(r.msg.options[119])
    assert 0 < len(got) < len(names) and list(names[:len(got)]) == got
    # the option overflowed into the file and sname fields
    assert r.msg.options[52] == b"\x03"
    # everything else is still there
    for code in (53, 54, 51, 1, 3, 6, 26):
        assert code in r.msg.options


def test_search_list_instances_each_within_255(conf):
    conf = make_conf(search=names_of(12))
    msg = bootp(DHCPDISCOVER, opt(57, struct.pack("!H", 9000)))
    frames = dhcp.handle(frame(msg), conf, GuestState(conf))
    payload = bytes(parse_udp(parse_ipv4(frames[0][14:])[1])[1])
    instances = []
    i = 240
    while payload[i] != 255:
        if payload[i] == 0:
            i += 1
            continue
        if payload[i] == 119:
            instances.append(payload[i + 1])
        i += 2 + payload[i + 1]
    assert len(instances) >= 2 and max(instances) == 255
    assert 52 not in parse_dhcp(payload).options          # all in the options field


def test_many_dns_servers_split(conf):
    servers = tuple(IPv4Address(f"10.0.{i // 250}.{i % 250 + 1}") for i in range(70))
    conf = replace(conf, ip4=replace(conf.ip4, dns=servers))
    msg = bootp(DHCPDISCOVER, opt(57, struct.pack("!H", 1500)))
    r = one_reply(dhcp.handle(frame(msg), conf, GuestState(conf)))
    assert r.msg.options[6] == b"".join(a.packed for a in servers)


def test_client_max_size_below_576_ignored(conf):
    conf = make_conf(search=names_of(14))
    small = bootp(DHCPDISCOVER, opt(57, struct.pack("!H", 300)))
    default = bootp(DHCPDISCOVER)
    a = one_reply(dhcp.handle(frame(small), conf, GuestState(conf)))
    b = one_reply(dhcp.handle(frame(default), conf, GuestState(conf)))
    assert a.length == b.length <= 548


def test_client_max_size_capped_by_our_mtu(conf):
    conf = replace(make_conf(search=names_of(40)), mtu=1000)
    msg = bootp(DHCPDISCOVER, opt(57, struct.pack("!H", 9000)))
    r = one_reply(dhcp.handle(frame(msg), conf, GuestState(conf)))
    assert 576 - 28 < r.length <= 1000 - 28


@settings(max_examples=60, deadline=None)
@given(st.lists(st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,12}){0,3}", fullmatch=True),
                max_size=40),
       st.integers(0, 4000), st.booleans(), st.booleans())
def test_replies_always_fit(search, max_size, hostname, client_id):
    conf = make_conf({"hostname": "h" * 60, "fqdn": "f" * 60 + ".example"} if hostname
                     else {}, search=search)
    options = opt(57, struct.pack("!H", max_size)) + (opt(61, bytes(200)) if client_id else b"")
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER, options)), conf, GuestState(conf)))
    assert 300 <= r.length <= max(576, min(max_size, conf.mtu)) - 28
    for code in (53, 54, 51, 1, 3, 26):
        assert code in r.msg.options
    got = decode_names(r.msg.options.get(119, b""))
    assert got == search[:len(got)]           # whole names, from the front


# ---------------------------------------------------------------- RFC 3397 encoding


def test_rfc3397_example():
    # RFC 3397 section 4: "eng.apple.com." and "marketing.apple.com."
    assert encode_domain_search(["eng.apple.com", "marketing.apple.com"]) == (
        b"\x03eng\x05apple\x03com\x00\x09marketing\xc0\x04")


def test_search_compression_whole_names_and_case():
    data = encode_domain_search(["Example.COM", "example.com", "a.example.com", "com"])
    assert data == (b"\x07Example\x03COM\x00" b"\xc0\x00" b"\x01a\xc0\x00" b"\xc0\x08")
    assert decode_names(data) == ["Example.COM", "Example.COM", "a.Example.COM", "COM"]


def test_search_invalid_names_skipped():
    assert decode_names(encode_domain_search(["ok.example", "bad..name", "x" * 64 + ".com",
                                              "", "."])) == ["ok.example"]


@given(st.lists(st.from_regex(r"[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63}){0,3}",
                              fullmatch=True).filter(lambda n: len(n) < 250), max_size=30))
def test_search_encoding_round_trip(names):
    data = encode_domain_search(names)
    decoded = decode_names(data)
    assert [d.lower() for d in decoded] == [n.lower() for n in names]
    # compression never makes it longer than the plain encoding
    assert len(data) <= sum(len(n) + 2 for n in names)


# ---------------------------------------------------------------- what is dropped


@pytest.mark.parametrize("msg", [
    pytest.param(bootp(DHCPDISCOVER, cookie=b"\x63\x82\x53\x64"), id="bad-cookie"),
    pytest.param(bootp(None), id="bootp-no-message-type"),
    pytest.param(bootp(None, opt(53, b"")), id="empty-message-type"),
    pytest.param(bootp(DHCPDISCOVER)[:239], id="truncated-cookie"),
    pytest.param(bootp(DHCPDISCOVER)[:236], id="no-cookie"),
    pytest.param(bootp(DHCPDISCOVER)[:100], id="truncated-header"),
    pytest.param(bootp(DHCPDISCOVER, b"\x0c\x20abc")[:-1], id="option-past-end"),
    pytest.param(bootp(DHCPDISCOVER, op=2), id="bootreply"),
    pytest.param(bootp(DHCPDISCOVER, htype=6), id="not-ethernet"),
    pytest.param(bootp(DHCPDISCOVER, hlen=16), id="hlen-16"),
    pytest.param(bootp(DHCPDISCOVER, chaddr=b"\x01\x00\x5e\x00\x00\x01"), id="mcast-chaddr"),
    pytest.param(bootp(DHCPDISCOVER, chaddr=bytes(6)), id="zero-chaddr"),
    pytest.param(bootp(DHCPREQUEST, opt(50, b"\xc0\x00\x02")), id="short-requested-ip"),
    pytest.param(b"", id="empty"),
])
def test_malformed_dropped(conf, guest, msg):
    assert dhcp.handle(frame(msg), conf, guest) == []


def test_wrong_port_and_protocol_dropped(conf, guest):
    assert dhcp.handle(frame(bootp(DHCPDISCOVER), dport=68), conf, guest) == []
    tcp_like = bytearray(frame(bootp(DHCPDISCOVER)))
    tcp_like[23] = 6
    assert dhcp.handle(bytes(tcp_like), conf, guest) == []
    fragment = bytearray(frame(bootp(DHCPDISCOVER)))
    fragment[20] |= 0x20                                           # more fragments
    assert dhcp.handle(bytes(fragment), conf, guest) == []
    assert dhcp.handle(frame(bootp(DHCPDISCOVER))[:40], conf, guest) == []


def test_no_ipv4_config(conf, guest):
    assert dhcp.handle(frame(bootp(DHCPDISCOVER)), replace(conf, ip4=None),
                       guest) == []


def test_overloaded_request_options_read(conf, guest):
    # a client that put its requested address in the file field
    msg = bytearray(bootp(DHCPREQUEST, opt(52, b"\x01")))
    msg[108:108 + 7] = opt(50, ip("192.0.2.77")) + b"\xff"
    r = one_reply(dhcp.handle(frame(bytes(msg)), conf, guest))
    assert r.type == DHCPNAK


@pytest.mark.parametrize("value", [b"", b"\x00", b"\x03", b"\x02\x01"])
def test_odd_overload_values_tolerated(conf, guest, value):
    r = one_reply(dhcp.handle(frame(bootp(DHCPDISCOVER, opt(52, value))), conf, guest))
    assert r.type == DHCPOFFER


def test_overload_with_garbage_in_sname_dropped(conf, guest):
    msg = bytearray(bootp(DHCPDISCOVER, opt(52, b"\x02")))
    msg[44:48] = b"\x0c\x7fab"                                 # option 12 runs past sname
    assert dhcp.handle(frame(bytes(msg)), conf, guest) == []


def test_repeated_options_concatenated():
    msg = bootp(DHCPDISCOVER, opt(61, b"ab") + opt(61, b"cd"))
    assert parse_dhcp(msg).options[61] == b"abcd"


def test_parse_dhcp_errors():
    with pytest.raises(MalformedPacket):
        parse_dhcp(bootp(DHCPDISCOVER, cookie=bytes(4)))
    with pytest.raises(MalformedPacket):
        parse_dhcp(bootp(DHCPDISCOVER, b"\x0c")[:-1])


options = st.lists(st.tuples(st.sampled_from([1, 12, 50, 52, 53, 54, 55, 57, 61, 81, 119, 200]),
                             st.binary(max_size=12)), max_size=8)


@settings(max_examples=300)
@given(st.sampled_from(range(10)), options, st.integers(0, 0xffff), st.binary(max_size=8))
def test_structured_garbage_never_raises(msg_type, opts, flags, ciaddr):
    conf = make_conf()
    guest = GuestState(conf)
    msg = bootp(msg_type, b"".join(opt(c, d) for c, d in opts), flags=flags,
                ciaddr=(ciaddr + ZERO4)[:4])
    for reply in dhcp.handle(frame(msg), conf, guest):
        assert one_reply([reply]).msg.xid == 0x1234abcd


@settings(max_examples=300)
@given(st.binary(max_size=400), st.sampled_from([0, 236, 240]))
def test_never_raises(data, keep):
    conf = make_conf()
    guest = GuestState(conf)
    base = bootp(DHCPDISCOVER)[:keep]
    for f in (frame(base + data), frame(data), data):
        for reply in dhcp.handle(f, conf, guest):
            one_reply([reply])
