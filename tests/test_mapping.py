"""mapping.forbidden: the addresses no guest flow may use, whatever the mapping."""

from __future__ import annotations

import socket

import pytest

from common.mapping import forbidden


def _p(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


@pytest.mark.parametrize(("src", "dst"), [
    ("10.0.0.2", "127.0.0.1"), ("10.0.0.2", "127.255.0.9"), ("10.0.0.2", "0.0.0.0"),
    ("10.0.0.2", "0.1.2.3"), ("127.0.0.1", "10.0.0.1"), ("0.0.0.0", "10.0.0.1"),
    ("fd00::2", "::1"), ("fd00::2", "::"), ("fd00::2", "::ffff:127.0.0.1"),
    ("fd00::2", "::ffff:0.0.0.0"), ("fd00::2", "::ffff:10.0.0.1"), ("fd00::2", "::127.0.0.1"),
    ("::1", "fd00::1"), ("::", "fd00::1"), ("::ffff:10.0.0.2", "fd00::1"),
])
def test_forbidden(src, dst):
    assert forbidden(":" in src, _p(src), _p(dst))


@pytest.mark.parametrize(("src", "dst"), [
    ("10.0.0.2", "10.0.0.1"), ("10.0.0.2", "192.0.2.1"), ("10.0.0.2", "1.0.0.1"),
    ("fd00::2", "fd00::1"), ("fe80::2", "fe80::1"), ("2001:db8::2", "64:ff9b::7f00:1"),
])
def test_allowed(src, dst):
    assert not forbidden(":" in src, _p(src), _p(dst))


def test_guest_never_claims_loopback_or_mapped_addresses():
    """pasta delivers host loopback clients to the guest's address: never a loopback."""
    from ipaddress import IPv4Address, IPv6Address

    from common.guest import GuestState
    from tests.support import make_conf

    conf = make_conf()
    g = GuestState(conf)
    a4, a6 = g.addr4, g.addr6
    for bad in ("127.0.0.1", "0.0.0.0", "0.1.2.3", "224.0.0.1"):
        g.observe_addr4(IPv4Address(bad))
    for bad in ("::1", "::", "::ffff:127.0.0.1", "::127.0.0.1", "ff02::1"):
        g.observe_addr6(IPv6Address(bad))
    assert (g.addr4, g.addr6) == (a4, a6)
    g.observe_addr4(IPv4Address("192.0.2.7"))
    g.observe_addr6(IPv6Address("2001:db8::7"))
    assert (str(g.addr4), str(g.addr6)) == ("192.0.2.7", "2001:db8::7")
