"""Build -> parse round trips and malformed-input handling for every codec."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.packet.arp import Arp, build_arp, parse_arp
from common.packet.checksum import checksum, l4_checksum4, l4_checksum6, reference_checksum
from common.packet.errors import MalformedPacket
from common.packet.ethernet import (
    ETH_HLEN,
    ETH_P_IP,
    build_ethernet,
    pack_ethernet_into,
    parse_ethernet,
)
from common.packet.frames import build_ipv4_frame, build_ipv6_frame, udp4_frame, udp6_frame
from common.packet.icmp import (
    ICMP4_ERROR_QUOTE_MAX,
    ICMP6_ERROR_QUOTE_MAX,
    ICMP_DEST_UNREACH,
    ICMP_FRAG_NEEDED,
    ICMPV6_PKT_TOOBIG,
    build_icmp4,
    build_icmp4_error,
    build_icmp6,
    build_icmp6_error,
    parse_icmp,
)
from common.packet.ipv4 import IPPROTO_TCP, IPPROTO_UDP, build_ipv4, pack_ipv4_into, parse_ipv4
from common.packet.ipv6 import (
    IPPROTO_DSTOPTS,
    IPPROTO_FRAGMENT,
    IPPROTO_HOPOPTS,
    IPPROTO_ICMPV6,
    IPPROTO_ROUTING,
    build_ipv6,
    parse_ipv6,
)
from common.packet.tcp import (
    ACK,
    FIN,
    PSH,
    SYN,
    TcpOptions,
    build_tcp4,
    build_tcp6,
    encode_tcp_options,
    parse_tcp,
    parse_tcp_options,
    syn_options,
)
from common.packet.udp import build_udp4, build_udp6, parse_udp

mac = st.binary(min_size=6, max_size=6)
ip4 = st.binary(min_size=4, max_size=4)
ip6 = st.binary(min_size=16, max_size=16)
u8, u16, u32 = st.integers(0, 0xff), st.integers(0, 0xffff), st.integers(0, 0xffffffff)
payload = st.binary(max_size=300)

PARSERS = [parse_ethernet, parse_arp, parse_ipv4, parse_ipv6, parse_udp, parse_tcp,
           parse_icmp, parse_tcp_options]


@given(st.binary(max_size=120))
def test_parsers_raise_only_malformed_packet(data):
    for parse in PARSERS:
        try:
            parse(data)
        except MalformedPacket:
            pass


@pytest.mark.parametrize("parse, minimum", [
    (parse_ethernet, 14), (parse_arp, 28), (parse_ipv4, 20), (parse_ipv6, 40),
    (parse_udp, 8), (parse_tcp, 20), (parse_icmp, 8)])
def test_short_input_is_malformed(parse, minimum):
    with pytest.raises(MalformedPacket):
        parse(b"")
    with pytest.raises(MalformedPacket):
        parse(bytes(minimum - 1))


def test_malformed_packet_is_a_value_error():
    assert issubclass(MalformedPacket, ValueError)


# ------------------------------------------------------------------ Ethernet, ARP


@given(mac, mac, u16, payload)
def test_ethernet_round_trip(dst, src, ethertype, data):
    frame = build_ethernet(dst, src, ethertype, data)
    eth, rest = parse_ethernet(frame)
    assert (eth.dst, eth.src, eth.ethertype, bytes(rest)) == (dst, src, ethertype, data)
    buf = bytearray(ETH_HLEN + 2)
    pack_ethernet_into(buf, 2, dst, src, ethertype)
    assert buf[2:] == frame[:ETH_HLEN]


def test_ethernet_payload_is_a_view():
    frame = bytearray(build_ethernet(b"\1" * 6, b"\2" * 6, ETH_P_IP, b"xyz"))
    _, rest = parse_ethernet(frame)
    assert isinstance(rest, memoryview)
    frame[14] = ord("X")
    assert rest == b"Xyz"
    rest.release()


def test_ethernet_rejects_bad_mac_length():
    with pytest.raises(ValueError):
        build_ethernet(b"\1" * 5, b"\2" * 6, ETH_P_IP, b"")


@given(u16, mac, ip4, mac, ip4)
def test_arp_round_trip(op, sha, spa, tha, tpa):
    arp = Arp(op, sha, spa, tha, tpa)
    data = build_arp(arp)
    assert len(data) == 28
    assert parse_arp(data + b"\0" * 18) == arp           # Ethernet padding ignored


@pytest.mark.parametrize("offset, value", [(0, 6), (2, 0x86), (4, 8), (5, 16)])
def test_arp_other_hardware_or_protocol_is_malformed(offset, value):
    data = bytearray(build_arp(Arp(1, b"\1" * 6, b"\2" * 4, b"\0" * 6, b"\3" * 4)))
    data[offset] = value
    with pytest.raises(MalformedPacket):
        parse_arp(data)


# ------------------------------------------------------------------ IPv4


@given(ip4, ip4, u8, payload, u8, u16, u8, st.booleans())
def test_ipv4_round_trip(src, dst, proto, data, ttl, ident, tos, df):
    packet = build_ipv4(src, dst, proto, data, ttl=ttl, ident=ident, tos=tos, df=df)
    assert reference_checksum(packet[:20]) == 0
    ip, rest = parse_ipv4(packet + b"\0" * 6, verify_checksum=True)   # padding trimmed
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.ident, ip.tos, ip.df, ip.mf) == (
        src, dst, proto, ttl, ident, tos, df, False)
    assert (ip.frag_offset, ip.header_len, ip.total_length) == (0, 20, 20 + len(data))
    assert bytes(rest) == data
    buf = bytearray(3 + 20)
    pack_ipv4_into(buf, 3, src, dst, proto, len(data), ttl=ttl, ident=ident, tos=tos, df=df)
    assert buf[3:] == packet[:20]


def _ipv4_header(**changes) -> bytearray:
    header = bytearray(build_ipv4(b"\1\2\3\4", b"\5\6\7\x08", IPPROTO_UDP, b"12345678"))
    for offset, value in changes.items():
        header[int(offset[1:])] = value
    return header


def test_ipv4_options_and_fragment_fields():
    options = b"\x01\x01\x01\x00"                          # NOP NOP NOP EOL
    header = bytearray(b"\x46\x00" + struct.pack("!H", 32) + b"\x12\x34\x20\x03"
                       + b"\x40\x06\0\0" + bytes(4) + bytes(4) + options + b"body" * 2)
    struct.pack_into("!H", header, 10, checksum(header[:24]))
    ip, rest = parse_ipv4(header, verify_checksum=True)
    assert (ip.header_len, ip.mf, ip.df, ip.frag_offset, ip.proto) == (24, True, False, 24, 6)
    assert rest == b"body" * 2


@pytest.mark.parametrize("changes", [
    {"b0": 0x65},                  # version 6
    {"b0": 0x44},                  # IHL 4
    {"b0": 0x4f},                  # IHL 15: header longer than the packet
    {"b2": 0, "b3": 19},           # total length shorter than the header
    {"b2": 0, "b3": 29},           # total length longer than what arrived
])
def test_ipv4_invalid_headers(changes):
    with pytest.raises(MalformedPacket):
        parse_ipv4(_ipv4_header(**changes))


def test_ipv4_checksum_verified_only_on_request():
    header = _ipv4_header(b10=0, b11=0)
    parse_ipv4(header)
    with pytest.raises(MalformedPacket):
        parse_ipv4(header, verify_checksum=True)


def test_ipv4_payload_too_long():
    with pytest.raises(ValueError):
        build_ipv4(bytes(4), bytes(4), IPPROTO_UDP, bytes(65516))
    assert len(build_ipv4(bytes(4), bytes(4), IPPROTO_UDP, bytes(65515))) == 65535


# ------------------------------------------------------------------ IPv6


@given(ip6, ip6, u8.filter(lambda n: n not in (0, 43, 44, 60)), payload, u8,
       st.integers(0, 0xfffff), u8)
def test_ipv6_round_trip(src, dst, nh, data, hlim, flow, tclass):
    packet = build_ipv6(src, dst, nh, data, hop_limit=hlim, flow_label=flow,
                        traffic_class=tclass)
    ip, rest = parse_ipv6(packet + b"pad")
    assert (ip.src, ip.dst, ip.next_header, ip.hop_limit, ip.payload_length) == (
        src, dst, nh, hlim, len(data))
    assert (ip.flow_label, ip.traffic_class, ip.fragment) == (flow, tclass, False)
    assert bytes(rest) == data


def _ext(nh: int, length8: int) -> bytes:
    """A generic extension header: `length8` units of 8 bytes, PadN-filled."""
    return bytes((nh, length8 - 1, 1, length8 * 8 - 4)) + bytes(length8 * 8 - 4)


@given(st.lists(st.sampled_from([IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS,
                                 IPPROTO_FRAGMENT]), max_size=5),
       st.lists(st.integers(1, 4), min_size=5, max_size=5), payload)
def test_ipv6_extension_headers_skipped(chain, sizes, data):
    body = data
    nh = IPPROTO_UDP
    frag_seen = False
    for kind, size in zip(reversed(chain), sizes, strict=False):
        if kind == IPPROTO_FRAGMENT:
            body = bytes((nh, 0)) + struct.pack("!HI", 0x0009, 42) + body   # offset 8, M
            frag_seen = True
        else:
            body = _ext(nh, size) + body
        nh = kind
    ip, rest = parse_ipv6(build_ipv6(bytes(16), bytes(16), nh, body))
    assert ip.next_header == IPPROTO_UDP and bytes(rest) == data
    assert ip.fragment == frag_seen
    if frag_seen:
        assert (ip.frag_offset, ip.frag_more) == (8, True)


@pytest.mark.parametrize("body", [
    _ext(IPPROTO_UDP, 2)[:12],                  # extension header runs past the payload
    b"\x11\x00\x00",                            # shorter than 8 bytes
])
def test_ipv6_truncated_extension_header(body):
    with pytest.raises(MalformedPacket):
        parse_ipv6(build_ipv6(bytes(16), bytes(16), IPPROTO_DSTOPTS, body))


def test_ipv6_invalid_headers():
    packet = bytearray(build_ipv6(bytes(16), bytes(16), IPPROTO_UDP, b"abcd"))
    with pytest.raises(MalformedPacket):
        parse_ipv6(packet[:-1])                 # payload length past the end
    packet[0] = 0x45
    with pytest.raises(MalformedPacket):
        parse_ipv6(packet)
    with pytest.raises(ValueError):
        build_ipv6(bytes(16), bytes(4), IPPROTO_UDP, b"")


# ------------------------------------------------------------------ UDP


@given(ip4, ip4, u16, u16, payload)
def test_udp4_round_trip(src, dst, sport, dport, data):
    segment = build_udp4(src, dst, sport, dport, data)
    assert l4_checksum4(src, dst, IPPROTO_UDP, segment) == 0
    udp, rest = parse_udp(segment + b"trailer")
    assert (udp.sport, udp.dport, udp.length, bytes(rest)) == (sport, dport, 8 + len(data), data)
    assert udp.checksum != 0


@given(ip6, ip6, u16, u16, payload)
def test_udp6_round_trip(src, dst, sport, dport, data):
    segment = build_udp6(src, dst, sport, dport, data)
    assert l4_checksum6(src, dst, IPPROTO_UDP, segment) == 0
    udp, rest = parse_udp(segment)
    assert (udp.sport, udp.dport, bytes(rest)) == (sport, dport, data)
    assert udp.checksum != 0


def test_udp_zero_checksum_sent_as_ffff():
    # choose the payload so that the computed checksum is 0
    src, dst = bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2))
    probe = build_udp4(src, dst, 1, 2, b"\0\0")
    want = struct.unpack("!H", probe[6:8])[0]           # checksum with a zero word
    segment = build_udp4(src, dst, 1, 2, struct.pack("!H", want))
    assert segment[6:8] == b"\xff\xff"
    assert l4_checksum4(src, dst, IPPROTO_UDP, segment) == 0


@pytest.mark.parametrize("length", [0, 7, 13])
def test_udp_bad_length(length):
    with pytest.raises(MalformedPacket):
        parse_udp(struct.pack("!HHHH", 1, 2, length, 0) + b"abcd")


# ------------------------------------------------------------------ TCP


tcp_options = st.builds(
    TcpOptions,
    mss=st.none() | u16,
    wscale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamps=st.none() | st.tuples(u32, u32),
    sack=st.lists(st.tuples(u32, u32), max_size=3).map(tuple),
)


@given(tcp_options)
def test_tcp_options_round_trip(opts):
    size = (4 * (opts.mss is not None) + 4 * (opts.wscale is not None)
            + (12 if opts.timestamps else 4 if opts.sack_permitted else 0)
            + (4 + 8 * len(opts.sack) if opts.sack else 0))
    if size > 40:
        with pytest.raises(ValueError):
            encode_tcp_options(opts)
        return
    data = encode_tcp_options(opts)
    assert len(data) == size
    assert parse_tcp_options(data) == opts


@given(ip4, ip4, u16, u16, u32, u32, u8, u16, payload, tcp_options, u16)
def test_tcp4_round_trip(src, dst, sport, dport, seq, ack, flags, window, data, opts, urg):
    try:
        segment = build_tcp4(src, dst, sport, dport, seq, ack, flags, window, data, opts, urg)
    except ValueError:
        return
    assert l4_checksum4(src, dst, IPPROTO_TCP, segment) == 0
    tcp, rest = parse_tcp(segment)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.flags, tcp.window, tcp.urgent) == (
        sport, dport, seq, ack, flags, window, urg)
    assert tcp.options == opts and bytes(rest) == data
    assert tcp.header_len == 20 + len(encode_tcp_options(opts))


@given(ip6, ip6, u16, u16, u32, u32, payload)
def test_tcp6_round_trip(src, dst, sport, dport, seq, ack, data):
    segment = build_tcp6(src, dst, sport, dport, seq, ack, ACK | PSH, 512, data)
    assert l4_checksum6(src, dst, IPPROTO_TCP, segment) == 0
    tcp, rest = parse_tcp(segment)
    assert tcp.header_len == 20 and tcp.options == TcpOptions() and bytes(rest) == data


def test_tcp_raw_option_bytes_accepted():
    segment = build_tcp4(bytes(4), bytes(4), 1, 2, 3, 4, SYN | FIN, 5,
                         options=b"\x02\x04\x05\xb4")
    assert parse_tcp(segment)[0].options.mss == 1460


def test_tcp_options_linux_syn_layout():
    opts = TcpOptions(mss=65480, wscale=7, sack_permitted=True, timestamps=(1, 0))
    assert encode_tcp_options(opts).hex() == (
        "0204ffc8" "0402080a" "00000001" "00000000" "01030307")
    assert encode_tcp_options(TcpOptions(sack_permitted=True)).hex() == "01010402"
    assert encode_tcp_options(TcpOptions(sack=((1, 2),))).hex() == (
        "0101050a" "00000001" "00000002")


def test_tcp_options_too_long():
    with pytest.raises(ValueError):
        encode_tcp_options(TcpOptions(mss=1, timestamps=(1, 2), sack=((1, 2),) * 3))


@pytest.mark.parametrize("data, expected", [
    (b"", TcpOptions()),
    (b"\x00\x02\x04\x05\xb4", TcpOptions()),                 # nothing after EOL
    (b"\x01\x01\xfe\x04\xaa\xbb\x03\x03\x09", TcpOptions(wscale=9)),   # unknown kind skipped
    (b"\x22\x02\x04\x02", TcpOptions(sack_permitted=True)),
])
def test_tcp_options_parse(data, expected):
    assert parse_tcp_options(data) == expected


@given(st.binary(max_size=40), st.integers(0, 19), u8)
def test_syn_options_agree_with_the_parser(data, at, byte):
    """The SYN shortcut finds what the parser finds, Linux's layout or not (and a
    Linux layout with any one byte changed)."""
    linux = bytearray(bytes.fromhex("0204ffc8" "0402080a" "00000001" "00000000" "01030307"))
    linux[at] = byte
    for case in (data, bytes(linux)):
        try:
            opts = parse_tcp_options(case)
        except MalformedPacket:
            with pytest.raises(MalformedPacket):
                syn_options(case)
            continue
        assert syn_options(case) == (opts.mss, opts.wscale)
        assert syn_options(memoryview(case)) == (opts.mss, opts.wscale)


@pytest.mark.parametrize("data", [
    b"\x02",                        # no length byte
    b"\x02\x01\x00\x00",            # length below 2
    b"\x02\x05\x05\xb4",            # runs past the end
    b"\x02\x03\x05",                # MSS with the wrong length
    b"\x03\x04\x07\x00",            # window scale with the wrong length
    b"\x08\x06\x00\x00\x00\x00",    # timestamps with the wrong length
    b"\x05\x02",                    # SACK with no block
    b"\x05\x06\x00\x00\x00\x00",    # SACK with a partial block
    b"\x04\x03\x00",                # SACK-permitted with the wrong length
])
def test_tcp_options_malformed(data):
    with pytest.raises(MalformedPacket):
        parse_tcp_options(data)


@pytest.mark.parametrize("offset_byte", [0x40, 0xf0])
def test_tcp_bad_data_offset(offset_byte):
    segment = bytearray(build_tcp4(bytes(4), bytes(4), 1, 2, 3, 4, ACK, 5, b"x" * 10))
    segment[12] = offset_byte
    with pytest.raises(MalformedPacket):
        parse_tcp(segment)


# ------------------------------------------------------------------ ICMP


@given(u8, u8, st.binary(min_size=4, max_size=4), payload)
def test_icmp4_round_trip(typ, code, rest, body):
    message = build_icmp4(typ, code, rest, body)
    assert reference_checksum(message) == 0
    icmp, data = parse_icmp(message)
    assert (icmp.type, icmp.code, icmp.rest, bytes(data)) == (typ, code, rest, body)


@given(ip6, ip6, u8, u8, st.binary(min_size=4, max_size=4), payload)
def test_icmp6_round_trip(src, dst, typ, code, rest, body):
    message = build_icmp6(src, dst, typ, code, rest, body)
    assert l4_checksum6(src, dst, IPPROTO_ICMPV6, message) == 0
    icmp, data = parse_icmp(message)
    assert (icmp.type, icmp.code, icmp.rest, bytes(data)) == (typ, code, rest, body)


def test_icmp_rest_must_be_four_bytes():
    with pytest.raises(ValueError):
        build_icmp4(8, 0, b"\0" * 3, b"")


@pytest.mark.parametrize("size", [28, 548, 549, 2000])
def test_icmp4_error_quotes_up_to_576_total(size):
    original = build_ipv4(bytes(4), bytes(4), IPPROTO_UDP, bytes(size - 20))
    message = build_icmp4_error(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, original,
                                struct.pack("!HH", 0, 1400))
    assert 20 + len(message) <= 576
    assert len(message) == 8 + min(size, ICMP4_ERROR_QUOTE_MAX)
    icmp, quoted = parse_icmp(message)
    assert icmp.rest == struct.pack("!HH", 0, 1400) and quoted == original[:len(quoted)]
    assert reference_checksum(message) == 0


@pytest.mark.parametrize("size", [48, 1232, 1233, 9000])
def test_icmp6_error_quotes_up_to_1280_total(size):
    src, dst = b"\1" * 16, b"\2" * 16
    original = build_ipv6(dst, src, IPPROTO_UDP, bytes(size - 40))
    message = build_icmp6_error(src, dst, ICMPV6_PKT_TOOBIG, 0, original,
                                struct.pack("!I", 1280))
    assert 40 + len(message) <= 1280
    assert len(message) == 8 + min(size, ICMP6_ERROR_QUOTE_MAX)
    assert l4_checksum6(src, dst, IPPROTO_ICMPV6, message) == 0


# ------------------------------------------------------------------ frames


@given(mac, mac, ip4, ip4, u16, u16, payload, u8)
def test_udp4_frame(dst_mac, src_mac, src, dst, sport, dport, data, ttl):
    frame = udp4_frame(dst_mac, src_mac, src, dst, sport, dport, data, ttl=ttl)
    eth, l3 = parse_ethernet(frame)
    assert (eth.dst, eth.src, eth.ethertype) == (dst_mac, src_mac, ETH_P_IP)
    ip, l4 = parse_ipv4(l3, verify_checksum=True)
    assert (ip.src, ip.dst, ip.proto, ip.ttl) == (src, dst, IPPROTO_UDP, ttl)
    assert l4 == build_udp4(src, dst, sport, dport, data)


@given(mac, mac, ip6, ip6, u16, u16, payload)
def test_udp6_frame(dst_mac, src_mac, src, dst, sport, dport, data):
    frame = udp6_frame(dst_mac, src_mac, src, dst, sport, dport, data)
    _, l3 = parse_ethernet(frame)
    ip, l4 = parse_ipv6(l3)
    assert (ip.src, ip.dst, ip.next_header, ip.hop_limit) == (src, dst, IPPROTO_UDP, 255)
    assert l4 == build_udp6(src, dst, sport, dport, data)


@given(mac, mac, ip4, ip4, u8, payload)
def test_ipv4_frame(dst_mac, src_mac, src, dst, proto, l4):
    frame = build_ipv4_frame(dst_mac, src_mac, src, dst, proto, l4)
    assert frame == build_ethernet(dst_mac, src_mac, ETH_P_IP, build_ipv4(src, dst, proto, l4))


@given(mac, mac, ip6, ip6, payload, u8)
def test_ipv6_frame(dst_mac, src_mac, src, dst, l4, hlim):
    frame = build_ipv6_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMPV6, l4, hop_limit=hlim)
    _, l3 = parse_ethernet(frame)
    assert l3 == build_ipv6(src, dst, IPPROTO_ICMPV6, l4, hop_limit=hlim)
