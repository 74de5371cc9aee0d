"""passt without QEMU: a test client speaks the stream protocol to a real passt session.

The session runs in-process on its own loop thread, with a Config built from
a made-up host (no discovery, nothing leaves the process: ARP, DHCP and NDP
are answered by passt itself).  The client sends frames merged into one
write and split across several, and checks the replies byte for byte with
the codecs, checksums included.  Also here: the socket path rules, qrap's
probe against our passt, and qrap's command-line patching.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from common.dhcp import DHCPACK, DHCPDISCOVER, DHCPOFFER, DHCPREQUEST, parse_dhcp
from common.packet.arp import ARPOP_REPLY, ARPOP_REQUEST, Arp, build_arp, parse_arp
from common.packet.checksum import l4_checksum4, l4_checksum6
from common.packet.ethernet import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, build_ethernet, parse_ethernet
from common.packet.frames import build_ipv6_frame, udp4_frame
from common.packet.icmp import ND_ROUTER_ADVERT, ND_ROUTER_SOLICIT, build_icmp6, parse_icmp
from common.packet.ipv4 import IPPROTO_UDP, parse_ipv4
from common.packet.ipv6 import IPPROTO_ICMPV6, parse_ipv6
from common.packet.udp import parse_udp
from common.process import SetupError
from passt import qrap, sockpath
from passt.session import Session
from tests.support import (
    BCAST,
    DNS4,
    GUEST_LL,
    GUEST_MAC,
    GW4,
    HOST4,
    HOST6,
    OUR_MAC,
    make_conf,
    wait_until,
)

# ---------------------------------------------------------------- frames the client sends


def arp_request(target: str) -> bytes:
    body = build_arp(Arp(ARPOP_REQUEST, GUEST_MAC, IPv4Address(HOST4).packed, bytes(6),
                         IPv4Address(target).packed))
    return build_ethernet(BCAST, GUEST_MAC, ETH_P_ARP, body)


def dhcp(msg_type: int, options: bytes = b"", xid: int = 0x1234ABCD) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s", 1, 1, 6, 0, xid, 0, 0, bytes(4), bytes(4),
                         bytes(4), bytes(4), GUEST_MAC + bytes(10))
    msg = (header + bytes(192) + b"\x63\x82\x53\x63" + bytes((53, 1, msg_type)) + options
           + b"\xff")
    return udp4_frame(BCAST, GUEST_MAC, bytes(4), b"\xff" * 4, 68, 67, msg)


def router_solicitation() -> bytes:
    dst = IPv6Address("ff02::2").packed
    l4 = build_icmp6(GUEST_LL.packed, dst, ND_ROUTER_SOLICIT, 0, bytes(4),
                     bytes((1, 1)) + GUEST_MAC)
    return build_ipv6_frame(b"\x33\x33" + dst[12:], GUEST_MAC, GUEST_LL.packed, dst,
                            IPPROTO_ICMPV6, l4)


def prefixed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


# ---------------------------------------------------------------- the client


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(5)
        self.data = b""
        self.frames: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _parse(self) -> None:
        while len(self.data) >= 4:
            (n,) = struct.unpack_from("!I", self.data)
            if len(self.data) < 4 + n:
                return
            self.frames.append(self.data[4:4 + n])
            self.data = self.data[4 + n:]

    def wait(self, pred, timeout: float = 5.0) -> bytes:
        """The first frame received (now or later) for which pred(frame) holds."""
        end = time.monotonic() + timeout
        while True:
            for i, f in enumerate(self.frames):
                if pred(f):
                    del self.frames[i]
                    return f
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame; got {len(self.frames)} others")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise AssertionError("passt closed the connection")
            self.data += chunk
            self._parse()

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return True
        except (TimeoutError, ConnectionResetError):
            return False

    def close(self) -> None:
        self.sock.close()


def is_arp(f: bytes) -> bool:
    return f[12:14] == b"\x08\x06"


def is_dhcp(f: bytes) -> bool:
    return f[12:14] == b"\x08\x00" and f[23] == IPPROTO_UDP and f[34:38] == b"\x00\x43\x00\x44"


def is_ra(f: bytes) -> bool:
    return f[12:14] == b"\x86\xdd" and f[20] == IPPROTO_ICMPV6 and f[54] == ND_ROUTER_ADVERT


# ---------------------------------------------------------------- checking replies


def check_arp_reply(f: bytes, target: str) -> None:
    eth, payload = parse_ethernet(f)
    assert (eth.dst, eth.src, eth.ethertype) == (GUEST_MAC, OUR_MAC, ETH_P_ARP)
    assert parse_arp(payload) == Arp(ARPOP_REPLY, OUR_MAC, IPv4Address(target).packed,
                                     GUEST_MAC, IPv4Address(HOST4).packed)


def check_dhcp_reply(f: bytes, msg_type: int) -> None:
    eth, l3 = parse_ethernet(f)
    assert eth.ethertype == ETH_P_IP and eth.src == OUR_MAC
    ip, l4 = parse_ipv4(l3, verify_checksum=True)
    assert ip.proto == IPPROTO_UDP
    assert l4_checksum4(ip.src, ip.dst, IPPROTO_UDP, l4) == 0        # the guest verifies it
    udp, payload = parse_udp(l4)
    msg = parse_dhcp(payload)
    assert msg.msg_type == msg_type
    assert msg.yiaddr == IPv4Address(HOST4).packed
    assert msg.options[1] == b"\xff\xff\xff\x00"
    assert msg.options[3] == IPv4Address(GW4).packed
    assert msg.options[6] == IPv4Address(DNS4).packed


def check_ra(f: bytes) -> None:
    eth, l3 = parse_ethernet(f)
    assert eth.ethertype == ETH_P_IPV6 and eth.src == OUR_MAC
    ip, l4 = parse_ipv6(l3)
    assert ip.hop_limit == 255
    assert l4_checksum6(ip.src, ip.dst, IPPROTO_ICMPV6, l4) == 0
    icmp, body = parse_icmp(l4)
    assert icmp.type == ND_ROUTER_ADVERT
    assert IPv6Address(HOST6).packed[:8] in bytes(body)           # the prefix to SLAAC from


# ---------------------------------------------------------------- the server


class Server:
    def __init__(self, path: Path, one_off: bool = False, **opts) -> None:
        self.session = Session(make_conf(**opts), socket_path=str(path), one_off=one_off)
        self.session.setup()
        self.session.start()
        # stop() comes from another thread: a timer makes the loop notice it soon
        self.session.loop.call_every(0.05, lambda: None)
        self.path = str(path)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.session.run()

    def stop(self) -> None:
        self.session.loop.stop(0)
        self.thread.join(5)
        self.session.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "passt.socket")
    yield s
    s.stop()


# ---------------------------------------------------------------- tests


def test_dhcp_arp_and_ra_with_merged_and_split_frames(server: Server) -> None:
    c = Client(server.path)
    try:
        # ARP and DHCPDISCOVER merged into one write, the length of the next frame split
        discover = prefixed(dhcp(DHCPDISCOVER))
        c.send(prefixed(arp_request(GW4)) + discover + prefixed(arp_request("192.0.2.77"))[:2])
        check_arp_reply(c.wait(is_arp), GW4)
        check_dhcp_reply(c.wait(is_dhcp), DHCPOFFER)
        # the rest of the split ARP request, then a router solicitation in three pieces
        c.send(prefixed(arp_request("192.0.2.77"))[2:])
        check_arp_reply(c.wait(is_arp), "192.0.2.77")
        rs = prefixed(router_solicitation())
        for piece in (rs[:3], rs[3:40], rs[40:]):
            c.send(piece)
            time.sleep(0.02)
        check_ra(c.wait(is_ra))
        # REQUEST for the offered address, with two ARP requests behind it in the same write
        request = dhcp(DHCPREQUEST, bytes((50, 4)) + IPv4Address(HOST4).packed
                       + bytes((54, 4)) + IPv4Address(GW4).packed)
        c.send(prefixed(request) + prefixed(arp_request(GW4)) + prefixed(arp_request(GW4)))
        check_dhcp_reply(c.wait(is_dhcp), DHCPACK)
        check_arp_reply(c.wait(is_arp), GW4)
        check_arp_reply(c.wait(is_arp), GW4)
    finally:
        c.close()


def test_periodic_ra_arrives_unasked(server: Server) -> None:
    c = Client(server.path)
    try:
        check_ra(c.wait(is_ra, timeout=3))
    finally:
        c.close()


def test_one_guest_at_a_time_then_the_next(server: Server) -> None:
    first = Client(server.path)
    first.send(prefixed(arp_request(GW4)))
    check_arp_reply(first.wait(is_arp), GW4)
    second = Client(server.path)
    assert second.closed_by_peer(), "a second guest must be turned away"
    second.close()
    first.close()
    wait_until(lambda: server.session.tap is None, what="the first guest gone")
    third = Client(server.path)
    try:
        third.send(prefixed(arp_request(GW4)))
        check_arp_reply(third.wait(is_arp), GW4)
        assert server.session.guests == 2
    finally:
        third.close()


def test_one_off_stops_when_the_guest_leaves(tmp_path: Path) -> None:
    s = Server(tmp_path / "one.socket", one_off=True)
    try:
        c = Client(s.path)
        c.send(prefixed(arp_request(GW4)))
        check_arp_reply(c.wait(is_arp), GW4)
        c.close()
        s.thread.join(5)
        assert not s.thread.is_alive() and s.code == 0
    finally:
        s.stop()
    assert not (tmp_path / "one.socket").exists()


def test_guest_closing_mid_frame_is_a_disconnect(server: Server) -> None:
    before = server.session.guests
    c = Client(server.path)
    c.send(prefixed(arp_request(GW4))[:20])
    c.close()
    wait_until(lambda: server.session.guests == before + 1 and server.session.tap is None,
               what="the guest attached and gone")
    c = Client(server.path)
    try:
        c.send(prefixed(arp_request(GW4)))
        check_arp_reply(c.wait(is_arp), GW4)
    finally:
        c.close()


def test_c_qrap_probe_is_answered(server: Server) -> None:
    c = Client(server.path)
    try:
        c.send(qrap.PROBE)
        reply = c.wait(is_arp, timeout=0.5)
        eth, payload = parse_ethernet(reply)
        arp = parse_arp(payload)
        assert arp.op == ARPOP_REPLY and arp.spa == bytes(4) and arp.sha == OUR_MAC
        # a broadcast source teaches us no guest MAC
        assert server.session.dataplane.guest.mac == BCAST
    finally:
        c.close()


def test_qrap_finds_our_passt_after_a_stale_socket(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "passt_1.socket"))     # bound, never listening: refused
    s = Server(tmp_path / "passt_3.socket")
    try:
        sock, path = qrap.find_passt(str(tmp_path / "passt_{}.socket"), count=4)
        assert path == str(tmp_path / "passt_3.socket")
        # the stream starts on a frame boundary: an ARP request now gets its reply
        c = Client.__new__(Client)
        c.sock, c.data, c.frames = sock, b"", []
        c.send(prefixed(arp_request(GW4)))
        check_arp_reply(c.wait(lambda f: is_arp(f) and f[:6] == GUEST_MAC), GW4)
        sock.close()
        with pytest.raises(qrap.QrapError):
            qrap.find_passt(str(tmp_path / "nothing_{}.socket"), count=2, timeout=0.1)
    finally:
        s.stop()
        stale.close()


# ---------------------------------------------------------------- socket paths


def test_default_path_skips_busy_and_other_and_reuses_stale(tmp_path: Path) -> None:
    template = str(tmp_path / "passt_{}.socket")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(template.format(1))
    busy.listen(1)
    Path(template.format(2)).write_text("not a socket")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(template.format(3))
    stale.close()
    try:
        sock, path = sockpath.bind_default(template, 5)
        assert path == template.format(3)
        sock.close()
        sock2, path2 = sockpath.bind_default(template, 5)
        assert path2 == template.format(3)           # left behind by us: stale again
        sock2.close()
    finally:
        busy.close()


def test_explicit_path_errors(tmp_path: Path) -> None:
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(sockpath.SocketPathError, match="not a socket"):
        sockpath.bind_explicit(str(other))
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(tmp_path / "busy"))
    busy.listen(1)
    with pytest.raises(sockpath.SocketPathError, match="in use"):
        sockpath.bind_explicit(str(tmp_path / "busy"))
    busy.close()
    with pytest.raises(sockpath.SocketPathError, match="too long"):
        sockpath.bind_explicit("/tmp/" + "x" * 200)
    with pytest.raises(sockpath.SocketPathError, match="cannot bind"):
        sockpath.bind_explicit(str(tmp_path / "no" / "such" / "dir"))


def test_qemu_hint_names_the_socket() -> None:
    text = "\n".join(sockpath.qemu_hint("/run/x.socket"))
    assert "addr.path=/run/x.socket" in text and "qrap 5" in text


# ---------------------------------------------------------------- qrap's command line


def test_qrap_keeps_a_netdev_that_names_the_fd() -> None:
    fd, cmd = qrap.command_line(["5", "qemu", "-m", "256", "-netdev", "socket,fd=5,id=n0"])
    assert fd == 5 and cmd == ["qemu", "-m", "256", "-netdev", "socket,fd=5,id=n0"]


def test_qrap_patches_another_backend() -> None:
    _, cmd = qrap.command_line(["7", "qemu", "-netdev", "user,id=n0,hostfwd=tcp::1-:2",
                                "-device", "virtio-net-pci,netdev=n0"])
    assert cmd == ["qemu", "-netdev", "socket,fd=7,id=n0", "-device", "virtio-net-pci,netdev=n0"]
    _, cmd = qrap.command_line(["5", "qemu", "-net", "nic,model=virtio", "-net", "user"])
    assert cmd == ["qemu", "-net", "nic,model=virtio", "-net", "socket,fd=5"]


def test_qrap_adds_a_backend_when_there_is_none() -> None:
    _, cmd = qrap.command_line(["5", "qemu", "-m", "256"])
    assert cmd[-4:] == ["-device", "virtio-net-pci,netdev=hostnet0",
                        "-netdev", "socket,fd=5,id=hostnet0"]


def test_qrap_without_fdnum_replaces_network_options(monkeypatch) -> None:
    monkeypatch.setattr(qrap, "find_qemu", lambda: "/usr/bin/qemu-system-x86_64")
    fd, cmd = qrap.command_line(["disk.img", "-m", "1024", "-device", "e1000,netdev=x",
                                 "-netdev", "user,id=x", "-nic", "user"])
    assert fd == 5
    assert cmd == ["/usr/bin/qemu-system-x86_64", "disk.img", "-m", "1024", "-device",
                   "virtio-net-pci,netdev=hostnet0", "-netdev", "socket,fd=5,id=hostnet0"]


def test_qrap_refuses_standard_streams() -> None:
    with pytest.raises(qrap.QrapError):
        qrap.command_line(["1", "qemu"])


# ---------------------------------------------------------------- forwarded ports


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_forwarded_ports_reach_the_guest_with_checksums(tmp_path: Path) -> None:
    tport, uport = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_DGRAM)
    s = Server(tmp_path / "fwd.socket", tcp_ports=[f"127.0.0.1/{tport}:2222"],
               udp_ports=[f"127.0.0.1/{uport}:5353"])
    try:
        # no guest yet: the host-side client is reset at once (the reset may even
        # beat connect() back, the kernel having completed the handshake already)
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", tport), timeout=5) as early:
                early.recv(10)
        c = Client(s.path)
        c.send(prefixed(arp_request(GW4)))                # teaches passt the guest's MAC
        check_arp_reply(c.wait(is_arp), GW4)
        host = socket.create_connection(("127.0.0.1", tport), timeout=5)
        syn = c.wait(lambda f: f[12:14] == b"\x08\x00" and f[23] == 6)
        eth, l3 = parse_ethernet(syn)
        ip, l4 = parse_ipv4(l3, verify_checksum=True)
        assert eth.dst == GUEST_MAC
        assert ip.src == IPv4Address(GW4).packed and ip.dst == IPv4Address(HOST4).packed
        assert l4_checksum4(ip.src, ip.dst, 6, l4) == 0
        assert struct.unpack_from("!H", l4, 2)[0] == 2222 and l4[13] & 0x02   # SYN
        host.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"hello guest", ("127.0.0.1", uport))
            dgram = c.wait(lambda f: f[12:14] == b"\x08\x00" and f[23] == IPPROTO_UDP
                           and f[36:38] == b"\x14\xe9")            # to port 5353
        eth, l3 = parse_ethernet(dgram)
        ip, l4 = parse_ipv4(l3, verify_checksum=True)
        assert l4_checksum4(ip.src, ip.dst, IPPROTO_UDP, l4) == 0
        assert bytes(parse_udp(l4)[1]) == b"hello guest"
        c.close()
    finally:
        s.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_socket_is_handed_over_never_through_a_symlink(tmp_path: Path, monkeypatch) -> None:
    """Root binds the socket, then gives it to the user it will run as. Should the
    path be a symbolic link by then (someone swapped it in the socket's directory),
    the file it points to must not change owner, and set-up fails."""
    import passt.session as session_module

    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    real_bind = session_module.bind_socket

    def bind_then_swap(path):
        listener, bound = real_bind(path)
        os.rename(bound, str(tmp_path / "moved.socket"))
        os.symlink(victim, bound)
        return listener, bound

    monkeypatch.setattr(session_module, "bind_socket", bind_then_swap)
    session = Session(make_conf(), socket_path=str(tmp_path / "passt.socket"),
                      owner=(65534, 65534))
    try:
        with pytest.raises(SetupError, match="was replaced"):
            session.setup()
    finally:
        session.close()
    assert (victim.stat().st_uid, victim.stat().st_gid) == (0, 0)
    assert (tmp_path / "passt.socket").is_symlink()
