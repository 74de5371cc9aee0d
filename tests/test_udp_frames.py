"""Datagram frames to the guest and ICMP errors rebuilt for it: bytes in, bytes out.

`FakeTap` stands in for the tap backends: it keeps what it is given and, for
partial checksums, finishes them as the kernel would (so a wrong
pseudo-header sum shows up as a wrong checksum).  Frames are checked with
the packet codecs, checksums included.
"""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.flowheader import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, FlowHeader
from common.packet.checksum import checksum, l4_checksum4, l4_checksum6
from common.packet.icmp import parse_icmp
from common.packet.ipv4 import IPPROTO_ICMP, IPPROTO_UDP, parse_ipv4
from common.packet.ipv6 import IPPROTO_ICMPV6
from common.packet.udp import parse_udp
from common.udp.frame import DatagramWriter
from common.udp.icmperr import (
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_EE_ORIGIN_LOCAL,
    SockError,
    error_for_guest,
    parse_sock_error,
)
from tests.support import GUEST_MAC, OUR_MAC, FakeTap, parse_frame

A4 = socket.inet_pton(socket.AF_INET, "192.0.2.1")
G4 = socket.inet_pton(socket.AF_INET, "192.0.2.10")
A6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
G6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")


class Guest:
    mac = GUEST_MAC


def check_udp(frame: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ip, l4 = parse_frame(frame)
    assert (ip.src, ip.dst) == (src, dst)
    if len(src) == 4:
        assert ip.proto == IPPROTO_UDP and ip.ttl == 64 and ip.df
        assert l4_checksum4(src, dst, IPPROTO_UDP, l4) == 0
    else:
        assert ip.next_header == IPPROTO_UDP
        assert l4_checksum6(src, dst, IPPROTO_UDP, l4) == 0
    udp, payload = parse_udp(l4)
    assert (udp.sport, udp.dport) == (sport, dport)
    assert udp.checksum != 0
    return bytes(payload)


# ---------------------------------------------------------------- DatagramWriter


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("v6", [False, True])
def test_udp_frame(offload, v6):
    tap = FakeTap(offload)
    w = DatagramWriter(tap, OUR_MAC, Guest())
    src, dst = (A6, G6) if v6 else (A4, G4)
    hdr = FlowHeader(v6, PROTO_UDP, src, dst, 53, 40000)
    payload = b"answer" * 100
    view = w.udp_payload6 if v6 else w.udp_payload4
    view[:len(payload)] = payload
    assert w.send_udp(hdr, len(payload))
    assert check_udp(tap.frames[0], src, dst, 53, 40000) == payload
    if offload:
        eth_to_l4 = 14 + (40 if v6 else 20)
        assert tap.partial == [(eth_to_l4, 6)]


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(max_size=3000), v6=st.booleans(), offload=st.booleans(),
       sport=st.integers(1, 65535), dport=st.integers(1, 65535),
       src=st.binary(min_size=16, max_size=16), dst=st.binary(min_size=16, max_size=16))
def test_udp_frames_any_payload(payload, v6, offload, sport, dport, src, dst):
    tap = FakeTap(offload)
    w = DatagramWriter(tap, OUR_MAC, Guest())
    if not v6:
        src, dst = src[:4], dst[:4]
    hdr = FlowHeader(v6, PROTO_UDP, src, dst, sport, dport)
    (w.udp_payload6 if v6 else w.udp_payload4)[:len(payload)] = payload
    w.send_udp(hdr, len(payload))
    assert check_udp(tap.frames[0], src, dst, sport, dport) == payload


def test_largest_datagrams_fit():
    tap = FakeTap()
    w = DatagramWriter(tap, OUR_MAC, Guest())
    assert len(w.udp_payload4) == 65535 - 28
    assert len(w.udp_payload6) == 65535 - 8
    big = bytes(range(256)) * 255 + b"x" * (65507 - 65280)
    w.udp_payload4[:len(big)] = big
    w.send_udp(FlowHeader(False, PROTO_UDP, A4, G4, 1, 2), len(big))
    assert check_udp(tap.frames[0], A4, G4, 1, 2) == big


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("v6", [False, True])
def test_icmp_echo_reply_frame(offload, v6):
    tap = FakeTap(offload)
    w = DatagramWriter(tap, OUR_MAC, Guest())
    src, dst = (A6, G6) if v6 else (A4, G4)
    msg = struct.pack("!BBHHH", 129 if v6 else 0, 0, 0xDEAD, 0x1234, 7) + b"ping data" * 7
    (w.l4_6 if v6 else w.l4_4)[:len(msg)] = msg
    hdr = FlowHeader(v6, PROTO_ICMPV6 if v6 else PROTO_ICMP, src, dst)
    w.send_icmp(hdr, len(msg))
    ip, l4 = parse_frame(tap.frames[0])
    assert (ip.src, ip.dst) == (src, dst)
    if v6:
        assert ip.next_header == IPPROTO_ICMPV6
        assert l4_checksum6(src, dst, IPPROTO_ICMPV6, l4) == 0
    else:
        assert ip.proto == IPPROTO_ICMP
        assert checksum(l4) == 0
    assert l4[4:] == msg[4:] and l4[:2] == msg[:2]


