"""ARP responder: request frames in, reply frames out, parsed back with the codecs."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import arp
from common.conf import Config, build_config
from common.guest import GuestState
from common.hostinfo import FamilyInfo, HostInfo
from common.packet.arp import ARPOP_REPLY, ARPOP_REQUEST, Arp, build_arp, parse_arp
from common.packet.ethernet import ETH_P_ARP, ETH_P_IP, build_ethernet, parse_ethernet
from common.record import replace

OUR_MAC = bytes.fromhex("021122334455")
GUEST_MAC = bytes.fromhex("52540000abcd")
BCAST = b"\xff" * 6


def ip(text: str) -> bytes:
    return IPv4Address(text).packed


def make_conf(opts: dict | None = None) -> Config:
    host = HostInfo(v4=FamilyInfo("eth0", "192.0.2.1", (("192.0.2.10", 24),)), v6=None,
                    macs={"eth0": "02:11:22:33:44:55"}, nameservers=("192.0.2.53",))
    return build_config("passt", opts or {}, host)


@pytest.fixture
def conf() -> Config:
    return make_conf()


@pytest.fixture
def guest(conf) -> GuestState:
    return GuestState(conf)


def request(target: str, sender: str = "192.0.2.10", sha: bytes = GUEST_MAC,
            src_mac: bytes | None = None, op: int = ARPOP_REQUEST) -> bytes:
    body = build_arp(Arp(op, sha, ip(sender), b"\0" * 6, ip(target)))
    return build_ethernet(BCAST, src_mac or sha, ETH_P_ARP, body)


def check_reply(frames: list[bytes], target: str, conf: Config, sender: str = "192.0.2.10",
                to_mac: bytes = GUEST_MAC) -> None:
    assert len(frames) == 1
    eth, payload = parse_ethernet(frames[0])
    assert (eth.dst, eth.src, eth.ethertype) == (to_mac, conf.our_mac, ETH_P_ARP)
    assert len(frames[0]) == 14 + 28
    assert parse_arp(payload) == Arp(ARPOP_REPLY, conf.our_mac, ip(target), to_mac, ip(sender))


@pytest.mark.parametrize("target", ["192.0.2.1", "192.0.2.2", "192.0.2.200", "192.0.2.254"])
def test_answers_gateway_and_subnet(conf, guest, target):
    check_reply(arp.handle(request(target), conf, guest), target, conf)


def test_reply_is_bytes_from_memoryview_input(conf, guest):
    frames = arp.handle(memoryview(bytearray(request("192.0.2.1"))), conf, guest)
    assert isinstance(frames[0], bytes)


@pytest.mark.parametrize("target", [
    "192.0.2.10",         # the guest's own address
    "192.0.2.0",          # network address
    "192.0.2.255",        # broadcast address
    "198.51.100.7",       # off the subnet
    "10.0.0.1",
])
def test_not_answered(conf, guest, target):
    assert arp.handle(request(target), conf, guest) == []


def test_observed_guest_address_not_answered(conf, guest):
    # the guest uses another address than the one we assign: announce it, then ask for it
    assert arp.handle(request("192.0.2.77", sender="192.0.2.77"), conf, guest) == []
    assert guest.addr4 == IPv4Address("192.0.2.77")
    # the configured address is still the guest's too
    assert arp.handle(request("192.0.2.10", sender="192.0.2.77"), conf, guest) == []
    check_reply(arp.handle(request("192.0.2.1", sender="192.0.2.77"), conf, guest),
                "192.0.2.1", conf, sender="192.0.2.77")


def test_subnet_of_observed_address_answered(conf, guest):
    # a guest configured by hand in another /24 still finds its neighbours
    frames = arp.handle(request("203.0.113.1", sender="203.0.113.9"), conf, guest)
    check_reply(frames, "203.0.113.1", conf, sender="203.0.113.9")
    assert arp.handle(request("203.0.113.9", sender="192.0.2.10"), conf, guest) == []


def test_gratuitous_and_announcement_ignored(conf, guest):
    assert arp.handle(request("192.0.2.10", sender="192.0.2.10"), conf, guest) == []
    assert arp.handle(request("192.0.2.50", sender="192.0.2.50"), conf, guest) == []
    reply_op = request("192.0.2.10", sender="192.0.2.10", op=ARPOP_REPLY)
    assert arp.handle(reply_op, conf, guest) == []


def test_address_probe_not_answered(conf, guest):
    # RFC 5227 probe for an address the guest would like: no conflict from us
    assert arp.handle(request("192.0.2.10", sender="0.0.0.0"), conf, guest) == []
    assert arp.handle(request("192.0.2.99", sender="0.0.0.0"), conf, guest) == []
    assert guest.addr4 == IPv4Address("192.0.2.10")


def test_qrap_probe_answered(conf, guest):
    # what qrap sends to find a live passt socket: all-zero addresses, broadcast source
    probe = build_ethernet(BCAST, BCAST, ETH_P_ARP,
                           build_arp(Arp(ARPOP_REQUEST, b"\0" * 6, b"\0" * 4, b"\0" * 6,
                                         b"\0" * 4)))
    frames = arp.handle(probe, conf, guest)
    assert len(frames) == 1
    eth, payload = parse_ethernet(frames[0])
    assert eth.dst == BCAST and eth.src == conf.our_mac
    assert parse_arp(payload).op == ARPOP_REPLY
    assert not guest.mac_seen                     # zero MAC not taken as the guest's


@pytest.mark.parametrize("opts, target", [
    ({"map_guest_addr": ["169.254.1.2"]}, "169.254.1.2"),
    ({"dns_forward": ["169.254.1.1"]}, "169.254.1.1"),
    ({"map_host_loopback": ["198.51.100.1"]}, "198.51.100.1"),
])
def test_mapped_addresses_answered(opts, target):
    conf = make_conf(opts)
    guest = GuestState(conf)
    check_reply(arp.handle(request(target), conf, guest), target, conf)


def test_our_addr_without_gateway():
    host = HostInfo(v4=FamilyInfo("eth0", None, (("192.0.2.10", 24),)), v6=None)
    conf = build_config("passt", {}, host)
    assert conf.ip4.gateway is None
    guest = GuestState(conf)
    target = str(conf.ip4.our_addr)
    check_reply(arp.handle(request(target), conf, guest), target, conf)


def test_observes_guest_mac_and_address(conf, guest):
    assert not guest.mac_seen
    arp.handle(request("192.0.2.1", sender="192.0.2.33"), conf, guest)
    assert guest.mac == GUEST_MAC and guest.addr4 == IPv4Address("192.0.2.33")


def test_reply_goes_to_sender_hardware_address(conf, guest):
    other = bytes.fromhex("52540000beef")
    frames = arp.handle(request("192.0.2.1", sha=other, src_mac=GUEST_MAC), conf, guest)
    check_reply(frames, "192.0.2.1", conf, to_mac=other)


def test_no_ipv4_no_answer(conf, guest):
    conf6 = replace(conf, ip4=None)
    assert arp.handle(request("192.0.2.1"), conf6, guest) == []


@pytest.mark.parametrize("mangle", [
    lambda f: f[:41],                                   # truncated
    lambda f: f[:12] + b"\x08\x00" + f[14:],           # not ARP
    lambda f: f[:14] + b"\x00\x06" + f[16:],           # IEEE 802 hardware
    lambda f: f[:20] + b"\x00\x03" + f[22:],           # RARP request
    lambda f: b"",
])
def test_malformed_ignored(conf, guest, mangle):
    assert arp.handle(mangle(request("192.0.2.1")), conf, guest) == []


def test_trailing_padding_accepted(conf, guest):
    frame = request("192.0.2.1") + b"\0" * 18            # padded to 60 bytes
    check_reply(arp.handle(frame, conf, guest), "192.0.2.1", conf)


@given(st.binary(max_size=80))
def test_never_raises(data):
    conf = make_conf()
    guest = GuestState(conf)
    frame = build_ethernet(BCAST, GUEST_MAC, ETH_P_ARP, data)
    for f in (frame, data, build_ethernet(BCAST, GUEST_MAC, ETH_P_IP, data)):
        for reply in arp.handle(f, conf, guest):
            assert parse_arp(parse_ethernet(reply)[1]).op == ARPOP_REPLY
