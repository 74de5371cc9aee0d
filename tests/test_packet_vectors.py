"""Frames the Linux kernel sent over a veth pair (checksum offload off), captured with
an AF_PACKET socket: our parsers read them, and our builders reproduce them byte for byte.
"""

from __future__ import annotations

from common.packet.arp import ARPOP_REQUEST, Arp, build_arp, parse_arp
from common.packet.checksum import checksum, l4_checksum4, l4_checksum6
from common.packet.ethernet import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    build_ethernet,
    parse_ethernet,
)
from common.packet.frames import build_ipv4_frame, build_ipv6_frame, udp4_frame, udp6_frame
from common.packet.icmp import (
    ICMP_ECHO,
    ICMPV6_ECHO_REQUEST,
    ND_NEIGHBOR_SOLICIT,
    ND_ROUTER_SOLICIT,
    build_icmp4,
    build_icmp6,
    parse_icmp,
)
from common.packet.ipv4 import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, build_ipv4, parse_ipv4
from common.packet.ipv6 import IPPROTO_ICMPV6, build_ipv6, parse_ipv6
from common.packet.tcp import SYN, TcpOptions, build_tcp4, parse_tcp
from common.packet.udp import build_udp6, parse_udp

MAC_A = bytes.fromhex("02000000000a")
MAC_B = bytes.fromhex("02000000000b")
IP_A = bytes((10, 9, 0, 1))
IP_B = bytes((10, 9, 0, 2))
IP6_A = bytes.fromhex("fd00" + "00" * 13 + "01")
IP6_B = bytes.fromhex("fd00" + "00" * 13 + "02")
LL_A = bytes.fromhex("fe80000000000000000000fffe00000a")

ARP_REQUEST = bytes.fromhex(
    "ffffffffffff02000000000a0806000108000604000102000000000a0a0900010000000000000a090002"
)

ICMP4_ECHO = bytes.fromhex(
    "02000000000b02000000000a0800450000302cb340004001fa050a0900010a090002080068652c5200015753"
    "076b0000000073060f000000000041414141"
)

UDP4 = bytes.fromhex(
    "02000000000b02000000000a080045000027d72d400040114f840a0900010a0900020fa0138800132cc46865"
    "6c6c6f207061737374"
)

NDP_NS = bytes.fromhex(
    "3333ff00000202000000000a86dd6000000000203afffd000000000000000000000000000001ff0200000000"
    "000000000001ff00000287007d8e00000000fd000000000000000000000000000002010102000000000a"
)

UDP6 = bytes.fromhex(
    "02000000000b02000000000a86dd60083e1a00131140fd000000000000000000000000000001fd0000000000"
    "000000000000000000020fa1138900139e0068656c6c6f206970763621"
)

TCP4_SYN = bytes.fromhex(
    "02000000000b02000000000a08004500003c19b2400040060cf60a0900010a090002b4b80009708cef6d0000"
    "0000a002faf059d10000020405b40402080acd8cfcdd000000000103030a"
)

ICMP6_ECHO = bytes.fromhex(
    "02000000000b02000000000a86dd600db95e00103a40fd000000000000000000000000000001fd0000000000"
    "0000000000000000000280004d232c7c00010001020304050607"
)

MLD2_REPORT = bytes.fromhex(
    "33330000001602000000000a86dd6000000000380001fe80000000000000000000fffe00000aff0200000000"
    "000000000000000000163a000502000001008f006fda0000000204000000ff0200000000000000000001ff00"
    "000a04000000ff0200000000000000000001ff000001"
)

NDP_RS = bytes.fromhex(
    "33330000000202000000000a86dd6000000000103afffe80000000000000000000fffe00000aff0200000000"
    "0000000000000000000285007b1a00000000010102000000000a"
)


def test_arp_request():
    eth, payload = parse_ethernet(ARP_REQUEST)
    assert (eth.dst, eth.src, eth.ethertype) == (b"\xff" * 6, MAC_A, ETH_P_ARP)
    arp = parse_arp(payload)
    assert arp == Arp(ARPOP_REQUEST, MAC_A, IP_A, b"\0" * 6, IP_B)
    assert build_ethernet(b"\xff" * 6, MAC_A, ETH_P_ARP, build_arp(arp)) == ARP_REQUEST


def test_icmp4_echo():
    eth, payload = parse_ethernet(ICMP4_ECHO)
    ip, l4 = parse_ipv4(payload, verify_checksum=True)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.ident, ip.df, ip.total_length) == (
        IP_A, IP_B, IPPROTO_ICMP, 64, 0x2cb3, True, 48)
    assert checksum(l4) == 0
    icmp, body = parse_icmp(l4)
    assert (icmp.type, icmp.code, icmp.rest) == (ICMP_ECHO, 0, bytes.fromhex("2c520001"))
    assert bytes(body).endswith(b"AAAA")
    rebuilt = build_icmp4(ICMP_ECHO, 0, icmp.rest, body)
    assert rebuilt == l4
    assert build_ipv4(IP_A, IP_B, IPPROTO_ICMP, rebuilt, ident=0x2cb3) == payload
    assert build_ethernet(MAC_B, MAC_A, ETH_P_IP, build_ipv4(
        IP_A, IP_B, IPPROTO_ICMP, rebuilt, ident=0x2cb3)) == ICMP4_ECHO