def test_destination_mac_follows_the_guest():
    tap = FakeTap()
    guest = Guest()
    w = DatagramWriter(tap, OUR_MAC, guest)
    hdr = FlowHeader(False, PROTO_UDP, A4, G4, 1, 2)
    w.send_udp(hdr, 0)
    guest.mac = bytes.fromhex("020000000001")
    w.send_udp(hdr, 0)
    assert tap.frames[0][:6] == GUEST_MAC and tap.frames[1][:6] == guest.mac


# ---------------------------------------------------------------- ICMP errors


# what recvmsg(MSG_ERRQUEUE) returned on this kernel for a port unreachable on 127.0.0.1
# and on ::1: struct sock_extended_err, then the offender's sockaddr
ERR4 = bytes.fromhex("6f000000020303000000000000000000" "020000007f0000010000000000000000")
ERR6 = bytes.fromhex("6f000000030104000000000000000000"
                     "0a000000000000000000000000000000000000000000000100000000")


def test_parse_sock_error():
    e4 = parse_sock_error(0, 11, ERR4)
    assert e4 == SockError(111, SO_EE_ORIGIN_ICMP, 3, 3, 0,
                           socket.inet_pton(socket.AF_INET, "127.0.0.1"))
    e6 = parse_sock_error(41, 25, ERR6)
    assert e6 == SockError(111, SO_EE_ORIGIN_ICMP6, 1, 4, 0,
                           socket.inet_pton(socket.AF_INET6, "::1"))
    assert parse_sock_error(1, 11, ERR4) is None           # not an IP_RECVERR message
    assert parse_sock_error(0, 11, ERR4[:10]) is None


def test_port_unreachable_v4_quotes_the_guests_datagram():
    err = parse_sock_error(0, 11, ERR4)
    msg = error_for_guest(False, err, guest=G4, remote=A4, guest_port=40000,
                          remote_port=9, payload=b"hello", guest_mtu=65520)
    assert checksum(msg) == 0
    icmp, body = parse_icmp(msg)
    assert (icmp.type, icmp.code, icmp.rest) == (3, 3, b"\0\0\0\0")
    ip, l4 = parse_ipv4(body, verify_checksum=True)
    assert (ip.src, ip.dst, ip.proto) == (G4, A4, IPPROTO_UDP)
    udp, payload = parse_udp(l4)
    assert (udp.sport, udp.dport, udp.length) == (40000, 9, 13)
    assert bytes(payload) == b"hello"


def test_port_unreachable_v6_from_the_sender():
    err = parse_sock_error(41, 25, ERR6)
    sender = socket.inet_pton(socket.AF_INET6, "2001:db8::99")
    msg = error_for_guest(True, err, guest=G6, remote=A6, guest_port=40000, remote_port=9,
                          payload=b"x" * 2000, guest_mtu=65520, sender=sender)
    assert l4_checksum6(sender, G6, IPPROTO_ICMPV6, msg) == 0
    assert len(msg) == 1280 - 40                       # the minimum MTU bounds the quote
    icmp, body = parse_icmp(msg)
    assert (icmp.type, icmp.code) == (1, 4)
    # the quote is cut short, so its header's length is not what is left: read it by hand
    assert body[6] == IPPROTO_UDP and (bytes(body[8:24]), bytes(body[24:40])) == (G6, A6)
    assert struct.unpack_from("!H", body, 4)[0] == 2008
    assert struct.unpack_from("!HH", body, 40) == (40000, 9)


def test_fragmentation_needed_reports_mtu_capped_to_the_guest():
    err = SockError(90, SO_EE_ORIGIN_ICMP, 3, 4, 9000, None)
    msg = error_for_guest(False, err, guest=G4, remote=A4, guest_port=1, remote_port=2,
                          payload=b"", guest_mtu=1500)
    icmp, _ = parse_icmp(msg)
    assert icmp.rest == struct.pack("!HH", 0, 1500)
    err6 = SockError(90, SO_EE_ORIGIN_ICMP6, 2, 0, 1400, None)
    msg6 = error_for_guest(True, err6, guest=G6, remote=A6, guest_port=1, remote_port=2,
                           payload=b"", guest_mtu=65520)
    assert parse_icmp(msg6)[0].rest == struct.pack("!I", 1400)


def test_local_and_unknown_errors_are_not_forwarded():
    local = SockError(90, SO_EE_ORIGIN_LOCAL, 0, 0, 1500, None)
    assert error_for_guest(False, local, guest=G4, remote=A4, guest_port=1, remote_port=2,
                           payload=b"", guest_mtu=1500) is None
    redirect = SockError(0, SO_EE_ORIGIN_ICMP, 5, 0, 0, None)
    assert error_for_guest(False, redirect, guest=G4, remote=A4, guest_port=1,
                           remote_port=2, payload=b"", guest_mtu=1500) is None
    wrong_family = SockError(111, SO_EE_ORIGIN_ICMP, 3, 3, 0, None)
    assert error_for_guest(True, wrong_family, guest=G6, remote=A6, guest_port=1,
                           remote_port=2, payload=b"", guest_mtu=1500) is None