def test_udp4():
    _, payload = parse_ethernet(UDP4)
    ip, l4 = parse_ipv4(payload, verify_checksum=True)
    assert l4_checksum4(ip.src, ip.dst, IPPROTO_UDP, l4) == 0
    udp, data = parse_udp(l4)
    assert (udp.sport, udp.dport, udp.length, udp.checksum) == (4000, 5000, 19, 0x2cc4)
    assert data == b"hello passt"
    # udp4_frame always sends ident 0: patch the kernel's ident and header checksum
    ours = udp4_frame(MAC_B, MAC_A, IP_A, IP_B, 4000, 5000, b"hello passt")
    assert ours[34:] == UDP4[34:]
    assert parse_ipv4(ours[14:], verify_checksum=True)[0].ident == 0


def test_tcp4_syn():
    _, payload = parse_ethernet(TCP4_SYN)
    ip, l4 = parse_ipv4(payload, verify_checksum=True)
    assert ip.proto == IPPROTO_TCP
    assert l4_checksum4(ip.src, ip.dst, IPPROTO_TCP, l4) == 0
    tcp, data = parse_tcp(l4)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.window, tcp.header_len) == (
        46264, 9, 0x708cef6d, 0, SYN, 64240, 40)
    assert tcp.options == TcpOptions(mss=1460, wscale=10, sack_permitted=True,
                                     timestamps=(0xcd8cfcdd, 0))
    assert data == b""
    # Linux's option layout is the one encode_tcp_options produces
    rebuilt = build_tcp4(IP_A, IP_B, 46264, 9, 0x708cef6d, 0, SYN, 64240, b"", tcp.options)
    assert rebuilt == l4
    frame = build_ipv4_frame(MAC_B, MAC_A, IP_A, IP_B, IPPROTO_TCP, rebuilt)
    assert frame[34:] == TCP4_SYN[34:] and frame[:14] == TCP4_SYN[:14]


def test_udp6_with_flow_label():
    _, payload = parse_ethernet(UDP6)
    ip, l4 = parse_ipv6(payload)
    assert (ip.src, ip.dst, ip.next_header, ip.hop_limit, ip.flow_label, ip.fragment) == (
        IP6_A, IP6_B, IPPROTO_UDP, 64, 0x83e1a, False)
    assert l4_checksum6(ip.src, ip.dst, IPPROTO_UDP, l4) == 0
    udp, data = parse_udp(l4)
    assert data == b"hello ipv6!"
    rebuilt = build_udp6(IP6_A, IP6_B, 4001, 5001, data)
    assert rebuilt == l4
    assert build_ipv6(IP6_A, IP6_B, IPPROTO_UDP, rebuilt, hop_limit=64,
                      flow_label=0x83e1a) == payload
    ours = udp6_frame(MAC_B, MAC_A, IP6_A, IP6_B, 4001, 5001, data, hop_limit=64)
    assert ours[:15] == UDP6[:15] and ours[18:] == UDP6[18:]      # all but the flow label


def test_icmp6_echo():
    _, payload = parse_ethernet(ICMP6_ECHO)
    ip, l4 = parse_ipv6(payload)
    assert ip.next_header == IPPROTO_ICMPV6
    icmp, body = parse_icmp(l4)
    assert icmp.type == ICMPV6_ECHO_REQUEST
    assert build_icmp6(IP6_A, IP6_B, ICMPV6_ECHO_REQUEST, 0, icmp.rest, body) == l4


def test_ndp_neighbor_solicitation():
    eth, payload = parse_ethernet(NDP_NS)
    assert eth.dst == bytes.fromhex("3333ff000002") and eth.ethertype == ETH_P_IPV6
    ip, l4 = parse_ipv6(payload)
    assert ip.hop_limit == 255 and ip.dst == bytes.fromhex("ff02" + "00" * 9 + "01ff000002")
    icmp, body = parse_icmp(l4)
    assert icmp.type == ND_NEIGHBOR_SOLICIT and bytes(body[:16]) == IP6_B
    assert bytes(body[16:]) == bytes.fromhex("0101") + MAC_A      # source link-layer option
    rebuilt = build_icmp6(ip.src, ip.dst, icmp.type, 0, icmp.rest, body)
    assert rebuilt == l4
    assert build_ipv6_frame(eth.dst, MAC_A, ip.src, ip.dst, IPPROTO_ICMPV6, rebuilt) == NDP_NS


def test_ndp_router_solicitation_from_link_local():
    _, payload = parse_ethernet(NDP_RS)
    ip, l4 = parse_ipv6(payload)
    assert ip.src == LL_A
    icmp, _ = parse_icmp(l4)
    assert icmp.type == ND_ROUTER_SOLICIT
    assert l4_checksum6(ip.src, ip.dst, IPPROTO_ICMPV6, l4) == 0


def test_mld_report_behind_hop_by_hop_header():
    _, payload = parse_ethernet(MLD2_REPORT)
    assert payload[6] == 0                       # next header: hop-by-hop options
    ip, l4 = parse_ipv6(payload)
    assert ip.next_header == IPPROTO_ICMPV6 and ip.payload_length == 56
    assert len(l4) == 48                         # 8 bytes of hop-by-hop skipped
    icmp, _ = parse_icmp(l4)
    assert icmp.type == 143                      # MLDv2 report
    assert l4_checksum6(ip.src, ip.dst, IPPROTO_ICMPV6, l4) == 0
